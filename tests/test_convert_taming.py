"""Official taming checkpoints, as released (Lightning 1.0 files, both serialisations), without PyTorch.

The fixtures in tests/taming_files were written by taming's own classes (tests/make_taming_files.py, run in the
reference environment): tiny VQModel (with loss.* keys), GumbelVQ, VQSegmentationModel and Net2NetTransformers
(class-conditional, unconditional, spatial), with taming's outputs on fixed inputs. Each is read through the
documented functions (load_taming_checkpoint, load_taming_transformer) and through `launch.convert_taming` +
`launch.sample`, and compared with taming's outputs: VQ indices equal, decodes within tolerance, greedy codes
(taming's ``Net2NetTransformer.sample(..., sample=False)``; ``top_k=1`` here) equal, sampled images equal to
taming's decodes of them.

Decode tolerance: 64 float32 ulps of the largest reference value (64 * 2**-23 * max|ref|, 1.4e-5 here). The
decoder runs about a dozen 3x3 convolutions of 288-term sums; XLA and PyTorch add them in other orders, so a few
ulps per layer accumulate. Observed: 3.5e-6 (VQModel), 3.5e-6 (GumbelVQ), 3.7e-6 (segmentation).
"""
import os
import re
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common_jax.torch_io import load_torch_file, read_torch_state_dict

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = os.path.join(HERE, "taming_files")
REPO = os.path.dirname(HERE)
VQ_NAMES = ("vqgan", "gumbel", "segmentation")
N2N_NAMES = ("cin", "uncond", "sflckr")
N_LABELS = 5


def decode_tolerance(ref: np.ndarray) -> float:
    return 64 * float(np.finfo(np.float32).eps) * float(np.abs(ref).max())


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The checkpoints unpacked: name -> path (``<model>.ckpt`` zip, ``<model>_legacy.ckpt`` pre-1.6)."""
    out = tmp_path_factory.mktemp("taming_ckpts")
    with tarfile.open(os.path.join(FILES, "checkpoints.tar.xz")) as tar:
        tar.extractall(out, filter="data")
    return {n[:-5]: str(out / n) for n in os.listdir(out)}


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(FILES, "expected.npz")))


def yaml_path(name: str) -> str:
    return os.path.join(FILES, f"{name}.yaml")


def test_files_are_lightning_1_0_checkpoints_in_both_serialisations(ckpts):
    assert sorted(ckpts) == sorted(n + s for n in VQ_NAMES + N2N_NAMES for s in ("", "_legacy"))
    for name in VQ_NAMES + N2N_NAMES:
        with open(ckpts[name], "rb") as f:
            assert f.read(2) == b"PK"                         # zip archive (torch >= 1.6)
        with open(ckpts[name + "_legacy"], "rb") as f:
            assert f.read(2) == b"\x80\x02"                   # pickle protocol 2 stream (torch < 1.6)
        for path in (ckpts[name], ckpts[name + "_legacy"]):
            obj = load_torch_file(path)
            assert obj["pytorch-lightning_version"] == "1.0.8" and obj["lr_schedulers"] == []
            (cls, cb_state), = obj["callbacks"].items()       # keyed by the ModelCheckpoint class, made inert
            assert "ModelCheckpoint" in repr(cls) and cb_state["monitor"] == "val/rec_loss"
        zipped, legacy = read_torch_state_dict(ckpts[name]), read_torch_state_dict(ckpts[name + "_legacy"])
        assert sorted(zipped) == sorted(legacy)
        for k in zipped:
            np.testing.assert_array_equal(zipped[k], legacy[k], err_msg=f"{name}: {k}")
    vq = read_torch_state_dict(ckpts["vqgan"])
    assert any(k.startswith("loss.discriminator.") for k in vq)       # as released VQGANs carry them
    assert any(k.startswith("loss.perceptual_loss.lin") for k in vq)


@pytest.mark.parametrize("name,suffix", [("vqgan", ""), ("vqgan", "_legacy"), ("gumbel", "_legacy"),
                                         ("segmentation", "")])
def test_vq_models_match_taming(ckpts, expected, name, suffix):
    from vqgan_jax.convert import load_taming_checkpoint
    from vqgan_jax.label_maps import one_hot_segmentation
    model, variables = load_taming_checkpoint(ckpts[name + suffix], yaml_path(name))
    if name == "segmentation":
        x = one_hot_segmentation(jnp.asarray(expected["segmentation/maps"]), N_LABELS)
    else:
        x = jnp.asarray(expected["vqgan/images"])
    indices = model.apply(variables, x, method="encode").indices
    np.testing.assert_array_equal(indices, expected[f"{name}/indices"])
    ref = expected[f"{name}/decoded"]
    decoded = np.asarray(model.apply(variables, indices, method="decode_code"))
    np.testing.assert_allclose(decoded, ref, rtol=0, atol=decode_tolerance(ref))


def greedy_codes(sampler, expected, name):
    e = lambda k: expected[f"{name}/{k}"]  # noqa: E731
    n = len(e("greedy_codes"))
    kw = {}
    if name == "cin":
        kw["labels"] = np.arange(n)
    elif name == "sflckr":
        cond = sampler.encode_condition(expected["segmentation/maps"])     # the maps taming's cond stage encoded
        np.testing.assert_array_equal(cond, e("cond_codes"))
        kw["cond_codes"] = np.asarray(cond)
    return np.asarray(sampler.sample_codes(jax.random.key(0), n, top_k=1, **kw))


def test_net2net_greedy_codes_match_taming(ckpts, expected):
    """The documented function on the legacy file; the other transformers go through launch.sample below."""
    from transformer_jax.net2net import load_taming_transformer
    tt = load_taming_transformer(ckpts["cin_legacy"], yaml_path("cin"))
    np.testing.assert_array_equal(greedy_codes(tt.sampler(), expected, "cin"), expected["cin/greedy_codes"])


@pytest.fixture(scope="module")
def converted(ckpts, tmp_path_factory):
    """Every fixture converted with launch.convert_taming.convert (the zip or the legacy file, alternately)."""
    from launch.convert_taming import convert
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for i, name in enumerate(VQ_NAMES + N2N_NAMES):
        out[name] = convert(ckpts[name + ("_legacy" if i % 2 else "")], yaml_path(name), str(root / name))
    return root, out


@pytest.mark.slow  # the converted fixture: both taming checkpoints converted to workdirs
def test_converted_workdirs_are_ordinary_workdirs(converted):
    from common_jax.pretrained import load_workdir
    root, out = converted
    assert out["cin"] == [str(root / "cin"), str(root / "cin_first_stage")]
    assert out["sflckr"] == [str(root / "sflckr"), str(root / "sflckr_first_stage"), str(root / "sflckr_cond_stage")]
    config, state, step = load_workdir(root / "sflckr")
    assert step == 0 and config.cond.kind == "spatial" and config.stage_one_fingerprint
    assert config.first_stage.workdir == str(root / "sflckr_first_stage")
    assert config.cond_stage.workdir == str(root / "sflckr_cond_stage")
    seg_config, _, _ = load_workdir(root / "segmentation")
    assert seg_config.task == "segmentation" and seg_config.model.in_channels == N_LABELS
    for name in VQ_NAMES + N2N_NAMES:
        assert os.path.isfile(root / name / "config.json")


@pytest.mark.slow  # the converted fixture: both taming checkpoints converted to workdirs
def test_converted_workdirs_hold_what_the_documented_functions_load(ckpts, converted):
    """Bit for bit: a workdir's weights are those load_taming_checkpoint / load_taming_transformer give."""
    from common_jax.pretrained import load_workdir
    from transformer_jax.net2net import load_taming_transformer
    from vqgan_jax.convert import load_taming_checkpoint
    root, _ = converted

    def same(workdir, variables):
        got, want = flat(load_workdir(workdir)[1]["params"]), flat(variables["params"])
        assert sorted(got) == sorted(want), workdir
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{workdir}: {k}")

    for name in VQ_NAMES:
        same(root / name, load_taming_checkpoint(ckpts[name], yaml_path(name))[1])
    for name in N2N_NAMES:
        tt = load_taming_transformer(ckpts[name + "_legacy"], yaml_path(name))
        same(root / name, tt.gpt_variables)
        same(root / f"{name}_first_stage", tt.first_stage_variables)
        if name == "sflckr":
            same(root / f"{name}_cond_stage", tt.cond_stage_variables)


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_png(path):
    from PIL import Image
    return np.asarray(Image.open(path))


def taming_uint8(images):
    from common_jax.metrics import to_uint8
    return to_uint8(images)


@pytest.mark.slow  # entry points as subprocesses
def test_launch_sample_on_converted_workdirs(converted, expected, tmp_path):
    """Samplers of converted workdirs (what launch.sample builds) draw taming's greedy codes with --top_k=1, and
    launch.sample's writers (class grids, an unconditional grid, --segmentation maps) write taming's decodes of
    them, pixel for pixel; a sliding-window image too."""
    from common_jax.metrics import save_png
    from launch.sample import write_class_grids, write_large, write_spatial
    from transformer_jax.sampler import Sampler, sampling_options
    root, _ = converted
    opts = sampling_options(1, 1.0, 1.0, 0.0)
    cin = Sampler.from_workdirs(str(root / "cin"))
    paths = write_class_grids(cin, str(tmp_path / "cin"), 1, [], opts, 0, 4)
    want = taming_uint8(expected["cin/greedy_images"])
    assert len(paths) == 4
    for c, path in enumerate(paths):       # a one-image grid: the image inside a 2-pixel border
        np.testing.assert_array_equal(read_png(path)[2:-2, 2:-2], want[c])
    big = write_large(cin, str(tmp_path / "cin_large"), 16, 32, [1], opts, 0)     # 8x16 codes, window 8x8
    assert read_png(big[0]).shape == (16, 32, 3) and len(np.unique(read_png(big[0]))) > 16

    np.testing.assert_array_equal(greedy_codes(cin, expected, "cin"), expected["cin/greedy_codes"])
    uncond = Sampler.from_workdirs(str(root / "uncond"))
    np.testing.assert_array_equal(greedy_codes(uncond, expected, "uncond"), expected["uncond/greedy_codes"])
    paths = write_class_grids(uncond, str(tmp_path / "uncond"), 1, [], opts, 0, 1)
    np.testing.assert_array_equal(read_png(paths[0])[2:-2, 2:-2], taming_uint8(expected["uncond/greedy_images"])[0])

    sflckr = Sampler.from_workdirs(str(root / "sflckr"))
    np.testing.assert_array_equal(greedy_codes(sflckr, expected, "sflckr"), expected["sflckr/greedy_codes"])
    for i in range(2):
        seg = str(tmp_path / f"map{i}.png")
        save_png(seg, expected["segmentation/maps"][i].astype(np.uint8))
        paths = write_spatial(sflckr, str(tmp_path / f"sflckr{i}"), seg, 1, opts, 0, 1)
        np.testing.assert_array_equal(read_png(paths[1])[2:-2, 2:-2],
                                      taming_uint8(expected["sflckr/greedy_images"])[i])


@pytest.mark.slow  # entry points as subprocesses
def test_command_lines(ckpts, tmp_path):
    """The entry points as a user runs them: convert, then sample; a bad file is one error line."""
    env = {k: v for k, v in os.environ.items() if k != "TAMING_JAX_TRACEBACK"}
    start = lambda *args: subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,  # noqa: E731
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    w = tmp_path / "cin"
    good = start("launch.convert_taming", f"--ckpt={ckpts['cin']}", f"--yaml={yaml_path('cin')}", f"--workdir={w}")
    # A VQGAN yaml given with the transformer's checkpoint: one line naming the files and keys.
    bad = start("launch.convert_taming", f"--ckpt={ckpts['cin']}", f"--yaml={yaml_path('vqgan')}",
                f"--workdir={tmp_path / 'bad'}")
    out, _ = good.communicate(timeout=600)
    assert good.returncode == 0, out[-3000:]
    sample = start("launch.sample", f"--workdir={w}", f"--out={tmp_path / 'out'}", "--per_class=2",
                   "--classes=0,3", "--top_k=1", "--batch_size=4")
    out, _ = bad.communicate(timeout=600)
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert bad.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert len(lines) == 1 and ckpts["cin"] in lines[0] and yaml_path("vqgan") in lines[0], out[-3000:]
    assert "state dict does not match the config" in lines[0] and "missing key '" in lines[0]
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")
    out, _ = sample.communicate(timeout=600)
    assert sample.returncode == 0, out[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["class_0000.png", "class_0003.png"]


def _edited_yaml(tmp_path, name, edit):
    from vqgan_jax.convert import read_yaml
    import yaml
    cfg = read_yaml(yaml_path(name))
    edit(cfg["model"])
    path = str(tmp_path / f"{name}_edited.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def test_bad_inputs_are_one_clear_error_and_nothing_is_lost(ckpts, tmp_path):
    from launch.convert_taming import convert
    w = str(tmp_path / "w")
    unsupported = _edited_yaml(tmp_path, "vqgan", lambda m: m.update(target="taming.models.vqgan.VQNoDiscModel"))
    with pytest.raises(ValueError, match=re.escape(f"{unsupported}: model.target 'taming.models.vqgan.VQNoDiscModel' "
                                                   "is not supported")):
        convert(ckpts["vqgan"], unsupported, w)
    coord = _edited_yaml(tmp_path, "uncond", lambda m: m["params"].update(
        cond_stage_config={"target": "taming.modules.misc.coord.CoordStage", "params": {"n_embed": 32}}))
    with pytest.raises(ValueError, match="unsupported cond_stage_config target 'taming.modules.misc.coord"):
        convert(ckpts["uncond"], coord, w)
    wider = _edited_yaml(tmp_path, "vqgan", lambda m: m["params"].update(n_embed=64))
    with pytest.raises(ValueError) as e:
        convert(ckpts["vqgan_legacy"], wider, w)
    msg = str(e.value)
    assert "\n" not in msg and ckpts["vqgan_legacy"] in msg and wider in msg
    assert "key 'quantize.embedding.weight': expected shape (64, 8), found (32, 8)" in msg
    with pytest.raises(ValueError) as e:      # another model's file: many problems, still one line
        convert(ckpts["cin"], yaml_path("vqgan"), w)
    assert "\n" not in str(e.value) and "problems): missing key '" in str(e.value) and "more" in str(e.value)
    gpt = _edited_yaml(tmp_path, "cin", lambda m: m["params"]["transformer_config"]["params"].update(n_layer=3))
    with pytest.raises(ValueError) as e:
        convert(ckpts["cin"], gpt, w)
    assert "\n" not in str(e.value) and "missing key 'transformer.blocks.2.ln1.weight'" in str(e.value)
    assert not os.path.exists(w)
    # A workdir that already holds checkpoints is refused before anything is written; its checkpoint stays.
    first = convert(ckpts["uncond"], yaml_path("uncond"), w)
    before = {d: sorted(os.listdir(os.path.join(d, "checkpoints"))) for d in first}
    with pytest.raises(ValueError, match=re.escape(f"{w}_first_stage already holds checkpoints")):
        convert(ckpts["cin"], yaml_path("cin"), w + "_first_stage")
    with pytest.raises(ValueError, match=re.escape(f"{w} already holds checkpoints")):
        convert(ckpts["cin"], yaml_path("cin"), w)
    assert {d: sorted(os.listdir(os.path.join(d, "checkpoints"))) for d in first} == before
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        convert(str(tmp_path / "nothing.ckpt"), yaml_path("cin"), str(tmp_path / "w2"))

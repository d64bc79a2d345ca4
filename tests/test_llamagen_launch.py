"""LlamaGen's released files through this project: read without PyTorch, converted by launch.convert_llamagen into
ordinary workdirs, sampled by launch.sample with guidance; the LLaMA config's sharded step and exact resume.

The files in tests/llamagen_files were written by torch 2.14's ``torch.save`` in the layouts LlamaGen's scripts
use (tests/make_llamagen_files.py): ``{"model": sd}`` (the releases), a bare FSDP-consolidated state dict,
``{"module": sd}`` and ``{"ema": sd, "steps", "args"}``. Their tensors are the golden tiny models' state dicts
(tests/golden/llamagen), stored with the tensor bytes zeroed and put back here; the sha256 of the result is the
one torch's output had, so the reader sees exactly the bytes torch wrote.
"""
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _xla_flags import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FILES = os.path.join(HERE, "llamagen_files")
GOLDEN = os.path.join(HERE, "golden", "llamagen")
GPT_FILES = ("c2i_tiny.pt", "c2i_tiny_consolidated.pth", "c2i_tiny_module.pt", "c2i_tiny_ema.pt")
# The golden models' LlamaGen ModelArgs beyond launch.convert_llamagen's defaults (llamagen_*_small.json).
GPT_ARGS = dict(dim=128, vocab_size=512, multiple_of=32, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
VQ_ARGS = dict(ch=32, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], z_channels=32)
CONVERT = dict(image_size=32, gpt_model="tiny", vq_model="VQ-16", codebook_size=256, codebook_embed_dim=8,
               num_classes=10, cls_token_num=1, gpt_args=GPT_ARGS, vq_args=VQ_ARGS)


def golden(name):
    with np.load(os.path.join(GOLDEN, name + ".npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def restore(name: str, out_dir: str) -> str:
    """``name`` from files.tar.xz with its tensor entries refilled from the golden arrays; checked against the
    sha256 of the file torch wrote."""
    manifest = json.load(open(os.path.join(FILES, "manifest.json")))["files"][name]
    with tarfile.open(os.path.join(FILES, "files.tar.xz")) as tar:
        blob = bytearray(tar.extractfile(name).read())
    sets = {"gpt": golden("llamagen_gpt_small"), "vq": golden("llamagen_vq_small")}
    with zipfile.ZipFile(io.BytesIO(bytes(blob))) as zf:
        for info in zf.infolist():
            if info.filename not in manifest["fill"]:
                continue
            set_name, key = manifest["fill"][info.filename]
            data = np.ascontiguousarray(sets[set_name]["state_dict/" + key]).astype("<" + sets[set_name][
                "state_dict/" + key].dtype.str[1:]).tobytes()
            name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            assert len(data) == info.file_size, (name, info.filename)
            blob[start:start + len(data)] = data
    assert hashlib.sha256(blob).hexdigest() == manifest["sha256"], f"{name}: not the bytes torch wrote"
    path = os.path.join(out_dir, name)
    with open(path, "wb") as f:
        f.write(blob)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("llamagen_files")
    names = json.load(open(os.path.join(FILES, "manifest.json")))["files"]
    return {n: restore(n, str(out)) for n in names}


def test_release_layouts_read_without_torch(files):
    """Each layout gives the golden state dict: the first of model/module/state_dict/ema, or the bare dict."""
    from common_jax.torch_io import read_torch_state_dict
    from launch.convert_llamagen import read_weights
    want = {k[len("state_dict/"):]: v for k, v in golden("llamagen_gpt_small").items() if k.startswith("state_dict/")}
    for name in GPT_FILES:
        got = read_weights(files[name])
        assert sorted(got) == sorted(want), name
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")
        # the project's generic reader too (the EMA entry by name: it looks under state_dict/model/module)
        generic = read_torch_state_dict(files[name], "ema" if name.endswith("_ema.pt") else None)
        assert sorted(generic) == sorted(want) and all(np.array_equal(generic[k], want[k]) for k in want), name
    vq = read_weights(files["vq_tiny.pt"])
    assert "quantize.codebook_used" in vq and "encoder.conv_in.weight" in vq


@pytest.fixture(scope="module")
def converted(files, tmp_path_factory):
    """Each GPT layout converted (with the tokenizer file) by launch.convert_llamagen.convert."""
    from launch.convert_llamagen import convert
    root = tmp_path_factory.mktemp("converted")
    return {name: convert(files[name], files["vq_tiny.pt"], str(root / name.split(".")[0]), **CONVERT)
            for name in GPT_FILES}


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_converted_workdirs_are_ordinary_workdirs(converted):
    from common_jax.pretrained import load_workdir
    first, first_stage = converted[GPT_FILES[0]]
    assert first_stage == first + "_first_stage"
    config, state, step = load_workdir(first)
    assert step == 0 and config.gpt.block == "llama" and config.stage_one_fingerprint
    assert config.first_stage.workdir == first_stage and tuple(config.data.code_grid) == (8, 8)
    assert (config.cond.kind, config.cond.n_classes, config.cond.class_offset, config.cond.null_token) == \
        ("class", 10, 0, 10)
    vq_config, _, _ = load_workdir(first_stage)
    assert vq_config.model.arch == "llamagen"
    want = flat(state["params"])
    for name in GPT_FILES[1:]:        # every layout: the same weights
        got = flat(load_workdir(converted[name][0])[1]["params"])
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")


def test_converted_gpt_draws_llamagens_greedy_tokens_with_guidance(converted):
    """The Sampler of the converted workdir (what launch.sample builds) holds a GPT whose greedy tokens under
    guidance 4 (the null class as the unconditional prefix, as the Sampler builds it) are LlamaGen's."""
    from transformer_jax.sampler import Sampler
    from transformer_jax.sampling import sample
    g = golden("llamagen_gpt_small")
    sampler = Sampler.from_workdirs(converted[GPT_FILES[0]][0])
    labels = g["input/labels"][:2]
    prefix = sampler.conditioning.sampling_prefix(2, dict(labels=labels, cond_codes=None))
    uncond = sampler.conditioning.null_prefix(prefix)
    np.testing.assert_array_equal(np.asarray(uncond), [[10], [10]])
    tokens = sample(sampler.gpt, sampler.gpt_vars, prefix, 64, jax.random.key(0), top_k=1, guidance_scale=4.0,
                    uncond_prefix=uncond)
    np.testing.assert_array_equal(np.asarray(tokens), g["output/greedy_cfg4"])


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TAMING_JAX_TRACEBACK"}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def convert_args(gpt, vq, workdir, **over):
    a = dict(CONVERT, **over)
    args = [f"--gpt_ckpt={gpt}", f"--vq_ckpt={vq}", f"--workdir={workdir}"]
    args += [f"--{k}={v}" for k, v in a.items() if k not in ("gpt_args", "vq_args")]
    args += [f"--gpt_arg={k}={v}" for k, v in a["gpt_args"].items()]
    args += [f"--vq_arg={k}={v}" for k, v in a["vq_args"].items()]
    return args


def test_command_lines_convert_and_sample_with_guidance(files, converted, tmp_path):
    """As a user runs them: convert the release file, sample it with --guidance_scale (greedy): the PNGs are the
    Sampler's guided samples, pixel for pixel; a file without weights and a wrong --gpt_model are one line each,
    naming the file (and the key), with nothing written."""
    from PIL import Image

    from common_jax.metrics import image_grid
    from transformer_jax.sampler import Sampler
    w = tmp_path / "cli"
    good = run("launch.convert_llamagen", *convert_args(files["c2i_tiny.pt"], files["vq_tiny.pt"], w))
    empty = run("launch.convert_llamagen", *convert_args(files["no_weights.pt"], files["vq_tiny.pt"],
                                                          tmp_path / "empty"))
    out, _ = good.communicate(timeout=600)
    assert good.returncode == 0, out[-3000:]
    sample = run("launch.sample", f"--workdir={w}", f"--out={tmp_path / 'out'}", "--per_class=2", "--classes=4,9",
                 "--top_k=1", "--guidance_scale=4", "--batch_size=4")
    wrong = run("launch.convert_llamagen", *convert_args(files["c2i_tiny.pt"], files["vq_tiny.pt"],
                                                          tmp_path / "wrong", gpt_model="GPT-B", gpt_args={}))
    for proc, needle in ((empty, f"{files['no_weights.pt']} holds no state dict"),
                         (wrong, f"{files['c2i_tiny.pt']} does not hold --gpt_model=GPT-B")):
        text, _ = proc.communicate(timeout=600)
        lines = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        assert proc.returncode == 1 and "Traceback" not in text, text[-3000:]
        assert len(lines) == 1 and needle in lines[0], text[-3000:]
        if proc is wrong:
            assert "(the file holds n_layer=2, dim=128, vocab_size=512)" in lines[0], lines[0]
            assert "missing key 'layers.2.attention.wqkv.weight'" in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "empty") and not os.path.exists(tmp_path / "wrong")
    out, _ = sample.communicate(timeout=600)
    assert sample.returncode == 0, out[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["class_0004.png", "class_0009.png"]
    sampler = Sampler.from_workdirs(str(w))
    images = sampler.sample(jax.random.key(0), 4, np.repeat([4, 9], 2), batch_size=4, top_k=1, guidance_scale=4.0,
                            progress=False)
    for k, c in enumerate((4, 9)):
        png = np.asarray(Image.open(tmp_path / "out" / f"class_{c:04d}.png"))
        np.testing.assert_array_equal(png, image_grid(images[2 * k:2 * k + 2], 2))


# ------------------------------------------------------------------------------------------- training the config
def llama_config(**over):
    from configs import transformer_llamagen_tiny
    from _stage_main import apply_overrides
    c = transformer_llamagen_tiny.get_config()
    c.data.global_batch_size = 8
    return apply_overrides(c, over)


def test_class_ids_index_the_blocks_class_table():
    """The prefix of the LLaMA block is class ids in its own table (not code tokens): the class kind fits it only
    with offset 0, the table's class count and the null class as null_token; other kinds are refused. One line
    each, before anything is built."""
    from transformer_jax.train import TransformerTask
    TransformerTask(llama_config())          # 10 classes + the null class 10; vocabulary of 128 codes
    cases = [({"cond.class_offset": 128}, "cond.class_offset=128 must be 0"),
             ({"cond.n_classes": 7}, "cond.n_classes=7 disagrees with the block's class table of 11 rows"),
             ({"cond.null_token": 127}, "cond.null_token=127 must be the null class 10"),
             ({"cond.kind": "unconditional"}, "cond.kind='unconditional' does not fit this GPT")]
    for over, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            TransformerTask(llama_config(**over))


def test_weight_decay_as_llamagen_applies_it():
    """configs/transformer_llamagen_*: AdamW (0.9, 0.95), decay 0.05 on every parameter of two or more
    dimensions (embeddings and class table included, norms not), clip 1.0; taming's rule stays the default."""
    from transformer_jax.train import DECAY_RULES, TransformerTask
    c = llama_config()
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.grad_clip) == (0.9, 0.95, 0.05, 1.0)
    params = jax.eval_shape(TransformerTask(c).init_state, jax.random.key(0)).params
    decayed = {jax.tree_util.keystr(p): DECAY_RULES[c.optim.weight_decay_on](p, x)
               for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert decayed["['tok_emb']"] and any(v for k, v in decayed.items() if "cls" in k), decayed
    assert not any(v for k, v in decayed.items() if "norm" in k), decayed


@pytest.fixture(scope="module")
def one_device_step():
    from test_transformer_train import run_steps
    from transformer_jax.train import TransformerTask
    from common_jax.mesh import make_mesh
    return run_steps(TransformerTask(llama_config(**DROPOUT)), make_mesh(data=1, devices=jax.devices()[:1]))


DROPOUT = {"gpt.embd_pdrop": 0.1, "gpt.resid_pdrop": 0.1, "gpt.block_options.ffn_pdrop": 0.1}


@pytest.mark.parametrize("shape,axis", [((4, 2, 1), "fsdp"), ((4, 1, 2), "model")])
def test_sharded_llama_step_equals_one_device(one_device_step, shape, axis):
    """The tiny LLaMA config's train step (with dropout and class dropout) on 8 simulated devices, data x fsdp
    and data x model, equals the one-device step; its weights do shard over the second axis."""
    import flax.linen as nn

    from common_jax.mesh import LOGICAL_AXIS_RULES, make_mesh
    from common_jax.training import state_shardings
    from test_transformer_train import run_steps
    from transformer_jax.train import TransformerTask
    task = TransformerTask(llama_config(**DROPOUT))
    mesh = make_mesh(*shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        sh = state_shardings(task, jax.eval_shape(task.init_state, jax.random.key(0)), mesh)
    assert any(axis in str(s.spec) for s in jax.tree.leaves(sh.params)), "no weight is sharded over " + axis
    ref_params, ref_metrics = one_device_step
    params, metrics = run_steps(task, mesh)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path_factory):
    """tests/test_gpt_resume.py's kill/resume check on the LLaMA config (dropout and class dropout on)."""
    import _stage_main as stage
    root = tmp_path_factory.mktemp("llama_resume")
    photos, vq_dir = str(root / "photos"), str(root / "vqgan")
    stage.write_stage_one_workdir(photos, vq_dir, step=1)
    over = {"config": "transformer_llamagen_tiny", "data.data_dir": photos, "first_stage.workdir": vq_dir,
            "total_steps": 6, "checkpoint.every": 2, **DROPOUT}
    keys = stage.assert_resume_bit_identical(stage.kill_resume_and_reference("gpt", root, over, 2), 6)
    assert any("opt_state" in k for k in keys) and any("cls_emb" in k for k in keys)


def test_cfg_interval_reaches_the_sampler(converted, monkeypatch):
    """launch.sample's --cfg_interval (LlamaGen's limit on guided tokens) goes through sampling_options and the
    Sampler to transformer_jax.sampling.sample; without a guidance scale it is refused."""
    import transformer_jax.sampler as sampler_lib
    opts = sampler_lib.sampling_options(0, 1.0, 1.0, 4.0, 20)
    assert opts["cfg_interval"] == 20 and "cfg_interval" not in sampler_lib.sampling_options(0, 1.0, 1.0, 4.0)
    with pytest.raises(ValueError, match="cfg_interval=20 limits classifier-free guidance"):
        sampler_lib.sampling_options(0, 1.0, 1.0, 0.0, 20)
    seen = {}

    def fake_sample(model, variables, prefix, steps, rng, **kw):
        seen.update(kw)
        return jnp.zeros((prefix.shape[0], steps), jnp.int32)
    monkeypatch.setattr(sampler_lib, "sample", fake_sample)
    sampler = sampler_lib.Sampler.from_workdirs(converted[GPT_FILES[0]][0])
    sampler.sample_codes(jax.random.key(0), 2, np.array([1, 2]), **opts)
    assert seen["cfg_interval"] == 20 and seen["guidance_scale"] == 4.0
    np.testing.assert_array_equal(np.asarray(seen["uncond_prefix"]), [[10], [10]])


def test_demo_flags_pick_the_configs_and_a_preempted_stage_stops_the_demo(tmp_path):
    """launch.demo --gpt_block / --quantizer choose configs/transformer_llamagen_tiny.py and vqgan_tiny_lfq.py; a
    stage one stopped by preemption (SIGTERM) ends the demo there (stage two does not train on a half-trained
    tokenizer). The stages are stand-ins here, in a process of its own (launch.demo sets up its host memory and
    flags on import)."""
    code = "\n".join([
        "import sys, vqgan_jax.train, transformer_jax.train",
        "from common_jax.training import RunResult",
        "calls = []",
        "vqgan_jax.train.train = lambda c, w: calls.append(('vqgan', c.model.quantizer.kind)) or "
        "RunResult(None, 7, {}, {}, True)",
        "transformer_jax.train.train = lambda c, w: calls.append(('gpt', c.gpt.block)) or "
        "RunResult(None, 3, {}, {}, False)",
        "from launch.demo import demo_configs, run_demo",
        "vq, gpt = demo_configs(sys.argv[1], 10, 10, 8, 'llama', 'lfq')",
        "print('configs', vq.model.quantizer.kind, gpt.gpt.block, gpt.gpt.n_embd)",
        "print('summary', run_demo(sys.argv[1], 10, 10, 2, 8, 2, 'llama', 'lfq'), calls)"])
    env = dict(os.environ, XLA_FLAGS=xla_flags())
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "demo")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "configs lfq llama 64" in out.stdout, out.stdout
    assert "summary {'preempted': 'vqgan'} [('vqgan', 'lfq')]" in out.stdout, out.stdout


def test_bad_keys_files_and_workdirs_are_one_line_each(files, converted, tmp_path):
    """A --gpt_key the file lacks, the two files swapped, a wrong --image_size, a workdir that holds checkpoints:
    one line naming the file (and key) each, and nothing written."""
    from launch.convert_llamagen import convert, read_weights
    with pytest.raises(ValueError, match=re.escape(f"{files['c2i_tiny.pt']} has no state dict under 'ema'; its "
                                                   "entries: ['model']")):
        read_weights(files["c2i_tiny.pt"], "ema")
    w = str(tmp_path / "w")
    with pytest.raises(ValueError) as e:
        convert(files["vq_tiny.pt"], files["c2i_tiny.pt"], w, **CONVERT)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{files['c2i_tiny.pt']} does not hold the tokenizer")
    assert "state dict does not match the config" in str(e.value) and "missing key 'decoder." in str(e.value)
    with pytest.raises(ValueError, match=re.escape("--image_size=30 must be a positive multiple of the tokenizer's "
                                                   "downsampling factor 4")):
        convert(files["c2i_tiny.pt"], files["vq_tiny.pt"], w, **dict(CONVERT, image_size=30))
    assert not os.path.exists(w) and not os.path.exists(w + "_first_stage")
    done = converted[GPT_FILES[0]][0]
    before = sorted(os.listdir(os.path.join(done, "checkpoints")))
    with pytest.raises(ValueError, match=re.escape(f"{done} already holds checkpoints")):
        convert(files["c2i_tiny.pt"], files["vq_tiny.pt"], done, **CONVERT)
    assert sorted(os.listdir(os.path.join(done, "checkpoints"))) == before

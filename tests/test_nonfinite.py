"""Weights holding NaN (a run that diverged) are refused wherever a workdir is read: stage two (and its
pre-encoding), the Sampler and eval_fid, with one line naming the workdir, the step and the first bad array; stage
two warns when the pre-encoded codes use a sliver of the codebook (a collapsed stage one)."""
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import _stage_main as stage
from _xla_flags import xla_flags
from common_jax import checkpoint as ckpt
from common_jax import pretrained
from common_jax.config_utils import config_to_dict
from common_jax.pretrained import NonFiniteWeightsError, load_workdir, nonfinite_leaves
from common_jax.training import jit_init
from transformer_jax import codes as codes_lib
from transformer_jax.codes_dataset import write_codes_dataset
from transformer_jax.sampler import Sampler
from transformer_jax.train import TransformerTask
from vqgan_jax.train import VQGANTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save(workdir, config, state, step=7):
    manager = ckpt.make_manager(str(workdir), async_save=False)
    try:
        ckpt.save(manager, step, state, {"config": config_to_dict(config)}, None, force=True)
        manager.wait_until_finished()
    finally:
        manager.close()


def with_leaf(state, name, fn):
    """``state`` with the leaf whose path ends in ``name`` replaced by ``fn(leaf)``."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(x) if jax.tree_util.keystr(p).endswith(name) else x, state)


def one_nan(x):
    return x.reshape(-1).at[0].set(jnp.nan).reshape(x.shape)    # a single element, as a first bad step leaves


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Freshly initialised tiny workdirs (stage two only needs frozen weights): healthy ones, and copies with one
    NaN in one array, as a run that diverged just before its checkpoint would leave them."""
    root = tmp_path_factory.mktemp("nonfinite")
    photos = str(root / "photos")
    vq_cfg = stage.vqgan_config(photos)
    vq_state = jit_init(VQGANTask(vq_cfg).init_state)(jax.random.key(0))
    save(root / "vq", vq_cfg, vq_state)
    save(root / "vq_nan", vq_cfg, with_leaf(vq_state, ".params['decoder']['conv_out']['kernel']", one_nan))
    # Every codebook row alike: each image encodes to code 0 only, as after a codebook collapse.
    save(root / "vq_collapsed", vq_cfg,
         with_leaf(vq_state, ".params['quantize']['embedding']", lambda e: jnp.broadcast_to(e[:1], e.shape)))
    gpt_cfg = stage.gpt_config(photos, str(root / "vq"))
    gpt_state = jit_init(TransformerTask(gpt_cfg).init_state)(jax.random.key(0))
    save(root / "gpt", gpt_cfg, gpt_state)
    save(root / "gpt_nan", gpt_cfg, with_leaf(gpt_state, ".params['ln_f']['scale']", one_nan))
    on_nan = ml_collections.ConfigDict(gpt_cfg.to_dict())
    on_nan.first_stage.workdir = str(root / "vq_nan")
    save(root / "gpt_on_nan_vq", on_nan, gpt_state)
    floats = lambda s: sum(jnp.issubdtype(x.dtype, jnp.inexact) for x in jax.tree.leaves(s))  # noqa: E731
    return dict(root=root, photos=photos, vq_cfg=vq_cfg, gpt_cfg=gpt_cfg, vq_arrays=floats(vq_state),
                gpt_arrays=floats(gpt_state))


def refusal(runs, what):
    """The one line that refuses the NaN workdir ``what`` (vq_nan / gpt_nan)."""
    arrays, first = ((runs["vq_arrays"], "params/decoder/conv_out/kernel") if what == "vq_nan"
                     else (runs["gpt_arrays"], "params/ln_f/scale"))
    return (f"{runs['root'] / what} (checkpoint step 7) holds non-finite weights: NaN or Inf in 1 of {arrays} arrays "
            f"(first: {first}); the run diverged before this checkpoint was written")


def test_nonfinite_leaves_finds_nan_and_inf_on_host_and_on_device(monkeypatch):
    tree = {"a": np.ones(3, np.float32), "b": {"c": np.array([1.0, np.inf]), "d": jnp.array([0, 5])},
            "e": jnp.array([np.nan, 1.0], jnp.bfloat16), "f": jnp.zeros((2, 2))}
    assert nonfinite_leaves(tree) == (["b/c", "e"], 4)       # the int leaf is not counted
    assert nonfinite_leaves({"a": np.ones(3), "n": 3}) == ([], 1)
    # Accelerator-resident leaves go through one jitted reduction; the same answer.
    monkeypatch.setattr(pretrained, "_on_host", lambda x: False)
    assert nonfinite_leaves(tree) == (["b/c", "e"], 4)


def test_load_workdir_refuses_a_nan_checkpoint_in_one_line(runs):
    with pytest.raises(NonFiniteWeightsError) as e:
        load_workdir(runs["root"] / "vq_nan")
    assert str(e.value).startswith(refusal(runs, "vq_nan")) and "\n" not in str(e.value), e.value
    config, _, step = load_workdir(runs["root"] / "vq")
    assert step == 7 and "task" in config


def test_sampler_refuses_a_nan_gpt_and_a_nan_vqgan(runs):
    root = runs["root"]
    with pytest.raises(NonFiniteWeightsError) as e:
        Sampler.from_workdirs(str(root / "gpt_nan"))
    assert str(e.value).startswith(refusal(runs, "gpt_nan")), e.value
    with pytest.raises(NonFiniteWeightsError) as e:     # the stage-one workdir its config names
        Sampler.from_workdirs(str(root / "gpt_on_nan_vq"))
    assert str(e.value).startswith(refusal(runs, "vq_nan")), e.value
    with pytest.raises(NonFiniteWeightsError) as e:     # or one given instead
        Sampler.from_workdirs(str(root / "gpt"), first_stage_workdir=str(root / "vq_nan"))
    assert str(e.value).startswith(refusal(runs, "vq_nan")), e.value
    assert Sampler.from_workdirs(str(root / "gpt")).n_codes == runs["vq_cfg"].model.quantizer.n_embed


def test_stage_two_refuses_a_nan_stage_one_before_any_work(runs, tmp_path):
    # Stage two (and its pre-encoding, which encodes with these weights) refuses before anything is written.
    from transformer_jax.train import train
    config = stage.gpt_config(runs["photos"], str(runs["root"] / "vq_nan"))
    with pytest.raises(NonFiniteWeightsError) as e:
        train(config, str(tmp_path / "gpt"))
    assert str(e.value).startswith(refusal(runs, "vq_nan")), e.value
    assert not os.path.exists(tmp_path / "gpt") and not os.path.exists(runs["photos"])


def eval_fid(*args):
    p = subprocess.run([sys.executable, "-m", "launch.eval_fid", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, XLA_FLAGS=xla_flags(), TF_CPP_MIN_LOG_LEVEL="3"))
    assert p.returncode == 1, p.stderr[-3000:]
    return p.stderr.strip().splitlines()[-1]


def test_eval_fid_refuses_a_nan_gpt_and_a_nan_vqgan_in_one_line(runs, tmp_path):
    # Refused while the models load, before the Inception network (a path that does not exist here) is read.
    root = runs["root"]
    common = [f"--inception_weights={tmp_path}/not_read.npz", f"--data_dir={tmp_path}", "--dataset=not_read"]
    last = eval_fid("--mode=samples", f"--workdir={tmp_path}/s", f"--transformer_workdir={root}/gpt_nan", *common)
    assert last.startswith("error: " + refusal(runs, "gpt_nan")), last
    last = eval_fid("--mode=reconstruction", f"--workdir={tmp_path}/r", f"--vqgan_workdir={root}/vq_nan", *common)
    assert last.startswith("error: " + refusal(runs, "vq_nan")), last
    assert sorted(os.listdir(tmp_path / "s")) == sorted(os.listdir(tmp_path / "r")) == []


def codes_dataset(data_dir, name, codes):
    write_codes_dataset(data_dir, name, "train",
                        ({"codes": c, "label": np.int32(0)} for c in np.asarray(codes, np.int32)))


def test_collapsed_codes_warn_and_healthy_ones_do_not(tmp_path, caplog):
    rng = np.random.default_rng(0)
    codes_dataset(tmp_path, "codes_collapsed", np.zeros((40, 8, 8)))
    codes_dataset(tmp_path, "codes_few", rng.integers(0, 12, (40, 8, 8)))       # 12 of 1024: above 1%
    codes_dataset(tmp_path, "codes_healthy", rng.integers(0, 1024, (40, 8, 8)))
    assert codes_lib.codebook_usage(str(tmp_path), "codes_collapsed", 1024) == (1, 40)
    assert codes_lib.codebook_usage(str(tmp_path), "codes_few", 1024, max_examples=5) == (12, 5)
    with caplog.at_level(logging.WARNING):
        assert codes_lib.warn_if_collapsed(str(tmp_path), "codes_collapsed", 1024, 0.01)
        assert not codes_lib.warn_if_collapsed(str(tmp_path), "codes_few", 1024, 0.01)
        assert not codes_lib.warn_if_collapsed(str(tmp_path), "codes_healthy", 1024, 0.01)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert ("the pre-encoded train codes (codes_collapsed) use 1 of the 1024 codebook entries (0.10%, in 40 "
            "examples), fewer than data.min_codebook_usage=0.01 of them") in warnings[0], warnings
    assert codes_lib.warn_if_collapsed(str(tmp_path), "codes_few", 1024, 0.05)      # the threshold is the config's
    with pytest.raises(ValueError, match=r"data.min_codebook_usage must be a fraction in \[0, 1\], got 5"):
        codes_lib.warn_if_collapsed(str(tmp_path), "codes_few", 1024, 5)


def test_stage_two_warns_on_codes_of_a_collapsed_stage_one(runs, tmp_path, monkeypatch, caplog):
    # Stage two up to its training loop, on the codes of a stage one whose codebook rows are all alike.
    from transformer_jax import train as train_lib
    monkeypatch.setattr(train_lib.training, "run", lambda *a, **k: "trained")
    config = stage.gpt_config(str(tmp_path / "photos"), str(runs["root"] / "vq_collapsed"))
    config.data.builtin_crops_per_photo = 2
    with caplog.at_level(logging.WARNING):
        assert train_lib.train(config, str(tmp_path / "gpt")) == "trained"
    warnings = [r.getMessage() for r in caplog.records if "codebook entries" in r.getMessage()]
    assert len(warnings) == 1 and "use 1 of the 128 codebook entries" in warnings[0], warnings

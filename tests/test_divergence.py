"""Divergence: a non-finite loss or gradient norm stops the run with one line before any checkpoint of that
state is written, keep-N rotation never drops the last good checkpoint, and ``max_skipped_steps`` skips a
bounded number of bad steps. The issue's case (a healthy stage-one workdir resumed at a huge learning rate)
runs once through the real entry point."""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import _stage_main as stage
import toy_task
from common_jax import checkpoint as ckpt
from common_jax.training import TrainingDiverged, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(workdir) -> list[int]:
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def _saved_state(workdir, step: int) -> dict:
    """Every array of checkpoint ``step`` (restored whole onto one device), by path."""
    manager = ckpt.make_manager(workdir, read_only=True, async_save=False)
    try:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                              manager.item_metadata(step)["state"])
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    finally:
        manager.close()
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _assert_all_finite(workdir, step: int) -> None:
    bad = [k for k, v in _saved_state(workdir, step).items()
           if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    assert not bad, f"checkpoint {step} holds non-finite arrays: {bad[:5]}"


def test_huge_learning_rate_stops_before_saving_and_keeps_the_good_checkpoints(tmp_path):
    # A healthy run to step 4 (checkpoints 2 and 4, keep=2), resumed with a learning rate so large that the
    # loss overflows within a step or two: before, the NaN states were saved and rotation deleted 2 and 4.
    run(toy_task.toy_config(4, every=2), tmp_path, toy_task.ToyTask(), toy_task.ToyLoader(16), tensorboard=False)
    assert _steps(tmp_path) == [2, 4]
    with pytest.raises(TrainingDiverged) as info:
        run(toy_task.toy_config(20, every=2), tmp_path, toy_task.ToyTask(lr=1e30), toy_task.ToyLoader(16),
            tensorboard=False)
    line = str(info.value)
    assert "\n" not in line
    m = re.fullmatch(r"training diverged at step (\d+): (.+) \(non-finite\); no checkpoint of the diverged state "
                     r"was written; the newest good checkpoint is step (\d+) in (\S+); lower the learning rate.*",
                     line)
    assert m, line
    bad_step, what, good, where = int(m[1]), m[2], int(m[3]), m[4]
    assert re.match(r"(loss|grad_norm) is (nan|inf|-inf)", what), what
    assert where == os.path.join(tmp_path, "checkpoints")
    steps = _steps(tmp_path)
    assert good == max(steps) < bad_step <= 20
    assert len(steps) == 2  # keep=2: the two newest good ones
    for s in steps:
        _assert_all_finite(tmp_path, s)


def test_divergence_right_after_a_save_keeps_that_save(tmp_path):
    # NaN at step 7, just after the (asynchronous) save of 6; it is seen at step 8, before 8 is saved (the
    # next log step would be 10: the record is read before every save, not only when logging).
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 7: loss is nan, grad_norm is nan "
                                               r"\(non-finite\);.* the newest good checkpoint is step 6 in "):
        run(toy_task.toy_config(12, every=2, log_every=5), tmp_path, toy_task.ToyTask(nan_at=(7,)),
            toy_task.ToyLoader(16), tensorboard=False)
    assert _steps(tmp_path) == [4, 6]
    _assert_all_finite(tmp_path, 6)


def test_skipped_steps_leave_the_state_unchanged_and_are_bounded(tmp_path):
    cfg = toy_task.toy_config(3, every=1, max_skipped_steps=1)
    res = run(cfg, tmp_path, toy_task.ToyTask(nan_at=(3,)), toy_task.ToyLoader(16), tensorboard=False)
    assert res.step == 3 and res.skipped_steps == 1 and int(res.state.step) == 3
    before, after = _saved_state(tmp_path, 2), _saved_state(tmp_path, 3)
    assert sorted(before) == sorted(after)
    for k in before:
        if k != "['step']":
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert int(after["['step']"]) == 3 and ckpt.latest_meta(tmp_path)["skipped_steps"] == 1
    # The count is kept across a resume: a second bad step is one more than max_skipped_steps=1 allows.
    with pytest.raises(TrainingDiverged, match=r"^training diverged: 2 steps of this run had non-finite values, "
                                               r"more than max_skipped_steps=1 \(the last at step 5: loss is nan"
                                               r".* the newest good checkpoint is step 4 in "):
        run(toy_task.toy_config(8, every=1, max_skipped_steps=1), tmp_path, toy_task.ToyTask(nan_at=(5,)),
            toy_task.ToyLoader(16), tensorboard=False)
    assert _steps(tmp_path) == [3, 4]


@pytest.mark.slow  # a real stage-one process: start-up and one compile of the VQGAN step
def test_stage_one_at_a_huge_learning_rate_exits_with_one_line(tmp_path):
    """The issue's reproduction through ``python -m launch.train_vqgan``: rc 1, one error line, the checkpoint
    written before the learning rate changed kept and finite."""
    from common_jax import datasets
    photos, vq = str(tmp_path / "photos"), str(tmp_path / "vq")
    datasets.prepare_builtin_photos(photos, crop_size=32, crops_per_photo=64)
    # A finite (freshly initialised) model at step 0, made smaller than configs/vqgan_tiny to compile faster.
    small = {"model.ch_mult": (1, 2), "model.attn_resolutions": (16,), "loss.disc_ndf": 8,
             "data.global_batch_size": 8}
    stage.save_fresh_stage_one(stage.vqgan_config(photos, **small), vq, step=0)
    argv = [sys.executable, "-m", "launch.train_vqgan", f"--workdir={vq}", f"--config.data.data_dir={photos}",
            *[f"--config.{k}={v}" for k, v in small.items()],
            "--config.optim.base_learning_rate=1e3", "--config.total_steps=12", "--config.log_every=2",
            "--config.checkpoint.every=2", "--config.checkpoint.keep=2", "--config.eval_every=0",
            "--config.image_every=0", "--config.tensorboard=False"]
    env = {k: v for k, v in os.environ.items() if k != "TAMING_JAX_TRACEBACK"}
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1], out[-3000:]
    m = re.match(r"error: training diverged at step (\d+): .*(loss|grad_norm) is (nan|inf|-inf).*\(non-finite\); "
                 r"no checkpoint of the diverged state was written; the newest good checkpoint is step (\d+) in ",
                 errors[0])
    assert m, errors[0]
    steps = _steps(vq)
    assert int(m[4]) == max(steps) < int(m[1]), (steps, errors[0])
    assert 0 in steps or len(steps) == 2, steps  # keep=2 drops a good one only for two newer good ones
    for s in steps:
        _assert_all_finite(vq, s)


@pytest.mark.parametrize("stage", ["vqgan", "segmentation", "transformer"])
def test_every_stage_reports_the_checked_loss_and_gradient_norm(stage):
    """Without its gradient norm a step whose loss is still finite but whose gradients are not would be saved
    (stage one at a huge learning rate does exactly that at its second step). Traced only, not compiled."""
    from configs import transformer_tiny, vqgan_segmentation_tiny, vqgan_tiny
    from common_jax.training import _checked
    if stage == "transformer":
        from transformer_jax.train import TransformerTask
        cfg = transformer_tiny.get_config()
        cfg.gpt.update(dict(n_layer=1, n_head=2, n_embd=32))
        task = TransformerTask(cfg)
        batch = {"codes": jax.ShapeDtypeStruct((2, *cfg.data.code_grid), np.int32),
                 "label": jax.ShapeDtypeStruct((2,), np.int32)}
        want = {"loss", "grad_norm"}
    elif stage == "segmentation":
        from vqgan_jax.segmentation import SegmentationVQTask
        task = SegmentationVQTask(vqgan_segmentation_tiny.get_config())
        batch = {"segmentation": jax.ShapeDtypeStruct((2, 32, 32), np.int32)}
        want = {"total_loss", "grad_norm"}
    else:
        from vqgan_jax.train import VQGANTask
        task = VQGANTask(vqgan_tiny.get_config())
        batch = {"image": jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)}
        want = {"total_loss", "disc_loss", "grad_norm", "disc_grad_norm"}
    state = jax.eval_shape(task.init_state, jax.random.key(0))
    _, metrics = jax.eval_shape(task.train_step, state, batch, jax.random.key(1))
    assert want <= set(_checked(metrics)), sorted(metrics)

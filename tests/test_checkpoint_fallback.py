"""A damaged newest checkpoint (truncated array file, deleted state/_METADATA, an empty stray step folder, a
missing item) makes the run resume from the newest complete one: one warning line names the folder and the
reason, the damaged folder is moved aside (never deleted), and its step can be written again. Only when no
checkpoint is readable does the run stop, with one error naming each step, and then nothing is moved."""
import glob
import logging as pylogging
import os
import shutil
import sys
import types

import jax
import numpy as np
import pytest

import toy_task
from common_jax import checkpoint as ckpt
from common_jax.config_utils import ConfigMismatchError
from common_jax.mesh import make_mesh
from common_jax.training import run, state_shardings

FIRST, TOTAL = 6, 8  # checkpoints 2, 4, 6 (keep=3); the resumed runs go on to 8


def _cfg(total):
    cfg = toy_task.toy_config(total, every=2)
    cfg.checkpoint.keep = 3
    return cfg


def _flat(state):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """A workdir with checkpoints 2, 4, 6, and the state an undisturbed run reaches at TOTAL from it."""
    base = tmp_path_factory.mktemp("base")
    run(_cfg(FIRST), base, toy_task.ToyTask(), toy_task.ToyLoader(16), tensorboard=False)
    ref = tmp_path_factory.mktemp("ref")
    shutil.copytree(base, ref, dirs_exist_ok=True)
    res = run(_cfg(TOTAL), ref, toy_task.ToyTask(), toy_task.ToyLoader(16), tensorboard=False)
    return base, _flat(res.state)


def _copy(base, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(base, workdir)
    return workdir


def _truncate_arrays(step_dir):
    """Cut every array data file of the state in half (what a full disk or an interrupted copy leaves)."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


DAMAGE = {
    "truncated_array": (6, _truncate_arrays, "OUT_OF_RANGE"),
    "missing_state_metadata": (6, lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
                               "state/_METADATA missing"),
    "stray_empty_folder": (999, os.makedirs, "no checkpoint items in it (an empty or stray folder)"),
    "missing_meta_item": (6, lambda d: shutil.rmtree(os.path.join(d, "meta")), "item meta missing"),
}


def _resume_logged(workdir, capfd):
    res, records = toy_task.run_logged(_cfg(TOTAL), workdir, tensorboard=False)
    return res, records, capfd.readouterr().err


# TensorStore reads still in flight when orbax gives up report 'Event loop is closed' as unraisable exceptions
# (printed as tracebacks outside pytest); here they would be warnings, made errors.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back(workdirs, tmp_path, capfd, name):
    base, reference = workdirs
    workdir = _copy(base, tmp_path)
    step, damage, reason = DAMAGE[name]
    damaged = os.path.join(workdir, "checkpoints", str(step))
    damage(damaged)
    before = sorted(os.path.relpath(p, damaged) for p in glob.glob(os.path.join(damaged, "**"), recursive=True))
    fallback = 6 if step == 999 else 4

    res, records, stderr = _resume_logged(workdir, capfd)

    messages = [r.getMessage() for r in records]
    assert f"resumed from step {fallback} of {os.path.join(workdir, 'checkpoints')}" in messages, messages
    warnings = [r.getMessage() for r in records if r.levelno >= pylogging.WARNING]
    assert len(warnings) == 1, warnings  # one line, none of orbax's own about the folder
    line = warnings[0]
    assert "\n" not in line
    assert line.startswith(f"checkpoint {damaged} is damaged ("), line
    assert reason in line and f"using step {fallback} instead" in line, line
    # ... and no asynchronous noise from the failed reads (43 tracebacks in the issue)
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr[-2000:]
    # Moved aside, whole, not deleted; orbax no longer sees it, and the step was written again.
    moved = glob.glob(os.path.join(workdir, "checkpoints_damaged", f"{step}-*"))
    assert len(moved) == 1 and moved[0] in line, (moved, line)
    assert sorted(os.path.relpath(p, moved[0]) for p in glob.glob(os.path.join(moved[0], "**"),
                                                                   recursive=True)) == before
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps == [4, 6, 8]  # keep=3; a damaged 6 was written again by the resumed run
    # The resumed run is the run that never saw the damage (from step 4: it recomputes 5 and 6).
    assert res.step == TOTAL
    got = _flat(res.state)
    for k in reference:
        np.testing.assert_array_equal(got[k], reference[k], err_msg=k)


def test_no_readable_checkpoint_is_one_error_and_moves_nothing(workdirs, tmp_path):
    base, _ = workdirs
    workdir = _copy(base, tmp_path)
    cdir = os.path.join(workdir, "checkpoints")
    _truncate_arrays(os.path.join(cdir, "6"))
    os.remove(os.path.join(cdir, "4", "state", "_METADATA"))
    shutil.rmtree(os.path.join(cdir, "2", "meta"))
    os.makedirs(os.path.join(cdir, "999"))
    listing = sorted(glob.glob(os.path.join(workdir, "**"), recursive=True))
    with pytest.raises(ckpt.CheckpointError) as info:
        run(_cfg(TOTAL), workdir, toy_task.ToyTask(), toy_task.ToyLoader(16), tensorboard=False)
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(f"no readable checkpoint in {cdir} (step 999: no checkpoint items"), line
    for part in ("step 6: OUT_OF_RANGE", "step 4: state/_METADATA missing", "step 2: item meta missing",
                 "nothing was moved or deleted"):
        assert part in line, line
    assert sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)) == listing


def test_another_model_or_config_is_refused_not_moved(workdirs, tmp_path):
    """A checkpoint of other shapes or another model config is not damage: it is refused and stays."""
    base, _ = workdirs
    workdir = _copy(base, tmp_path)
    listing = sorted(glob.glob(os.path.join(workdir, "**"), recursive=True))
    wrong = {"step": jax.ShapeDtypeStruct((), np.int32), "w": jax.ShapeDtypeStruct((3,), np.float32)}
    shard = jax.sharding.NamedSharding(make_mesh(), jax.sharding.PartitionSpec())
    manager = ckpt.make_manager(workdir, keep=3, every=2)
    try:
        with pytest.raises(ckpt.CheckpointError, match=r"checkpoint step 6 in .* does not fit this run's state: "
                                                        r"\d+ array\(s\) of this run missing from it"):
            ckpt.restore_newest(manager, wrong, shard, reopen=lambda: ckpt.make_manager(workdir, keep=3, every=2))
    finally:
        manager.close()
    other = _cfg(TOTAL)
    other.model.d_hid = 32
    with pytest.raises(ConfigMismatchError):
        run(other, workdir, toy_task.ToyTask(), toy_task.ToyLoader(16), tensorboard=False)
    assert sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)) == listing


def test_read_only_meta_falls_back_without_moving(workdirs, tmp_path, caplog):
    base, _ = workdirs
    workdir = _copy(base, tmp_path)
    os.makedirs(os.path.join(workdir, "checkpoints", "999"))
    with caplog.at_level(pylogging.WARNING):
        assert ckpt.latest_meta(workdir)["step"] == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= pylogging.WARNING]
    assert len(warnings) == 1 and "999 is damaged (no checkpoint items" in warnings[0], warnings
    assert "left in place; using step 6 instead" in warnings[0]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "999"))
    assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))


def test_restored_state_matches_the_fallback_step(workdirs, tmp_path):
    """restore_newest returns step 4's arrays, bit for bit, when 6 is damaged."""
    base, _ = workdirs
    workdir = _copy(base, tmp_path)
    task = toy_task.ToyTask()
    abstract = jax.eval_shape(task.init_state, jax.random.key(0))
    shardings = state_shardings(task, abstract, make_mesh())
    manager = ckpt.make_manager(workdir, read_only=True)
    try:
        want = _flat(ckpt.restore(manager, 4, abstract, shardings)[0])
    finally:
        manager.close()
    os.remove(os.path.join(workdir, "checkpoints", "6", "state", "_METADATA"))
    manager = ckpt.make_manager(workdir, keep=3, every=2)
    try:
        manager, step, (state, meta, _) = ckpt.restore_newest(
            manager, abstract, shardings, reopen=lambda: ckpt.make_manager(workdir, keep=3, every=2))
        assert step == 4 and meta["step"] == 4 and ckpt.latest_step(manager) == 4
    finally:
        manager.close()
    got = _flat(state)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_late_read_errors_are_dropped_and_others_kept():
    """The 'Event loop is closed' errors of reads a failed restore left in flight reach ``sys.unraisablehook``
    (seen in the issue as dozens of tracebacks); while damaged folders are probed only they are dropped."""
    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda info: seen.append(str(info.exc_value))
    try:
        with ckpt._LateReadErrors().installed():
            for e in (RuntimeError("Event loop is closed"), ValueError("another problem")):
                sys.unraisablehook(types.SimpleNamespace(exc_value=e, exc_type=type(e), exc_traceback=None,
                                                         err_msg=None, object=None))
    finally:
        sys.unraisablehook = previous
    assert seen == ["another problem"]

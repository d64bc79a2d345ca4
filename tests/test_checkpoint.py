"""Checkpointing: SIGKILL + resume is bit-exact, SIGTERM saves and exits, half-written checkpoints are
ignored, a checkpoint restores onto another mesh, and bad input gets clear errors."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import toy_task
from common_jax import checkpoint as ckpt
from common_jax.mesh import make_mesh
from common_jax.training import run, state_shardings

MAIN = os.path.join(os.path.dirname(__file__), "_train_toy_main.py")
TOTAL = 12


def _flat(state):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]}


def _assert_bit_identical(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _spawn(workdir, total, every, sleep, log_path):
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, MAIN, str(workdir), str(total), "--every", str(every),
                             "--sleep", str(sleep)], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    return proc, log


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process (same 8 devices, same mesh, same config)."""
    cfg = toy_task.toy_config(TOTAL, every=3)
    res = run(cfg, tmp_path_factory.mktemp("ref"), toy_task.ToyTask(noise=0.1),
              toy_task.ToyLoader(cfg.batch_size), tensorboard=False)
    return _flat(res.state)


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory):
    """Two slowed-down subprocesses started together: one gets SIGKILL after its first complete
    checkpoint, the other SIGTERM after it has logged step 2."""
    kill_dir, term_dir = tmp_path_factory.mktemp("kill"), tmp_path_factory.mktemp("term")
    kill_log, term_log = str(kill_dir) + ".log", str(term_dir) + ".log"
    pk, fk = _spawn(kill_dir, TOTAL, 3, 0.25, kill_log)
    pt, ft = _spawn(term_dir, TOTAL, 100, 0.25, term_log)
    first = os.path.join(kill_dir, "checkpoints", "3")
    # Poll both at once: each is signalled as soon as its own condition holds.
    todo = {"kill": (pk, kill_log, lambda: os.path.isdir(first), signal.SIGKILL),
            "term": (pt, term_log, lambda: f"step 2/{TOTAL}" in open(term_log).read(), signal.SIGTERM)}
    t0 = time.monotonic()
    try:
        while todo:
            for name, (proc, log, ready, sig) in list(todo.items()):
                if ready():
                    proc.send_signal(sig)
                    del todo[name]
                elif proc.poll() is not None or time.monotonic() - t0 > 150:
                    raise AssertionError(f"{name} run ended (rc={proc.returncode}) or timed out before it "
                                         "could be signalled:\n" + open(log).read()[-3000:])
            time.sleep(0.05)
        pk.wait(30)
        term_rc = pt.wait(60)
    finally:
        for p in (pk, pt):
            if p.poll() is None:
                p.kill()
        fk.close()
        ft.close()
    return kill_dir, pk.returncode, term_dir, term_rc, term_log


def test_sigkill_then_resume_is_bit_identical(interrupted_runs, request):
    kill_dir, kill_rc, *_ = interrupted_runs
    assert kill_rc == -signal.SIGKILL
    assert not os.path.exists(os.path.join(kill_dir, "done.json"))  # it really died mid-run
    steps_left = sorted(int(s) for s in os.listdir(os.path.join(kill_dir, "checkpoints")) if s.isdigit())
    assert steps_left and max(steps_left) < TOTAL
    resume = subprocess.Popen([sys.executable, MAIN, str(kill_dir), str(TOTAL), "--every", "3"],
                              stdout=subprocess.DEVNULL, stderr=open(str(kill_dir) + ".resume.log", "w"))
    try:
        reference = request.getfixturevalue("reference")  # computed while the new process starts up
        rc = resume.wait(180)
    finally:
        if resume.poll() is None:
            resume.kill()
    log = open(str(kill_dir) + ".resume.log").read()
    assert rc == 0, log[-3000:]
    assert f"resumed from step {max(steps_left)} " in log
    assert json.load(open(os.path.join(kill_dir, "done.json")))["step"] == TOTAL
    _assert_bit_identical(dict(np.load(os.path.join(kill_dir, "final_state.npz"))), reference)


def test_sigterm_saves_and_exits_cleanly_then_resumes(interrupted_runs, reference):
    *_, term_dir, term_rc, term_log = interrupted_runs
    assert term_rc == 0, open(term_log).read()[-3000:]
    done = json.load(open(os.path.join(term_dir, "done.json")))
    assert done["preempted"] and 2 <= done["step"] < TOTAL
    # checkpoint.every=100: the only checkpoint is the one the signal caused.
    assert os.listdir(os.path.join(term_dir, "checkpoints")) == [str(done["step"])]
    assert "preemption signal: saved step" in open(term_log).read()
    res = run(toy_task.toy_config(TOTAL, every=100), term_dir, toy_task.ToyTask(noise=0.1),
              toy_task.ToyLoader(16), tensorboard=False)
    _assert_bit_identical(_flat(res.state), reference)


def test_half_written_checkpoint_is_ignored(tmp_path):
    cfg = toy_task.toy_config(3, every=3)
    res = run(cfg, tmp_path, toy_task.ToyTask(), toy_task.ToyLoader(16), tensorboard=False)
    saved = _flat(res.state)
    cdir = os.path.join(tmp_path, "checkpoints")
    # What a kill during the save of step 6 leaves: orbax's tmp directory, with partial content.
    partial = os.path.join(cdir, "6.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(cdir, "3"), partial)
    shutil.rmtree(os.path.join(partial, "state"))
    os.remove(os.path.join(partial, "commit_success.txt"))  # never written for an unfinished save
    with open(os.path.join(partial, "meta", "metadata"), "w") as f:
        f.write('{"step": 6, "config": {"model": {"d_hid": 999}}}')  # would fail the config check if read

    manager = ckpt.make_manager(tmp_path, keep=2, every=3)
    try:
        assert ckpt.latest_step(manager) == 3
        t0 = time.monotonic()  # orbax deletes tmp directories in the background on start
        while os.path.exists(partial) and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        assert not os.path.exists(partial)
        mesh = make_mesh()
        task = toy_task.ToyTask()
        abstract = jax.eval_shape(task.init_state, jax.random.key(0))
        state, meta, data = ckpt.restore(manager, 3, abstract, state_shardings(task, abstract, mesh))
    finally:
        manager.close()
    _assert_bit_identical(_flat(state), saved)
    assert meta["step"] == 3 and meta["config"]["model"]["d_hid"] == toy_task.D_HID
    assert data == {"process_count": 1, "0": {"index": 3, "seed": 0}}


def test_restore_onto_another_mesh(tmp_path):
    cfg = toy_task.toy_config(3, data=4, fsdp=2, every=3)
    res = run(cfg, tmp_path, toy_task.ToyTask(), toy_task.ToyLoader(16), tensorboard=False)
    saved = _flat(res.state)
    assert len(res.state.params["Dense_0"]["kernel"].addressable_shards[0].data) == toy_task.D_IN // 2

    task = toy_task.ToyTask()
    abstract = jax.eval_shape(task.init_state, jax.random.key(0))
    for mesh in (make_mesh(8, 1, 1), make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        manager = ckpt.make_manager(tmp_path, read_only=True)
        try:
            state, _, _ = ckpt.restore(manager, 3, abstract, state_shardings(task, abstract, mesh))
        finally:
            manager.close()
        kernel = state.params["Dense_0"]["kernel"]
        assert kernel.sharding.mesh.shape == mesh.shape
        assert kernel.addressable_shards[0].data.shape == (toy_task.D_IN, toy_task.D_HID)
        _assert_bit_identical(_flat(state), saved)
    # and the loop continues on the new mesh
    res8 = run(toy_task.toy_config(4, data=8, fsdp=1, every=3), tmp_path, toy_task.ToyTask(),
               toy_task.ToyLoader(16), tensorboard=False)
    assert res8.step == 4 and int(res8.state.step) == 4


def test_checkpoint_errors(tmp_path, caplog):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ckpt.make_manager(tmp_path, keep=0)
    with pytest.raises(ckpt.CheckpointError, match="saved by 2 processes, this run has 1"):
        ckpt.local_process_state({"process_count": 2, "0": {}, "1": {}})
    with pytest.raises(ckpt.CheckpointError, match="no entry for process 0"):
        ckpt.local_process_state({"process_count": 1})
    # A checkpoint whose state does not fit the requested structure.
    run(toy_task.toy_config(1, every=1), tmp_path, toy_task.ToyTask(), toy_task.ToyLoader(16), tensorboard=False)
    with caplog.at_level(logging.WARNING):
        manager = ckpt.make_manager(tmp_path, read_only=True)
    # Reading is what a read-only manager is for: none of orbax's warnings about it reach the user (loading a
    # Sampler printed six).
    assert not [r for r in caplog.records if "read only" in r.getMessage() or "read_only" in r.getMessage()]
    try:
        wrong = {"step": jax.ShapeDtypeStruct((), np.int32), "w": jax.ShapeDtypeStruct((3,), np.float32)}
        shard = jax.sharding.NamedSharding(make_mesh(), jax.sharding.PartitionSpec())
        with pytest.raises(ckpt.CheckpointError, match="could not restore step 1 from"):
            ckpt.restore(manager, 1, wrong, shard)
    finally:
        manager.close()

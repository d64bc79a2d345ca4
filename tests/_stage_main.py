"""Tiny stage-one / stage-two configs for the end-to-end tests, and a script that trains one in its own process.

usage: python _stage_main.py {vqgan,gpt} WORKDIR KEY=VALUE... [--sleep S]
KEY=VALUE are config overrides (dotted keys, VALUE a Python literal or a plain string). ``--sleep`` slows every
train batch down so a test can signal the process mid-run. When ``train`` returns, writes WORKDIR/final_state.npz
(every state leaf, keyed by its tree path) and WORKDIR/done.json (step, preempted).
"""
from __future__ import annotations

import ast
import json
import os
import sys
from typing import Any


def assert_resume_bit_identical(r: dict, total: int) -> list[str]:
    """The kill/resume checks both stages share: the killed run died by SIGKILL after a checkpoint before
    ``total``, resumed from it and finished, and its final state equals the uninterrupted run's bit for bit.
    Returns the state's keys (for stage-specific checks)."""
    import signal

    import numpy as np
    kill_dir, ref_dir = r["kill_dir"], r["ref_dir"]
    assert r["kill_rc"] == -signal.SIGKILL
    assert r["complete"] and max(r["complete"]) < total, r["complete"]
    log = open(str(kill_dir) + ".log").read()
    assert r["resume_rc"] == 0, log[-3000:]
    assert r["ref_rc"] == 0, open(str(ref_dir) + ".log").read()[-3000:]
    assert f"resumed from step {max(r['complete'])} " in log
    assert json.load(open(os.path.join(kill_dir, "done.json")))["step"] == total
    got = dict(np.load(os.path.join(kill_dir, "final_state.npz")))
    want = dict(np.load(os.path.join(ref_dir, "final_state.npz")))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    return sorted(want)


if __name__ == "__main__":
    from _xla_flags import xla_flags
    os.environ.setdefault("XLA_FLAGS", xla_flags(8))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Set dotted fields; a key the config does not have is an error (a typo must not pass silently)."""
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        if last not in node:
            raise KeyError(f"config has no field {key!r}")
        node[last] = value
    return config


def vqgan_config(data_dir: str, **overrides: Any) -> ml_collections.ConfigDict:
    """configs/vqgan_tiny on the built-in photos in ``data_dir``, a few steps, small eval."""
    from configs import vqgan_tiny
    c = vqgan_tiny.get_config()
    c.data.data_dir = data_dir
    c.data.eval_examples = 32
    c.total_steps = 6
    c.log_every = 2
    c.eval_every = 0
    c.image_every = 0
    c.checkpoint.update(dict(every=2, keep=5))
    return apply_overrides(c, {k.replace("__", "."): v for k, v in overrides.items()})


def gpt_config(data_dir: str, first_stage: str, config: str = "transformer_tiny",
               **overrides: Any) -> ml_collections.ConfigDict:
    """configs/<config> (transformer_tiny by default) on the codes of the built-in photos, a few steps, small eval."""
    import importlib
    c = importlib.import_module(f"configs.{config}").get_config()
    c.data.data_dir = data_dir
    c.data.eval_examples = 64
    c.first_stage.workdir = first_stage
    c.total_steps = 6
    c.log_every = 2
    c.eval_every = 0
    c.checkpoint.update(dict(every=2, keep=5))
    return apply_overrides(c, {k.replace("__", "."): v for k, v in overrides.items()})


def flat_state(state: Any) -> dict:
    """Every leaf of a (possibly sharded) state as a host numpy array, keyed by its tree path."""
    import jax

    from common_jax.metrics import to_host
    return {jax.tree_util.keystr(k): to_host(v) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


# ------------------------------------------------------------------------- helpers for the tests' subprocesses
def cache_env(cache_dir: str) -> dict:
    """This environment plus a persistent compilation cache: the first run fills it, later runs reuse it."""
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def spawn(stage: str, workdir: Any, overrides: dict, env: dict, sleep: float = 0.0):
    """Start this script on ``workdir``; output goes to ``<workdir>.log``. Returns (process, log file)."""
    import subprocess
    args = [sys.executable, os.path.abspath(__file__), stage, str(workdir)]
    args += [f"{k}={v}" if isinstance(v, str) else f"{k}={v!r}" for k, v in overrides.items()]
    if sleep:
        args += ["--sleep", str(sleep)]
    log = open(str(workdir) + ".log", "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log


def wait(proc, log, timeout: float) -> int:
    """Return code of ``proc`` (killed if still running after ``timeout`` s)."""
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def kill_after_checkpoint(proc, log, workdir: Any, step: int, timeout: float) -> int:
    """SIGKILL ``proc`` as soon as checkpoint ``step`` of ``workdir`` is complete; returns its return code.

    Orbax writes a checkpoint under a tmp name and renames it when done, so the plain folder means complete.
    """
    import signal
    import time
    target = os.path.join(str(workdir), "checkpoints", str(step))
    t0 = time.monotonic()
    try:
        while not os.path.isdir(target):
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise AssertionError(f"run ended (rc={proc.returncode}) or timed out before checkpoint {step}:\n"
                                     + open(str(workdir) + ".log").read()[-3000:])
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def plant_unfinished_checkpoint(workdir: Any, step: int) -> str:
    """Leave what a kill during the save of ``step`` leaves: ``<step>.orbax-checkpoint-tmp-<n>`` with partial
    content, no commit marker, and a meta naming another model (a resume that read it would fail)."""
    import glob
    import shutil
    import time
    cdir = os.path.join(str(workdir), "checkpoints")
    latest = max(int(s) for s in os.listdir(cdir) if s.isdigit())
    fake = os.path.join(cdir, f"{step}.orbax-checkpoint-tmp-{int(time.time())}")
    shutil.copytree(os.path.join(cdir, str(latest)), fake)
    shutil.rmtree(os.path.join(fake, "state"))
    for marker in glob.glob(os.path.join(fake, "commit_success*")):
        os.remove(marker)
    with open(os.path.join(fake, "meta", "metadata"), "w") as f:
        json.dump({"step": step, "config": {"model": {"n_embed": 3}, "gpt": {"n_embd": 3}}}, f)
    return fake


def kill_resume_and_reference(stage: str, root: Any, overrides: dict, every: int, timeout: float = 900) -> dict:
    """Run ``stage`` in ``root/killed``, SIGKILL it once checkpoint ``every`` is complete, leave a half-written
    next checkpoint (unless the kill left one), resume it in a new process, and run ``root/reference``
    uninterrupted beside it; returns what :func:`assert_resume_bit_identical` checks."""
    import glob
    kill_dir, ref_dir = root / "killed", root / "reference"
    env = cache_env(str(root / "jax_cache"))
    proc, log = spawn(stage, kill_dir, overrides, env, sleep=0.5)
    kill_rc = kill_after_checkpoint(proc, log, kill_dir, every, timeout=timeout)
    cdir = os.path.join(kill_dir, "checkpoints")
    complete = sorted(int(s) for s in os.listdir(cdir) if s.isdigit())
    if not os.path.exists(os.path.join(cdir, str(max(complete) + every))):
        plant_unfinished_checkpoint(kill_dir, max(complete) + every)
    leftovers = sorted(os.path.basename(p) for p in glob.glob(os.path.join(cdir, "*.orbax-checkpoint-tmp*")))
    resumed = spawn(stage, kill_dir, overrides, env)
    reference = spawn(stage, ref_dir, overrides, env)
    return dict(kill_dir=kill_dir, ref_dir=ref_dir, kill_rc=kill_rc, complete=complete, leftovers=leftovers,
                resume_rc=wait(*resumed, timeout), ref_rc=wait(*reference, timeout))


def write_stage_one_workdir(photos: str, workdir: str, step: int) -> None:
    """Built-in photos prepared in ``photos`` and a stage-one workdir holding checkpoint ``step`` of a freshly
    initialised configs/vqgan_tiny (stage two and config checks need a frozen model, not a trained one)."""
    from common_jax import datasets
    datasets.prepare_builtin_photos(photos, crop_size=32, crops_per_photo=64)
    save_fresh_stage_one(vqgan_config(photos), workdir, step)


def save_fresh_stage_one(config: ml_collections.ConfigDict, workdir: str, step: int, seed: int = 0) -> None:
    """A stage-one workdir holding checkpoint ``step`` of ``config``'s freshly initialised VQGAN (init key ``seed``)."""
    import jax

    from common_jax import checkpoint as ckpt
    from common_jax.config_utils import config_to_dict
    from common_jax.training import jit_init
    from vqgan_jax.train import VQGANTask
    state = jit_init(VQGANTask(config).init_state)(jax.random.key(seed))
    manager = ckpt.make_manager(workdir, async_save=False)
    try:
        ckpt.save(manager, step, state, {"config": config_to_dict(config)}, None, force=True)
        manager.wait_until_finished()
    finally:
        manager.close()


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str]) -> None:
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["vqgan", "gpt"])
    p.add_argument("workdir")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args(argv)
    over = dict(o.split("=", 1) for o in a.overrides)
    over = {k: _parse_value(v) for k, v in over.items()}

    import numpy as np
    from absl import logging

    from common_jax import data as data_lib

    if a.sleep > 0:
        import time
        original = data_lib.Loader.__next__

        def slow_next(self):
            time.sleep(a.sleep)
            return original(self)
        data_lib.Loader.__next__ = slow_next

    logging.set_verbosity(logging.INFO)
    data_dir = over.pop("data.data_dir")
    if a.stage == "vqgan":
        from vqgan_jax.train import train
        config = vqgan_config(data_dir, **over)
    else:
        from transformer_jax.train import train
        config = gpt_config(data_dir, over.pop("first_stage.workdir"), **over)
    config.tensorboard = False  # console logs only: these runs are compared by state, and skip TensorFlow's import
    res = train(config, a.workdir)
    np.savez(os.path.join(a.workdir, "final_state.npz"), **flat_state(res.state))
    with open(os.path.join(a.workdir, "done.json"), "w") as f:
        json.dump({"step": res.step, "preempted": res.preempted}, f)


if __name__ == "__main__":
    main(sys.argv[1:])

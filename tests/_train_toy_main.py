"""Run the toy task through common_jax.training.run in its own process (for kill/resume tests).

usage: python _train_toy_main.py WORKDIR TOTAL_STEPS [--every N] [--sleep S] [--data D] [--fsdp F]
Writes WORKDIR/final_params.npz and WORKDIR/done.json (step, preempted) when run() returns.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

import toy_task  # noqa: E402
from common_jax.training import run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("total_steps", type=int)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--data", type=int, default=-1)
    p.add_argument("--fsdp", type=int, default=1)
    a = p.parse_args()
    logging.set_verbosity(logging.INFO)
    cfg = toy_task.toy_config(a.total_steps, data=a.data, fsdp=a.fsdp, every=a.every)
    task = toy_task.ToyTask(noise=0.1)
    loader = toy_task.ToyLoader(cfg.batch_size, seed=0, sleep=a.sleep)
    res = run(cfg, a.workdir, task, loader, tensorboard=False)
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(
        jax.device_get(res.state))[0]}
    np.savez(os.path.join(a.workdir, "final_state.npz"), **flat)
    with open(os.path.join(a.workdir, "done.json"), "w") as f:
        json.dump({"step": res.step, "preempted": res.preempted}, f)


if __name__ == "__main__":
    main()

"""Run the toy task through common_jax.training.run in its own process (kill/resume, multi-process tests).

usage: python _train_toy_main.py WORKDIR TOTAL_STEPS [--every N] [--sleep S] [--data D] [--fsdp F]
           [--stop-after K] [--num-processes P --process-id I --coordinator HOST:PORT] [--per-process-workdir]
           [--per-process-weights] [--data-dir DIR --dataset NAME]
Writes WORKDIR/final_state.npz and WORKDIR/done.json (step, preempted) when run() returns (process 0).
With --data-dir (``{p}`` is replaced by the process id) it only resolves that prepared dataset as the stages
do before training (checked across processes), prints "dataset resolved" and exits.
With several processes the 8 devices are split evenly between them (CPU collectives over gloo).
"""
import argparse
import json
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("workdir")
p.add_argument("total_steps", type=int)
p.add_argument("--every", type=int, default=3)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--data", type=int, default=-1)
p.add_argument("--fsdp", type=int, default=1)
p.add_argument("--stop-after", type=int, default=None)
p.add_argument("--num-processes", type=int, default=1)
p.add_argument("--process-id", type=int, default=0)
p.add_argument("--coordinator", default="localhost:12355")
p.add_argument("--per-process-workdir", action="store_true", help="WORKDIR_p<id>: a workdir that is not shared")
p.add_argument("--per-process-weights", action="store_true", help="each process reports other loaded weights")
p.add_argument("--data-dir", default="", help="resolve this prepared dataset ({p}: the process id) and exit")
p.add_argument("--dataset", default="")
a = p.parse_args()
from _xla_flags import xla_flags  # noqa: E402  (this script's folder is on the path)
if a.per_process_workdir:
    a.workdir = f"{a.workdir}_p{a.process_id}"

if a.num_processes > 1:
    os.environ["XLA_FLAGS"] = xla_flags(8 // a.num_processes)
else:
    os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

if a.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(a.coordinator, num_processes=a.num_processes, process_id=a.process_id)

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

import toy_task  # noqa: E402
from common_jax.metrics import to_host  # noqa: E402
from common_jax.dataset_resolution import resolve_dataset  # noqa: E402
from common_jax.multihost import check_same_on_all_processes  # noqa: E402
from common_jax.workdir_checks import check_workdir  # noqa: E402
from common_jax.training import run  # noqa: E402


def main() -> None:
    logging.set_verbosity(logging.INFO)
    cfg = toy_task.toy_config(a.total_steps, data=a.data, fsdp=a.fsdp, every=a.every)
    task = toy_task.ToyTask(noise=0.1)
    loader = toy_task.ToyLoader(cfg.batch_size, seed=0, sleep=a.sleep,
                                process_index=jax.process_index(), process_count=jax.process_count())
    workdir = check_workdir(a.workdir)
    if a.data_dir:
        import ml_collections
        resolve_dataset(ml_collections.ConfigDict(dict(data_dir=a.data_dir.format(p=a.process_id),
                                                       name=a.dataset)), workdir)
        print("dataset resolved", flush=True)
        return
    # What a stage-two run checks of the stage-one weights each process loaded (same in every other run here).
    check_same_on_all_processes(f"weights of process {a.process_id}" if a.per_process_weights else "weights",
                                "the toy weights", "load them from one place")
    res = run(cfg, workdir, task, loader, tensorboard=False, stop_after=a.stop_after)
    flat = {jax.tree_util.keystr(k): to_host(v)
            for k, v in jax.tree_util.tree_flatten_with_path(res.state)[0]}
    if jax.process_index() == 0:
        np.savez(os.path.join(a.workdir, "final_state.npz"), **flat)
        with open(os.path.join(a.workdir, "done.json"), "w") as f:
            json.dump({"step": res.step, "preempted": res.preempted}, f)


if __name__ == "__main__":
    main()

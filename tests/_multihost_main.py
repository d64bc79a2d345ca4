"""One process of the multi-host test (tests/test_multihost.py): both stages through their public train
functions, with tiny configs, in ROOT/{vq,gpt} and the data in ROOT/data.

usage: python _multihost_main.py ROOT [--stages vq,gpt] [--hang STAGE:K] [--devices D] [--data DIR]
           [--num-processes P --process-id I --coordinator HOST:PORT] [--ref] [--tensorboard]

``--hang vq:3`` makes the stage's train loader block for good when asked for global batch 3 (after step 3,
with the checkpoint of step 2 already started), so the test can SIGKILL a process mid-run at a known point.
``--data DIR`` (default ROOT/data) holds the built-in photos and the codes. ``--ref``: the single-process
reference (no eval, no image summaries); stage two then trains from the codes dataset already in DIR,
written by the multi-process run (the same global batches; see test_multihost.py for why not its own
encoding). Stage ``codes`` (reference)
pre-encodes the photos of DIR into ROOT/codes with the stage-one model of ``--first-stage`` in one process.
``--tensorboard``: the default writers (TensorBoard on process 0) instead of console logs only.
Writes ROOT/<stage>/final_state.npz (every state leaf, process 0) and ROOT/<stage>/done.json.
"""
import argparse
import json
import os
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("--stages", default="vq,gpt")
p.add_argument("--hang", default="")
p.add_argument("--devices", type=int, default=2)
p.add_argument("--num-processes", type=int, default=1)
p.add_argument("--process-id", type=int, default=0)
p.add_argument("--coordinator", default="")
p.add_argument("--data", default="")
p.add_argument("--ref", action="store_true")
p.add_argument("--first-stage", default="")
p.add_argument("--tensorboard", action="store_true")
a = p.parse_args()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from _xla_flags import xla_flags  # noqa: E402  (this script's folder is on the path)

os.environ["XLA_FLAGS"] = xla_flags(a.devices)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

if a.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The same environment variables a user's launcher sets; the entry points' code path starts it.
    os.environ.update(JAX_COORDINATOR_ADDRESS=a.coordinator, JAX_NUM_PROCESSES=str(a.num_processes),
                      JAX_PROCESS_ID=str(a.process_id))
    from common_jax import multihost  # noqa: E402
    multihost.maybe_initialize_distributed("auto")
    assert jax.process_count() == a.num_processes, jax.process_count()

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from common_jax import training  # noqa: E402
from common_jax.metrics import to_host  # noqa: E402
from configs import transformer_tiny, vqgan_tiny  # noqa: E402

DATA = a.data or os.path.join(a.root, "data")
TOTAL, EVERY, BATCH = 4, 2, 8
CROPS = 8   # built-in photos: 8 train crops per photo (80), 2 held out (20)


def with_writer(c):
    """TensorBoard (process 0) and clu's logging writer (others) only where asked: elsewhere console logs,
    without TensorFlow's import (about 6 s of CPU per process)."""
    c.tensorboard = a.tensorboard
    return c


def vq_config():
    c = with_writer(vqgan_tiny.get_config())
    c.loss.disc_start = 0            # the discriminator, its BatchNorm stats and the adaptive weight all train
    c.data.update(dict(data_dir=DATA, global_batch_size=BATCH, eval_batch_size=BATCH,
                       eval_examples=BATCH))
    c.data.builtin_crops_per_photo = CROPS
    c.total_steps, c.log_every, c.eval_every, c.image_every = TOTAL, 1, 0, 0
    c.checkpoint.update(dict(every=EVERY, keep=3))
    return c


def gpt_config():
    c = with_writer(transformer_tiny.get_config())
    c.first_stage.workdir = a.first_stage or os.path.join(a.root, "vq")
    c.data.update(dict(data_dir=DATA, global_batch_size=BATCH, eval_batch_size=BATCH,
                       eval_examples=BATCH))
    c.data.builtin_crops_per_photo = CROPS
    c.total_steps, c.log_every, c.eval_every = TOTAL, 1, 0
    c.checkpoint.update(dict(every=EVERY, keep=3))
    return c


class HangingLoader:
    """Passes batches through until asked for global batch ``at``, then blocks (the test kills us)."""

    def __init__(self, loader, at: int, marker: str):
        self.loader, self.at, self.marker = loader, at, marker

    def __iter__(self):
        return self

    def __next__(self):
        if self.loader.get_state()["next_batch"] == self.at:
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            while True:
                time.sleep(60)
        return next(self.loader)

    def get_state(self):
        return self.loader.get_state()

    def set_state(self, state):
        self.loader.set_state(state)


class TrainOnly:
    """A task without eval_step/summaries: the references only need the final state."""

    def __init__(self, task):
        self._task = task

    def __getattr__(self, name):
        if name in ("eval_step", "summaries"):
            raise AttributeError(name)
        return getattr(self._task, name)


def patch_run(stage: str, workdir: str) -> None:
    """Wrap the shared loop (both stages call ``training.run``): the hang hook on the train loader, and no
    eval or image summaries in the references (they would only add compile time)."""
    original = training.run
    hang = a.hang.startswith(stage + ":")
    if not (hang or a.ref):
        return

    def run(config, wd, task, train_loader, eval_loader_factory=None, **kwargs):
        training.run = original
        if hang:
            marker = os.path.join(workdir, f"hanging.{jax.process_index()}")
            train_loader = HangingLoader(train_loader, int(a.hang.split(":")[1]), marker)
        if a.ref:
            task, eval_loader_factory = TrainOnly(task), None
        return original(config, wd, task, train_loader, eval_loader_factory, **kwargs)
    training.run = run


def dump(workdir: str, result) -> None:
    flat = {jax.tree_util.keystr(k): to_host(v)
            for k, v in jax.tree_util.tree_flatten_with_path(result.state)[0]}
    if jax.process_index() == 0:
        np.savez(os.path.join(workdir, "final_state.npz"), **flat)
        with open(os.path.join(workdir, "done.json"), "w") as f:
            json.dump({"step": result.step, "preempted": result.preempted,
                       "process_count": jax.process_count(), "device_count": jax.device_count()}, f)


def ref_gpt(config, workdir: str):
    """Stage two in one process on the multi-process run's codes dataset (same global batches)."""
    from common_jax import data as data_lib
    from transformer_jax.train import TransformerTask
    names = [n for n in os.listdir(DATA) if n.startswith("codes_")]
    assert len(names) == 1, names
    loader = data_lib.make_loader(DATA, names[0], "train", BATCH, train=True, image_size=None,
                                  seed=int(config.seed))
    return training.run(config, workdir, TransformerTask(config), loader)


def load_state_on_one_device(workdir: str):
    """(config, state dict) of a workdir's newest checkpoint, every array whole on this process's first
    device, whatever layout wrote it: the restore target comes from the checkpoint's own metadata."""
    import ml_collections
    import orbax.checkpoint as ocp
    from common_jax import checkpoint as ckpt
    manager = ckpt.make_manager(workdir, read_only=True, async_save=False)
    try:
        step = ckpt.latest_step(manager)
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                              manager.item_metadata(step)["state"])
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                            meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return ml_collections.ConfigDict(out["meta"]["config"]), out["state"]


def encode_alone() -> str:
    """Pre-encode the photos in one process into ROOT/codes (images linked from DATA); the dataset name."""
    from common_jax.datasets import builtin_photos_name
    from common_jax.pretrained import params_fingerprint
    from transformer_jax import codes as codes_lib
    from transformer_jax.code_encoder import make_encoder
    from vqgan_jax.pretrained import load_vqgan
    from vqgan_jax.train import model_from_config
    out = os.path.join(a.root, "codes")
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(os.path.join(out, "builtin_photos")):
        os.symlink(os.path.join(DATA, "builtin_photos"), os.path.join(out, "builtin_photos"))
    try:
        vq, variables, _ = load_vqgan(workdir=a.first_stage)
    except ValueError as e:
        # load_workdir must read a workdir written by another process/device layout; a failure is
        # recorded for test_stage_one_workdir_loads_in_another_process_layout, then worked around here.
        with open(os.path.join(out, "load_workdir_error.txt"), "w") as f:
            f.write(str(e))
        config, state = load_state_on_one_device(a.first_stage)
        vq = model_from_config(config)
        variables = {"params": state["ema_params"] or state["params"]}
    return codes_lib.prepare_codes(out, builtin_photos_name(32, CROPS), 32, make_encoder(vq, variables),
                                   params_fingerprint(variables), BATCH)


def main() -> None:
    logging.set_verbosity(logging.INFO)
    for stage in a.stages.split(","):
        workdir = os.path.join(a.root, stage)
        if stage == "codes":
            logging.info("codes dataset %s", encode_alone())
            continue
        os.makedirs(workdir, exist_ok=True)
        patch_run(stage, workdir)
        t0 = time.monotonic()
        if stage == "vq":
            from vqgan_jax.train import train
            result = train(vq_config(), workdir)
        elif a.ref:
            result = ref_gpt(gpt_config(), workdir)
        else:
            from transformer_jax.train import train
            result = train(gpt_config(), workdir)
        logging.info("stage %s: step %d in %.1f s (tensorflow imported: %s)", stage, result.step,
                     time.monotonic() - t0, "tensorflow" in sys.modules)
        dump(workdir, result)


if __name__ == "__main__":
    main()

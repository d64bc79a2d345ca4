"""Stage one: train a VQGAN.  python -m launch.train_vqgan --config=configs/vqgan_tiny.py --workdir=runs/vq

Any config field can be overridden, e.g. --config.data.global_batch_size=64 --config.mesh.fsdp=4.
Rerunning with the same workdir resumes from its newest checkpoint.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from common_jax import run_setup as setup_run
from vqgan_jax.train import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/vqgan_tiny.py", "stage-one config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and images go")
_MULTIHOST = flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"], "start jax.distributed")


def main(argv):
    del argv
    setup_run.maybe_initialize_distributed(_MULTIHOST.value)
    workdir = setup_run.check_workdir(_WORKDIR.value)
    result = train(_CONFIG.value, workdir)
    logging.info("done at step %d: %s", result.step, result.eval_metrics)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(setup_run.run_main(main))

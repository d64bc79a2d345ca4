"""Stage two: train the GPT over a frozen VQGAN's codes.

    python -m launch.train_transformer --config=configs/transformer_tiny.py --workdir=runs/gpt \
        --config.first_stage.workdir=runs/vq

The stage-one model comes from a stage-one workdir of this project or an official taming checkpoint
(--config.first_stage.taming_ckpt=... --config.first_stage.taming_yaml=...). With data.pre_encoded (default)
the dataset is encoded to codes once and training reads integers; otherwise every batch is encoded on the fly.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from common_jax import run_setup as setup_run
from transformer_jax.train import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/transformer_tiny.py", "stage-two config file")
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

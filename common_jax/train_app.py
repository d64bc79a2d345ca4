"""The absl app both stages' training entry points run (launch/train_vqgan.py, launch/train_transformer.py)."""
from __future__ import annotations

from typing import Any, Callable

from absl import logging

from common_jax.cli_errors import run_main
from common_jax.multihost import maybe_initialize_distributed
from common_jax.workdir_checks import check_workdir


def train_app(train_fn: Callable[[Any, str], Any], default_config: str) -> None:
    """The absl app of a stage's entry point: --config (config_flags), --workdir, --multihost, then
    ``train_fn(config, workdir)``; the same for both stages."""
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", default_config, "config file (get_config())")
    workdir = flags.DEFINE_string("workdir", None, "where checkpoints, logs and images go")
    multihost = flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"], "start jax.distributed")

    def main(argv):
        del argv
        maybe_initialize_distributed(multihost.value)
        result = train_fn(config.value, check_workdir(workdir.value))
        logging.info("done at step %d: %s", result.step, result.eval_metrics)

    flags.mark_flag_as_required("workdir")
    app.run(run_main(main))

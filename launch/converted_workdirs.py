"""Writing converted weights as workdirs of this project (shared by the converters of released checkpoints).

A converted workdir holds ``config.json`` and checkpoint 0 of the weights (``step`` and ``params``, plus an EMA
codebook when the model has one; no optimizer state), so sampling, scoring, encoding and ``init_from``
fine-tuning read it as they read a trained run.
"""
from __future__ import annotations

import json
import logging as pylogging
import os

import jax
import jax.numpy as jnp
import ml_collections


def refuse_existing(workdir: str) -> None:
    """Refuse a workdir that already holds checkpoints (called for every workdir before the first write)."""
    from common_jax import checkpoint as ckpt
    cdir = ckpt.checkpoint_dir(workdir)
    if os.path.isdir(cdir) and any(n.isdigit() for n in os.listdir(cdir)):
        raise ValueError(f"{workdir} already holds checkpoints; convert into a new workdir (nothing was written)")


def write_workdir(workdir: str, config: ml_collections.ConfigDict, variables: dict) -> None:
    """Checkpoint 0 (``step``, ``params`` and an EMA codebook when the model has one) and config.json."""
    from common_jax import checkpoint as ckpt
    from common_jax.config_utils import config_to_dict
    state = {"step": jnp.zeros((), jnp.int32),
             "params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables["params"])}
    if variables.get("codebook_ema"):
        state["codebook_ema"] = variables["codebook_ema"]
    os.makedirs(workdir, exist_ok=True)
    manager = ckpt.make_manager(workdir, async_save=False)
    try:
        ckpt.save(manager, 0, state, {"config": config_to_dict(config)}, None, force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)


def not_orbax_info(record: pylogging.LogRecord) -> bool:
    """Orbax logs several INFO lines per save; the command's own lines stay readable without them."""
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname.replace("\\", "/")

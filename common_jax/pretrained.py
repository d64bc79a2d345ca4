"""Read a finished (or running) workdir of this project for inference: its config and trained weights."""
from __future__ import annotations

import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from common_jax import checkpoint as ckpt


def load_workdir(workdir: str | os.PathLike, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(config, train state as a nested dict of arrays, step) of the newest (or given) checkpoint.

    The state is restored as saved (no abstract target needed), so this works without the data, LPIPS
    weights or mesh the run used.
    """
    workdir = os.fspath(workdir)
    if not os.path.isdir(ckpt.checkpoint_dir(workdir)):
        raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; is this a training workdir of this project?")
    manager = ckpt.make_manager(workdir, read_only=True, async_save=False)
    try:
        step = ckpt.latest_step(manager) if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{workdir}: no complete checkpoint yet")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    meta = dict(restored["meta"])
    if "config" not in meta:
        raise ValueError(f"{workdir}: checkpoint {step} has no config in its meta item")
    return ml_collections.ConfigDict(meta["config"]), restored["state"], step

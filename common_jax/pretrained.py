"""Read a finished (or running) workdir of this project for inference: its config and trained weights."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from common_jax import checkpoint as ckpt


# How each stage's config tells itself apart: stage one has ``task`` (vqgan / segmentation), stage two ``gpt``.
STAGE_KEYS = {"stage-one (VQGAN)": "task", "stage-two (transformer)": "gpt"}


def check_stage(config: ml_collections.ConfigDict, workdir: str, stage: str, where: str = "here") -> None:
    """Raise unless ``config`` (of ``workdir``) is a run of ``stage`` (a key of :data:`STAGE_KEYS`): a workdir
    of the other stage would otherwise fail later on a missing config key."""
    if STAGE_KEYS[stage] in config:
        return
    other = [name for name, key in STAGE_KEYS.items() if key in config]
    found = f"a {other[0]} run" if other else "no run of this project"
    raise ValueError(f"{workdir} holds {found}; a {stage} workdir is needed {where}")


def load_workdir(workdir: str | os.PathLike, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(config, train state as a nested dict of arrays, step) of the newest (or given) checkpoint (which stage it
    holds: :func:`check_stage`).

    Every array is restored whole onto this process's first device, with the target built from the
    checkpoint's own metadata: no data, LPIPS weights or mesh of the run are needed, and a workdir written by
    any process/device layout (e.g. a pod) loads on one machine.
    """
    workdir = os.fspath(workdir)
    if not os.path.isdir(ckpt.checkpoint_dir(workdir)):
        raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; is this a training workdir of this project?")
    manager = ckpt.make_manager(workdir, read_only=True, async_save=False)
    try:
        step = ckpt.latest_step(manager) if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{workdir}: no complete checkpoint yet")
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                              manager.item_metadata(step)["state"])
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    meta = dict(restored["meta"])
    if "config" not in meta:
        raise ValueError(f"{workdir}: checkpoint {step} has no config in its meta item")
    return ml_collections.ConfigDict(meta["config"]), restored["state"], step


def params_fingerprint(variables: Any) -> str:
    """Cheap identity of a set of weights: shapes plus a few summary statistics of every leaf."""
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(variables):
        a = np.asarray(leaf, np.float64)
        h.update(json.dumps([list(a.shape), float(a.sum()), float(np.abs(a).sum())]).encode())
    return h.hexdigest()

"""Read a finished (or running) workdir of this project for inference: its config and trained weights."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from common_jax import checkpoint as ckpt


class NonFiniteWeightsError(ValueError):
    """Weights holding NaN or Inf (a run that diverged before it was saved): refused wherever they are loaded,
    since a model built from them samples, encodes and scores without any error. A ``ValueError``, so the entry
    points print it as their one ``error:`` line."""


def _path_name(path: tuple) -> str:
    """``params/encoder/conv_in/kernel`` for a tree path."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _on_host(x: Any) -> bool:
    return not isinstance(x, jax.Array) or all(d.platform == "cpu" for d in x.devices())


@jax.jit
def _nonfinite_flags(leaves: list) -> jax.Array:
    # One program for all accelerator-resident leaves: a fused reduction each, one small transfer back.
    return jnp.stack([~jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> tuple[list[str], int]:
    """(paths of the floating-point leaves holding a NaN or Inf, in tree order; number of floating-point leaves).

    Leaves in host memory (numpy, or CPU jax arrays, read in place) are checked with numpy: one jitted program
    over a whole checkpoint would cost seconds of compile per model on CPU. Accelerator leaves are reduced on
    their device, in one program, so no weights are copied to the host."""
    floats = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    bad = [False] * len(floats)
    device = [i for i, (_, x) in enumerate(floats) if not _on_host(x)]
    for i in set(range(len(floats))) - set(device):
        bad[i] = not np.isfinite(np.asarray(floats[i][1])).all()
    if device:
        for i, flag in zip(device, np.asarray(_nonfinite_flags([floats[i][1] for i in device]))):
            bad[i] = bool(flag)
    return [_path_name(p) for (p, _), b in zip(floats, bad) if b], len(floats)


DIVERGED = ("the run diverged before this checkpoint was written: resume it from an earlier checkpoint (one "
            "written before the divergence), or use another run")


def check_finite(tree: Any, where: str, remedy: str = DIVERGED) -> None:
    """Raise :class:`NonFiniteWeightsError` (one line naming ``where``, how many of the arrays hold NaN or Inf,
    the first of them, and ``remedy``) unless every floating-point leaf of ``tree`` is finite."""
    bad, total = nonfinite_leaves(tree)
    if bad:
        raise NonFiniteWeightsError(f"{where} holds non-finite weights: NaN or Inf in {len(bad)} of {total} arrays "
                                    f"(first: {bad[0]}); {remedy}")


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
    holds: :func:`check_stage`). A state holding NaN or Inf anywhere is refused (:func:`check_finite`): every
    consumer of a workdir (stage two, the Sampler, eval_fid, the demo) reads it here.

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
    check_finite(restored["state"], f"{workdir} (checkpoint step {step})")
    return ml_collections.ConfigDict(meta["config"]), restored["state"], step


def params_fingerprint(variables: Any) -> str:
    """Cheap identity of a set of weights: shapes plus a few summary statistics of every leaf."""
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(variables):
        a = np.asarray(leaf, np.float64)
        h.update(json.dumps([list(a.shape), float(a.sum()), float(np.abs(a).sum())]).encode())
    return h.hexdigest()

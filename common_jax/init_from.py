"""Fine-tuning: a fresh train state whose weights come from another workdir (``config.init_from``).

The loop calls :func:`init_from_workdir` on the state it has just initialised, only when it starts a run afresh
(a run that resumes keeps its own checkpoint). Taken from the source workdir's newest checkpoint: ``params``,
the EMA codebook statistics (``codebook_ema``) when this run keeps them (from a source without them, e.g. a
converted taming model, they start at its codebook), and the generator weight EMA (``ema_params``, started
from the source's EMA or else its params) when this run keeps one. Everything else stays fresh: the
step (0), optimizer states, a discriminator, code-usage statistics. The source may be a trained run of this
project or a converted official checkpoint (``launch.convert_taming``).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging

from common_jax.pretrained import STAGE_KEYS, check_stage, load_workdir


def _stage_of(config: Any) -> str:
    for name, key in STAGE_KEYS.items():
        if key in config:
            return name
    raise ValueError(f"init_from: cannot tell this run's stage from its config (no {sorted(STAGE_KEYS.values())})")


def _flat(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _matched(fresh: Any, loaded: Any, source: str, what: str) -> Any:
    """``loaded`` arranged as ``fresh`` (same tree, dtypes and shardings); one error line on any mismatch."""
    want, have = _flat(fresh), _flat(loaded)
    lacking = sorted(set(want) - set(have))
    if lacking:
        more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
        raise ValueError(f"init_from {source}: {what}{lacking[0]} of this run's model is not there{more}; "
                         "the model configs differ")
    extra = sorted(set(have) - set(want))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"init_from {source}: it holds {what}{extra[0]}, which this run's model lacks{more}; "
                         "the model configs differ")
    for key, x in want.items():
        if tuple(np.shape(have[key])) != tuple(x.shape):
            raise ValueError(f"init_from {source}: {what}{key} has shape {tuple(np.shape(have[key]))} there, "
                             f"{tuple(x.shape)} in this run's config")

    def place(x: jax.Array, host: Any) -> jax.Array:
        host = np.asarray(host).astype(x.dtype)
        # Every process holds the whole array: each fills its own shards (one device or a pod alike).
        return jax.make_array_from_callback(x.shape, x.sharding, lambda idx: host[idx])

    return jax.tree.map(place, fresh, jax.tree.unflatten(jax.tree.structure(fresh),
                                                         [have[k] for k in _flat(fresh)]))


def init_from_workdir(state: Any, source: str, config: Any) -> Any:
    """``state`` (fresh, on its shardings) with its weights replaced by those of ``source``'s newest checkpoint.

    A source of the other stage (or another stage-one task) is refused; a missing parameter or a shape that
    differs is one error naming the parameter (and both shapes).
    """
    src_config, src_state, src_step = load_workdir(source)
    stage = _stage_of(config)
    check_stage(src_config, source, stage, "as init_from")
    if stage.startswith("stage-one"):
        mine, theirs = config.get("task", "vqgan"), src_config.get("task", "vqgan")
        if mine != theirs:
            raise ValueError(f"init_from {source} holds a stage-one {theirs!r} run; this run trains {mine!r}")
    elif (src_config.get("stage_one_fingerprint") and config.get("stage_one_fingerprint")
          and src_config.stage_one_fingerprint != config.stage_one_fingerprint):
        logging.warning("init_from %s: its GPT was trained on other stage-one weights than this run's first_stage "
                        "(its codes differ from the ones it learned)", source)
    replace = {"params": _matched(state.params, src_state["params"], source, "params")}
    if getattr(state, "codebook_ema", None):
        ema_stats = src_state.get("codebook_ema") or {
            # A source without EMA statistics (a converted taming model): start them as a fresh EMA codebook
            # does, count 1 per code and sum = the codebook, so the first update does not pull the codes back
            # to this run's random init.
            m: {"count": np.ones(np.shape(src_state["params"][m]["embedding"])[:1], np.float32),
                "sum": src_state["params"][m]["embedding"]}
            for m in state.codebook_ema if "embedding" in src_state["params"].get(m, {})}
        replace["codebook_ema"] = _matched(state.codebook_ema, ema_stats, source, "codebook_ema")
    if getattr(state, "ema_params", None):
        ema = src_state.get("ema_params") or src_state["params"]
        replace["ema_params"] = _matched(state.ema_params, ema, source, "ema_params")
    logging.info("init_from: %s taken from %s (its step %d); optimizer and step start afresh",
                 ", ".join(sorted(replace)), source, src_step)
    return state.replace(**replace)

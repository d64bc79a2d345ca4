"""Row chunks of a sampled batch decoded concurrently on host threads (CPU).

XLA:CPU runs a decode step's small ops (matmuls with a few rows, per-head attention over the cache) one after
another, mostly on one core; programs started from separate threads run on separate cores. Each chunk reads all
the weights, so this pays only while they stay in the last-level cache.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from transformer_jax import cpu_backend
from transformer_jax.gpt import GPT, decode_weight_bytes

# Weights up to this size (in the compute dtype) fit the last-level cache of the CPUs this was measured on, so
# concurrent chunks reading them all share it instead of contending for DRAM.
THREADS_MAX_WEIGHT_BYTES = 32 << 20
THREADS_ENV = "TAMING_JAX_DECODE_THREADS"


def check_threads(threads: Any) -> None:
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")


def decode_threads(model: GPT, batch: int) -> int:
    """How many row chunks of the batch a sampler decodes concurrently on host threads (1 = one program).

    On CPU, when the weights (:func:`transformer_jax.gpt.decode_weight_bytes`) are at most
    :data:`THREADS_MAX_WEIGHT_BYTES`, one chunk per available core (no more chunks than rows), else 1. Pass
    ``threads=`` to the samplers, or set ``TAMING_JAX_DECODE_THREADS``, to choose otherwise.
    """
    env = os.environ.get(THREADS_ENV, "")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive int, got {env!r}")
        return min(batch, int(env))
    if not cpu_backend.uses("threads") or batch < 2 or decode_weight_bytes(model) > THREADS_MAX_WEIGHT_BYTES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(batch, cores))


def _placed_or_traced(*trees: Any) -> bool:
    """Whether any leaf is a tracer or an array spread over several devices (then the batch is not split)."""
    for leaf in jax.tree_util.tree_leaves(trees):
        if isinstance(leaf, jax.core.Tracer):
            return True
        if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1:
            return True
    return False


def row_chunks(model: GPT, batch: int, threads: int | None, *inputs: Any) -> list[tuple[int, int]]:
    """The (start, end) row chunks a sampler decodes concurrently: at most ``threads`` of them (default
    :func:`decode_threads`), one chunk when any input is traced or spread over several devices.

    All chunks have one size, so they run one compiled program: where that size does not divide the batch, the
    last chunk overlaps the one before (3 rows on 2 threads: rows 0-1 and 1-2) and :func:`run_row_chunks` drops
    the repeated rows. The repeats run on otherwise idle cores, while the largest chunk sets the time anyway;
    two sizes would compile two programs.
    """
    check_threads(threads)
    if _placed_or_traced(*inputs):
        threads = 1  # under a transformation, or placed on a mesh: one program
    elif threads is None:
        threads = decode_threads(model, batch)
    size = -(-batch // max(1, min(threads, batch)))  # ceil
    starts = [min(start, batch - size) for start in range(0, batch, size)]  # the last one may step back
    return [(start, start + size) for start in starts]


def run_row_chunks(run: Callable[[int, int], Any], rows: list[tuple[int, int]]) -> Any:
    """``run(start, end)`` for each row chunk (in increasing order, possibly overlapping), concurrently on host
    threads when there are several (XLA:CPU runs a program started from one thread inline on it); outputs
    concatenated along axis 0, each row once."""
    if len(rows) == 1:
        return run(*rows[0])
    with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
        outs = list(pool.map(lambda r: jax.block_until_ready(run(*r)), rows))
    # Chunk k's first (end of chunk k-1) - (start of chunk k) rows were already given by chunk k-1.
    skips = [0] + [prev[1] - cur[0] for prev, cur in zip(rows[:-1], rows[1:])]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate([x[k:] for x, k in zip(xs, skips)], axis=0), *outs)

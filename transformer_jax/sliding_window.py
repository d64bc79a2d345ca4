"""Sliding-window sampling of code grids larger than the transformer's training window.

Reproduces taming's rule (scripts/sample_conditional.py): to sample position (i, j) of an H x W grid with
a w x w window, the window's top-left corner is (i - li, j - lj) with ``li = window_offset(i, H, w)``
(likewise lj); the window's codes, flattened row-major, follow the conditioning tokens (a fixed prefix
such as SOS / class, and/or the conditioning grid cut at the same place), and the logits that predict
window position (li, lj) are used.

One jitted program covers all positions, visited in raster order by ``lax.fori_loop``. Two methods:

- ``"cached"`` (default): a KV cache per window column. A window's codes never change once drawn,
  so the cache of window (r0, c0) stays valid and later positions that use the same window only feed
  the tokens drawn since (a window row, or one token), in chunks, instead of re-running the prefix.
  Windows are told apart by their column; a slot is reset when its row start moves on (tall grids).
- ``"prefix"``: the model runs on the tokens up to the end of the window row that holds (li, lj)
  (later tokens cannot influence that position), about half of the window in the interior rows;
  ``buckets`` trades this saving against compile time. No cache memory.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax import cpu_backend
from transformer_jax.blocks import block_class
from transformer_jax.decode_kernels import prepare_decode_variables, uses_decode_kernels
from transformer_jax.decode_threads import row_chunks, run_row_chunks
from transformer_jax.gpt import GPT, cache_bytes, init_cache
from transformer_jax.sampling import (_check_optional_positive_int, _check_options, _check_positive_int, _check_tokens,
                                      checked_vocab_limit, choose_with_uniform, step_uniforms)

# Default memory for the cached method's window caches; fewer slots than window columns are shared
# round-robin (still exact, more recomputation).
CACHE_BYTES_BUDGET = 2 << 30


def window_offset(i: Any, size: int, window: int) -> Any:
    """Local offset of index ``i`` inside its window (taming's rule); works on ints and jax scalars."""
    half = window // 2
    if isinstance(i, int):
        if i <= half:
            return i
        return window - (size - i) if size - i < half else half
    return jnp.where(i <= half, i, jnp.where(size - i < half, window - (size - i), half))


def row_groups(height: int, window: int, buckets: int | None) -> list[tuple[int, int, int]]:
    """Consecutive row ranges sharing one static prefix: (row_start, row_end, window rows needed)."""
    step = 1 if buckets is None else max(1, math.ceil(window / buckets))
    groups: list[tuple[int, int, int]] = []
    for i in range(height):
        q = min(window, math.ceil((window_offset(i, height, window) + 1) / step) * step)
        if groups and groups[-1][2] == q:
            groups[-1] = (groups[-1][0], i + 1, q)
        else:
            groups.append((i, i + 1, q))
    return groups


def _crop(g: jax.Array, i0: Any, j0: Any, w: int) -> jax.Array:
    """(B, H, W) -> the (B, w*w) row-major window with top-left corner (i0, j0)."""
    return lax.dynamic_slice(g, (0, i0, j0), (g.shape[0], w, w)).reshape(g.shape[0], w * w)


@functools.lru_cache(maxsize=32)
def _sliding_sampler(model: GPT, height: int, width: int, window: int, top_k: int | None,
                     use_top_p: bool, buckets: int | None, return_logits: bool, vocab_limit: int | None,
                     cpu_plain: frozenset = frozenset()):  # cpu_plain (cpu_backend.turned_off) keys the cache only
    w = window

    def run(variables, prefix, cond_grid, u, temperature, top_p):
        variables = prepare_decode_variables(model, variables)
        b = prefix.shape[0]
        n_ctx = prefix.shape[1] + (w * w if cond_grid.shape[1] else 0)
        tp = top_p if use_top_p else None
        grid = jnp.zeros((b, height, width), jnp.int32)
        logits_all = jnp.zeros((b, height, width, model.vocab_size) if return_logits else (0,), jnp.float32)

        def make_body(length):
            def body(p, carry):
                grid, logits_all = carry
                i, j = p // width, p % width
                li, lj = window_offset(i, height, w), window_offset(j, width, w)
                parts = [prefix]
                if cond_grid.shape[1]:
                    parts.append(_crop(cond_grid, i - li, j - lj, w))
                parts.append(_crop(grid, i - li, j - lj, w))
                tokens = jnp.concatenate(parts, axis=1)[:, :length]
                h = model.apply(variables, tokens, method=GPT.features)
                # Input position n_ctx - 1 + li*w + lj predicts window position (li, lj).
                h = lax.dynamic_slice_in_dim(h, n_ctx - 1 + li * w + lj, 1, axis=1)
                logits = model.apply(variables, h, method=GPT.logits_from_features)[:, 0]
                tok = choose_with_uniform(logits, u[p], top_k, tp, temperature, vocab_limit)
                grid = lax.dynamic_update_slice(grid, tok[:, None, None], (0, i, j))
                if return_logits:
                    logits_all = lax.dynamic_update_slice(logits_all, logits[:, None, None], (0, i, j, 0))
                return grid, logits_all
            return body

        carry = (grid, logits_all)
        for r0, r1, rows in row_groups(height, w, buckets):
            length = n_ctx + rows * w - 1
            carry = lax.fori_loop(r0 * width, r1 * width, make_body(length), carry)
        return carry

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _cached_sampler(model: GPT, height: int, width: int, window: int, top_k: int | None,
                    use_top_p: bool, slots: int, chunk: int, return_logits: bool, vocab_limit: int | None,
                    cpu_plain: frozenset = frozenset()):  # cpu_plain (cpu_backend.turned_off) keys the cache only
    w = window

    def run(variables, prefix, cond_grid, u, temperature, top_p):
        variables = prepare_decode_variables(model, variables)
        b = prefix.shape[0]
        n_ctx = prefix.shape[1] + (w * w if cond_grid.shape[1] else 0)
        length = n_ctx + w * w - 1          # input positions a window ever needs
        c = min(max(chunk, model.n_unmasked), length)  # a first chunk covers the unmasked block
        tp = top_p if use_top_p else None
        caches = jax.tree_util.tree_map(lambda x: jnp.zeros((slots,) + x.shape, x.dtype),
                                        init_cache(model, b, length))
        owner = jnp.full((slots, 2), -1, jnp.int32)    # (row start, column start) each slot holds
        filled = jnp.zeros((slots,), jnp.int32)        # positions [0, filled) of that slot are valid
        grid = jnp.zeros((b, height, width), jnp.int32)
        logits_all = jnp.zeros((b, height, width, model.vocab_size) if return_logits else (0,), jnp.float32)

        def feed(tokens, cache, start):
            return model.apply(variables, tokens, cache, start, method=GPT.decode)

        def body(p, carry):
            grid, caches, owner, filled, logits_all = carry
            i, j = p // width, p % width
            li, lj = window_offset(i, height, w), window_offset(j, width, w)
            r0, c0 = i - li, j - lj
            slot = c0 % slots
            cache = jax.tree_util.tree_map(lambda x: lax.dynamic_index_in_dim(x, slot, keepdims=False), caches)
            same = (owner[slot, 0] == r0) & (owner[slot, 1] == c0)
            n0 = jnp.where(same, filled[slot], 0)
            q = n_ctx - 1 + li * w + lj      # the input position whose logits predict (li, lj)
            parts = [prefix] + ([_crop(cond_grid, r0, c0, w)] if cond_grid.shape[1] else [])
            seq = jnp.concatenate(parts + [_crop(grid, r0, c0, w)], axis=1)

            def one_token(cache):
                logits, cache = feed(lax.dynamic_slice_in_dim(seq, q, 1, axis=1), cache, q)
                return logits[:, 0], cache

            def chunks(cache):
                # Feed [n0, q] in chunks of c; a chunk may run past q (into codes not drawn yet): those
                # positions are causally invisible to q and are overwritten by the next extension.
                def step(state):
                    n, cache, _ = state
                    start = jnp.minimum(n, length - c)
                    logits, cache = feed(lax.dynamic_slice_in_dim(seq, start, c, axis=1), cache, start)
                    at = jnp.clip(q - start, 0, c - 1)
                    return start + c, cache, lax.dynamic_index_in_dim(logits, at, axis=1, keepdims=False)
                init = (n0, cache, jnp.zeros((b, model.vocab_size), jnp.float32))
                _, cache, logits = lax.while_loop(lambda st: st[0] <= q, step, init)
                return logits, cache

            logits, cache = lax.cond(q == n0, one_token, chunks, cache)
            caches = jax.tree_util.tree_map(lambda x, y: lax.dynamic_update_index_in_dim(x, y, slot, 0),
                                            caches, cache)
            owner = owner.at[slot].set(jnp.stack([r0, c0]))
            filled = filled.at[slot].set(q + 1)
            tok = choose_with_uniform(logits, u[p], top_k, tp, temperature, vocab_limit)
            grid = lax.dynamic_update_slice(grid, tok[:, None, None], (0, i, j))
            if return_logits:
                logits_all = lax.dynamic_update_slice(logits_all, logits[:, None, None], (0, i, j, 0))
            return grid, caches, owner, filled, logits_all

        grid, _, _, _, logits_all = lax.fori_loop(0, height * width, body,
                                                  (grid, caches, owner, filled, logits_all))
        return grid, logits_all

    return jax.jit(run)


def sample_sliding_window(model: GPT, variables: Any, shape: tuple[int, int], window: int,
                          rng: jax.Array, prefix: jax.Array | None = None,
                          cond_grid: jax.Array | None = None, top_k: int | None = None,
                          top_p: float | None = None, temperature: float = 1.0,
                          method: str = "cached", buckets: int | None = 4,
                          cache_slots: int | None = None, chunk: int | None = None,
                          return_logits: bool = False, threads: int | None = None,
                          vocab_limit: int | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Sample an (H, W) code grid with a ``window`` x ``window`` sliding window -> (B, H, W) int32.

    Conditioning tokens: ``prefix`` (B, P) (e.g. SOS or class token, prepended unchanged) and/or
    ``cond_grid`` (B, H, W) (spatial conditioning codes, cropped with the same window); at least one
    token in all. Position (i, j) draws with ``fold_in(rng, i * W + j)``, so on an H = W = window grid
    this equals :func:`transformer_jax.sampling.sample` with the same key (up to float rounding).

    ``method="cached"`` keeps a KV cache per window column (``cache_slots``; default W - window + 1, or
    as many as fit in :data:`CACHE_BYTES_BUDGET`; fewer slots are shared round-robin and recompute
    more), each of (n_layer, 2, B, heads, conditioning + window**2, head_dim) in the compute dtype, and
    feeds new codes ``chunk`` tokens at a time (default: one window row). ``method="prefix"`` keeps no
    cache: the model runs on the tokens up to the end of the window row being sampled, rounded up to one
    of ``buckets`` lengths (each length is one compiled loop): ``buckets=None`` is exact per row offset
    (least compute, up to ``window`` loops to compile), ``1`` always runs the full window.
    ``return_logits`` also returns the logits used at every position (B, H, W, vocab), for checking.
    ``threads``: as in :func:`transformer_jax.sampling.sample` (on CPU, row chunks of the batch run as
    concurrent programs), and ``vocab_limit`` (draw only ids below it).
    """
    _check_options(top_k, top_p, temperature)
    vocab_limit = checked_vocab_limit(vocab_limit, model.vocab_size)
    h, wd = (int(s) for s in shape)
    _check_positive_int("window", window)
    grid = block_class(model.block).position_grid(model.block_options)
    if grid is not None and window != grid:
        raise ValueError(f"sample_sliding_window: the {model.block!r} block's positions assume a {grid}x{grid} code "
                         f"grid, so the window must be {grid}, got {window}")
    if h < window or wd < window:
        raise ValueError(f"grid shape {(h, wd)} must be at least the window size {window} in both dims")
    if method not in ("cached", "prefix"):
        raise ValueError(f"method must be 'cached' or 'prefix', got {method!r}")
    _check_optional_positive_int("cache_slots", cache_slots)
    _check_optional_positive_int("chunk", chunk)
    _check_optional_positive_int("buckets", buckets)
    if prefix is None and cond_grid is None:
        raise ValueError("sample_sliding_window needs conditioning: a prefix (e.g. SOS token) and/or cond_grid")
    batch = None
    if prefix is not None:
        prefix = _check_tokens("prefix", prefix, model.vocab_size)
        batch = prefix.shape[0]
    if cond_grid is not None:
        if not hasattr(cond_grid, "shape") or len(cond_grid.shape) != 3 or tuple(cond_grid.shape[1:]) != (h, wd):
            raise ValueError(f"cond_grid must be (batch, {h}, {wd}) codes, got "
                             f"{getattr(cond_grid, 'shape', type(cond_grid))}")
        cond_grid = _check_tokens("cond_grid", jnp.asarray(cond_grid).reshape(cond_grid.shape[0], -1),
                                  model.vocab_size).reshape(cond_grid.shape)
        if batch is not None and cond_grid.shape[0] != batch:
            raise ValueError(f"cond_grid batch {cond_grid.shape[0]} != prefix batch {batch}")
        batch = cond_grid.shape[0]
    else:
        cond_grid = jnp.zeros((batch, 0, 0), jnp.int32)
    if prefix is None:
        prefix = jnp.zeros((batch, 0), jnp.int32)
    n_ctx = prefix.shape[1] + (window * window if cond_grid.shape[1] else 0)
    if n_ctx + window * window - 1 > model.block_size:
        raise ValueError(f"conditioning ({n_ctx} tokens) + window ({window}x{window}) - 1 = "
                         f"{n_ctx + window * window - 1} exceeds the model's block_size {model.block_size}")
    if n_ctx < model.n_unmasked:
        raise ValueError(f"conditioning length {n_ctx} is shorter than n_unmasked {model.n_unmasked}")
    if method == "cached":
        slot_bytes = cache_bytes(model, batch, n_ctx + window * window - 1)
        slots = min(cache_slots or max(1, CACHE_BYTES_BUDGET // slot_bytes), wd - window + 1)
        fn = _cached_sampler(model, h, wd, window, top_k, top_p is not None, slots, chunk or window,
                             return_logits, vocab_limit, cpu_backend.turned_off())
    else:
        fn = _sliding_sampler(model, h, wd, window, top_k, top_p is not None, buckets, return_logits, vocab_limit,
                              cpu_backend.turned_off())
    if uses_decode_kernels(model):  # once for all row chunks, outside their programs (variables may be prepared)
        variables = prepare_decode_variables(model, variables)
    rows = row_chunks(model, batch, threads, variables, prefix, cond_grid, rng, temperature, top_p)
    u = step_uniforms(rng, h * wd, batch)  # position p draws u[p], the numbers fold_in(rng, p) gives
    scalars = (jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p))
    grid, logits = run_row_chunks(
        lambda r0, r1: fn(variables, prefix[r0:r1], cond_grid[r0:r1], u[:, r0:r1], *scalars), rows)
    return (grid, logits) if return_logits else grid

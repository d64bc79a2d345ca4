"""Autoregressive sampling for :class:`transformer_jax.gpt.GPT`: logit filtering and KV-cached decoding.

:func:`sample` runs one jitted program per (model, shapes, static options): a prefill of the
conditioning prefix, then one ``lax.fori_loop`` per cache phase (:func:`decode_phases`) over the remaining
steps, one token per step through the KV cache. Step ``t`` draws with ``jax.random.fold_in(rng, t)`` (all
steps' uniforms are drawn up front, :func:`step_uniforms`), so results depend only on the key, not on how
the batch is split into concurrently decoded row chunks on CPU
(:func:`transformer_jax.decode_threads.decode_threads`).

Filtering semantics (shared by :func:`filter_logits` and the samplers): logits are divided by the
temperature, then top-k keeps exactly ``k`` tokens, then top-p keeps the smallest set of the remaining
tokens (in order of decreasing probability) whose renormalised mass reaches ``p`` (at least one token).
Ties are broken by the lower token index (``lax.top_k`` and stable sorts order equal values that way),
so the kept set is always well defined.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from common_jax.quick_compile import quick_jit
from transformer_jax import cpu_backend
from transformer_jax.attention import even_bounds
from transformer_jax.decode_kernels import prepare_decode_variables, uses_decode_kernels
from transformer_jax.decode_threads import row_chunks, run_row_chunks
from transformer_jax.gpt import GPT, cache_bytes, decode_weight_bytes, init_cache, token_bounds


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:  # a bool is an int to Python
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _check_optional_positive_int(name: str, value: Any) -> None:
    _check_positive_int(name, value, allow_none=True)


def _check_options(top_k: int | None, top_p: float | None, temperature: Any) -> None:
    _check_optional_positive_int("top_k", top_k)
    if top_p is not None and not isinstance(top_p, jax.core.Tracer) and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if not isinstance(temperature, jax.core.Tracer) and not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _candidates(logits: jax.Array, top_k: int | None, top_p: Any | None, temperature: Any
                ) -> tuple[jax.Array, jax.Array | None]:
    """Candidate (values, token ids) in decreasing order, values -inf where filtered out.

    ids is None when no filter is active (values are then the full, unsorted logits).
    """
    logits = logits.astype(jnp.float32) / temperature
    v = logits.shape[-1]
    k = v if top_k is None else min(top_k, v)
    if k < v:
        vals, ids = lax.top_k(logits, k)
    elif top_p is not None:
        ids = jnp.argsort(-logits, axis=-1, stable=True).astype(jnp.int32)
        vals = jnp.take_along_axis(logits, ids, axis=-1)
    else:
        return logits, None
    if top_p is not None:
        probs = jax.nn.softmax(vals, axis=-1)  # renormalised over the top-k survivors, like HF/taming
        before = jnp.cumsum(probs, axis=-1) - probs
        # Keep while the mass strictly before a token is below p: the smallest prefix reaching p.
        keep = (before < top_p) | (jnp.arange(vals.shape[-1]) == 0) | (top_p >= 1.0)
        vals = jnp.where(keep, vals, -jnp.inf)
    return vals, ids


def filter_logits(logits: jax.Array, top_k: int | None = None, top_p: float | None = None,
                  temperature: float = 1.0) -> jax.Array:
    """Temperature-scaled float32 logits (..., V) with filtered-out tokens set to -inf."""
    _check_options(top_k, top_p, temperature)
    vals, ids = _candidates(logits, top_k, top_p, temperature)
    if ids is None:
        return vals
    flat_vals, flat_ids = vals.reshape(-1, vals.shape[-1]), ids.reshape(-1, ids.shape[-1])
    out = jnp.full((flat_vals.shape[0], logits.shape[-1]), -jnp.inf, jnp.float32)
    out = out.at[jnp.arange(flat_vals.shape[0])[:, None], flat_ids].set(flat_vals)
    return out.reshape(logits.shape)


def choose_tokens(logits: jax.Array, key: jax.Array, top_k: int | None = None,
                  top_p: Any | None = None, temperature: Any = 1.0) -> jax.Array:
    """One token per row of ``logits`` (B, V) -> (B,) int32; ``top_k == 1`` is greedy (argmax).

    Draws among the filtered candidates only (k values, not V), which is the same distribution as
    sampling from :func:`filter_logits` and cheaper.
    """
    return choose_with_uniform(logits, _uniform(key, logits.shape[0]), top_k, top_p, temperature)


def _uniform(key: jax.Array, batch: int) -> jax.Array:
    """The (batch, 1) uniforms :func:`choose_tokens` draws with ``key``."""
    return jax.random.uniform(key, (batch, 1), jnp.float32)


def _step_uniforms(rng: jax.Array, steps: int, batch: int) -> jax.Array:
    """(steps, batch, 1): row ``t`` holds the uniforms ``choose_tokens`` draws with ``fold_in(rng, t)``.

    Drawn for the whole batch before decoding, so a row's tokens do not depend on how the batch is split
    into chunks (:mod:`transformer_jax.decode_threads`). Compiled quickly (it runs once per call of a sampler).
    """
    return jax.vmap(lambda t: _uniform(jax.random.fold_in(rng, t), batch))(jnp.arange(steps))


step_uniforms = quick_jit(_step_uniforms, static_argnums=(1, 2))


def choose_with_uniform(logits: jax.Array, u: jax.Array, top_k: int | None = None,
                        top_p: Any | None = None, temperature: Any = 1.0,
                        vocab_limit: int | None = None) -> jax.Array:
    """:func:`choose_tokens` given its (B, 1) uniforms in [0, 1) instead of a key; with ``vocab_limit``, only
    ids below it are candidates (their logits alone are filtered and normalised)."""
    if vocab_limit is not None:
        logits = logits[..., :vocab_limit]
    if top_k == 1:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vals, ids = _candidates(logits, top_k, top_p, temperature)
    j = _inverse_cdf(u, vals)
    if ids is None:
        return j.astype(jnp.int32)
    return jnp.take_along_axis(ids, j[..., None], axis=-1)[..., 0].astype(jnp.int32)


def _inverse_cdf(u: jax.Array, logits: jax.Array) -> jax.Array:
    """Index drawn from softmax(logits) (B, K) over the last axis with ONE uniform per row, ``u`` (B, 1).

    Cheaper than Gumbel-max (``jax.random.categorical``), which needs a random number per logit: on
    CPU generating them cost more than the rest of a small model's decode step.
    """
    w = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    c = jnp.cumsum(w, axis=-1)
    j = jnp.sum(c <= u * c[..., -1:], axis=-1)
    # u * total can round up to total; never step past the last token with nonzero probability.
    last = logits.shape[-1] - 1 - jnp.argmax(jnp.flip(w > 0, axis=-1), axis=-1)
    return jnp.minimum(j, last)


def guided_logits(cond: jax.Array, uncond: jax.Array, scale: Any) -> jax.Array:
    """Classifier-free guidance ``uncond + s (cond - uncond)``, written so that s = 1 returns cond exactly."""
    return cond + (scale - 1.0) * (cond - uncond)


def last_guided_step(cfg_interval: float, steps: int) -> int:
    """The last sampled token (0-based) that guidance applies to, by LlamaGen's ``cfg_interval`` rule
    (autoregressive/models/generate.py): the first token (from the prefill) always, then decode step ``i``
    (token ``i + 1``) until ``cfg_interval > -1 and i > cfg_interval``; so -1 (or less): every token. LlamaGen's
    sampling scripts take it as a float, so a float is taken too."""
    if not isinstance(cfg_interval, (int, float)) or isinstance(cfg_interval, bool) or not math.isfinite(cfg_interval):
        raise ValueError(f"cfg_interval must be a number (-1: guidance at every step), got {cfg_interval!r}")
    return steps - 1 if cfg_interval <= -1 else min(math.floor(cfg_interval) + 1, steps - 1)


def decode_phases(model: GPT, batch: int, length: int, steps: int) -> int:
    """How many cache lengths the decode loop of :func:`sample` grows through (1 = one full-length cache).

    Each step attends to every position of its KV cache, filled or not, so a cache that grows in 4 phases
    reads on average 5/8 of the full length. That pays where the cache is a sizeable share of what a step
    reads (small models, large batches: 10-17% faster for the 4-layer GPT at batch 4 and 256 tokens on CPU, at
    about 2x the compile time); where the weights dominate (the 24-layer GPT at small batch) one phase
    compiles faster for the same speed. ``length`` is the full cache length, ``batch`` includes a guidance
    batch.
    """
    if steps < 32:
        return 1
    return 4 if cache_bytes(model, batch, length) >= decode_weight_bytes(model) / 4 else 1


def _grow_cache(cache: Any, length: int) -> Any:
    """The KV cache zero-padded along time to ``length`` positions (a no-op when it already has them)."""
    return tuple(tuple(jnp.pad(c, ((0, 0), (0, 0), (0, length - c.shape[2]), (0, 0))) for c in kv)
                 for kv in cache)


def _sampler(model: GPT, steps: int, top_k: int | None, use_top_p: bool, guided: bool, phases: int = 1,
             vocab_limit: int | None = None):
    """The jitted sampling program for one (model, static options) under the CPU strategies in force now."""
    return _compiled_sampler(model, steps, top_k, use_top_p, guided, phases, vocab_limit, cpu_backend.turned_off())


@functools.lru_cache(maxsize=64)
def _compiled_sampler(model: GPT, steps: int, top_k: int | None, use_top_p: bool, guided: bool, phases: int,
                      vocab_limit: int | None, cpu_plain: frozenset):
    """The jitted sampling program for one (model, static options); jit caches per input shape.

    The steps after the prefill run as ``phases`` loops (1 to max(1, steps - 1)); phase k's cache holds only
    the positions written up to its last step, grown (zero-padded) between phases. Masking makes the result
    independent of it. ``cpu_plain`` (:func:`transformer_jax.cpu_backend.turned_off`) keys the cache only.
    """
    bounds = [1 + k for k in even_bounds(steps - 1, phases)]  # step ranges, from step 1

    def run(variables, prefix, uncond, u, temperature, top_p, scale, guide_until):
        variables = prepare_decode_variables(model, variables)
        b, p = prefix.shape
        tokens = jnp.concatenate([prefix, uncond], axis=0) if guided else prefix
        # Step t writes position p + t - 1, so steps [start, end) need p + end - 1 positions.
        cache = init_cache(model, tokens.shape[0], p + bounds[1] - 1)
        tp = top_p if use_top_p else None

        def pick(logits, t):
            if guided:  # steps after guide_until take the conditional logits alone (cfg_interval)
                logits = jnp.where(t <= guide_until, guided_logits(logits[:b], logits[b:], scale), logits[:b])
            return choose_with_uniform(logits, u[t], top_k, tp, temperature, vocab_limit)

        logits, cache = model.apply(variables, tokens, cache, 0, method=GPT.decode)
        out = jnp.zeros((b, steps), jnp.int32).at[:, 0].set(pick(logits[:, -1], 0))

        def body(t, carry):
            out, cache = carry
            prev = lax.dynamic_slice_in_dim(out, t - 1, 1, axis=1)
            feed = jnp.concatenate([prev, prev], axis=0) if guided else prev
            logits, cache = model.apply(variables, feed, cache, p + t - 1, method=GPT.decode)
            out = lax.dynamic_update_slice_in_dim(out, pick(logits[:, 0], t)[:, None], t, axis=1)
            return out, cache

        for start, end in zip(bounds[:-1], bounds[1:]):
            out, cache = lax.fori_loop(start, end, body, (out, _grow_cache(cache, p + end - 1)))
        return out

    return jax.jit(run)


def checked_vocab_limit(vocab_limit: Any, vocab_size: int) -> int | None:
    """``vocab_limit`` of the samplers (None or an int in [1, vocab_size]), as the static option their programs
    take: None when it keeps the whole vocabulary, so equivalent calls share one compiled program."""
    _check_optional_positive_int("vocab_limit", vocab_limit)
    if vocab_limit is not None and vocab_limit > vocab_size:
        raise ValueError(f"vocab_limit must be at most the model's vocab_size {vocab_size}, got {vocab_limit}")
    return None if vocab_limit == vocab_size else vocab_limit


def _check_tokens(name: str, x: Any, vocab_size: int | Callable[[int], np.ndarray]) -> jax.Array:
    """``x`` as (batch, length) int32 ids, each below ``vocab_size``: one bound, or a function of the length
    giving one per position (:func:`transformer_jax.gpt.token_bounds`: leading positions may hold the ids of
    another table, e.g. class ids)."""
    if not hasattr(x, "shape") or len(x.shape) != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be (batch, length) integer token ids, got "
                         f"{getattr(x, 'shape', type(x))} {getattr(x, 'dtype', '')}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token (SOS or conditioning), got shape {x.shape}")
    if not isinstance(x, jax.core.Tracer):
        with jax.ensure_compile_time_eval():  # concrete ids are checked even inside another function's trace
            ids = np.asarray(x)
        bounds = np.broadcast_to(vocab_size(ids.shape[1]) if callable(vocab_size) else vocab_size, (ids.shape[1],))
        for bound in np.unique(bounds):  # each kind of position (e.g. class ids, then codes) on its own
            cols = np.flatnonzero(bounds == bound)
            lo, hi = int(ids[:, cols].min()), int(ids[:, cols].max())
            if lo < 0 or hi >= bound:
                where = "" if len(cols) == ids.shape[1] else f" at positions {cols[0]}..{cols[-1]}"
                raise ValueError(f"{name} token ids{where} must be in [0, {bound}), found range [{lo}, {hi}]")
    return jnp.asarray(x, jnp.int32)


def sample(model: GPT, variables: Any, prefix: jax.Array, steps: int, rng: jax.Array,
           top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
           guidance_scale: float | None = None, uncond_prefix: jax.Array | None = None,
           cache_phases: int | None = None, threads: int | None = None,
           vocab_limit: int | None = None, cfg_interval: float = -1) -> jax.Array:
    """Sample ``steps`` tokens after ``prefix`` (B, P) -> (B, steps) int32, in one jitted program.

    ``top_k=1`` decodes greedily. Classifier-free guidance: give ``guidance_scale`` and an
    ``uncond_prefix`` of the same shape; both run as one doubled batch and the logits are mixed as
    ``uncond + s (cond - uncond)`` before filtering; ``cfg_interval`` (LlamaGen's, :func:`last_guided_step`;
    -1: always) ends the guidance after that many decode steps, later tokens taking the conditional logits
    alone. ``cache_phases`` (default :func:`decode_phases`)
    and ``threads`` (default :func:`transformer_jax.decode_threads.decode_threads`: on CPU, row chunks of
    the batch run as concurrent programs, and the call then returns once they are done; one program under
    jit or for inputs spread over several devices) trade compile time or host threads for speed only: every
    value draws the same numbers for each row, so tokens are equal up to float rounding (on CPU products of
    up to 4 rows run a row at a time, :func:`transformer_jax.cpu_products.matmul`; a matmul over more rows
    may round a logit differently from one over fewer, which can flip a near-tie).

    ``vocab_limit``: draw only ids below it, e.g. the first-stage codebook size when the vocabulary also
    holds condition tokens (class or null tokens after the codes), which are no image codes.
    """
    _check_options(top_k, top_p, temperature)
    vocab_limit = checked_vocab_limit(vocab_limit, model.vocab_size)
    prefix = _check_tokens("prefix", prefix, functools.partial(token_bounds, model))
    _check_positive_int("steps", steps)
    b, p = prefix.shape
    if p + steps - 1 > model.block_size:
        raise ValueError(f"prefix length {p} + steps {steps} - 1 = {p + steps - 1} exceeds the model's "
                         f"block_size {model.block_size}")
    if p < model.n_unmasked:
        raise ValueError(f"prefix length {p} is shorter than n_unmasked {model.n_unmasked}: the unmasked "
                         f"block must be prefilled in one chunk")
    guided = guidance_scale is not None or uncond_prefix is not None
    if guided:
        if guidance_scale is None or uncond_prefix is None:
            raise ValueError("classifier-free guidance needs both guidance_scale and uncond_prefix")
        uncond_prefix = _check_tokens("uncond_prefix", uncond_prefix, functools.partial(token_bounds, model))
        if uncond_prefix.shape != prefix.shape:
            raise ValueError(f"uncond_prefix shape {uncond_prefix.shape} must equal prefix shape {prefix.shape}")
    else:
        uncond_prefix = jnp.zeros((0, p), jnp.int32)
    guide_until = last_guided_step(cfg_interval, steps)
    if cfg_interval != -1 and not guided:
        raise ValueError(f"cfg_interval={cfg_interval} needs classifier-free guidance (guidance_scale and "
                         "uncond_prefix)")
    _check_optional_positive_int("cache_phases", cache_phases)
    if uses_decode_kernels(model):  # once for all row chunks, outside their programs (variables may be prepared)
        variables = prepare_decode_variables(model, variables)
    rows = row_chunks(model, b, threads, variables, prefix, uncond_prefix, rng, temperature, top_p, guidance_scale)
    if cache_phases is None:
        cache_phases = decode_phases(model, (rows[0][1] - rows[0][0]) * (2 if guided else 1), p + steps - 1, steps)
    # At most one phase per decoded step, so counts that act alike share one compiled program.
    fn = _sampler(model, steps, top_k, top_p is not None, guided, max(1, min(cache_phases, steps - 1)), vocab_limit)
    u = step_uniforms(rng, steps, b)
    scalars = (jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p),
               jnp.float32(1.0 if guidance_scale is None else guidance_scale), jnp.int32(guide_until))
    return run_row_chunks(lambda r0, r1: fn(variables, prefix[r0:r1], uncond_prefix[r0:r1], u[:, r0:r1], *scalars),
                          rows)

"""Sampling: logit filters on constructed distributions, KV-cached sampling vs plain full-model loops,
determinism, classifier-free guidance, compile caching and argument errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seeded_weights import golden
from transformer_jax.convert import from_mingpt
from transformer_jax.cpu_products import DECODE_KERNELS
from transformer_jax.decode_kernels import prepare_decode_variables
from transformer_jax.decode_threads import decode_threads, row_chunks
from transformer_jax.gpt import GPT
from transformer_jax.sampling import _sampler, choose_tokens, decode_phases, filter_logits, sample


@pytest.fixture(scope="module")
def gpt():
    sd, manifest, data = golden("gpt_small")
    model, variables = from_mingpt(sd, 138, 65, 2, 4, 64)
    # Four rows (the golden input's three, and a fourth from its first row's later tokens): on 2 cores sample()
    # decodes them as two equal row chunks, one compiled program, where three rows would compile two.
    idx = data["input/idx"]
    prefix = jnp.asarray(np.concatenate([idx[:, :5], idx[:1, 5:10]]), jnp.int32)
    return model, variables, prefix


@pytest.fixture(scope="module")
def forward(gpt):
    model = gpt[0]
    return jax.jit(lambda v, idx: model.apply(v, idx))


def _kept(x):
    return set(np.flatnonzero(np.isfinite(np.asarray(x))))


def test_top_k_exact_and_ties():
    logits = jnp.array([[0.5, 2.0, 1.0, 2.0, -1.0, 2.0]])
    assert _kept(filter_logits(logits, top_k=2)[0]) == {1, 3}      # tie at the boundary: lower ids
    assert _kept(filter_logits(logits, top_k=4)[0]) == {1, 2, 3, 5}
    assert _kept(filter_logits(logits, top_k=100)[0]) == set(range(6))
    out = np.asarray(filter_logits(logits, top_k=3, temperature=0.5)[0])
    np.testing.assert_allclose(out[[1, 3, 5]], [4.0, 4.0, 4.0])   # temperature divides the logits


def _smallest_set(p, top_p):
    order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)
    return set(order[:min(n, len(p))])


def test_top_p_smallest_set_random_distributions():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        logits = rng.normal(0, 2, 40)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top_p = rng.uniform(0.05, 0.99)
        if np.min(np.abs(np.cumsum(np.sort(p)[::-1]) - top_p)) < 1e-5:
            continue  # too close to a boundary for float32
        assert _kept(filter_logits(jnp.asarray(logits, jnp.float32), top_p=top_p)) == _smallest_set(p, top_p)
        checked += 1
    assert checked > 150


def test_top_p_constructed_cases():
    logits = jnp.log(jnp.array([0.1, 0.5, 0.3, 0.05, 0.05]))
    assert _kept(filter_logits(logits, top_p=0.45)) == {1}          # 0.5 already reaches 0.45
    assert _kept(filter_logits(logits, top_p=0.7)) == {1, 2}        # 0.5 < 0.7 <= 0.8
    assert _kept(filter_logits(logits, top_p=0.85)) == {0, 1, 2}
    assert _kept(filter_logits(logits, top_p=1e-6)) == {1}          # always at least one token
    assert _kept(filter_logits(logits, top_p=1.0)) == set(range(5))
    ties = jnp.log(jnp.array([0.1, 0.3, 0.3, 0.3]))
    assert _kept(filter_logits(ties, top_p=0.5)) == {1, 2}          # ties resolved by token id
    # top-p applies to the top-k survivors, renormalised: {0.5, 0.3} -> {0.625, 0.375}
    assert _kept(filter_logits(logits, top_k=2, top_p=0.6)) == {1}
    assert _kept(filter_logits(logits, top_k=2, top_p=0.65)) == {1, 2}


def test_choose_tokens_distribution():
    logits = jnp.log(jnp.array([0.1, 0.5, 0.3, 0.05, 0.05]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: choose_tokens(logits[None], k, top_k=3, top_p=None)[0])(keys))
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, [1 / 9, 5 / 9, 3 / 9, 0, 0], atol=0.015)
    assert np.asarray(choose_tokens(jnp.array([[1.0, 3.0, 3.0]]), keys[0], top_k=1))[0] == 1


def test_filter_option_errors():
    x = jnp.zeros((1, 4))
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        filter_logits(x, top_k=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        filter_logits(x, top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        filter_logits(x, temperature=0.0)


def _full_model_loop(forward, variables, prefix, steps, uncond=None, scale=1.0, pick=None):
    """Plain greedy decoding with the full model (or ``pick(logits, step)`` choosing each token). Sequences
    are zero-padded to one fixed length so the forward compiles once; causality makes the padding
    irrelevant to the logits read at t."""
    b, p = prefix.shape
    pad = lambda z: np.concatenate([np.asarray(z), np.zeros((b, steps), np.int32)], 1)  # noqa: E731
    x = pad(prefix)
    u = None if uncond is None else pad(uncond)
    for t in range(p, p + steps):
        lg = np.asarray(forward(variables, jnp.asarray(x)))[:, t - 1]
        if u is not None:
            lu = np.asarray(forward(variables, jnp.asarray(u)))[:, t - 1]
            lg = lu + scale * (lg - lu)
        x[:, t] = np.argmax(lg, -1) if pick is None else np.asarray(pick(jnp.asarray(lg), t - p))
        if u is not None:
            u[:, t] = x[:, t]
    return x[:, p:]


def test_greedy_equals_full_model_loop(gpt, forward):
    model, variables, prefix = gpt
    out = sample(model, variables, prefix, 40, jax.random.key(0), top_k=1)
    assert out.shape == (4, 40) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), _full_model_loop(forward, variables, prefix, 40))


def test_bf16_samples_the_same_from_prepared_or_plain_variables(gpt):
    # On CPU a bf16 model decodes through (out, in) kernel copies; sample() makes them when not given them, once
    # for all row chunks, so prepared variables (what the Sampler keeps) draw the same tokens.
    model, variables, prefix = gpt
    bf16 = model.clone(dtype=jnp.bfloat16)
    prepared = prepare_decode_variables(bf16, variables)
    assert DECODE_KERNELS in prepared
    key, opts = jax.random.key(3), dict(top_k=40, temperature=0.9)
    out = np.asarray(sample(bf16, variables, prefix, 12, key, **opts))
    np.testing.assert_array_equal(out, np.asarray(sample(bf16, prepared, prefix, 12, key, **opts)))
    assert out.shape == (4, 12) and len(np.unique(out)) > 5


def test_step_t_draws_with_fold_in_t(gpt, forward):
    # The documented key contract: step t samples as choose_tokens(logits, fold_in(rng, t)) does.
    model, variables, prefix = gpt
    key, opts = jax.random.key(11), dict(top_k=40, top_p=0.9, temperature=0.8)
    out = np.asarray(sample(model, variables, prefix, 16, key, **opts))
    plain = _full_model_loop(forward, variables, prefix, 16,
                         pick=lambda lg, t: choose_tokens(lg, jax.random.fold_in(key, t), **opts))
    np.testing.assert_array_equal(out, plain)
    assert len(np.unique(out)) > 5


def test_vocab_limit_draws_only_ids_below_it(gpt, forward):
    # Condition tokens after the codes (class, null) are no image codes: with vocab_limit the draws are those of
    # the logits below it alone, with the same key contract.
    model, variables, prefix = gpt
    key, opts, limit = jax.random.key(11), dict(top_k=40, top_p=0.9, temperature=0.8), 100
    free = np.asarray(sample(model, variables, prefix, 16, key, **opts))
    assert free.max() >= limit  # this model does draw ids past the limit when free to
    out = np.asarray(sample(model, variables, prefix, 16, key, vocab_limit=limit, **opts))
    plain = _full_model_loop(forward, variables, prefix, 16,
                             pick=lambda lg, t: choose_tokens(lg[:, :limit], jax.random.fold_in(key, t), **opts))
    np.testing.assert_array_equal(out, plain)
    assert out.max() < limit and len(np.unique(out)) > 5
    for bad in (0, 139, True):
        with pytest.raises(ValueError, match="vocab_limit must be"):
            sample(model, variables, prefix, 4, key, vocab_limit=bad)


def _same_tokens_for_each(gpt, forward, name, values, steps, sampled):
    """Greedy decoding with ``name=value`` equals the plain loop for each value, and sampling (guided or not) with
    ``name=sampled`` draws exactly the tokens of ``name=1``."""
    model, variables, prefix = gpt
    plain = _full_model_loop(forward, variables, prefix, steps)
    for value in values:
        np.testing.assert_array_equal(np.asarray(sample(model, variables, prefix, steps, jax.random.key(0), top_k=1,
                                                        **{name: value})), plain)
    uncond = jnp.full_like(prefix, 7)
    for kw in ({}, {"guidance_scale": 2.0, "uncond_prefix": uncond}):
        one, other = (np.asarray(sample(model, variables, prefix, steps - 3, jax.random.key(5), top_k=40, top_p=0.9,
                                        **{name: n}, **kw)) for n in (1, sampled))
        np.testing.assert_array_equal(other, one)


def test_row_chunks_on_threads_give_the_same_tokens(gpt, forward, monkeypatch):
    # Splitting the batch into concurrently decoded row chunks (even or not) must not change any row's tokens
    # (each row keeps its own draws).
    model, variables, prefix = gpt
    _same_tokens_for_each(gpt, forward, "threads", (2, 3, 8), 24, sampled=2)
    # Chunks share one size; where it does not divide the batch the last chunk overlaps the one before, and
    # each row is returned once, with its own draws.
    small = GPT(vocab_size=1024, block_size=257, n_layer=4, n_head=4, n_embd=256)
    assert row_chunks(small, 3, 2) == [(0, 2), (1, 3)] and row_chunks(small, 5, 2) == [(0, 3), (2, 5)]
    assert row_chunks(small, 5, 4) == [(0, 2), (2, 4), (3, 5)] and row_chunks(small, 4, 3) == [(0, 2), (2, 4)]
    assert row_chunks(small, 3, 1) == [(0, 3)] and row_chunks(small, 3, 8) == [(0, 1), (1, 2), (2, 3)]
    for kw in ({}, {"guidance_scale": 2.0, "uncond_prefix": jnp.full_like(prefix[:3], 7)}):
        one, split = (np.asarray(sample(model, variables, prefix[:3], 21, jax.random.key(5), top_k=40, top_p=0.9,
                                        threads=n, **kw)) for n in (1, 2))
        assert split.shape == (3, 21)
        np.testing.assert_array_equal(split, one)
    # Under jit (traced inputs) the batch stays one program.
    whole = np.asarray(sample(model, variables, prefix, 6, jax.random.key(5)))
    traced = jax.jit(lambda x: sample(model, variables, x, 6, jax.random.key(5), threads=2))(prefix)
    np.testing.assert_array_equal(np.asarray(traced), whole)
    traced = jax.jit(lambda k: sample(model, variables, prefix, 6, k, threads=2))(jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(traced), whole)
    # The default: one chunk per core on CPU while the weights stay cached, never for one row or large models;
    # TAMING_JAX_DECODE_THREADS overrides it.
    monkeypatch.delenv("TAMING_JAX_DECODE_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert decode_threads(small, 4) == min(4, cores) and decode_threads(small, 1) == 1
    assert decode_threads(GPT(vocab_size=1024, block_size=257, n_layer=24, n_head=16, n_embd=1536), 4) == 1
    monkeypatch.setenv("TAMING_JAX_DECODE_THREADS", "3")
    assert decode_threads(small, 8) == 3 and decode_threads(small, 2) == 2
    monkeypatch.setenv("TAMING_JAX_DECODE_THREADS", "two")
    with pytest.raises(ValueError, match="TAMING_JAX_DECODE_THREADS must be a positive int, got 'two'"):
        decode_threads(small, 4)
    monkeypatch.delenv("TAMING_JAX_DECODE_THREADS")
    with pytest.raises(ValueError, match="threads must be a positive int"):
        sample(model, variables, prefix, 8, jax.random.key(0), threads=0)


def test_cache_phases_give_the_same_tokens(gpt, forward):
    # A decode loop whose cache grows through phases must draw exactly the tokens of one full-length cache,
    # including an uneven split.
    model, variables, prefix = gpt
    _same_tokens_for_each(gpt, forward, "cache_phases", (3, 4), 40, sampled=4)
    assert np.asarray(sample(model, variables, prefix, 1, jax.random.key(0), cache_phases=4)).shape == (4, 1)
    # The default: phases only where the cache is a sizeable share of a step's reads, and never for short runs.
    assert decode_phases(model, 3, 44, 40) == 4 and decode_phases(model, 3, 14, 10) == 1
    assert decode_phases(GPT(vocab_size=1024, block_size=257, n_layer=4, n_head=4, n_embd=256), 4, 256, 256) == 4
    assert decode_phases(GPT(vocab_size=1024, block_size=257, n_layer=24, n_head=16, n_embd=1536), 4, 64, 64) == 1
    with pytest.raises(ValueError, match="cache_phases must be a positive int"):
        sample(model, variables, prefix, 8, jax.random.key(0), cache_phases=0)


def test_guided_greedy_equals_full_model_loop(gpt, forward):
    model, variables, prefix = gpt
    uncond = jnp.full_like(prefix, 7)
    out = sample(model, variables, prefix, 12, jax.random.key(0), top_k=1, guidance_scale=3.0,
                 uncond_prefix=uncond)
    np.testing.assert_array_equal(np.asarray(out), _full_model_loop(forward, variables, prefix, 12, uncond, 3.0))


def test_determinism_keys_and_guidance_scale_one(gpt):
    model, variables, prefix = gpt
    a = np.asarray(sample(model, variables, prefix, 30, jax.random.key(1), top_k=40, top_p=0.95))
    b = np.asarray(sample(model, variables, prefix, 30, jax.random.key(1), top_k=40, top_p=0.95))
    c = np.asarray(sample(model, variables, prefix, 30, jax.random.key(2), top_k=40, top_p=0.95))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5
    assert len(np.unique(a)) > 10                    # really sampling, not collapsing to one token
    g = sample(model, variables, prefix, 30, jax.random.key(1), top_k=40, top_p=0.95,
               guidance_scale=1.0, uncond_prefix=jnp.zeros_like(prefix))
    np.testing.assert_array_equal(np.asarray(g), a)


def test_compiled_once_per_static_options(gpt):
    model, variables, prefix = gpt
    fn = _sampler(model, 8, 20, False, False, 1, None)
    sample(model, variables, prefix, 8, jax.random.key(0), top_k=20, temperature=0.7, threads=1)
    n = fn._cache_size()
    sample(model, variables, prefix, 8, jax.random.key(3), top_k=20, temperature=1.3, threads=1)
    assert _sampler(model, 8, 20, False, False, 1, None) is fn and fn._cache_size() == n == 1
    # A vocab_limit that keeps the whole vocabulary is no limit: the same program.
    sample(model, variables, prefix, 8, jax.random.key(3), top_k=20, threads=1, vocab_limit=model.vocab_size)
    assert fn._cache_size() == 1 and _sampler(model, 8, 20, False, False, 1, model.vocab_size)._cache_size() == 0
    sample(model, variables, prefix[:3], 8, jax.random.key(3), top_k=20, threads=2)  # rows 0-1 and 1-2: one size
    assert fn._cache_size() == 2
    sample(model, variables, prefix, 8, jax.random.key(3), top_k=20, threads=4)  # four chunks of one row
    assert fn._cache_size() == 3


def test_sample_argument_errors(gpt):
    model, variables, prefix = gpt
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="exceeds the model's block_size 65"):
        sample(model, variables, prefix, 62, key)
    with pytest.raises(ValueError, match="token ids must be in \\[0, 138\\)"):
        sample(model, variables, prefix + 200, 4, key)
    with pytest.raises(ValueError, match="prefix must be \\(batch, length\\)"):
        sample(model, variables, prefix[0], 4, key)
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, variables, prefix[:, :0], 4, key)
    with pytest.raises(ValueError, match="needs both guidance_scale and uncond_prefix"):
        sample(model, variables, prefix, 4, key, guidance_scale=2.0)
    with pytest.raises(ValueError, match="must equal prefix shape"):
        sample(model, variables, prefix, 4, key, guidance_scale=2.0, uncond_prefix=prefix[:, :2])
    for bad in (0, True):
        with pytest.raises(ValueError, match="steps must be a positive int"):
            sample(model, variables, prefix, bad, key)

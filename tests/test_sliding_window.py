"""Sliding-window sampling: taming's offset rule, equality with ordinary sampling on a window-sized grid,
per-position logits against a plain crop-and-forward loop (prefix and spatial conditioning), buckets,
and argument errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from transformer_jax import sliding_window
from transformer_jax.gpt import GPT
from transformer_jax.sampling import sample
from transformer_jax.sliding_window import row_groups, sample_sliding_window, window_offset

W = 4  # window


@pytest.fixture(scope="module")
def gpt():
    # block: 1 SOS + 16 cond codes + 15 window inputs
    model = GPT(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32)
    v = meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    # Larger weights than minGPT's init so the logits are far from uniform and positions matter.
    v = jax.tree_util.tree_map(lambda x: x * 6.0 if x.ndim >= 2 else x, v)
    return model, v


@pytest.fixture(scope="module")
def forward(gpt):
    model = gpt[0]
    return jax.jit(lambda v, idx: model.apply(v, idx))


def _taming_local(i, size):
    """scripts/sample_conditional.py, written for a 16 x 16 window."""
    if i <= 8:
        return i
    elif size - i < 8:
        return 16 - (size - i)
    return 8


def test_offset_rule_matches_taming():
    for size in (16, 17, 23, 40):
        for i in range(size):
            assert window_offset(i, size, 16) == _taming_local(i, size), (size, i)
            assert int(window_offset(jnp.int32(i), size, 16)) == _taming_local(i, size)
            li = window_offset(i, size, 16)
            assert 0 <= i - li and i - li + 16 <= size      # the window stays inside the grid


def test_row_groups_cover_rows_with_enough_context():
    for h, buckets in ((4, None), (9, None), (9, 2), (30, 3)):
        groups = row_groups(h, W, buckets)
        assert [g[0] for g in groups] == [0] + [g[1] for g in groups[:-1]] and groups[-1][1] == h
        for r0, r1, rows in groups:
            assert all(window_offset(i, h, W) + 1 <= rows <= W for i in range(r0, r1))
        if buckets is not None:
            assert len(groups) <= buckets


@pytest.mark.parametrize("method", ["cached", "prefix"])
def test_window_sized_grid_equals_ordinary_sampling(gpt, method):
    model, v = gpt
    prefix = jnp.array([[3], [7]], jnp.int32)
    key = jax.random.key(5)
    grid = sample_sliding_window(model, v, (W, W), W, key, prefix=prefix, top_k=10, method=method)
    seq = sample(model, v, prefix, W * W, key, top_k=10)
    assert grid.shape == (2, W, W) and grid.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(grid).reshape(2, -1), np.asarray(seq))
    assert len(np.unique(np.asarray(seq))) > 3


def test_vocab_limit_draws_only_ids_below_it(gpt):
    # As sample(vocab_limit=): only ids below the limit, each among the top 8 of the logits below it (without the
    # limit this grid holds ids up to 38).
    model, v = gpt
    prefix, key, limit = jnp.array([[3], [7]], jnp.int32), jax.random.key(5), 25
    grid, logits = sample_sliding_window(model, v, (6, 7), W, key, prefix=prefix, top_k=8, vocab_limit=limit,
                                         return_logits=True)
    grid, logits = np.asarray(grid), np.asarray(logits)
    assert grid.max() < limit and len(np.unique(grid)) > 5
    top8 = np.argsort(-logits[..., :limit], axis=-1)[..., :8]
    assert (top8 == grid[..., None]).any(-1).all()
    with pytest.raises(ValueError, match="vocab_limit must be at most the model's vocab_size 40"):
        sample_sliding_window(model, v, (4, 4), W, key, prefix=prefix, vocab_limit=41)


def _reference_logits(forward, v, grid, prefix, cond_grid, i, j):
    """taming's loop body: crop the window (and the conditioning), run the full model on
    cond + patch[:-1], take the last w*w logits and pick (local_i, local_j)."""
    h, w_ = grid.shape[1:]
    li, lj = window_offset(i, h, W), window_offset(j, w_, W)
    i0, j0 = i - li, j - lj
    parts = [] if prefix is None else [prefix]
    if cond_grid is not None:
        parts.append(cond_grid[:, i0:i0 + W, j0:j0 + W].reshape(grid.shape[0], -1))
    parts.append(grid[:, i0:i0 + W, j0:j0 + W].reshape(grid.shape[0], -1))
    x = np.concatenate(parts, 1)[:, :-1]
    logits = np.asarray(forward(v, jnp.asarray(x)))[:, -W * W:]
    return logits.reshape(grid.shape[0], W, W, -1)[:, li, lj]


# cached: all slots, 2 slots shared round-robin (resets), chunks of 3 (chunks run past the sampled
# position and are shifted back at the end of the window), and the cache-free prefix method.
@pytest.mark.parametrize("spatial,options", [
    (False, dict(method="cached")), (True, dict(method="cached")),
    (False, dict(method="cached", cache_slots=2, chunk=3)), (True, dict(method="cached", chunk=5)),
    (False, dict(method="prefix")), (True, dict(method="prefix"))])
def test_larger_grid_logits_match_plain_loop(gpt, forward, spatial, options):
    model, v = gpt
    h, w_ = 6, 7
    prefix = jnp.array([[1], [2]], jnp.int32)
    cond = jax.random.randint(jax.random.key(9), (2, h, w_), 0, 40) if spatial else None
    grid, logits = sample_sliding_window(model, v, (h, w_), W, jax.random.key(3), prefix=prefix,
                                         cond_grid=cond, top_k=8, temperature=0.9, return_logits=True,
                                         **options)
    grid, logits = np.asarray(grid), np.asarray(logits)
    cond_np = None if cond is None else np.asarray(cond)
    for i in range(h):
        for j in range(w_):
            ref = _reference_logits(forward, v, grid, np.asarray(prefix), cond_np, i, j)
            np.testing.assert_allclose(logits[:, i, j], ref, rtol=0, atol=1e-5, err_msg=f"({i},{j})")
            # the drawn token is one of the top-8 of those logits
            top8 = np.argsort(-ref, axis=-1)[:, :8]
            assert all(grid[b, i, j] in top8[b] for b in range(2))
    assert len(np.unique(grid)) > 5


@pytest.mark.parametrize("method", ["cached", "prefix"])
def test_row_chunks_keep_each_rows_codes(gpt, method):
    # Rows decoded as concurrent chunks (rows 0-1 and 1-2, row 1 kept once) draw what they draw in one program,
    # spatially conditioned.
    model, v = gpt
    prefix = jnp.array([[1], [2], [3]], jnp.int32)
    cond = jax.random.randint(jax.random.key(9), (3, 6, 7), 0, 40)
    (g1, l1), (g2, l2) = (sample_sliding_window(model, v, (6, 7), W, jax.random.key(4), prefix=prefix, cond_grid=cond,
                                                top_k=8, method=method, return_logits=True, threads=n) for n in (1, 2))
    np.testing.assert_array_equal(np.asarray(g2), np.asarray(g1))
    np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), rtol=0, atol=1e-5)
    assert l2.shape == (3, 6, 7, model.vocab_size)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        sample_sliding_window(model, v, (6, 7), W, jax.random.key(4), prefix=prefix, threads=0)


def test_buckets_and_cache_budget_change_cost_not_result(gpt, monkeypatch):
    model, v = gpt
    prefix = jnp.array([[1], [2]], jnp.int32)
    key = jax.random.key(11)
    a = sample_sliding_window(model, v, (6, 7), W, key, prefix=prefix, top_k=1, method="prefix", buckets=None)
    for buckets in (1, 2):
        b = sample_sliding_window(model, v, (6, 7), W, key, prefix=prefix, top_k=1, method="prefix",
                                  buckets=buckets)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = sample_sliding_window(model, v, (6, 7), W, key, prefix=prefix, top_k=1)   # cached
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    # A cache budget smaller than one window's cache leaves one shared slot: same codes.
    slots_used, real = [], sliding_window._cached_sampler
    monkeypatch.setattr(sliding_window, "_cached_sampler", lambda *args: slots_used.append(args[6]) or real(*args))
    monkeypatch.setattr(sliding_window, "CACHE_BYTES_BUDGET", 1)
    d = sample_sliding_window(model, v, (6, 7), W, key, prefix=prefix, top_k=1)
    assert slots_used == [1]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(d))


def test_argument_errors(gpt):
    model, v = gpt
    key = jax.random.key(0)
    prefix = jnp.array([[1]], jnp.int32)
    with pytest.raises(ValueError, match="at least the window size"):
        sample_sliding_window(model, v, (3, 8), W, key, prefix=prefix)
    with pytest.raises(ValueError, match="needs conditioning"):
        sample_sliding_window(model, v, (4, 4), W, key)
    with pytest.raises(ValueError, match="exceeds the model's block_size 32"):
        sample_sliding_window(model, v, (4, 4), W, key, prefix=jnp.zeros((1, 2), jnp.int32),
                              cond_grid=jnp.zeros((1, 4, 4), jnp.int32))
    with pytest.raises(ValueError, match="cond_grid must be \\(batch, 5, 5\\)"):
        sample_sliding_window(model, v, (5, 5), W, key, cond_grid=jnp.zeros((1, 4, 4), jnp.int32))
    with pytest.raises(ValueError, match="cond_grid batch 2 != prefix batch 1"):
        sample_sliding_window(model, v, (4, 4), W, key, prefix=prefix, cond_grid=jnp.zeros((2, 4, 4), jnp.int32))
    with pytest.raises(ValueError, match="method must be 'cached' or 'prefix', got 'kv'"):
        sample_sliding_window(model, v, (4, 4), W, key, prefix=prefix, method="kv")
    with pytest.raises(ValueError, match="cache_slots must be a positive int"):
        sample_sliding_window(model, v, (4, 4), W, key, prefix=prefix, cache_slots=0)
    for bad in (0, True):  # a bool is an int to Python, not a bucket count
        with pytest.raises(ValueError, match="buckets must be"):
            sample_sliding_window(model, v, (4, 4), W, key, prefix=prefix, buckets=bad)
    for bad in (None, True, 2.0):
        with pytest.raises(ValueError, match="window must be a positive int"):
            sample_sliding_window(model, v, (4, 4), bad, key, prefix=prefix)
    with pytest.raises(ValueError, match="token ids must be in"):
        sample_sliding_window(model, v, (4, 4), W, key, prefix=prefix + 100)

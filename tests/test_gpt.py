"""GPT (minGPT-compatible): golden logits, converter round trip and errors, KV cache, dtype, remat,
logical axis names and sharded forward."""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from common_jax.mesh import LOGICAL_AXIS_RULES, logical_to_sharding, make_mesh
from seeded_weights import golden, suggested_atol
from transformer_jax.convert import from_mingpt, to_mingpt
from transformer_jax.attention import attention_mask, causal_attention, causal_query_blocks, softmax_attention
from transformer_jax.cpu_products import DECODE_KERNELS, matmul, matmul_transposed
from transformer_jax.decode_kernels import prepare_decode_variables
from transformer_jax.gpt import (GPT, abstract_variables, init_cache, init_variables, kernels_in_compute_dtype,
                                 logical_partition_specs)
from transformer_jax.mixed_products import mixed_dense, mixed_einsum


@pytest.fixture(scope="module")
def gold():
    sd, manifest, data = golden("gpt_small")
    cfg = manifest["config"]["GPT"]
    model, variables = from_mingpt(sd, cfg["vocab_size"], cfg["block_size"], cfg["n_layer"],
                                   cfg["n_head"], cfg["n_embd"])
    return sd, manifest, data, model, variables


@pytest.fixture(scope="module")
def forward(gold):
    model = gold[3]
    return jax.jit(lambda v, idx: model.apply(v, idx))


def test_golden_logits(gold, forward):
    _, manifest, data, _, variables = gold
    idx = jnp.asarray(data["input/idx"], jnp.int32)
    np.testing.assert_allclose(np.asarray(forward(variables, idx)), data["output/logits"],
                               rtol=0, atol=suggested_atol(manifest, "logits"))
    np.testing.assert_allclose(np.asarray(forward(variables, idx[:, :40])), data["output/logits_prefix40"],
                               rtol=0, atol=suggested_atol(manifest, "logits_prefix40"))


def test_round_trip_exact(gold):
    sd, _, _, _, variables = gold
    back = to_mingpt(variables)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)  # masks included (tril buffers)


def test_converter_bad_keys_listed(gold):
    sd = dict(gold[0])
    del sd["blocks.1.attn.query.bias"]
    sd["blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    sd["head.weight"] = np.zeros((10, 64), np.float32)
    with pytest.raises(ValueError) as e:
        from_mingpt(sd, 138, 65, 2, 4, 64)
    msg = str(e.value)
    assert "missing key 'blocks.1.attn.query.bias'" in msg
    assert "unexpected key 'blocks.0.attn.extra.weight'" in msg
    assert "shape mismatch for 'head.weight': expected (138, 64), found (10, 64)" in msg


def test_converter_wrong_config_and_prefix(gold):
    sd = gold[0]
    with pytest.raises(ValueError, match="missing key 'blocks.2.ln1.weight'"):
        from_mingpt(sd, 138, 65, 3, 4, 64)
    with pytest.raises(ValueError, match="divisible"):
        from_mingpt(sd, 138, 65, 2, 5, 64)
    prefixed = {"transformer." + k: v for k, v in sd.items()}
    prefixed["first_stage_model.foo"] = np.zeros(1)
    _, v = from_mingpt(prefixed, 138, 65, 2, 4, 64, prefix="transformer.")
    np.testing.assert_array_equal(v["params"]["head"]["kernel"], sd["head.weight"].T)
    with pytest.raises(ValueError, match="do not look like GPT params"):
        to_mingpt({"params": {"foo": np.zeros(1)}})


def _ref_forward(sd, idx, n_head, n_unmasked=0):
    """Plain numpy float64 minGPT forward (taming's formulas, mask with the unmasked prefix)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    t = idx.shape[1]
    x = sd["tok_emb.weight"][idx] + sd["pos_emb"][:, :t]
    mask = np.tril(np.ones((t, t)))
    mask[:n_unmasked, :n_unmasked] = 1

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    i = 0
    while f"blocks.{i}.ln1.weight" in sd:
        b = f"blocks.{i}."
        h = ln(x, b + "ln1")
        bsz, _, c = h.shape
        split = lambda y: y.reshape(bsz, t, n_head, c // n_head).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(lin(h, b + "attn.query")), split(lin(h, b + "attn.key")), split(lin(h, b + "attn.value"))
        att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(c // n_head)
        att = np.where(mask == 0, -np.inf, att)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(bsz, t, c)
        x = x + lin(y, b + "attn.proj")
        h = lin(ln(x, b + "ln2"), b + "mlp.0")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = x + lin(h, b + "mlp.2")
        i += 1
    return ln(x, "ln_f") @ sd["head.weight"].T


def test_numpy_reference_and_n_unmasked(gold):
    sd, _, data, _, _ = gold
    idx = np.asarray(data["input/idx"])[:, :20]
    for n_unmasked in (0, 6):
        model, v = from_mingpt(sd, 138, 65, 2, 4, 64, n_unmasked=n_unmasked)
        out = np.asarray(jax.jit(model.apply)(v, jnp.asarray(idx, jnp.int32)))
        np.testing.assert_allclose(out, _ref_forward(sd, idx, 4, n_unmasked), rtol=0, atol=2e-5)
        # KV cache: the unmasked block in the prefill, then single tokens.
        cache = init_cache(model, 3, 20)
        lg, cache = jax.jit(lambda v, x, c: model.apply(v, x, c, 0, method=GPT.decode))(
            v, jnp.asarray(idx[:, :8], jnp.int32), cache)
        np.testing.assert_allclose(np.asarray(lg), out[:, :8], rtol=0, atol=1e-5)
    # n_unmasked really lets prefix positions see later prefix tokens (and nothing else does).
    changed = idx.copy()
    changed[:, 4] = (changed[:, 4] + 1) % 138
    ref_a, ref_b = _ref_forward(sd, idx, 4, 6), _ref_forward(sd, changed, 4, 6)
    assert np.abs(ref_a[:, 2] - ref_b[:, 2]).max() > 1e-3


def test_bf16_matmul_on_cpu_reads_the_bf16_kernel():
    # A bf16 product is accumulated in float32 and rounded once, as before; but asked for a bf16 result, XLA:CPU
    # widened the whole kernel to float32 first (every decode step: bf16 sampling of the 24-layer GPT ran slower
    # than float32). With a float32 result and one rounding, the optimised program converts no kernel.
    x = jax.random.normal(jax.random.key(0), (4, 256)).astype(jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (256, 1024)).astype(jnp.bfloat16)
    y = jax.jit(matmul)(x, kernel)
    assert y.dtype == jnp.bfloat16
    want = (x.astype(jnp.float32) @ kernel.astype(jnp.float32)).astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
    # The same for the product a bf16 model's layers make on CPU (mixed_dense), here with a kernel already in bf16.
    for fn in (matmul, lambda x, k: mixed_dense(x, k, None)):
        hlo = jax.jit(fn).lower(x, kernel).compile().as_text()
        assert "f32[256,1024]" not in hlo, [line for line in hlo.splitlines() if "f32[256,1024]" in line][:3]


def test_transposed_bf16_product_contracts_the_kernels_minor_axis():
    # The (out, in) form XLA:CPU streams 3x faster for bf16: the optimised program contracts the kernel's dimension
    # 1 and converts no kernel to float32; one row runs as two (XLA widens a one-row bf16 product).
    kernel_t = jax.random.normal(jax.random.key(1), (1024, 256)).astype(jnp.bfloat16)
    for rows in (1, 3):
        x = jax.random.normal(jax.random.key(rows), (rows, 1, 256)).astype(jnp.bfloat16)
        y = jax.jit(matmul_transposed)(x, kernel_t)
        assert y.shape == (rows, 1, 1024) and y.dtype == jnp.bfloat16
        want = (x.astype(jnp.float32) @ kernel_t.astype(jnp.float32).T).astype(jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
        hlo = jax.jit(matmul_transposed).lower(x, kernel_t).compile().as_text()
        dots = [line for line in hlo.splitlines() if " dot(" in line]
        assert len(dots) == 1 and "rhs_contracting_dims={1}" in dots[0], dots
        assert f"f32[{max(rows, 2)},1024]" in dots[0], dots
        assert "f32[1024,256]" not in hlo and "f32[256,1024]" not in hlo


def test_decode_variables_of_a_bf16_model_hold_out_in_kernels(gold):
    _, _, data, _, variables = gold
    model = GPT(vocab_size=138, block_size=65, n_layer=2, n_head=4, n_embd=64, dtype=jnp.bfloat16)
    assert DECODE_KERNELS not in init_variables(model, jax.random.key(0))     # init makes no copies
    prepared = prepare_decode_variables(model, variables)
    assert prepare_decode_variables(model, prepared) is prepared             # prepared once, not again
    shapes = {jax.tree_util.keystr(p): (x.shape, x.dtype) for p, x in
              jax.tree_util.tree_leaves_with_path(prepared[DECODE_KERNELS])}
    assert len(shapes) == 2 * 6 + 1                                          # every kernel, as a 2D (out, in) copy
    assert shapes["['blocks_0']['mlp_fc']['kernel_t']"] == ((256, 64), jnp.bfloat16)
    assert shapes["['blocks_1']['attn']['proj']['kernel_t']"] == ((64, 64), jnp.bfloat16)
    assert shapes["['head']['kernel_t']"] == ((138, 64), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(prepared[DECODE_KERNELS]["blocks_0"]["attn"]["query"]["kernel_t"]),
                                  np.asarray(variables["params"]["blocks_0"]["attn"]["query"]["kernel"]
                                             .reshape(64, 64).T.astype(jnp.bfloat16)))
    # Decoding and the full forward through the copies give what the parameters give (both accumulate in float32
    # and round once; only the summation order may differ).
    idx = jnp.asarray(data["input/idx"], jnp.int32)
    dec = jax.jit(lambda v: model.apply(v, idx[:, :20], init_cache(model, 3, 20), 0, method=GPT.decode)[0])
    np.testing.assert_allclose(np.asarray(dec(prepared)), np.asarray(dec(variables)), rtol=0, atol=2e-2)
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(prepared, idx)),
                               np.asarray(jax.jit(model.apply)(variables, idx)), rtol=0, atol=2e-2)
    # Float32 models keep their (in, out) parameters, the faster float32 form.
    f32 = GPT(vocab_size=138, block_size=65, n_layer=2, n_head=4, n_embd=64)
    assert prepare_decode_variables(f32, variables) is variables


def test_kv_cache_matches_full_forward(gold, forward):
    _, _, data, model, variables = gold
    idx = jnp.asarray(data["input/idx"], jnp.int32)
    full = np.asarray(forward(variables, idx))
    step = jax.jit(lambda v, tok, cache, pos: model.apply(v, tok, cache, pos, method=GPT.decode))
    cache = init_cache(model, 3)
    lg, cache = step(variables, idx[:, :10], cache, 0)      # prefill
    np.testing.assert_allclose(np.asarray(lg), full[:, :10], rtol=0, atol=1e-5)
    for t in range(10, 60):
        lg, cache = step(variables, idx[:, t:t + 1], cache, t)
        np.testing.assert_allclose(np.asarray(lg[:, 0]), full[:, t], rtol=0, atol=1e-5, err_msg=f"step {t}")
    lg, cache = jax.jit(lambda v, tok, c: model.apply(v, tok, c, 60, method=GPT.decode))(
        variables, idx[:, 60:65], cache)                    # a later multi-token chunk
    np.testing.assert_allclose(np.asarray(lg), full[:, 60:65], rtol=0, atol=1e-5)
    assert cache[0][0].shape == (3, 4, 65, 16)              # (batch, heads, time, head_dim)


def test_length_and_cache_errors(gold):
    model, variables = gold[3], gold[4]
    with pytest.raises(ValueError, match="exceeds block_size 65"):
        model.apply(variables, jnp.zeros((1, 66), jnp.int32))
    with pytest.raises(ValueError, match="cache has 1 layers, model has 2"):
        model.apply(variables, jnp.zeros((1, 1), jnp.int32), init_cache(model, 1)[:1], 0, method=GPT.decode)
    with pytest.raises(ValueError, match="length must be in"):
        init_cache(model, 1, 66)
    with pytest.raises(ValueError, match="idx must be"):
        model.apply(variables, jnp.zeros((5,), jnp.int32))


def test_bf16_compute_keeps_f32_params(gold, forward):
    sd, _, data, _, variables = gold
    model = GPT(vocab_size=138, block_size=65, n_layer=2, n_head=4, n_embd=64, dtype=jnp.bfloat16)
    params = nn.meta.unbox(abstract_variables(model))["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    idx = jnp.asarray(data["input/idx"], jnp.int32)
    out = jax.jit(model.apply)(variables, idx)
    ref = np.asarray(forward(variables, idx))
    assert out.dtype == jnp.float32
    err = np.abs(np.asarray(out) - ref).max()
    assert 0 < err < 0.03 * np.abs(ref).max()  # bf16 rounding is visible but small


def _bf16_close(got, want, tol=2e-2):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max()


def test_mixed_dense_and_einsum_match_float32_autodiff():
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (2, 16, 64)).astype(jnp.bfloat16)
    kernel = jax.random.normal(keys[1], (64, 96)) * 0.1
    bias = jax.random.normal(keys[2], (96,))
    weight = jax.random.normal(keys[3], (2, 16, 96))          # makes every output element's gradient differ
    # Forward: bf16 operands, float32 accumulation and bias, one rounding.
    y = jax.jit(mixed_dense)(x, kernel, bias)
    assert y.dtype == jnp.bfloat16
    want = (x.astype(jnp.float32) @ kernel.astype(jnp.bfloat16).astype(jnp.float32) + bias).astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
    # Backward: the float32 gradients of the same function, within bf16 rounding; kernel and bias grads float32.
    got = jax.jit(jax.grad(lambda x, k, b: jnp.sum(mixed_dense(x, k, b) * weight), argnums=(0, 1, 2)))(
        x, kernel, bias)
    ref = jax.grad(lambda x, k, b: jnp.sum((x @ k + b) * weight), argnums=(0, 1, 2))(
        x.astype(jnp.float32), kernel, bias)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.float32, jnp.float32]
    for g, r in zip(got, ref):
        _bf16_close(g, r)
    assert jax.grad(lambda k: jnp.sum(mixed_dense(x, k, None)))(kernel).dtype == jnp.float32   # no bias

    q, k = (jax.random.normal(kk, (2, 3, 8, 16)).astype(jnp.bfloat16) for kk in keys[4:])
    s = mixed_einsum("bhqd,bhkd->bhqk", q, k)
    assert s.dtype == jnp.float32
    w = jnp.arange(s.size, dtype=jnp.float32).reshape(s.shape) / s.size
    got = jax.grad(lambda q, k: jnp.sum(mixed_einsum("bhqd,bhkd->bhqk", q, k) * w), argnums=(0, 1))(q, k)
    ref = jax.grad(lambda q, k: jnp.sum(jnp.einsum("bhqd,bhkd->bhqk", q, k) * w), argnums=(0, 1))(
        q.astype(jnp.float32), k.astype(jnp.float32))
    for g, r in zip(got, ref):
        assert g.dtype == jnp.bfloat16
        _bf16_close(g, r)
    with pytest.raises(ValueError, match="at least two terms"):
        mixed_einsum("bq,bk->b", q[0, 0], k[0, 0])


def test_bf16_training_gradients_multiply_bf16_operands(gold):
    # On CPU, autodiff of a bf16 model's products (float32 accumulation) had widened the cotangent and the kernel
    # to float32 for the backward products; XLA:CPU multiplies bf16 operands (AMX on Sapphire Rapids) about 4x
    # faster. mixed_dense / mixed_einsum keep them bf16: the gradient program's products with bf16 operands
    # are then at least the forward's 13 dense products and their input gradients (before: 15 of 63).
    _, _, data, f32_model, variables = gold
    model = GPT(vocab_size=138, block_size=65, n_layer=2, n_head=4, n_embd=64, dtype=jnp.bfloat16)
    idx = jnp.asarray(data["input/idx"], jnp.int32)

    def loss_fn(m):
        return lambda p: jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, idx))[..., 0])

    grad = jax.jit(jax.grad(loss_fn(model)))
    hlo = grad.lower(variables["params"]).compile().as_text()
    decl = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    operands = [(decl.get(a), decl.get(b)) for a, b in re.findall(r"\bdot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]
    n_dense = 6 * model.n_layer + 1
    assert sum(o == ("bf16", "bf16") for o in operands) >= 2 * n_dense, operands
    # The gradients are the float32 model's within bf16 rounding, all float32.
    # (The key biases' gradient is zero in exact arithmetic, hence the floor relative to the largest gradient.)
    got = grad(variables["params"])
    ref = dict(jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss_fn(f32_model)))(variables["params"])))
    largest = max(np.abs(np.asarray(r)).max() for r in ref.values())
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        r = np.asarray(ref[path])
        assert g.dtype == jnp.float32, path
        assert np.abs(np.asarray(g) - r).max() <= max(0.05 * np.abs(r).max(), 1e-3 * largest), path


def test_kernels_cast_once_for_decoding_are_bit_identical(gold):
    _, _, data, _, variables = gold
    model = GPT(vocab_size=138, block_size=65, n_layer=2, n_head=4, n_embd=64, dtype=jnp.bfloat16)
    cast = kernels_in_compute_dtype(model, variables)
    dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(cast)}
    assert dtypes["['params']['head']['kernel']"] == jnp.bfloat16
    assert dtypes["['params']['blocks_0']['mlp_fc']['kernel']"] == jnp.bfloat16
    assert dtypes["['params']['blocks_0']['ln1']['scale']"] == jnp.float32       # LN stays float32
    assert dtypes["['params']['tok_emb']"] == jnp.float32
    idx = jnp.asarray(data["input/idx"], jnp.int32)
    np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)(variables, idx)),
                                  np.asarray(jax.jit(model.apply)(cast, idx)))
    f32 = GPT(vocab_size=138, block_size=65, n_layer=2, n_head=4, n_embd=64)
    assert kernels_in_compute_dtype(f32, variables) is variables


def test_attention_impl_option(gold, forward):
    _, _, data, _, variables = gold
    idx = jnp.asarray(data["input/idx"], jnp.int32)

    def value_and_grads(impl, n_unmasked=0):
        m = GPT(vocab_size=138, block_size=65, n_layer=2, n_head=4, n_embd=64, n_unmasked=n_unmasked,
                attention_impl=impl)
        loss = lambda p: jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, idx))[..., 0])
        return jax.jit(jax.value_and_grad(loss))(variables["params"]), jax.jit(m.apply)(variables, idx)

    # The explicit (B, H, T, D) attention (the form with attention dropout) must agree with
    # jax.nn.dot_product_attention ("xla", which "" picks on CPU) in values and gradients, with and without
    # taming's unmasked prefix.
    np.testing.assert_array_equal(np.asarray(value_and_grads("xla")[1]), np.asarray(forward(variables, idx)))
    for n_unmasked in (0, 5):
        (l0, g0), y0 = value_and_grads("xla", n_unmasked)
        (l1, g1), y1 = value_and_grads("explicit", n_unmasked)
        np.testing.assert_allclose(y0, y1, rtol=0, atol=2e-5)
        np.testing.assert_allclose(l0, l1, rtol=0, atol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), g0, g1)
    bad = GPT(vocab_size=138, block_size=65, n_layer=2, n_head=4, n_embd=64, attention_impl="flash")
    with pytest.raises(ValueError, match="attention_impl must be"):
        bad.apply(variables, idx)


def test_causal_query_blocks_skip_only_masked_scores():
    # Each query block sees every key its mask allows: the causal prefix, or the whole unmasked prefix.
    assert causal_query_blocks(16, 0, 1) == [(0, 16, 16)]
    assert causal_query_blocks(16, 10, 4) == [(0, 4, 10), (4, 8, 10), (8, 12, 12), (12, 16, 16)]
    assert causal_query_blocks(64, 0) == [(0, 32, 32), (32, 64, 64)]     # the default splits from t = 32 on
    assert causal_query_blocks(2, 0, 4) == [(0, 1, 1), (1, 2, 2)]          # never an empty block
    with pytest.raises(ValueError, match="n_blocks must be >= 1"):
        causal_query_blocks(16, 0, 0)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 16, 8)) for i in range(3))
    pos = jnp.arange(16)

    def loss(attend, q, k, v):
        return jnp.sum(jnp.sin(attend(q, k, v)))

    def outputs(attend):  # one compiled program per variant (op by op, the gradients took a minute)
        return jax.jit(lambda q, k, v: (attend(q, k, v), *jax.value_and_grad(
            lambda *a: loss(attend, *a), argnums=(0, 1, 2))(q, k, v)))(q, k, v)

    for n_unmasked in (0, 3, 10):
        y0, l0, g0 = outputs(lambda q, k, v: softmax_attention(q, k, v, attention_mask(pos, pos, n_unmasked),
                                                               jnp.float32))
        for n_blocks in (2, 3, 4):
            y1, l1, g1 = outputs(lambda q, k, v: causal_attention(q, k, v, n_unmasked, jnp.float32, n_blocks=n_blocks))
            np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-6)
            np.testing.assert_allclose(l1, l0, rtol=1e-6)
            for a, b in zip(g1, g0):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_remat_same_values_and_grads(gold):
    _, _, data, model, variables = gold
    remat = GPT(vocab_size=138, block_size=65, n_layer=2, n_head=4, n_embd=64, remat=True)
    idx = jnp.asarray(data["input/idx"], jnp.int32)[:, :32]

    def loss(m, p):
        return jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, idx))[..., 0])

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(variables["params"])
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(variables["params"])
    np.testing.assert_allclose(l0, l1, rtol=0, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), g0, g1)


def test_dropout_training_mode(gold):
    _, _, data, _, variables = gold
    model = GPT(vocab_size=138, block_size=65, n_layer=2, n_head=4, n_embd=64,
                embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1, remat=True)
    idx = jnp.asarray(data["input/idx"], jnp.int32)[:, :16]
    run = jax.jit(lambda v, key: model.apply(v, idx, deterministic=False, rngs={"dropout": key}))
    a, b, c = (np.asarray(run(variables, jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    assert np.abs(a - np.asarray(jax.jit(model.apply)(variables, idx))).max() > 1e-3


def test_every_param_has_logical_names():
    model = GPT(vocab_size=138, block_size=65, n_layer=2, n_head=4, n_embd=64)
    specs = logical_partition_specs(model)["params"]
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_shapes = dict(jax.tree_util.tree_leaves_with_path(shapes["params"]))
    assert len(flat_specs) == len(flat_shapes) == 2 + 2 * 16 + 3
    for path, spec in flat_specs:
        assert len(spec) == len(flat_shapes[path].shape), path
        assert all(n in known for n in spec), (path, spec)
    assert specs["blocks_0"]["attn"]["query"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads", "kv")
    assert specs["tok_emb"] == jax.sharding.PartitionSpec("vocab", "embed")


def test_sharded_forward_equals_single_device(gold, forward):
    _, _, data, model, variables = gold
    assert jax.device_count() == 8
    mesh = make_mesh(data=4, fsdp=1, model=2)
    shardings = logical_to_sharding(abstract_variables(model), mesh)
    sharded = jax.device_put(variables, shardings)
    assert sharded["params"]["blocks_0"]["attn"]["query"]["kernel"].sharding.spec[1] == "model"
    idx = np.concatenate([data["input/idx"]] * 4, 0)[:8].astype(np.int32)
    idx_sharded = jax.device_put(idx, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    out = jax.jit(lambda v, x: model.apply(v, x))(sharded, idx_sharded)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(forward(variables, jnp.asarray(idx))), rtol=0, atol=1e-5)

"""LlamaGen's LLaMA block (``gpt.block="llama"``): the converted golden model of LlamaGen's own code (logits,
greedy guided sampling), KV-cached decode and grouped KV heads against a numpy rendering of LlamaGen's forward,
logical axis names, bf16/remat/dropout, LlamaGen's cfg_interval rule, and the converter's and options' refusals."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common_jax.mesh import LOGICAL_AXIS_RULES
from seeded_weights import GOLDEN_DIR, suggested_atol
from transformer_jax.blocks.llama import llama_options
from transformer_jax.convert import LLAMAGEN_GPT_SIZES, from_llamagen, llamagen_gpt_config
from transformer_jax.convert_llamagen import llamagen_model_args, llamagen_state_shapes
from transformer_jax.gpt import GPT, gpt_from_config, init_cache
from transformer_jax.sampling import last_guided_step, sample

NAME = "llamagen_gpt_small"


@pytest.fixture(scope="module")
def golden():
    manifest = json.loads((GOLDEN_DIR / "llamagen" / f"{NAME}.json").read_text())
    with np.load(GOLDEN_DIR / "llamagen" / f"{NAME}.npz", allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    sd = {k[len("state_dict/"):]: v for k, v in data.items() if k.startswith("state_dict/")}
    assert sorted(sd) == sorted(manifest["state_dict_keys"])
    model, variables = from_llamagen(sd, manifest["config"])
    return manifest, data, sd, model, variables


def test_logits_equal_llamagen(golden):
    manifest, data, _, model, variables = golden
    codes, labels = data["input/codes"], data["input/labels"]  # the third label is the null class
    assert labels[2] == manifest["config"]["num_classes"]
    idx = np.concatenate([labels[:, None], codes[:, :-1]], axis=1)
    ref = data["output/logits"]
    # The policy of tests/README.md on LlamaGen's manifest: its suggested atol, raised to 4 ulps of max|ref|.
    atol = suggested_atol({"outputs": {"logits": {"suggested_atol": manifest["suggested_atol"]["output/logits"],
                                                  "max_abs_fp64": float(np.abs(ref).max())}}}, "logits")
    np.testing.assert_allclose(np.asarray(model.apply(variables, jnp.asarray(idx))), ref, rtol=0, atol=atol)


def llamagen_greedy(model, variables, labels, steps, scale, cfg_interval, null):
    """LlamaGen's generate (greedy, cfg over a doubled batch) written out in Python over the full forward: the
    prefill's token is guided; decode step i turns guidance off for good once ``cfg_interval > -1 and
    i > cfg_interval``. Returns the tokens and the smallest top-1/top-2 gap met on the way."""
    forward = jax.jit(lambda idx: model.apply(variables, idx))
    b = len(labels)
    seq = np.zeros((2 * b, steps), np.int32)  # [class | tokens]; causal, so the zeros after t do not matter
    seq[:, 0] = np.concatenate([labels, np.full(b, null)])
    tokens, gap, cfg_flag = [], np.inf, True
    for k in range(steps):
        if k > 0 and cfg_interval > -1 and k - 1 > cfg_interval:
            cfg_flag = False
        logits = np.asarray(forward(jnp.asarray(seq)))[:, k]
        cond, uncond = logits[:b], logits[b:]
        mixed = uncond + (cond - uncond) * scale if cfg_flag else cond
        top2 = np.sort(mixed, axis=-1)[:, -2:]
        gap = min(gap, float((top2[:, 1] - top2[:, 0]).min()))
        tok = mixed.argmax(-1)
        tokens.append(tok)
        if k + 1 < steps:
            seq[:, k + 1] = np.concatenate([tok, tok])
    return np.stack(tokens, axis=1), gap


def test_greedy_guided_sampling_equals_llamagen_generate_and_cfg_interval(golden):
    manifest, data, _, model, variables = golden
    labels, null = data["input/labels"][:2], manifest["config"]["num_classes"]
    prefix, uncond = jnp.asarray(labels[:, None]), jnp.full((2, 1), null, jnp.int32)
    run = lambda scale, **kw: np.asarray(sample(model, variables, prefix, 64, jax.random.key(0), top_k=1,  # noqa
                                                guidance_scale=scale, uncond_prefix=uncond, **kw))
    np.testing.assert_array_equal(run(1.0), data["output/greedy_cfg1"])
    np.testing.assert_array_equal(run(4.0), data["output/greedy_cfg4"])
    # cfg_interval: guidance for the prefill's token and decode steps 0..5, then the conditional logits alone.
    ref, gap = llamagen_greedy(model, variables, labels, 64, 4.0, 5, null)
    assert gap > 1e-4  # no near-tie on this path: the equality below is not at the mercy of rounding
    got = run(4.0, cfg_interval=5)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got[:, :7], data["output/greedy_cfg4"][:, :7])
    assert (got != data["output/greedy_cfg4"]).any()  # the interval changed the samples


def test_cfg_interval_rule_is_llamagens():
    def guided_tokens(cfg_interval, steps):  # generate.py's control flow, token by token
        flags, cfg_flag = [True], True       # the prefill's token
        for i in range(steps - 1):
            if cfg_interval > -1 and i > cfg_interval:
                cfg_flag = False
            flags.append(cfg_flag)
        return flags

    for steps in (1, 2, 5, 16):
        for interval in (-1, -3, 0, 1, 3, 4, 20, -1.0, -0.5, 0.5, 2.7):  # LlamaGen's scripts pass a float
            last = last_guided_step(interval, steps)
            assert [t <= last for t in range(steps)] == guided_tokens(interval, steps), (interval, steps)
    with pytest.raises(ValueError, match=r"^cfg_interval must be a number"):
        last_guided_step("3", 4)


def numpy_llamagen_forward(sd, a, labels, codes):
    """LlamaGen's eval forward in numpy float64 from its state_dict (wqkv split, repeat_interleave of KV heads,
    zero RoPE rows for the class token, SwiGLU, RMSNorm): an independent rendering for grouped KV."""
    c, h, kv = a["dim"], a["n_head"], a["n_kv_head"]
    d, grid = c // h, int(round(a["block_size"] ** 0.5))
    w = {k: v.astype(np.float64) for k, v in sd.items()}
    x = np.concatenate([w["cls_embedding.embedding_table.weight"][labels][:, None],
                        w["tok_embeddings.weight"][codes]], axis=1)
    t = x.shape[1]
    freqs = 1.0 / (a["rope_base"] ** (np.arange(0, d // 2, 2)[: d // 4] / (d // 2)))
    pos = np.arange(grid * grid)
    ang = np.concatenate([np.outer(pos // grid, freqs), np.outer(pos % grid, freqs)], axis=-1)
    cos = np.concatenate([np.zeros((1, d // 2)), np.cos(ang)])[:t]
    sin = np.concatenate([np.zeros((1, d // 2)), np.sin(ang)])[:t]

    def rms(v, g):
        return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-5) * g

    def rope(v):  # (B, T, H, D), interleaved pairs
        e, o = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = e * cos[None, :, None] - o * sin[None, :, None]
        out[..., 1::2] = o * cos[None, :, None] + e * sin[None, :, None]
        return out

    for i in range(a["n_layer"]):
        p = f"layers.{i}."
        y = rms(x, w[p + "attention_norm.weight"])
        qkv = y @ w[p + "attention.wqkv.weight"].T
        q = rope(qkv[..., :c].reshape(len(x), t, h, d))
        k = rope(qkv[..., c:c + kv * d].reshape(len(x), t, kv, d))
        v = qkv[..., c + kv * d:].reshape(len(x), t, kv, d)
        k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", pr, v).reshape(len(x), t, c)
        x = x + o @ w[p + "attention.wo.weight"].T
        y = rms(x, w[p + "ffn_norm.weight"])
        g = y @ w[p + "feed_forward.w1.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (y @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return rms(x, w["norm.weight"]) @ w["output.weight"].T


GQA_ARGS = dict(dim=64, n_layer=2, n_head=4, n_kv_head=2, vocab_size=40, block_size=16, num_classes=5,
                multiple_of=16, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)


def random_state_dict(a, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(0, 0.3, s) + (1.0 if len(s) == 1 else 0.0)).astype(np.float32)
            for k, s in llamagen_state_shapes(a).items()}


def test_grouped_kv_forward_matches_numpy_and_cached_decode_matches_forward():
    sd = random_state_dict(GQA_ARGS)
    model, variables = from_llamagen(sd, GQA_ARGS)
    rng = np.random.default_rng(1)
    labels, codes = np.array([1, 5]), rng.integers(0, 40, (2, 15))
    idx = jnp.asarray(np.concatenate([labels[:, None], codes], axis=1))
    full = np.asarray(jax.jit(model.apply)(variables, idx))
    ref = numpy_llamagen_forward(sd, llamagen_model_args(GQA_ARGS), labels, codes)
    # float32 against float64: products of 64-wide rows, two layers; a few ulps of the magnitudes involved.
    np.testing.assert_allclose(full, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    decode = jax.jit(lambda v, i, c, p: model.apply(v, i, c, p, method=GPT.decode))
    cache = init_cache(model, 2)
    assert cache[0][0].shape == (2, 2, 16, 16)  # cached at n_kv_head heads
    logits, cache = decode(variables, idx[:, :3], cache, 0)  # prefill: class + 2 codes
    steps = [logits]
    for t in range(3, 16):
        logits, cache = decode(variables, idx[:, t:t + 1], cache, t)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-5 * np.abs(full).max())


def test_logical_axis_names_init_bf16_remat_and_dropout():
    args = {**GQA_ARGS, "token_dropout_p": 0.1, "resid_dropout_p": 0.1, "ffn_dropout_p": 0.1, "attn_dropout_p": 0.1}
    cfg = llamagen_gpt_config(args)
    model = gpt_from_config(cfg)
    boxed = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))()
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == len(x.value.shape) and set(x.names) <= known, x.names
    init = nn.unbox(boxed)["params"]
    assert init["cls_emb"].shape == (6, 64) and "pos_emb" not in init
    # LlamaGen's initialisation: the output head zero, the other matrices and tables normal(0.02).
    assert not init["head"]["kernel"].any()
    for w in (init["blocks_0"]["w1"]["kernel"], init["tok_emb"]):
        assert 0.015 < float(w.std()) < 0.025
    _, params = from_llamagen(random_state_dict(args), args)
    idx = jnp.asarray(np.random.default_rng(2).integers(0, 5, (2, 16)))
    ref = jax.jit(model.apply)(params, idx)
    fast = gpt_from_config({**cfg, "dtype": "bfloat16", "remat": True})

    def loss(p, deterministic):
        return jnp.mean(fast.apply(p, idx, deterministic, rngs={"dropout": jax.random.key(1)}) ** 2)

    dropped, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, False)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    low = jax.jit(fast.apply)(params, idx)
    # bf16 compute (8-bit mantissa) against float32: a loose bound, relative to the logits' scale.
    assert low.dtype == jnp.float32 and np.abs(low - ref).max() < 0.05 * np.abs(ref).max()
    assert np.isfinite(dropped) and not np.isclose(dropped, jnp.mean(low ** 2), rtol=1e-3)  # dropout acted


def test_converter_and_options_refuse_in_one_line(golden):
    manifest, _, sd, _, _ = golden
    a = manifest["config"]
    missing = {k: v for k, v in sd.items() if k != "layers.1.feed_forward.w3.weight"}
    with pytest.raises(ValueError, match=r"^from_llamagen: .*missing key 'layers.1.feed_forward.w3.weight' "
                                         r"\(expected shape \(352, 128\)\)$"):
        from_llamagen(missing, a)
    wrong = {**sd, "norm.weight": np.ones(64, np.float32)}
    with pytest.raises(ValueError, match=r"^from_llamagen: .*shape mismatch for 'norm.weight': expected \(128,\), "
                                         r"found \(64,\)$"):
        from_llamagen(wrong, a)
    extra = {**sd, "bogus.weight": np.ones(3, np.float32), "freqs_cis": np.zeros((65, 16, 2), np.float32),
             "layers.0.attention.kv_cache.k_cache": np.zeros((2, 4, 72, 32), np.float32)}
    with pytest.raises(ValueError, match=r"^from_llamagen: .*\(1 problems\): unexpected key 'bogus.weight' "
                                         r"\(shape \(3,\)\)$"):
        from_llamagen(extra, a)  # the buffers are skipped, the stray key is not
    for bad, msg in (({"model_type": "t2i"}, "model_type 't2i' is not supported"),
                     ({"drop_path_rate": 0.1}, "drop_path_rate=0.1 is not supported"),
                     ({"block_size": 60}, "block_size=60 must be a square"),
                     ({"dims": 3}, r"unknown fields \['dims'\]")):
        with pytest.raises(ValueError, match=msg):
            from_llamagen(sd, {**a, **bad})
    with pytest.raises(ValueError, match=r"^gpt.block_options.grid_size: the llama block needs the side"):
        llama_options({"num_classes": 3})
    with pytest.raises(ValueError, match=r"^gpt.block_options: unknown llama block options \['n_kv_heads'\]"):
        llama_options({"grid_size": 4, "n_kv_heads": 2})
    assert LLAMAGEN_GPT_SIZES["GPT-L"] == dict(n_layer=24, n_head=16, dim=1024)


def test_sampling_checks_class_ids_and_codes_by_position(golden):
    _, _, _, model, variables = golden
    run = lambda prefix: sample(model, variables, jnp.asarray(prefix, jnp.int32), 2, jax.random.key(0))  # noqa
    assert run([[10]]).shape == (1, 2)  # the null class (11 class rows, vocab of 512 codes)
    with pytest.raises(ValueError, match=r"^prefix token ids must be in \[0, 11\), found range \[11, 11\]$"):
        run([[11]])
    with pytest.raises(ValueError, match=r"^prefix token ids at positions 0..0 must be in \[0, 11\), "
                                         r"found range \[11, 11\]$"):
        run([[11, 3]])
    with pytest.raises(ValueError, match=r"^prefix token ids at positions 1..1 must be in \[0, 512\), "
                                         r"found range \[512, 512\]$"):
        run([[3, 512]])


def test_sliding_window_refuses_a_window_other_than_the_rope_grid(golden):
    """2-D RoPE places code t at (t // grid, t % grid): a window of another width would rotate every cropped
    code by the wrong row and column, so it is refused."""
    from transformer_jax.sliding_window import sample_sliding_window
    _, _, _, model, variables = golden
    grid = llama_options(model.block_options).grid_size
    with pytest.raises(ValueError, match=rf"^sample_sliding_window: the 'llama' block's positions assume a "
                                         rf"{grid}x{grid} code grid, so the window must be {grid}, got {grid - 1}$"):
        sample_sliding_window(model, variables, (grid, grid + 2), grid - 1, jax.random.key(0),
                              prefix=jnp.zeros((1, 1), jnp.int32))

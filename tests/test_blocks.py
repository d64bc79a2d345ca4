"""The GPT's block registry (transformer_jax.blocks): one clear error for an unknown name, and a block registered
by one line, written against the interface alone (here a LLaMA-like one: RMSNorm, no learned positions, grouped
KV heads, a rotary-like position signal), runs the GPT's forward and its KV-cached decode alike."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from transformer_jax import blocks
from transformer_jax.attention import attend
from transformer_jax.blocks.base import BlockFields
from transformer_jax.gpt import GPT, cache_bytes, decode_weight_bytes, gpt_from_config, init_cache
from transformer_jax.gpt_layers import HeadsProjection, Linear, OutProjection


def test_unknown_block_is_one_error_listing_the_choices():
    cfg = ml_collections.ConfigDict(dict(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8, block="lama"))
    with pytest.raises(ValueError, match=r"^gpt.block: unknown block 'lama'; choices: llama, mingpt$"):
        gpt_from_config(cfg)
    with pytest.raises(ValueError, match=r"gpt.block: unknown block 'lama'; choices: llama, mingpt"):
        GPT(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8, block="lama").init(
            jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    cfg.block = "mingpt"
    cfg.block_options = {"n_kv_head": 1}
    with pytest.raises(ValueError, match=r"the mingpt block takes no options, got \{'n_kv_head': 1\}"):
        gpt_from_config(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


class RMSNorm(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5) * scale).astype(self.dtype)


class TinyLlamaBlock(BlockFields):
    """A block that exists only in this test: what a new block file holds."""

    learned_positions = False

    @staticmethod
    def final_norm(dtype: Any, options: tuple = ()) -> nn.Module:
        return RMSNorm(dtype)

    @staticmethod
    def kv_heads(n_head: int, options: tuple) -> int:
        return dict(options)["n_kv_head"]

    @nn.compact
    def __call__(self, x, deterministic=True, cache=None, pos=None):
        d, kv = self.n_embd // self.n_head, self.kv_heads(self.n_head, self.options)
        h = RMSNorm(self.dtype)(x)
        q = jnp.swapaxes(HeadsProjection(self.n_head, d, self.dtype, use_bias=False)(h), 1, 2)
        k = jnp.swapaxes(HeadsProjection(kv, d, self.dtype, use_bias=False)(h), 1, 2)
        v = jnp.swapaxes(HeadsProjection(kv, d, self.dtype, use_bias=False)(h), 1, 2)
        # A position-dependent rotation of q and k (the place RoPE takes), from absolute positions.
        start = 0 if pos is None else pos
        angle = (start + jnp.arange(x.shape[1]))[:, None] * 0.1
        q, k = q * jnp.cos(angle), k * jnp.cos(angle)
        if cache is not None:
            k_cache, v_cache = cache
            k = k_cache = jax.lax.dynamic_update_slice(k_cache, k, (0, 0, pos, 0))
            v = v_cache = jax.lax.dynamic_update_slice(v_cache, v, (0, 0, pos, 0))
            cache = (k_cache, v_cache)
        y = attend(q, k, v, self.n_unmasked, self.dtype, self.attention_impl, None, pos if cache is not None else None)
        x = x + OutProjection(self.n_embd, self.dtype, use_bias=False)(jnp.swapaxes(y, 1, 2))
        h = RMSNorm(self.dtype)(x)
        gate = Linear(2 * self.n_embd, ("embed", "mlp"), use_bias=False, dtype=self.dtype)(h)
        up = Linear(2 * self.n_embd, ("embed", "mlp"), use_bias=False, dtype=self.dtype)(h)
        down = Linear(self.n_embd, ("mlp", "embed"), use_bias=False, dtype=self.dtype)
        return x + down(jax.nn.silu(gate) * up), cache


def test_a_block_registered_by_one_line_runs_forward_and_decode(monkeypatch):
    import sys
    monkeypatch.setattr(sys.modules[__name__], "Block", TinyLlamaBlock, raising=False)
    monkeypatch.setitem(blocks.BLOCKS, "tiny_llama", __name__)  # the one registry line
    cfg = ml_collections.ConfigDict(dict(vocab_size=32, block_size=12, n_layer=2, n_head=4, n_embd=16,
                                         block="tiny_llama", block_options={"n_kv_head": 2}))
    model = gpt_from_config(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    assert "pos_emb" not in variables["params"] and "bias" not in variables["params"]["ln_f"]
    idx = jax.random.randint(jax.random.key(1), (2, 10), 0, 32)
    full = model.apply(variables, idx)
    cache = init_cache(model, 2, 10)
    assert cache[0][0].shape == (2, 2, 10, 4)                                  # cached at its own head count
    assert cache_bytes(model, 2, 10) == 2 * 2 * 2 * 2 * 10 * 4 * 4
    assert decode_weight_bytes(model) == 4 * (2 * (16 * 16 + 2 * 16 * 8 + 16 * 16 + 3 * 16 * 32) + 16 * 32)
    logits, cache = model.apply(variables, idx[:, :4], cache, 0, method=GPT.decode)   # prefill
    steps = [logits]
    for t in range(4, 10):
        logits, cache = model.apply(variables, idx[:, t:t + 1], cache, t, method=GPT.decode)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-5)

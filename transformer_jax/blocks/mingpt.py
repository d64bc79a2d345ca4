"""taming's minGPT block (taming/modules/transformer/mingpt.py): pre-LN ``x + attn(ln1(x))``, ``x + mlp(ln2(x))``;
causal multi-head attention with separate query/key/value/proj Linears (with bias); exact-erf GELU MLP 4x.
Module names follow taming's keys, so conversion stays a renaming."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.attention import attend
from transformer_jax.blocks.base import BlockFields
from transformer_jax.gpt_layers import HeadsProjection, LayerNorm, Linear, OutProjection


def write_cache(cache: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, pos: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """The (B, H, T, D) KV cache with ``k``, ``v`` (B, H, n, D) written at positions [pos, pos + n)."""
    k_cache, v_cache = cache
    return (lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, pos, 0)),
            lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, pos, 0)))


class CausalSelfAttention(BlockFields):
    """Causal multi-head attention (its ``options`` are the block's, unused here)."""

    def setup(self) -> None:
        d = self.n_embd // self.n_head
        self.query = HeadsProjection(self.n_head, d, self.dtype)
        self.key = HeadsProjection(self.n_head, d, self.dtype)
        self.value = HeadsProjection(self.n_head, d, self.dtype)
        self.proj = OutProjection(self.n_embd, self.dtype)
        self.attn_drop = nn.Dropout(self.attn_pdrop)
        self.resid_drop = nn.Dropout(self.resid_pdrop)

    def __call__(self, x: jax.Array, deterministic: bool = True, cache: Any = None, pos: jax.Array | None = None
                 ) -> tuple[jax.Array, Any]:
        # (B, T, H, D) -> (B, H, T, D): for one-token decode steps the swap is free (a bitcast), whereas asking
        # the projection for (B, H, T, D) directly made XLA transpose the weights on every step.
        q, k, v = (jnp.swapaxes(p(x), 1, 2) for p in (self.query, self.key, self.value))
        if cache is not None:
            k, v = cache = write_cache(cache, k, v, pos)
        drop = None
        if not deterministic and self.attn_pdrop > 0.0:
            drop = lambda w: self.attn_drop(w, deterministic=False)  # noqa: E731
        y = attend(q, k, v, self.n_unmasked, self.dtype, self.attention_impl, drop,
                   None if cache is None else pos)
        return self.resid_drop(self.proj(jnp.swapaxes(y, 1, 2)), deterministic=deterministic), cache


class Block(BlockFields):

    learned_positions = True  # the GPT adds learned absolute position embeddings

    @staticmethod
    def final_norm(dtype: Any, options: tuple = ()) -> nn.Module:
        return LayerNorm(dtype=dtype)

    @staticmethod
    def kv_heads(n_head: int, options: tuple) -> int:
        return n_head

    def setup(self) -> None:
        if self.options:
            raise ValueError(f"gpt.block_options: the mingpt block takes no options, got {dict(self.options)}")
        self.ln1 = LayerNorm(dtype=self.dtype)
        self.ln2 = LayerNorm(dtype=self.dtype)
        self.attn = CausalSelfAttention(self.n_head, self.n_embd, self.attn_pdrop, self.resid_pdrop,
                                        self.n_unmasked, self.dtype, self.attention_impl)
        self.mlp_fc = Linear(4 * self.n_embd, ("embed", "mlp"), dtype=self.dtype)
        self.mlp_out = Linear(self.n_embd, ("mlp", "embed"), dtype=self.dtype)
        self.mlp_drop = nn.Dropout(self.resid_pdrop)

    def __call__(self, x: jax.Array, deterministic: bool = True, cache: Any = None, pos: jax.Array | None = None
                 ) -> tuple[jax.Array, Any]:
        a, cache = self.attn(self.ln1(x), deterministic, cache, pos)
        x = x + a
        # GELU in float32 whatever the compute dtype: in bf16 every step of its erf polynomial (and of its
        # derivative) was rounded to bf16, slower on CPU and less exact.
        h = jax.nn.gelu(self.mlp_fc(self.ln2(x)).astype(jnp.float32), approximate=False).astype(self.dtype)
        return x + self.mlp_drop(self.mlp_out(h), deterministic=deterministic), cache

"""LlamaGen's LLaMA block (FoundationVision/LlamaGen, ``autoregressive/models/gpt.py``): pre-norm
``h = x + attn(rms(x))``, ``h + ffn(rms(h))``; RMSNorm in float32; causal attention with 2-D RoPE over the code
grid (:mod:`transformer_jax.rope`) and optional grouped KV heads; a SwiGLU FFN ``w2(silu(w1 x) * w3 x)``; no
biases. Class ids at the ``cls_token_num`` leading positions are embedded by a class table the GPT makes on the
block's request (:meth:`Block.prefix_table`).

Its settings come as ``gpt.block_options`` (:func:`llama_options`). Module names follow LlamaGen's keys
(``attention_norm``, ``wq/wk/wv/wo``, ``ffn_norm``, ``w1/w2/w3``), so conversion stays a renaming; weights carry
minGPT's logical axis names, so it shards the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.attention import attend
from transformer_jax.blocks.base import BlockFields
from transformer_jax.blocks.mingpt import write_cache
from transformer_jax.gpt_layers import ONES, ZEROS, HeadsProjection, Linear, OutProjection
from transformer_jax.rope import apply_rope, check_head_dim, rope_table


@dataclasses.dataclass(frozen=True)
class LlamaOptions:
    """The llama block's ``gpt.block_options`` (LlamaGen ``ModelArgs`` names where they exist)."""
    grid_size: int = 0            # side of the code grid the 2-D RoPE runs over (required)
    cls_token_num: int = 1        # leading positions holding class ids
    num_classes: int = 1000
    null_class: bool = True       # the class table has a last row, id num_classes, for guidance's null class
    n_kv_head: int = 0            # 0: n_head
    multiple_of: int = 256
    ffn_dim_multiplier: float = 0.0  # 0: none
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    ffn_pdrop: float = 0.0

    @property
    def class_rows(self) -> int:
        return self.num_classes + int(self.null_class)


_INTS = ("grid_size", "cls_token_num", "num_classes", "n_kv_head", "multiple_of")


def llama_options(options: Any) -> LlamaOptions:
    """The block's options (sorted pairs or a dict), checked: one error line per problem."""
    given = dict(options or ())
    known = [f.name for f in dataclasses.fields(LlamaOptions)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"gpt.block_options: unknown llama block options {unknown}; known: {known}")
    for name in _INTS:
        if name in given and (not isinstance(given[name], int) or isinstance(given[name], bool)):
            raise ValueError(f"gpt.block_options.{name} must be an int, got {given[name]!r}")
    if given.get("ffn_dim_multiplier") is None:
        given.pop("ffn_dim_multiplier", None)  # LlamaGen's None
    opts = LlamaOptions(**given)
    if opts.grid_size < 1:
        raise ValueError("gpt.block_options.grid_size: the llama block needs the side of the code grid its 2-D RoPE "
                         f"runs over (e.g. 16 for 16x16 codes), got {opts.grid_size}")
    if opts.cls_token_num < 0 or opts.num_classes < 1 or opts.multiple_of < 1 or opts.n_kv_head < 0:
        raise ValueError("gpt.block_options: cls_token_num must be >= 0, num_classes and multiple_of >= 1, "
                         f"n_kv_head >= 0; got {given}")
    if not 0.0 <= opts.ffn_pdrop < 1.0:
        raise ValueError(f"gpt.block_options.ffn_pdrop must be in [0, 1), got {opts.ffn_pdrop}")
    return opts


def swiglu_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """LlamaGen's SwiGLU width: int(2/3 of 4 dim), times ``ffn_dim_multiplier`` when given, rounded up to a
    multiple of ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier:
        hidden = int(ffn_dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


class RMSNorm(nn.Module):
    """``x / rms(x) * scale`` over the last axis, in float32 whatever the compute dtype."""
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(ONES, ("norm",)), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class Block(BlockFields):

    learned_positions = False  # positions enter through the 2-D RoPE
    head_init = staticmethod(ZEROS)  # LlamaGen zero-initialises its output layer (the rest: normal(0.02), as minGPT)

    @staticmethod
    def final_norm(dtype: Any, options: tuple = ()) -> nn.Module:
        return RMSNorm(eps=llama_options(options).norm_eps, dtype=dtype)

    @staticmethod
    def kv_heads(n_head: int, options: tuple) -> int:
        return llama_options(options).n_kv_head or n_head

    @staticmethod
    def prefix_table(options: tuple) -> tuple[int, int]:
        opts = llama_options(options)
        return opts.cls_token_num, opts.class_rows

    @staticmethod
    def position_grid(options: tuple) -> int | None:
        return llama_options(options).grid_size

    def setup(self) -> None:
        opts = self.opts = llama_options(self.options)
        d = self.n_embd // self.n_head
        check_head_dim(d)
        kv = opts.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"gpt.block_options.n_kv_head ({kv}) must divide n_head ({self.n_head})")
        if self.n_unmasked:
            raise ValueError(f"the llama block is causal throughout: n_unmasked must be 0, got {self.n_unmasked}")
        self.attention_norm = RMSNorm(opts.norm_eps, self.dtype)
        self.wq = HeadsProjection(self.n_head, d, self.dtype, use_bias=False)
        self.wk = HeadsProjection(kv, d, self.dtype, use_bias=False)
        self.wv = HeadsProjection(kv, d, self.dtype, use_bias=False)
        self.wo = OutProjection(self.n_embd, self.dtype, use_bias=False)
        self.ffn_norm = RMSNorm(opts.norm_eps, self.dtype)
        hidden = swiglu_hidden(self.n_embd, opts.multiple_of, opts.ffn_dim_multiplier)
        self.w1 = Linear(hidden, ("embed", "mlp"), use_bias=False, dtype=self.dtype)
        self.w3 = Linear(hidden, ("embed", "mlp"), use_bias=False, dtype=self.dtype)
        self.w2 = Linear(self.n_embd, ("mlp", "embed"), use_bias=False, dtype=self.dtype)
        self.attn_drop = nn.Dropout(self.attn_pdrop)
        self.resid_drop = nn.Dropout(self.resid_pdrop)
        self.ffn_drop = nn.Dropout(opts.ffn_pdrop)

    def attention(self, x: jax.Array, deterministic: bool, cache: Any, pos: jax.Array | None
                  ) -> tuple[jax.Array, Any]:
        opts = self.opts
        start = 0 if cache is None else pos
        cos, sin = rope_table(start + jnp.arange(x.shape[1]), self.n_embd // self.n_head, opts.grid_size,
                              opts.cls_token_num, opts.rope_base)
        q = apply_rope(self.wq(x), cos, sin)
        k = apply_rope(self.wk(x), cos, sin)
        # (B, T, H, D) -> (B, H, T, D), as minGPT's attention does (free for one-token decode steps).
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, self.wv(x)))
        if cache is not None:
            k, v = cache = write_cache(cache, k, v, pos)  # keys are cached rotated, as LlamaGen's
        drop = None
        if not deterministic and self.attn_pdrop > 0.0:
            drop = lambda w: self.attn_drop(w, deterministic=False)  # noqa: E731
        y = attend(q, k, v, 0, self.dtype, self.attention_impl, drop, None if cache is None else pos)
        return self.resid_drop(self.wo(jnp.swapaxes(y, 1, 2)), deterministic=deterministic), cache

    def __call__(self, x: jax.Array, deterministic: bool = True, cache: Any = None, pos: jax.Array | None = None
                 ) -> tuple[jax.Array, Any]:
        a, cache = self.attention(self.attention_norm(x), deterministic, cache, pos)
        h = x + a
        f = self.ffn_norm(h)
        # silu and the gate product in float32 whatever the compute dtype (one rounding, as minGPT's GELU).
        gate = jax.nn.silu(self.w1(f).astype(jnp.float32)) * self.w3(f).astype(jnp.float32)
        out = self.ffn_drop(self.w2(gate.astype(self.dtype)), deterministic=deterministic)
        return h + out, cache

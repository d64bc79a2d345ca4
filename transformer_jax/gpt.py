"""Stage-two GPT, parameter-compatible with taming's minGPT, with a functional KV cache for decoding.

Token embeddings (plus learned position embeddings when the block asks for them; the leading positions from a
table of their own, e.g. class ids, when the block declares one: ``prefix_table``), ``n_layer`` blocks of the
kind ``block`` names (:mod:`transformer_jax.blocks`; "mingpt", taming's, by default), the block's final norm
and a bias-free head.

Parameters are float32 with logical axis names; ``dtype`` is the compute dtype (e.g. bfloat16). The KV cache is
a plain pytree (one ``(k, v)`` pair per layer, each ``(batch, kv_heads, time, head_dim)``) passed in and returned
by :meth:`GPT.decode`, so a whole decode loop can live inside one jitted ``lax.fori_loop``. How products and
attention run on each platform is decided outside this file (:mod:`transformer_jax.cpu_products`,
:mod:`transformer_jax.attention`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.attention import ATTENTION_IMPLS
from transformer_jax.blocks import block_class
from transformer_jax.gpt_layers import INIT, ZEROS, Linear

# One (k, v) pair per layer, each (batch, kv_heads, time, head_dim).
KVCache = tuple[tuple[jax.Array, jax.Array], ...]


class GPT(nn.Module):
    """minGPT. ``apply(variables, idx) -> logits (B, T, vocab)`` (float32).

    Training dropout: ``apply(..., deterministic=False, rngs={"dropout": key})``.
    Decoding: ``apply(variables, idx, cache, pos, method=GPT.decode)``.
    """
    vocab_size: int
    block_size: int
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    n_unmasked: int = 0
    dtype: Any = jnp.float32
    remat: bool = False
    # Attention for training/prefill: "xla" or "cudnn" (fused flash attention on NVIDIA GPUs, bf16/fp16
    # compute) are jax.nn.dot_product_attention's implementations; "explicit" is softmax attention written
    # out in (B, H, T, D) layout (the form dropout on attention weights takes); "" lets JAX pick.
    attention_impl: str = ""
    # The block (transformer_jax.blocks.BLOCKS) and its own settings as sorted (name, value) pairs.
    block: str = "mingpt"
    block_options: tuple = ()

    def setup(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.n_unmasked <= self.block_size:
            raise ValueError(f"GPT: n_unmasked must be in [0, block_size={self.block_size}], "
                             f"got {self.n_unmasked}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"GPT: attention_impl must be '', 'xla', 'cudnn' or 'explicit', "
                             f"got {self.attention_impl!r}")
        block = block_class(self.block)
        self.tok_emb = self.param("tok_emb", nn.with_logical_partitioning(INIT, ("vocab", "embed")),
                                  (self.vocab_size, self.n_embd), jnp.float32)
        if block.learned_positions:
            self.pos_emb = self.param("pos_emb", nn.with_logical_partitioning(ZEROS, ("length", "embed")),
                                      (self.block_size, self.n_embd), jnp.float32)
        n_prefix, rows = block.prefix_table(self.block_options)
        if n_prefix:  # e.g. class ids: the first n_prefix positions of idx index this table, not tok_emb
            self.cls_emb = self.param("cls_emb", nn.with_logical_partitioning(INIT, ("vocab", "embed")),
                                      (rows, self.n_embd), jnp.float32)
        # deterministic (argument 2, counting self) is a Python bool: static under remat.
        layer = nn.remat(block, static_argnums=(2,)) if self.remat else block
        self.blocks = [layer(n_head=self.n_head, n_embd=self.n_embd, attn_pdrop=self.attn_pdrop,
                             resid_pdrop=self.resid_pdrop, n_unmasked=self.n_unmasked, dtype=self.dtype,
                             attention_impl=self.attention_impl, options=self.block_options, name=f"blocks_{i}")
                       for i in range(self.n_layer)]
        self.ln_f = block.final_norm(self.dtype, self.block_options)
        self.head = Linear(self.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                           kernel_init=block.head_init)
        self.drop = nn.Dropout(self.embd_pdrop)

    def _check_length(self, t: int) -> None:
        if t > self.block_size:
            raise ValueError(f"GPT: sequence length {t} exceeds block_size {self.block_size}")

    def _embed(self, idx: jax.Array, pos: jax.Array | int = 0) -> jax.Array:
        block = block_class(self.block)
        n_prefix, _ = block.prefix_table(self.block_options)
        if n_prefix:
            in_prefix = ((pos + jnp.arange(idx.shape[1])) < n_prefix)[None, :]
            # Each lookup sees only ids of its own table (0 elsewhere), so neither reads out of bounds.
            x = jnp.where(in_prefix[..., None], jnp.take(self.cls_emb, jnp.where(in_prefix, idx, 0), axis=0),
                          jnp.take(self.tok_emb, jnp.where(in_prefix, 0, idx), axis=0))
        else:
            x = jnp.take(self.tok_emb, idx, axis=0)
        if block.learned_positions:
            x = x + lax.dynamic_slice_in_dim(self.pos_emb, pos, idx.shape[1], axis=0)[None]
        return x.astype(self.dtype)

    def features(self, idx: jax.Array, deterministic: bool = True) -> jax.Array:
        """Final hidden states after ``ln_f`` (B, T, C), before the head."""
        if idx.ndim != 2:
            raise ValueError(f"GPT: idx must be (batch, time) token ids, got shape {idx.shape}")
        self._check_length(idx.shape[1])
        x = self.drop(self._embed(idx), deterministic=deterministic)
        for blk in self.blocks:
            x, _ = blk(x, deterministic)
        return self.ln_f(x)

    def logits_from_features(self, h: jax.Array) -> jax.Array:
        return self.head(h).astype(jnp.float32)

    def __call__(self, idx: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.logits_from_features(self.features(idx, deterministic))

    def decode(self, idx: jax.Array, cache: KVCache, pos: jax.Array | int
               ) -> tuple[jax.Array, KVCache]:
        """Process tokens at positions [pos, pos + n) given the cache; returns (logits (B, n, V), cache).

        With ``n_unmasked > 0`` the first call (prefill) must cover all ``n_unmasked`` positions.
        """
        if len(cache) != self.n_layer:
            raise ValueError(f"GPT.decode: cache has {len(cache)} layers, model has {self.n_layer}")
        self._check_length(cache[0][0].shape[2])
        pos = jnp.asarray(pos, jnp.int32)
        x = self._embed(idx, pos)
        new_cache = []
        for blk, layer_cache in zip(self.blocks, cache):
            x, layer_cache = blk(x, True, layer_cache, pos)
            new_cache.append(layer_cache)
        return self.logits_from_features(self.ln_f(x)), tuple(new_cache)


def gpt_from_config(cfg: Any) -> GPT:
    """GPT from ``config.gpt`` (fields of :class:`GPT`; ``dtype`` as a string, '' = float32; ``block_options`` a
    dict of the block's own settings)."""
    d = dict(cfg)
    fields = set(GPT.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"gpt config: unknown keys {unknown}; known: {sorted(fields)}")
    dt = d.get("dtype", "")
    d["dtype"] = jnp.dtype(dt) if isinstance(dt, str) and dt else (dt or jnp.float32)
    block_class(d.get("block", "mingpt"))  # an unknown name fails here, with the choices
    d["block_options"] = tuple(sorted(dict(d.get("block_options") or {}).items()))
    return GPT(**d)


def token_bounds(model: GPT, length: int) -> np.ndarray:
    """(length,) int: the exclusive upper bound of the ids ``idx`` may hold at each position: the rows of the
    block's prefix table (e.g. class ids, null class included) at its leading positions, vocab_size after."""
    n_prefix, rows = block_class(model.block).prefix_table(model.block_options)
    return np.where(np.arange(length) < n_prefix, rows, model.vocab_size)


def is_kernel_path(path: tuple) -> bool:
    """Whether a pytree path (``tree_map_with_path``) names a matmul kernel (Linear and projections)."""
    return any(getattr(k, "key", None) == "kernel" for k in path)


def kernels_in_compute_dtype(model: GPT, variables: Any) -> Any:
    """``variables`` with every matmul kernel already cast to ``model.dtype``.

    Every layer casts its kernel to the compute dtype before the matmul, so results are bit-identical;
    a decode loop calls this once outside the loop so each step reads bf16 kernels (half the bytes of
    float32) instead of converting all of them again every token. A no-op for float32 models.
    """
    if jnp.dtype(model.dtype) == jnp.float32:
        return variables

    def cast(path: tuple, x: Any) -> Any:
        return x.astype(model.dtype) if is_kernel_path(path) and jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map_with_path(cast, variables)


def init_cache(model: GPT, batch: int, length: int | None = None, dtype: Any = None) -> KVCache:
    """Zero KV cache for ``length`` positions (default block_size), in the compute dtype by default."""
    length = model.block_size if length is None else int(length)
    if not 0 < length <= model.block_size:
        raise ValueError(f"init_cache: length must be in [1, block_size={model.block_size}], got {length}")
    heads = block_class(model.block).kv_heads(model.n_head, model.block_options)
    shape = (batch, heads, length, model.n_embd // model.n_head)
    dtype = model.dtype if dtype is None else dtype
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(model.n_layer))


def cache_bytes(model: GPT, batch: int, length: int) -> int:
    """Bytes of :func:`init_cache`'s cache for ``batch`` rows and ``length`` positions."""
    shapes = jax.eval_shape(lambda: init_cache(model, batch, length))
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))


@functools.lru_cache(maxsize=64)
def decode_weight_bytes(model: GPT) -> int:
    """Bytes of the matmul kernels one decode step reads (every kernel, in the compute dtype), summed over the
    model's parameters."""
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_variables(model)))
    return sum(x.size for path, x in leaves if is_kernel_path(path)) * jnp.dtype(model.dtype).itemsize


def init_variables(model: GPT, rng: jax.Array, length: int = 1) -> Any:
    """Boxed (logically partitioned) variables from a (1, length) dummy input."""
    return model.init(rng, jnp.zeros((1, length), jnp.int32))


def abstract_variables(model: GPT) -> Any:
    """Boxed ShapeDtypeStructs of the variables (nothing materialised); feed to
    ``common_jax.mesh.logical_to_sharding`` to get the NamedShardings of a mesh."""
    return jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))


def logical_partition_specs(model: GPT) -> Any:
    """Tree of logical PartitionSpecs (axis names, not mesh axes) of ``model``'s variables."""
    return nn.get_partition_spec(abstract_variables(model))

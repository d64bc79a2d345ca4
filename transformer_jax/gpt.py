"""Stage-two GPT, parameter-compatible with taming's minGPT, with a functional KV cache for decoding.

Architecture (taming/modules/transformer/mingpt.py): token + learned position embeddings, pre-LN blocks
``x + attn(ln1(x))``, ``x + mlp(ln2(x))``, causal multi-head attention with separate query/key/value/proj
Linears (with bias), exact-erf GELU MLP 4x, final LayerNorm (eps 1e-5), bias-free head.

Parameters are float32 with logical axis names; ``dtype`` is the compute dtype (e.g. bfloat16). The KV
cache is a plain pytree (one ``(k, v)`` pair per layer, each ``(batch, heads, time, head_dim)``) passed in
and returned by :meth:`GPT.decode`, so a whole decode loop can live inside one jitted ``lax.fori_loop``.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# One (k, v) pair per layer, each (batch, heads, time, head_dim).
KVCache = tuple[tuple[jax.Array, jax.Array], ...]

_INIT = nn.initializers.normal(stddev=0.02)  # minGPT's _init_weights for Linear and Embedding
_ZEROS = nn.initializers.zeros_init()
_ONES = nn.initializers.ones_init()

# A decode step multiplies a few rows (its batch) by each kernel. On CPU, XLA's vector-matrix product ran a
# cache-resident kernel 1.6-1.9x faster per row than its matrix product did for 2-4 rows (1 MB kernel,
# AMD EPYC without AVX-512), so such products run one row at a time; past 4 rows, or for kernels that
# stream from memory (each row would read them again), the single product wins.
ROWWISE_MAX_ROWS = 4
ROWWISE_MAX_KERNEL_BYTES = 4 << 20


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x (..., C) @ kernel (C, F)``; on CPU, for 2 to ``ROWWISE_MAX_ROWS`` rows and a float32 kernel of at most
    ``ROWWISE_MAX_KERNEL_BYTES``, as one vector-matrix product per row (equal up to float rounding)."""
    if jax.default_backend() != "cpu":
        return x @ kernel
    rows = math.prod(x.shape[:-1])
    # Not for bf16: XLA:CPU's one-row bf16 product widens the kernel to float32 (see _f32_dot).
    if (1 < rows <= ROWWISE_MAX_ROWS and kernel.dtype == jnp.float32
            and kernel.size * kernel.dtype.itemsize <= ROWWISE_MAX_KERNEL_BYTES):
        flat = x.reshape(rows, x.shape[-1])
        y = jnp.concatenate([flat[i:i + 1] @ kernel for i in range(rows)], axis=0)
        return y.reshape(*x.shape[:-1], kernel.shape[1])
    return _f32_dot(x, kernel).astype(jnp.result_type(x, kernel))


def _f32_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` accumulated and returned in float32, for callers to round once: what XLA:CPU computes for a
    bf16 dot anyway, but asked for a bf16 result it first widened the whole bf16 kernel to float32 (in a decode
    loop, every step), where with a float32 result its library reads the bf16 kernel directly (from 2 rows on;
    a one-row product is still widened). The 24-layer GPT's bf16 decode at batch 4: 261 -> 194 ms per token."""
    return jnp.matmul(x, kernel, preferred_element_type=jnp.float32)


def matmul_transposed(x: jax.Array, kernel_t: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x (..., C) @ kernel_t (F, C).T (+ bias)``, accumulated in float32 (the bias added in float32) and rounded
    to the inputs' dtype once.

    With a bf16 kernel this is the form XLA:CPU's library streams fastest: contracting the kernel's minor axis,
    4 rows by the 24-layer GPT's 1536 x 6144 MLP kernels read 19-20 GB/s of bf16 from memory, against 6.7 GB/s
    for the same kernel in (C, F) layout and 10.7 GB/s for float32 (2 cores, Intel Xeon, 2026-12-02). One row
    is multiplied as two (XLA widens a one-row bf16 product: 10 against 16 GB/s).
    """
    rows = math.prod(x.shape[:-1])
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = jnp.concatenate([flat, flat], axis=0)
    y = lax.dot_general(flat, kernel_t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)[:rows]
    if bias is not None:
        y = y + bias
    return y.astype(jnp.result_type(x, kernel_t)).reshape(*x.shape[:-1], kernel_t.shape[0])


@jax.custom_vjp
def mixed_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``x (..., C) @ kernel (C, F) + bias`` for a low-precision ``x`` (e.g. bf16) and a float32 (or ``x.dtype``)
    kernel and bias (``None`` for none): the products take ``x`` and the kernel rounded to ``x.dtype`` and
    accumulate in float32, the bias is added in float32, and the result is rounded to ``x.dtype`` once.

    The custom VJP keeps the backward in the same form: input gradient ``g @ kernel.T`` from ``x.dtype`` operands,
    kernel gradient ``x.T @ g`` accumulated and returned in float32, bias gradient summed in float32. Plain
    autodiff of the forward widened ``g`` and the kernel to float32 for both products, and on CPUs with AMX
    (Sapphire Rapids) XLA:CPU multiplies bf16 operands into float32 about 4x faster than float32 ones.
    """
    return _mixed_dense_fwd(x, kernel, bias)[0]


def _mixed_dense_fwd(x, kernel, bias):
    y = _f32_dot(x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype), (x, kernel, bias)


def _mixed_dense_bwd(res, g):
    x, kernel, bias = res
    g = g.astype(x.dtype)
    dx = _f32_dot(g, kernel.astype(x.dtype).T).astype(x.dtype)
    rows = math.prod(x.shape[:-1])
    g2 = g.reshape(rows, g.shape[-1])
    dk = lax.dot_general(x.reshape(rows, x.shape[-1]), g2, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    db = None if bias is None else jnp.sum(g2.astype(jnp.float32), axis=0).astype(bias.dtype)
    return dx, dk.astype(kernel.dtype), db


mixed_dense.defvjp(_mixed_dense_fwd, _mixed_dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` of two low-precision operands (e.g. bf16) accumulated and returned in float32,
    with both gradients formed the same way (from the cotangent rounded to the operands' dtype), where plain
    autodiff widened the operands to float32 (see :func:`mixed_dense`). Every index of ``spec`` ("zab,zcb->zac"
    form, no ellipsis) must appear in at least two of its three terms, so each gradient is one einsum."""
    _einsum_terms(spec)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_terms(spec: str) -> tuple[str, str, str]:
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    if any((c in sa) + (c in sb) + (c in out) < 2 for c in set(sa + sb + out)):
        raise ValueError(f"mixed_einsum: every index must appear in at least two terms, got {spec!r}")
    return sa, sb, out


def _mixed_einsum_fwd(spec, a, b):
    return mixed_einsum(spec, a, b), (a, b)


def _mixed_einsum_bwd(spec, res, g):
    a, b = res
    sa, sb, out = _einsum_terms(spec)
    da = jnp.einsum(f"{out},{sb}->{sa}", g.astype(b.dtype), b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{out}->{sb}", a, g.astype(a.dtype), preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


# Collection of the (out, in) kernel copies a CPU decode of a bf16 model multiplies by (prepare_decode_variables).
DECODE_KERNELS = "decode_kernels"


def _apply_kernel(module: nn.Module, x: jax.Array, kernel_2d: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``x @ kernel_2d (+ bias)`` in the module's compute dtype, by the module's prepared (out, in) copy when the
    variables hold one (and making that copy when :data:`DECODE_KERNELS` is mutable:
    :func:`prepare_decode_variables`); otherwise on CPU a low-precision model goes through :func:`mixed_dense`."""
    dtype = module.dtype
    if module.is_mutable_collection(DECODE_KERNELS) and not module.is_initializing():
        module.variable(DECODE_KERNELS, "kernel_t", lambda: kernel_2d.astype(dtype).T)
    # On CPU a low-precision model computes every product the same way, so that all paths (training, decoding
    # with or without the prepared copies) agree: float32 accumulation, bias added in float32, one rounding.
    if module.has_variable(DECODE_KERNELS, "kernel_t"):
        return matmul_transposed(x.astype(dtype), module.get_variable(DECODE_KERNELS, "kernel_t"), bias)
    if jax.default_backend() == "cpu" and jnp.dtype(dtype) != jnp.float32:
        return mixed_dense(x.astype(dtype), kernel_2d, bias)
    y = matmul(x.astype(dtype), kernel_2d.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis; statistics in float32 whatever the compute dtype."""
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(_ONES, ("norm",)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(_ZEROS, ("norm",)), (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class Linear(nn.Module):
    """``x @ kernel (+ bias)`` with a named (in, out) kernel."""
    features: int
    kernel_axes: tuple[str, str]
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(_INIT, self.kernel_axes),
                            (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(_ZEROS, self.kernel_axes[1:]),
                          (self.features,), jnp.float32) if self.use_bias else None
        return _apply_kernel(self, x, kernel, bias)


class HeadsProjection(nn.Module):
    """Linear (C -> n_head * head_dim) with the kernel kept as (C, heads, head_dim).

    ``layout`` picks the output layout so that no transpose is needed: ``"bthd"`` for
    ``jax.nn.dot_product_attention``, ``"bhtd"`` for the KV cache.
    """
    n_head: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, layout: str = "bthd") -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(_INIT, ("embed", "heads", "kv")),
                            (x.shape[-1], self.n_head, self.head_dim), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(_ZEROS, ("heads", "kv")),
                          (self.n_head, self.head_dim), jnp.float32)
        # A plain (B*T, C) x (C, H*D) matmul: reshaping the kernel is free, and XLA then never
        # transposes weights inside decode loops.
        bsz, t, c = x.shape
        y = _apply_kernel(self, x, kernel.reshape(c, -1), bias.reshape(-1)).reshape(bsz, t, self.n_head, self.head_dim)
        return y if layout == "bthd" else jnp.swapaxes(y, 1, 2)


class OutProjection(nn.Module):
    """Linear (n_head * head_dim -> C) with the kernel kept as (heads, head_dim, C)."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array, layout: str = "bthd") -> jax.Array:
        h, d = (y.shape[2], y.shape[3]) if layout == "bthd" else (y.shape[1], y.shape[3])
        kernel = self.param("kernel", nn.with_logical_partitioning(_INIT, ("heads", "kv", "embed")),
                            (h, d, self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(_ZEROS, ("embed",)),
                          (self.features,), jnp.float32)
        if layout == "bhtd":
            y = jnp.swapaxes(y, 1, 2)
        bsz, t = y.shape[:2]
        return _apply_kernel(self, y.reshape(bsz, t, h * d), kernel.reshape(h * d, -1), bias)


def use_explicit_attention(impl: str, backend: str | None = None) -> bool:
    """Whether ``GPT.attention_impl`` means the explicit (B, H, T, D) attention: "explicit" always, ""
    (automatic) on CPU only; "xla" and "cudnn" go through ``jax.nn.dot_product_attention``."""
    return impl == "explicit" or (impl == "" and (backend or jax.default_backend()) == "cpu")


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, n_unmasked: int) -> jax.Array:
    """(Tq, Tk) bool: causal, plus taming's fully visible prefix of ``n_unmasked`` tokens."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if n_unmasked > 0:
        mask = mask | ((q_pos[:, None] < n_unmasked) & (k_pos[None, :] < n_unmasked))
    return mask


def even_bounds(total: int, parts: int) -> list[int]:
    """``parts + 1`` boundaries splitting ``range(total)`` into consecutive parts whose sizes differ by at most one."""
    return [round(i * total / parts) for i in range(parts + 1)]


def causal_query_blocks(t: int, n_unmasked: int = 0, n_blocks: int | None = None
                        ) -> list[tuple[int, int, int]]:
    """(query start, query end, key end) per block of queries of a causal attention over ``t`` positions.

    Queries [a, b) see only keys [0, b) (or [0, n_unmasked) when the block holds an unmasked-prefix query),
    so each block skips the fully masked keys after it. Default: two blocks from t = 32 on, which skips a
    quarter of the score matrix; on CPU that took about 4% off the small GPT train step (T = 256), and four
    blocks gained nothing more.
    """
    if n_blocks is None:
        n_blocks = 2 if t >= 32 else 1
    if n_blocks < 1:
        raise ValueError(f"causal_query_blocks: n_blocks must be >= 1, got {n_blocks}")
    n_blocks = min(n_blocks, t)  # no empty blocks
    bounds = even_bounds(t, n_blocks)
    return [(a, b, max(b, n_unmasked) if a < n_unmasked else b) for a, b in zip(bounds[:-1], bounds[1:])]


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype: Any,
                      dropout: Any = None) -> jax.Array:
    """Attention in (B, H, T, D) layout: float32 scores ``q k^T / sqrt(D)``, masked (``mask`` (Tq, Tk) bool),
    softmax, ``dropout`` (a function of the weights, optional), weights in ``dtype`` times ``v``.

    Shared by the full forward on CPU and the KV-cached decode step, so both compute the same thing.
    """
    # Low-precision operands go through mixed_einsum (float32 accumulation in both directions).
    product = jnp.einsum if q.dtype == jnp.float32 else mixed_einsum
    s = product("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    w = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    if dropout is not None:
        w = dropout(w)
    return product("bhqk,bhkd->bhqd", w.astype(dtype), v.astype(dtype)).astype(dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, n_unmasked: int, dtype: Any,
                     dropout: Any = None, n_blocks: int | None = None) -> jax.Array:
    """:func:`softmax_attention` of a whole (B, H, T, D) sequence under :func:`attention_mask`, computed in
    :func:`causal_query_blocks` (the same values as one block, without the fully masked scores)."""
    pos = jnp.arange(q.shape[2])
    outs = [softmax_attention(q[:, :, a:b], k[:, :, :end], v[:, :, :end],
                              attention_mask(pos[a:b], pos[:end], n_unmasked), dtype, dropout)
            for a, b, end in causal_query_blocks(q.shape[2], n_unmasked, n_blocks)]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


class CausalSelfAttention(nn.Module):
    n_head: int
    n_embd: int
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    n_unmasked: int = 0
    dtype: Any = jnp.float32
    attention_impl: str = ""

    def setup(self) -> None:
        # Module names follow taming's keys (query/key/value/proj) so conversion stays a renaming.
        d = self.n_embd // self.n_head
        self.query = HeadsProjection(self.n_head, d, self.dtype)
        self.key = HeadsProjection(self.n_head, d, self.dtype)
        self.value = HeadsProjection(self.n_head, d, self.dtype)
        self.proj = OutProjection(self.n_embd, self.dtype)
        self.attn_drop = nn.Dropout(self.attn_pdrop)
        self.resid_drop = nn.Dropout(self.resid_pdrop)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        dropout = not deterministic and self.attn_pdrop > 0.0
        if dropout or use_explicit_attention(self.attention_impl):
            return self.resid_drop(self.proj(self._explicit(x, dropout), "bhtd"),
                                   deterministic=deterministic)
        q, k, v = self.query(x), self.key(x), self.value(x)          # (B, T, H, D)
        impl = self.attention_impl or None
        if self.n_unmasked > 0:
            pos = jnp.arange(x.shape[1])
            mask = attention_mask(pos, pos, self.n_unmasked)[None, None]
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        else:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        return self.resid_drop(self.proj(y), deterministic=deterministic)

    def _explicit(self, x: jax.Array, dropout: bool) -> jax.Array:
        """:func:`causal_attention` over the whole sequence, (B, H, T, D) out.

        XLA:CPU ran this forward about twice as fast as ``dot_product_attention``'s (B, T, H, D) matmuls
        (forward + backward about 1.25x). Also the only path with dropout on the attention weights.
        """
        q, k, v = (proj(x, "bhtd") for proj in (self.query, self.key, self.value))
        return causal_attention(q, k, v, self.n_unmasked, self.dtype,
                                lambda w: self.attn_drop(w, deterministic=not dropout))

    def decode(self, x: jax.Array, cache: tuple[jax.Array, jax.Array], pos: jax.Array
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Tokens at positions [pos, pos + n) attending to the cache; returns (out, updated cache)."""
        k_cache, v_cache = cache
        # Projections as plain (B*T, C) x (C, H*D) matmuls, then (B, T, H, D) -> (B, H, T, D): for the
        # one-token steps that swap is free (a bitcast), whereas asking the einsum for "bhtd" directly
        # made XLA transpose the weight matrices on every step.
        q = jnp.swapaxes(self.query(x), 1, 2)
        k_cache = lax.dynamic_update_slice(k_cache, jnp.swapaxes(self.key(x), 1, 2).astype(k_cache.dtype),
                                           (0, 0, pos, 0))
        v_cache = lax.dynamic_update_slice(v_cache, jnp.swapaxes(self.value(x), 1, 2).astype(v_cache.dtype),
                                           (0, 0, pos, 0))
        mask = attention_mask(pos + jnp.arange(x.shape[1]), jnp.arange(k_cache.shape[2]), self.n_unmasked)
        y = softmax_attention(q, k_cache.astype(self.dtype), v_cache.astype(self.dtype), mask, self.dtype)
        return self.proj(jnp.swapaxes(y, 1, 2)), (k_cache, v_cache)


class Block(nn.Module):
    n_head: int
    n_embd: int
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    n_unmasked: int = 0
    dtype: Any = jnp.float32
    attention_impl: str = ""

    def setup(self) -> None:
        self.ln1 = LayerNorm(dtype=self.dtype)
        self.ln2 = LayerNorm(dtype=self.dtype)
        self.attn = CausalSelfAttention(self.n_head, self.n_embd, self.attn_pdrop, self.resid_pdrop,
                                        self.n_unmasked, self.dtype, self.attention_impl)
        self.mlp_fc = Linear(4 * self.n_embd, ("embed", "mlp"), dtype=self.dtype)
        self.mlp_out = Linear(self.n_embd, ("mlp", "embed"), dtype=self.dtype)
        self.mlp_drop = nn.Dropout(self.resid_pdrop)

    def _mlp(self, x: jax.Array, deterministic: bool) -> jax.Array:
        # GELU in float32 whatever the compute dtype: in bf16 every step of its erf polynomial (and of its
        # derivative) was rounded to bf16, slower on CPU (a convert around each op) and less exact.
        h = jax.nn.gelu(self.mlp_fc(self.ln2(x)).astype(jnp.float32), approximate=False).astype(self.dtype)
        return self.mlp_drop(self.mlp_out(h), deterministic=deterministic)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = x + self.attn(self.ln1(x), deterministic)
        return x + self._mlp(x, deterministic)

    def decode(self, x: jax.Array, cache: tuple[jax.Array, jax.Array], pos: jax.Array
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        a, cache = self.attn.decode(self.ln1(x), cache, pos)
        x = x + a
        return x + self._mlp(x, True), cache


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
    # out in (B, H, T, D) layout; "" picks "explicit" on CPU (faster there) and jax's default elsewhere.
    attention_impl: str = ""

    def setup(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.n_unmasked <= self.block_size:
            raise ValueError(f"GPT: n_unmasked must be in [0, block_size={self.block_size}], "
                             f"got {self.n_unmasked}")
        if self.attention_impl not in ("", "xla", "cudnn", "explicit"):
            raise ValueError(f"GPT: attention_impl must be '', 'xla', 'cudnn' or 'explicit', "
                             f"got {self.attention_impl!r}")
        self.tok_emb = self.param("tok_emb", nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
                                  (self.vocab_size, self.n_embd), jnp.float32)
        self.pos_emb = self.param("pos_emb", nn.with_logical_partitioning(_ZEROS, ("length", "embed")),
                                  (self.block_size, self.n_embd), jnp.float32)
        # deterministic (argument 2, counting self) is a Python bool: static under remat.
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        self.blocks = [block(self.n_head, self.n_embd, self.attn_pdrop, self.resid_pdrop, self.n_unmasked,
                             self.dtype, self.attention_impl, name=f"blocks_{i}") for i in range(self.n_layer)]
        self.ln_f = LayerNorm(dtype=self.dtype)
        self.head = Linear(self.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype)
        self.drop = nn.Dropout(self.embd_pdrop)

    def _check_length(self, t: int) -> None:
        if t > self.block_size:
            raise ValueError(f"GPT: sequence length {t} exceeds block_size {self.block_size}")

    def _embed(self, idx: jax.Array, pos: jax.Array | int = 0) -> jax.Array:
        t = idx.shape[1]
        pos_emb = lax.dynamic_slice_in_dim(self.pos_emb, pos, t, axis=0)
        return (jnp.take(self.tok_emb, idx, axis=0) + pos_emb[None]).astype(self.dtype)

    def features(self, idx: jax.Array, deterministic: bool = True) -> jax.Array:
        """Final hidden states after ``ln_f`` (B, T, C), before the head."""
        if idx.ndim != 2:
            raise ValueError(f"GPT: idx must be (batch, time) token ids, got shape {idx.shape}")
        self._check_length(idx.shape[1])
        x = self.drop(self._embed(idx), deterministic=deterministic)
        for blk in self.blocks:
            x = blk(x, deterministic)
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
            x, layer_cache = blk.decode(x, layer_cache, pos)
            new_cache.append(layer_cache)
        return self.logits_from_features(self.ln_f(x)), tuple(new_cache)


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


def prepare_decode_variables(model: GPT, variables: Any) -> Any:
    """``variables`` made ready for decoding loops: what every sampler calls once, outside its loop.

    On CPU with a bf16 (or other non-float32) compute dtype, adds :data:`DECODE_KERNELS`: each kernel as its 2D
    (out, in) matrix in the compute dtype, which :func:`matmul_transposed` reads about 3x faster than the
    (in, out) parameters (the 24-layer GPT's bf16 decode at batch 4: see the README's performance notes).
    Elsewhere (float32 models, accelerators) it is :func:`kernels_in_compute_dtype`. Products equal those of
    ``variables`` up to float rounding. Already prepared variables are returned as they are, so a caller that
    samples many batches (``Sampler``) prepares once: the copy of the 24-layer GPT takes about 0.6 s and
    1.35 GB.
    """
    if DECODE_KERNELS in variables:
        return variables
    if not uses_decode_kernels(model):
        return kernels_in_compute_dtype(model, variables)
    return {**variables, DECODE_KERNELS: _decode_kernels(model, variables)}


def uses_decode_kernels(model: GPT) -> bool:
    """Whether :func:`prepare_decode_variables` makes (out, in) kernel copies for ``model``: on CPU, for a
    non-float32 compute dtype."""
    return jax.default_backend() == "cpu" and jnp.dtype(model.dtype) != jnp.float32


@functools.partial(jax.jit, static_argnums=0)
def _decode_kernels(model: GPT, variables: Any) -> Any:
    """The :data:`DECODE_KERNELS` collection, made by one decode step on a dummy token (whose output is
    discarded, so only the kernel copies are computed). Jitted so that a direct call returns the copies alone,
    not new copies of ``variables``."""
    _, made = model.apply(variables, jnp.zeros((1, 1), jnp.int32), init_cache(model, 1, 1), 0,
                          method=GPT.decode, mutable=[DECODE_KERNELS])
    return made[DECODE_KERNELS]


def init_cache(model: GPT, batch: int, length: int | None = None, dtype: Any = None) -> KVCache:
    """Zero KV cache for ``length`` positions (default block_size), in the compute dtype by default."""
    length = model.block_size if length is None else int(length)
    if not 0 < length <= model.block_size:
        raise ValueError(f"init_cache: length must be in [1, block_size={model.block_size}], got {length}")
    shape = (batch, model.n_head, length, model.n_embd // model.n_head)
    dtype = model.dtype if dtype is None else dtype
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(model.n_layer))


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

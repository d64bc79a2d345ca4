"""Vector quantizers: taming's VectorQuantizer2 and GumbelQuantize, plus training options beyond taming.

Options (all off by default, so the default is numerically taming's quantizer):
- ``l2_normalize``: codes and inputs are unit-normalised before the nearest-code search (cosine codebook).
- ``codebook_dim``: low-dimensional codes; the input is projected down before lookup and back up after.
- ``use_ema``: codebook updated by exponential moving averages of assigned inputs (no codebook gradient,
  the loss keeps only the commitment term).
- ``entropy_weight``: penalty that pushes per-sample assignments to be confident and batch usage to be uniform.
- Dead-code restart lives in :func:`restart_dead_codes`, applied by the train step between updates.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax.layers import Conv

HIGHEST = jax.lax.Precision.HIGHEST


class QuantizerOutput(NamedTuple):
    z_q: jax.Array          # (B, h, w, C), straight-through
    indices: jax.Array      # (B, h, w) int32
    loss: jax.Array         # scalar codebook + commitment (+ entropy / KL) loss
    perplexity: jax.Array   # scalar, exp(entropy of the batch's code usage)
    usage: jax.Array        # (n_embed,) float32 counts of each code in the batch


def _usage_stats(indices: jax.Array, n_embed: int) -> tuple[jax.Array, jax.Array]:
    counts = jnp.zeros((n_embed,), jnp.float32).at[indices.reshape(-1)].add(1.0)
    p = counts / jnp.maximum(counts.sum(), 1.0)
    perplexity = jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))
    return counts, perplexity


def _l2n(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class VectorQuantizer(nn.Module):
    """taming's VectorQuantizer2: nearest code by squared distance, straight-through estimator.

    ``legacy=True`` (VQModel's default) puts β on the codebook term, ``legacy=False`` on the commitment term;
    both give the same loss value, with different gradients.
    """
    n_embed: int
    embed_dim: int
    beta: float = 0.25
    legacy: bool = True
    l2_normalize: bool = False
    codebook_dim: int | None = None
    use_ema: bool = False
    ema_decay: float = 0.99
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01

    def setup(self):
        dim = self.codebook_dim or self.embed_dim
        # PyTorch initialises the table U(-1/n, 1/n).
        init = nn.initializers.uniform(2.0 / self.n_embed)
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(
                lambda k, s, d: init(k, s, d) - 1.0 / self.n_embed, ("codes", "code_dim")),
            (self.n_embed, dim), jnp.float32)
        if self.codebook_dim:
            self.project_in = nn.Dense(dim, kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "code_dim")), name="project_in")
            self.project_out = nn.Dense(self.embed_dim, kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("code_dim", "embed")), name="project_out")
        if self.use_ema:
            self.ema_count = self.variable("codebook_ema", "count",
                                           lambda: jnp.ones((self.n_embed,), jnp.float32))
            self.ema_sum = self.variable("codebook_ema", "sum", lambda: self.embedding)

    def codebook(self) -> jax.Array:
        e = self.embedding
        return _l2n(e) if self.l2_normalize else e

    def nearest(self, z_flat: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(indices, squared distances) of the nearest code for each row of ``z_flat`` (N, dim)."""
        e = self.codebook()
        d = (jnp.sum(z_flat ** 2, axis=1, keepdims=True) + jnp.sum(e ** 2, axis=1)
             - 2.0 * jnp.matmul(z_flat, e.T, precision=HIGHEST))
        return jnp.argmin(d, axis=1).astype(jnp.int32), d

    def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
        z = z.astype(jnp.float32)
        b, h, w, _ = z.shape
        zp = self.project_in(z) if self.codebook_dim else z
        if self.l2_normalize:
            zp = _l2n(zp)
        z_flat = zp.reshape(-1, zp.shape[-1])
        idx, d = self.nearest(z_flat)
        e = self.codebook()
        zq = jnp.take(e, idx, axis=0).reshape(zp.shape)
        sg = jax.lax.stop_gradient
        if self.use_ema:
            # Codebook moves by EMA; only the encoder is pulled towards its code.
            loss = self.beta * jnp.mean((sg(zq) - zp) ** 2)
            if train:
                self._ema_update(z_flat, idx)
        elif self.legacy:
            loss = jnp.mean((sg(zq) - zp) ** 2) + self.beta * jnp.mean((zq - sg(zp)) ** 2)
        else:
            loss = self.beta * jnp.mean((sg(zq) - zp) ** 2) + jnp.mean((zq - sg(zp)) ** 2)
        if self.entropy_weight > 0.0:
            loss = loss + self.entropy_weight * entropy_penalty(-d, self.entropy_temperature)
        zq = zp + sg(zq - zp)  # straight-through, as taming computes it
        if self.codebook_dim:
            zq = self.project_out(zq)
        indices = idx.reshape(b, h, w)
        usage, perplexity = _usage_stats(indices, self.n_embed)
        return QuantizerOutput(zq, indices, loss, perplexity, usage)

    def _ema_update(self, z_flat: jax.Array, idx: jax.Array) -> None:
        stats = ema_batch_statistics(z_flat, idx, self.n_embed)
        # Also exposed (collection "ema_batch"), so that gradient accumulation can add the micro-batches'
        # statistics and apply one update per optimizer step.
        self.sow("ema_batch", "stats", stats, reduce_fn=lambda _prev, new: new, init_fn=dict)
        new = ema_apply({"count": self.ema_count.value, "sum": self.ema_sum.value}, stats, self.ema_decay)
        self.ema_count.value, self.ema_sum.value = new["count"], new["sum"]

    def embed_code(self, indices: jax.Array) -> jax.Array:
        """Codes (B, h, w) -> quantized vectors (B, h, w, embed_dim), as ``get_codebook_entry``."""
        zq = jnp.take(self.codebook(), indices, axis=0)
        return self.project_out(zq) if self.codebook_dim else zq


def ema_batch_statistics(z_flat: jax.Array, idx: jax.Array, n_embed: int) -> dict:
    """One batch's EMA statistics: per-code counts (n_embed,) and sums of assigned inputs (n_embed, dim).

    Both are sums over the batch, so the statistics of micro-batches add up to those of the whole batch.
    """
    onehot = jax.nn.one_hot(idx, n_embed, dtype=jnp.float32)
    return {"count": onehot.sum(0),
            "sum": jnp.matmul(onehot.T, jax.lax.stop_gradient(z_flat), precision=HIGHEST)}


def ema_apply(ema_vars: dict, stats: dict, decay: float) -> dict:
    """One EMA step of the codebook statistics ``{"count", "sum"}`` towards a batch's ``stats``."""
    return {k: decay * ema_vars[k] + (1 - decay) * stats[k] for k in ("count", "sum")}


def ema_codebook(ema_vars: dict, eps: float = 1e-5) -> jax.Array:
    """Codebook implied by EMA statistics (Laplace-smoothed counts); the train step writes it into params."""
    count, total = ema_vars["count"], ema_vars["sum"]
    n = count.sum()
    smoothed = (count + eps) / (n + count.shape[0] * eps) * n
    return total / smoothed[:, None]


def entropy_penalty(affinity: jax.Array, temperature: float) -> jax.Array:
    """Mean per-sample entropy minus entropy of the mean assignment (low = confident and diverse)."""
    p = jax.nn.softmax(affinity / temperature, axis=-1)
    logp = jax.nn.log_softmax(affinity / temperature, axis=-1)
    sample_entropy = -jnp.mean(jnp.sum(p * logp, axis=-1))
    avg = jnp.mean(p, axis=0)
    avg_entropy = -jnp.sum(avg * jnp.log(avg + 1e-10))
    return sample_entropy - avg_entropy


def restart_dead_codes(codebook: jax.Array, usage: jax.Array, z_flat: jax.Array, rng: jax.Array,
                       threshold: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Replace codes used fewer than ``threshold`` times by randomly chosen encoder outputs.

    ``usage`` is a running count (e.g. EMA of per-step usage). Returns (new codebook, number restarted).
    """
    dead = usage < threshold
    pick = jax.random.randint(rng, (codebook.shape[0],), 0, z_flat.shape[0])
    candidates = z_flat[pick].astype(codebook.dtype)
    return jnp.where(dead[:, None], candidates, codebook), dead.sum()


class GumbelQuantize(nn.Module):
    """taming's GumbelQuantize: logits from a 1x1 conv, Gumbel-softmax over codes, KL to uniform prior.

    ``train=True`` samples (straight-through hard samples if ``straight_through``), ``train=False`` is the
    deterministic argmax path used for encoding (taming adds Gumbel noise even in eval; we do not).
    """
    n_embed: int
    embed_dim: int
    kl_weight: float = 5e-4
    temperature: float = 1.0
    straight_through: bool = True
    dtype: Any = None

    def setup(self):
        self.proj = Conv(self.n_embed, (1, 1), dtype=self.dtype, name="proj")
        self.embed = self.param(
            "embed", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("codes", "code_dim")),
            (self.n_embed, self.embed_dim), jnp.float32)

    def __call__(self, z: jax.Array, train: bool = False, temperature: jax.Array | float | None = None
                 ) -> QuantizerOutput:
        logits = self.proj(z).astype(jnp.float32)
        tau = self.temperature if temperature is None else temperature
        if train:
            g = jax.random.gumbel(self.make_rng("gumbel"), logits.shape, jnp.float32)
            soft = jax.nn.softmax((logits + g) / tau, axis=-1)
            idx = jnp.argmax(soft, axis=-1).astype(jnp.int32)
            if self.straight_through:
                hard = jax.nn.one_hot(idx, self.n_embed, dtype=soft.dtype)
                soft = hard + soft - jax.lax.stop_gradient(soft)
        else:
            idx = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            soft = jax.nn.one_hot(idx, self.n_embed, dtype=jnp.float32)
        zq = jnp.einsum("bhwn,nd->bhwd", soft, self.embed, precision=HIGHEST)
        qy = jax.nn.softmax(logits, axis=-1)
        loss = self.kl_weight * jnp.mean(jnp.sum(qy * jnp.log(qy * self.n_embed + 1e-10), axis=-1))
        usage, perplexity = _usage_stats(idx, self.n_embed)
        return QuantizerOutput(zq, idx, loss, perplexity, usage)

    def embed_code(self, indices: jax.Array) -> jax.Array:
        return jnp.take(self.embed, indices, axis=0)

"""taming's VectorQuantizer2 (``model.quantizer.kind='vq'``), plus training options beyond taming.

Options (all off by default, so the default is numerically taming's quantizer):
- ``l2_normalize``: codes and inputs are unit-normalised before the nearest-code search (cosine codebook).
- ``codebook_dim``: low-dimensional codes; the input is projected down before lookup and back up after.
- ``use_ema``: codebook updated by exponential moving averages of assigned inputs (no codebook gradient,
  the loss keeps only the commitment term).
- ``entropy_weight``: penalty that pushes per-sample assignments to be confident and batch usage to be uniform
  (``entropy_eps`` inside the log of the batch's mean assignment: 1e-5 in LlamaGen's and MaskGIT's loss).
- Dead-code restart (``loss.dead_code_threshold``): :func:`restart_dead_codes`, applied after each update by
  :meth:`VectorQuantizer.after_step`.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.quantizers.base import QuantizerHooks, QuantizerOutput, entropy_terms, usage_stats

HIGHEST = jax.lax.Precision.HIGHEST


def _l2n(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class VectorQuantizer(QuantizerHooks, nn.Module):
    """taming's VectorQuantizer2: nearest code by squared distance, straight-through estimator.

    ``legacy=True`` (VQModel's default) puts β on the codebook term, ``legacy=False`` on the commitment term;
    both give the same loss value, with different gradients.
    """
    n_embed: int
    embed_dim: int
    beta: float = 0.25
    legacy: bool = True
    l2_normalize: bool = False
    codebook_dim: int = 0           # 0: codes live in embed_dim
    use_ema: bool = False
    ema_decay: float = 0.99
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    entropy_eps: float = 1e-10

    shape_options = ("n_embed", "codebook_dim", "use_ema")

    @property
    def codebook_size(self) -> int:
        return int(self.n_embed)

    @classmethod
    def check_training(cls, kind: str, options: Mapping[str, Any], loss_cfg: Any) -> None:
        if float(loss_cfg.get("dead_code_threshold", 0.0) or 0.0) > 0 and options.get("codebook_dim"):
            raise ValueError("loss.dead_code_threshold > 0 with model.quantizer.codebook_dim: the restart re-seeds "
                             "codes from encoder outputs, which live in embed_dim, not codebook_dim; set one of "
                             "them to 0")

    def setup(self):
        dim = self.codebook_dim or self.embed_dim
        # PyTorch initialises the table U(-1/n, 1/n); a cosine codebook starts unit-norm (as LlamaGen's and
        # ViT-VQGAN's), else the normalisation's gradient would be scaled by 1/|e|, about n_embed.
        init = nn.initializers.uniform(2.0 / self.n_embed)

        def table(k, s, d):
            e = init(k, s, d) - 1.0 / self.n_embed
            return _l2n(e) if self.l2_normalize else e
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(table, ("codes", "code_dim")), (self.n_embed, dim), jnp.float32)
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

    def __call__(self, z: jax.Array, train: bool = False, temperature: Any = None) -> QuantizerOutput:
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
            loss = loss + self.entropy_weight * entropy_penalty(-d, self.entropy_temperature, self.entropy_eps)
        zq = zp + sg(zq - zp)  # straight-through, as taming computes it
        if self.codebook_dim:
            zq = self.project_out(zq)
        indices = idx.reshape(b, h, w)
        usage, perplexity = usage_stats(indices, self.n_embed)
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

    # -- state beside the parameters, updated by the train step through these (unbound) methods --------
    @property
    def keeps_state(self) -> bool:
        return bool(self.use_ema)

    def initial_state(self, params: Mapping[str, Any]) -> dict:
        """EMA statistics of a fresh EMA codebook at ``params``: count 1 per code, sum = the codebook."""
        if not self.use_ema:
            return {}
        emb = params["embedding"]
        return {"count": jnp.ones(emb.shape[:1], jnp.float32), "sum": emb}

    def ema_step(self, state: Any, batch_stats: Any) -> Any:
        """EMA statistics after one step of (micro-batch-summed) batch statistics."""
        return ema_apply(state, batch_stats, float(self.ema_decay)) if state else state

    def after_step(self, params: Any, state: Any, code_usage: jax.Array, z_flat: jax.Array, rng: jax.Array,
                   restart_threshold: float) -> tuple[Any, jax.Array, jax.Array]:
        """Write the EMA codebook into the parameters, then restart codes used less than the threshold."""
        if state:
            params = _with_codebook(params, ema_codebook(state))
        restarted = jnp.float32(0.0)
        if restart_threshold > 0:
            new_cb, restarted = restart_dead_codes(params["embedding"], code_usage, z_flat, rng, restart_threshold)
            params = _with_codebook(params, new_cb)
            code_usage = jnp.where(code_usage < restart_threshold, 1.0, code_usage)
        return params, code_usage, restarted


def _with_codebook(params: Any, codebook: jax.Array) -> Any:
    return {**params, "embedding": codebook.astype(params["embedding"].dtype)}


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


def entropy_penalty(affinity: jax.Array, temperature: float, eps: float = 1e-10) -> jax.Array:
    """Mean per-sample entropy minus entropy of the mean assignment (low = confident and diverse)."""
    sample_entropy, avg_entropy = entropy_terms(affinity, temperature, eps)
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

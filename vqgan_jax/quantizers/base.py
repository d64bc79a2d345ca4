"""What every quantizer returns and the hooks the train step calls; kinds override what they need.

A quantizer is a Flax module ``(z, train, temperature) -> QuantizerOutput`` with ``codebook_size`` and
``embed_code(indices)``. Its dataclass fields after ``embed_dim`` are its config options
(``model.quantizer.<option>``). State it keeps beside its parameters (an EMA codebook) is updated through
:meth:`QuantizerHooks.ema_step` and :meth:`QuantizerHooks.after_step`; those run on the unbound module
(only its options are read), so the train step never looks inside the quantizer's parameters.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp


class QuantizerOutput(NamedTuple):
    z_q: jax.Array          # (B, h, w, C), straight-through
    indices: jax.Array      # (B, h, w) int32
    loss: jax.Array         # scalar: the quantizer's own loss terms, weighted
    perplexity: jax.Array   # scalar, exp(entropy of the batch's code usage)
    usage: jax.Array        # (codebook_size,) float32 counts of each code in the batch


def usage_stats(indices: jax.Array, codebook_size: int) -> tuple[jax.Array, jax.Array]:
    """(per-code counts, perplexity) of a batch of indices."""
    counts = jnp.zeros((codebook_size,), jnp.float32).at[indices.reshape(-1)].add(1.0)
    p = counts / jnp.maximum(counts.sum(), 1.0)
    perplexity = jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))
    return counts, perplexity


def entropy_terms(affinity: jax.Array, temperature: float, eps: float = 1e-10) -> tuple[jax.Array, jax.Array]:
    """(mean per-sample entropy, entropy of the mean assignment) of softmax(affinity / temperature) rows;
    ``eps`` is added to the mean assignment inside its log."""
    p = jax.nn.softmax(affinity / temperature, axis=-1)
    logp = jax.nn.log_softmax(affinity / temperature, axis=-1)
    sample_entropy = -jnp.mean(jnp.sum(p * logp, axis=-1))
    avg = jnp.mean(p, axis=0)
    return sample_entropy, -jnp.sum(avg * jnp.log(avg + eps))


class QuantizerHooks:
    """Defaults for a quantizer without state beside its parameters (FSQ, LFQ, Gumbel)."""

    # option names whose value changes the parameter or state shapes (a resume refuses a change)
    shape_options: ClassVar[tuple[str, ...]] = ()
    # whether ``__call__`` takes a (scheduled) temperature
    uses_temperature: ClassVar[bool] = False

    @classmethod
    def check_options(cls, kind: str, options: Mapping[str, Any], embed_dim: int) -> None:
        """Refuse options that cannot build this quantizer (one line); nothing to check by default."""

    @classmethod
    def check_training(cls, kind: str, options: Mapping[str, Any], loss_cfg: Any) -> None:
        """Refuse training options this quantizer would silently ignore (one line)."""
        if float(loss_cfg.get("dead_code_threshold", 0.0) or 0.0) > 0:
            raise ValueError(f"model.quantizer.kind={kind!r} does not use loss.dead_code_threshold (it has no "
                             "learned codebook to restart): set it to 0")

    @property
    def keeps_state(self) -> bool:
        """Whether the quantizer keeps state beside its parameters (the ``codebook_ema`` collection)."""
        return False

    def initial_state(self, params: Mapping[str, Any]) -> dict:
        """That state started from given parameters (a converted or fine-tuned codebook); none by default."""
        return {}

    def ema_step(self, state: Any, batch_stats: Any) -> Any:
        """State after one step of batch statistics (summed over micro-batches); none by default."""
        return state

    def after_step(self, params: Any, state: Any, code_usage: jax.Array, z_flat: jax.Array, rng: jax.Array,
                   restart_threshold: float) -> tuple[Any, jax.Array, jax.Array]:
        """(params, code usage, number of codes restarted) after the optimizer step; unchanged by default."""
        return params, code_usage, jnp.float32(0.0)

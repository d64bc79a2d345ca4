"""Finite scalar quantisation (Mentzer et al. 2023, ``model.quantizer.kind='fsq'``).

Each of the ``embed_dim`` channels is squashed into a bounded range by a shifted tanh and rounded to one of
``levels[c]`` integers, with a straight-through gradient. The codebook is implicit: every combination of
per-channel levels, ``prod(levels)`` codes, numbered in mixed radix (channel 0 the least significant
digit). Codes are the rounded values divided by ``levels // 2``, so they lie in [-1, 1]. There are no
parameters and no codebook loss. ``embed_dim`` must equal ``len(levels)``: ``quant_conv`` already projects
the encoder's channels down, so no second projection is added here.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.quantizers.base import QuantizerHooks, QuantizerOutput, usage_stats


class FSQ(QuantizerHooks, nn.Module):
    embed_dim: int
    levels: Sequence[int] = (8, 5, 5, 5)
    eps: float = 1e-3     # narrows the tanh range slightly, as Mentzer et al.'s Appendix A.1 does

    shape_options = ("levels",)

    @classmethod
    def check_options(cls, kind: str, options: Mapping[str, Any], embed_dim: int) -> None:
        levels = tuple(options.get("levels", cls.levels))
        if len(levels) != embed_dim:
            raise ValueError(f"model.quantizer.levels={list(levels)} has {len(levels)} channels but "
                             f"model.embed_dim={embed_dim}: FSQ quantizes each latent channel, set them equal")
        if any(int(v) < 2 for v in levels):
            raise ValueError(f"model.quantizer.levels={list(levels)}: every channel needs at least 2 levels")

    @property
    def codebook_size(self) -> int:
        return int(math.prod(int(v) for v in self.levels))

    def _consts(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        levels = np.asarray(self.levels, np.int64)
        basis = np.concatenate([[1], np.cumprod(levels[:-1])])
        return jnp.asarray(levels, jnp.float32), jnp.asarray(levels // 2, jnp.float32), jnp.asarray(basis, jnp.int32)

    def bound(self, z: jax.Array) -> jax.Array:
        """Channel c squashed into (-levels[c]/2, levels[c]/2) so that rounding gives levels[c] integers.

        Appendix A.1 of the paper: half-width (L - 1)(1 - eps)/2, even L shifted by 1/2. The shift inside the
        tanh is arctanh(offset / half), the exact value that maps z = 0 onto level 0 (as lucidrains'
        vector-quantize-pytorch does); the appendix writes tan(), equal to third order (4e-4 apart at L = 4).
        """
        levels, _, _ = self._consts()
        half = (levels - 1) * (1 - self.eps) / 2
        offset = jnp.where(levels % 2 == 0, 0.5, 0.0)   # even counts: integers -L/2 .. L/2 - 1
        shift = jnp.arctanh(offset / half)
        return jnp.tanh(z + shift) * half - offset

    def __call__(self, z: jax.Array, train: bool = False, temperature: Any = None) -> QuantizerOutput:
        _, half_width, basis = self._consts()
        bounded = self.bound(z.astype(jnp.float32))
        rounded = jnp.round(bounded)
        z_q = (bounded + jax.lax.stop_gradient(rounded - bounded)) / half_width
        indices = jnp.sum((rounded + half_width).astype(jnp.int32) * basis, axis=-1)
        usage, perplexity = usage_stats(indices, self.codebook_size)
        return QuantizerOutput(z_q, indices, jnp.float32(0.0), perplexity, usage)

    def embed_code(self, indices: jax.Array) -> jax.Array:
        """Codes (...) -> their vectors (..., embed_dim) in [-1, 1]."""
        levels, half_width, basis = self._consts()
        digits = (indices[..., None] // basis) % levels.astype(jnp.int32)
        return (digits.astype(jnp.float32) - half_width) / half_width

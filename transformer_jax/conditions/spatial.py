"""Spatially conditioned models: the codes of a second frozen VQ model (taming's cond stage, e.g. the
segmentation model of label maps), flattened row-major."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.conditions.base import Conditioning


class Spatial(Conditioning):
    name = "spatial"
    description = "spatially conditioned"
    sampler_arg = "cond_codes"
    sampler_arg_help = "(n, h, w)"
    example_feature = "segmentation"
    batch_key = "cond_codes"
    uses_cond_stage = True

    def prefix_length(self, cond_grid: tuple[int, int] | None = None) -> int:
        if cond_grid is None:
            raise ValueError("spatial conditioning needs the cond code grid size")
        return cond_grid[0] * cond_grid[1]

    def prefix(self, batch: Mapping[str, Any], batch_size: int) -> jax.Array:
        return jnp.asarray(batch["cond_codes"], jnp.int32).reshape(batch_size, -1)

    def sampler_value(self, value: Any, n: int, cond_grid: tuple[int, int] | None) -> np.ndarray:
        cond_codes = np.asarray(value)
        # Another grid would give the model a prefix of a length it never saw: garbage, not an error.
        want = (n, *cond_grid) if cond_grid else None
        if (cond_codes.ndim != 3 or len(cond_codes) != n or (want and cond_codes.shape != want)
                or not np.issubdtype(cond_codes.dtype, np.integer)):
            shape = f"{want}" if want else f"(n={n}, h, w)"
            raise ValueError(f"cond_codes must be {shape} integer codes (the cond stage's grid at the training "
                             f"size), got {cond_codes.dtype} {cond_codes.shape}; sample_large takes larger maps")
        return cond_codes.astype(np.int32).reshape(n, -1)

    def window_condition(self, n: int, conditions: Mapping[str, Any], cond_grid: tuple[int, int] | None = None
                         ) -> tuple[jax.Array | None, jax.Array | None]:
        # The sliding window crops the cond grid with the image window: no fixed prefix.
        return None, jnp.asarray(self.taken(conditions), jnp.int32)

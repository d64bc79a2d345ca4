"""Unconditional models: one start-of-sequence token (taming's SOSProvider)."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from transformer_jax.conditions.base import Conditioning


class Unconditional(Conditioning):
    name = "unconditional"
    description = "unconditional"
    conditional = False
    layout_keys = ("sos_token",)
    # example_feature / batch_key stay "label": the loaders read a dataset's labels as before, and the prefix
    # ignores them.

    def check_layout(self, vocab_size: int) -> None:
        if not 0 <= self.cfg.sos_token < vocab_size:
            raise ValueError(f"cond.sos_token={self.cfg.sos_token} is outside the vocabulary [0, {vocab_size})")

    def prefix(self, batch: Mapping[str, Any], batch_size: int) -> jax.Array:
        return jnp.full((batch_size, 1), self.cfg.sos_token, jnp.int32)

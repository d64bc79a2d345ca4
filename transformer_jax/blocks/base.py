"""The fields every GPT block takes (the registry's contract, ``transformer_jax.blocks``), declared once."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax.gpt_layers import INIT


class BlockFields(nn.Module):
    """``n_head, n_embd, attn_pdrop, resid_pdrop, n_unmasked, dtype, attention_impl, options``: what the GPT
    passes each block, in this order (``options``: the block's own settings, sorted (name, value) pairs)."""
    n_head: int
    n_embd: int
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    n_unmasked: int = 0
    dtype: Any = jnp.float32
    attention_impl: str = ""
    options: tuple = ()

    head_init = staticmethod(INIT)  # the initialiser of the GPT's output head (minGPT's normal(0.02))

    @staticmethod
    def prefix_table(options: tuple) -> tuple[int, int]:
        """(leading positions embedded from a table of their own, that table's rows): none by default."""
        return 0, 0

    @staticmethod
    def position_grid(options: tuple) -> int | None:
        """The side of the code grid the block's positions assume (2-D positions), None when positions are
        plain sequence indices: a sliding window must then be that wide."""
        return None

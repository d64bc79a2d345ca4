"""The GPT's blocks, chosen by name (``gpt.block`` in config). One line per block below; nothing else in the
project compares a block's name.

A block module defines ``Block``, a Flax module that:

- takes the fields of ``blocks.base.BlockFields`` (``n_head, n_embd, attn_pdrop, resid_pdrop, n_unmasked, dtype,
  attention_impl``) and
  ``options`` (the block's own settings, ``gpt.block_options``, as sorted (name, value) pairs);
- is called as ``block(x, deterministic, cache=None, pos=None) -> (x, cache)``: ``cache=None`` for a whole
  sequence, else the layer's KV cache with the tokens at positions [pos, pos + T) (see
  :func:`transformer_jax.attention.attend`, the attention every block calls);
- says what the model around it needs: ``learned_positions`` (whether the GPT adds learned absolute position
  embeddings), ``final_norm(dtype, options)`` (the norm before the head), ``kv_heads(n_head, options)`` (the heads
  its KV cache holds) and ``prefix_table(options)`` (``(positions, rows)``: how many leading positions of ``idx``
  the GPT embeds from a separate table of ``rows`` entries, e.g. class ids; ``(0, 0)``, the default of
  ``BlockFields``, for none); optionally ``head_init``, the output head's initialiser (default minGPT's), and
  ``position_grid(options)`` (the side of the code grid its positions assume, which a sliding window must match;
  None, the default, for plain sequence positions).
"""
from __future__ import annotations

import importlib
from typing import Any

BLOCKS = {
    "mingpt": "transformer_jax.blocks.mingpt",  # taming's minGPT block: the default
    "llama": "transformer_jax.blocks.llama",    # LlamaGen's LLaMA block: RMSNorm, 2-D RoPE, SwiGLU, class table
}


def block_class(name: str) -> Any:
    """The ``Block`` class registered as ``name``."""
    if name not in BLOCKS:
        raise ValueError(f"gpt.block: unknown block {name!r}; choices: {', '.join(sorted(BLOCKS))}")
    return importlib.import_module(BLOCKS[name]).Block

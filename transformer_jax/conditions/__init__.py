"""The conditioning registry: ``cond.kind`` -> class (see :mod:`transformer_jax.conditions.base` for what a
kind provides). Adding a kind is one file with its class and one line in ``KINDS``; nothing outside this
package compares the kind's name.
"""
from __future__ import annotations

from typing import Any

from transformer_jax.conditions.base import Conditioning, drop_condition
from transformer_jax.conditions.class_label import ClassLabel
from transformer_jax.conditions.spatial import Spatial
from transformer_jax.conditions.unconditional import Unconditional

KINDS: dict[str, type[Conditioning]] = {"unconditional": Unconditional, "class": ClassLabel, "spatial": Spatial}

__all__ = ["KINDS", "Conditioning", "drop_condition", "for_model", "from_config", "shape_keys"]


def from_config(cond: Any, vocab_size: int | None = None, prefix_table: tuple[int, int] = (0, 0)) -> Conditioning:
    """The conditioning ``cond.kind`` names, over the section ``cond``; with ``vocab_size``, its tokens are
    checked against the vocabulary, or against the GPT block's own prefix table (``prefix_table``: (positions,
    rows), :func:`model_prefix_table`) when it has one."""
    kind = cond.kind
    if kind not in KINDS:
        raise ValueError(f"cond.kind must be one of {sorted(KINDS)}, got {kind!r}")
    conditioning = KINDS[kind](cond)
    if vocab_size is not None:
        conditioning.check(vocab_size, prefix_table)
    return conditioning


def for_model(cond: Any, model: Any) -> Conditioning:
    """:func:`from_config` checked against a GPT: its vocabulary, or its block's own prefix table."""
    from transformer_jax.blocks import block_class
    table = block_class(model.block).prefix_table(model.block_options)
    return from_config(cond, model.vocab_size, tuple(int(t) for t in table))


def shape_keys() -> tuple[str, ...]:
    """The ``cond.*`` keys that fix the prefix's token layout, over every kind."""
    names = {"kind", "null_token"}
    for cls in KINDS.values():
        names.update(cls.layout_keys)
    return tuple(f"cond.{k}" for k in sorted(names))

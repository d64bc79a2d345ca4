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

__all__ = ["KINDS", "Conditioning", "drop_condition", "from_config", "shape_keys"]


def from_config(cond: Any, vocab_size: int | None = None) -> Conditioning:
    """The conditioning ``cond.kind`` names, over the section ``cond``; with ``vocab_size``, its tokens are
    checked against the vocabulary."""
    kind = cond.kind
    if kind not in KINDS:
        raise ValueError(f"cond.kind must be one of {sorted(KINDS)}, got {kind!r}")
    conditioning = KINDS[kind](cond)
    if vocab_size is not None:
        conditioning.check(vocab_size)
    return conditioning


def shape_keys() -> tuple[str, ...]:
    """The ``cond.*`` keys that fix the prefix's token layout, over every kind."""
    names = {"kind", "null_token"}
    for cls in KINDS.values():
        names.update(cls.layout_keys)
    return tuple(f"cond.{k}" for k in sorted(names))

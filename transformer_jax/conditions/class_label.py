"""Class-conditional models: one token, the class label plus ``cond.class_offset`` (taming's Labelator uses
the label itself, i.e. offset 0)."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.conditions.base import Conditioning


def class_ids(labels: Any) -> np.ndarray:
    """``labels`` as a flat int32 array; fractional values are an error, not truncated to another class."""
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iub" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise ValueError(f"labels must be integer class ids, got {arr.dtype} values {arr.reshape(-1)[:5].tolist()}")
    return arr.astype(np.int32).reshape(-1)


class ClassLabel(Conditioning):
    name = "class"
    description = "class-conditional"
    sampler_arg = "labels"
    sampler_arg_help = "(one per sample)"
    layout_keys = ("n_classes", "class_offset")

    def check_layout(self, vocab_size: int) -> None:
        top = self.cfg.class_offset + self.cfg.n_classes
        if top > vocab_size:
            raise ValueError(f"cond: class tokens reach {top - 1} (class_offset {self.cfg.class_offset} + "
                             f"n_classes {self.cfg.n_classes} - 1) but vocab_size is {vocab_size}")

    def prefix(self, batch: Mapping[str, Any], batch_size: int) -> jax.Array:
        return jnp.asarray(batch["label"], jnp.int32).reshape(batch_size, 1) + self.cfg.class_offset

    def sampler_value(self, value: Any, n: int, cond_grid: tuple[int, int] | None) -> np.ndarray:
        labels = class_ids(value)
        if len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for {n} samples")
        bad = labels[(labels < 0) | (labels >= self.cfg.n_classes)]
        if bad.size:
            raise ValueError(f"labels must be in [0, {self.cfg.n_classes}), got {bad[:5].tolist()}")
        return labels

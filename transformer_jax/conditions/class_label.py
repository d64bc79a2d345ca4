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

    def check_table(self, positions: int, rows: int) -> None:
        # The block looks class ids up in its own table (LlamaGen's class embedding): ids are not offset into the
        # code vocabulary, and the null class of guidance is the row after the classes.
        c = self.cfg
        if positions != self.prefix_length():
            raise ValueError(f"the GPT's block takes {positions} class position(s) (cls_token_num); class "
                             f"conditioning gives {self.prefix_length()}")
        if c.class_offset != 0:
            raise ValueError(f"cond.class_offset={c.class_offset} must be 0: this GPT's block looks class ids up in "
                             f"its own class table ({rows} rows), not in the code vocabulary")
        if c.n_classes not in (rows, rows - 1):
            raise ValueError(f"cond.n_classes={c.n_classes} disagrees with the block's class table of {rows} rows "
                             "(num_classes, plus the null class when trained with class dropout)")
        if c.cfg_dropout > 0 and (c.null_token != c.n_classes or rows != c.n_classes + 1):
            raise ValueError(f"cond.null_token={c.null_token} must be the null class {c.n_classes}, the class "
                             f"table's last row (it has {rows} rows), for condition dropout")

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

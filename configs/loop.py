"""The training loop's fields, shared by every base config: the one place their defaults are written.

``common_jax.training.run`` reads them and has no defaults of its own; a config without one of them is
refused with a line naming the field. Tests that drive the loop with a toy task start from here too.
"""
from __future__ import annotations

import ml_collections


def loop_config(**overrides) -> ml_collections.ConfigDict:
    """seed, mesh and the loop cadence (steps, logging, eval, images, checkpoints), with ``overrides``."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    c.total_steps = 1_000_000
    c.log_every = 100
    c.tensorboard = True        # False: console logs only (no TensorFlow import, about 6 s of CPU per process)
    c.eval_every = 5000         # 0: only at the end (when the stage has held-out data)
    c.eval_steps = 0            # 0: the whole held-out split (capped by data.eval_examples)
    c.image_every = 0           # 0: only at the end
    c.checkpoint = ml_collections.ConfigDict(dict(every=5000, keep=3, async_save=True))
    # A step whose loss or gradient norm is NaN/Inf: 0 stops the run (no checkpoint of it is written); N > 0
    # skips up to N such steps of the run (each leaves the state unchanged), then stops.
    c.max_skipped_steps = 0
    c.update(overrides)
    return c

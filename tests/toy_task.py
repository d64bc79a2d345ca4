"""A tiny Task for the training-loop tests: 2-layer MLP regression with Adam and a running input mean
(mutable, BatchNorm-like state), plus a deterministic checkpointable loader."""
from __future__ import annotations

import logging as pylogging
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from common_jax.training import accumulate_gradients, run, specs_from_boxed_init
from configs.loop import loop_config

D_IN, D_HID, D_OUT = 8, 16, 8


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        k1 = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        k2 = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
        b1 = nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",))
        b2 = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
        x = nn.Dense(D_HID, kernel_init=k1, bias_init=b1)(x)
        x = jnp.tanh(x)
        return nn.Dense(D_OUT, kernel_init=k2, bias_init=b2)(x)


@struct.dataclass
class ToyState:
    step: jax.Array
    params: Any
    opt_state: Any
    input_mean: jax.Array  # non-gradient state updated every step


class ToyTask:
    shape_keys = ("model.d_in", "model.d_hid", "model.d_out")

    def __init__(self, lr: float = 1e-2, num_micro: int = 1, noise: float = 0.0, nan_at: tuple[int, ...] = ()):
        self.model = MLP()
        self.tx = optax.adam(lr)
        self.num_micro = num_micro
        self.noise = noise  # > 0: the step uses its rng, so resume must reproduce the rng stream
        self.nan_at = tuple(nan_at)  # a fault at chosen steps: their loss (and gradients) are NaN

    def _init_boxed(self, rng):
        params = self.model.init(rng, jnp.zeros((1, D_IN)))["params"]
        return ToyState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                        input_mean=jnp.zeros((D_IN,), jnp.float32))

    def init_state(self, rng):
        return nn.unbox(self._init_boxed(rng))

    def state_logical_specs(self, abstract_state):
        del abstract_state
        return specs_from_boxed_init(self._init_boxed, jax.random.key(0))

    def _loss(self, params, batch, rng=None):
        x = batch["x"]
        if rng is not None and self.noise:
            x = x + self.noise * jax.random.normal(rng, x.shape)
        pred = self.model.apply({"params": params}, x)
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, {"abs_err": jnp.mean(jnp.abs(pred - batch["y"]))}

    def train_step(self, state, batch, rng):
        vg = jax.value_and_grad(self._loss, has_aux=True)
        if self.nan_at:
            poisoned = jnp.isin(state.step + 1, jnp.asarray(self.nan_at))
            vg = _poison(vg, jnp.where(poisoned, jnp.nan, 1.0))
        (loss, aux), grads = accumulate_gradients(vg, state.params, batch, self.num_micro, rng=rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        input_mean = 0.9 * state.input_mean + 0.1 * jnp.mean(batch["x"], axis=0)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, input_mean=input_mean)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

    def eval_step(self, state, batch):
        pred = self.model.apply({"params": state.params}, batch["x"])
        per_ex = jnp.mean((pred - batch["y"]) ** 2, axis=-1) * batch["mask"]
        return {"loss": per_ex.sum(), "count": batch["mask"].sum()}

    def summaries(self, state, batch):
        pred = self.model.apply({"params": state.params}, batch["x"])
        img = jnp.clip((pred.reshape(-1, 2, 4, 1) + 1.0) * 127.5, 0, 255).astype(jnp.uint8)
        return {"pred": img}


def _poison(vg, factor):
    """``vg`` with its loss and gradients multiplied by ``factor`` (NaN at the chosen steps, else 1)."""
    def wrapped(*args):
        (loss, aux), grads = vg(*args)
        return (loss * factor, aux), jax.tree.map(lambda g: g * factor, grads)
    return wrapped


def make_batch(seed: int, index: int, batch_size: int) -> dict:
    rng = np.random.default_rng([seed, index])
    x = rng.normal(size=(batch_size, D_IN)).astype(np.float32)
    w = np.random.default_rng(1234).normal(size=(D_IN, D_OUT)).astype(np.float32) / np.sqrt(D_IN)
    return {"x": x, "y": np.sin(x @ w).astype(np.float32)}


class ToyLoader:
    """Infinite, deterministic: batch i depends only on (seed, i); state is {'index': i}."""

    def __init__(self, batch_size: int, seed: int = 0, sleep: float = 0.0,
                 process_index: int = 0, process_count: int = 1):
        self.batch_size, self.seed, self.sleep, self.index = batch_size, seed, sleep, 0
        # Host-local slice of the global batch, as a per-process data loader yields.
        per = batch_size // process_count
        self._slice = slice(process_index * per, (process_index + 1) * per)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.sleep:
            time.sleep(self.sleep)
        batch = make_batch(self.seed, self.index, self.batch_size)
        self.index += 1
        return {k: v[self._slice] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"index": self.index, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"ToyLoader.set_state: seed {state.get('seed')} != {self.seed}")
        self.index = int(state["index"])


def eval_batches(batch_size: int = 16, n: int = 2):
    """A finite eval stream; the last batch is padded with mask=0 rows."""
    for i in range(n):
        b = make_batch(99, i, batch_size)
        mask = np.ones((batch_size,), np.float32)
        if i == n - 1:
            mask[batch_size // 2:] = 0.0
        yield {**b, "mask": mask}


def toy_config(total_steps: int = 6, data: int = -1, fsdp: int = 1, every: int = 3, **kw) -> ml_collections.ConfigDict:
    # The loop's fields come from the configs' one definition of them (the loop has no defaults).
    cfg = loop_config(total_steps=total_steps, log_every=2, eval_every=0, image_every=0)
    cfg.checkpoint.update({"every": every, "keep": 2})
    cfg.mesh.update({"data": data, "fsdp": fsdp})
    cfg.update({
        "model": {"d_in": D_IN, "d_hid": D_HID, "d_out": D_OUT},
        "batch_size": 16,
    })
    cfg.update(kw)
    return cfg


def run_logged(cfg, workdir, **kwargs):
    """``training.run`` on the toy task with the absl log records (INFO and up) captured: (result, records)."""
    records = []

    class Grab(pylogging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Grab(level=pylogging.INFO)
    absl_logger = pylogging.getLogger("absl")
    old_level = absl_logger.level
    absl_logger.addHandler(handler)
    absl_logger.setLevel(pylogging.INFO)
    try:
        res = run(cfg, workdir, ToyTask(), ToyLoader(16), **kwargs)
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(old_level)
    return res, records

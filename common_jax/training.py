"""The one training loop both stages use. A stage supplies a ``Task``; the loop holds no model math.

The loop: mesh from config -> abstract state (``jax.eval_shape``) -> shardings from the logical-axis
table -> init (jit with out_shardings) or exact resume from the newest complete checkpoint -> a train
step jitted once (state donated, batch split over ('data', 'fsdp')) -> periodic logging, eval, image
summaries and checkpoints -> a final checkpoint. SIGTERM (single process) or JAX's preemption sync
point (multi-host) make it save and return early with ``preempted=True``.

Config fields read, all required (the loop has no defaults: ``configs/loop.py`` writes them once for every
base config): ``seed``, ``total_steps``, ``log_every``, ``eval_every`` (0: only at the end, when an eval
loader is given), ``eval_steps`` (0: the whole eval loader), ``image_every`` (0: only at the end),
``checkpoint.every``, ``checkpoint.keep``, ``checkpoint.async_save``, ``tensorboard`` (unless a writer or
``tensorboard=`` is given), ``mesh.data/fsdp/model``, ``max_skipped_steps``.

Divergence: every step checks, inside the jitted step, that the metrics named ``loss``, ``*_loss``,
``grad_norm`` and ``*_grad_norm`` are finite, and keeps a small device-side record of the first and the
latest non-finite step. The host reads it only where it syncs anyway (log, eval and image steps) and before
every checkpoint save, so no diverged state is ever saved and keep-N rotation only ever drops good
checkpoints for newer good ones. With ``max_skipped_steps=0`` the run stops with :class:`TrainingDiverged`
(one line: step, quantities, newest good checkpoint); with N > 0 a non-finite step leaves the state unchanged
(only its step counter advances) and the run stops once more than N steps of the run were skipped (the count
is kept in the checkpoints' meta).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import logging as pylogging

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from common_jax import checkpoint as ckpt
from common_jax import metrics as mlib
from common_jax.config_utils import check_config_compatible, config_to_dict, get, require
from common_jax.mesh import (LOGICAL_AXIS_RULES, batch_sharding, fit_to_shapes, mesh_from_config, replicated,
                             shard_batch)
from common_jax.quick_compile import quick_jit

PyTree = Any

# Metrics checked for non-finite values every step: the loss terms and gradient norms (see ``_checked``).
MAX_CHECKED_METRICS = 32


class TrainingDiverged(RuntimeError):
    """A loss or gradient norm became NaN or Inf (beyond ``max_skipped_steps``); the message is one line."""


# -------------------------------------------------------------------------------------------- the Task
@runtime_checkable
class Task(Protocol):
    """What a stage gives the loop. All methods are pure and traced under jit by the loop.

    The state is a flax ``struct.dataclass`` with an integer ``step`` field that ``train_step``
    increments. Optional methods (looked up with getattr):
      ``eval_step(state, batch) -> dict`` of SUMS over the batch; a ``count`` entry (number of real
        examples, e.g. ``mask.sum()``) makes the loop divide the other sums by the total count, otherwise
        they are averaged over eval batches.
      ``summaries(state, batch) -> dict[str, uint8 NHWC]`` images written as grids (TensorBoard + PNG).
    ``shape_keys``: the dotted config keys (or whole sections) that define the state's shapes or the
    meaning of its weights. A resume refuses a change of one of them and logs a change of any other key of
    their sections (:func:`common_jax.config_utils.check_config_compatible`).
    ``upgrade_saved_config(saved: dict) -> dict`` (optional): the config a checkpoint recorded, brought to
    today's layout (keys added or moved since), so an older workdir resumes instead of being refused.
    """

    shape_keys: Sequence[str]

    def init_state(self, rng: jax.Array) -> PyTree:
        """A fresh train state; called under jax.eval_shape and jax.jit."""

    def state_logical_specs(self, abstract_state: PyTree) -> PyTree:
        """Logical PartitionSpecs (names from LOGICAL_AXIS_RULES), a tree (prefix) of the state."""

    def train_step(self, state: PyTree, batch: PyTree, rng: jax.Array) -> tuple[PyTree, dict]:
        """One optimisation step: (new state with step+1, scalar metrics)."""


def specs_from_boxed_init(init_boxed: Callable[..., PyTree], *args: Any) -> PyTree:
    """Logical PartitionSpecs of every leaf of ``init_boxed(*args)``'s output, which holds flax
    ``LogicallyPartitioned`` boxes (as linen ``init`` returns with ``nn.with_logical_partitioning``;
    optax states built from boxed params are boxed alike). Unboxed leaves get ``P()`` (replicated).

    Pair with ``init_state = lambda rng: nn.unbox(init_boxed(rng))``: the specs tree then matches the
    unboxed state leaf for leaf.
    """
    return nn.get_partition_spec(jax.eval_shape(init_boxed, *args))


def state_shardings(task: Task, abstract_state: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """NamedShardings of the task's state on ``mesh`` via the one logical-axis table.

    The task's specs are PartitionSpecs already, so they go straight to ``nn.logical_to_mesh_sharding``
    (``mesh.logical_to_sharding`` would run ``get_partition_spec`` again, which turns ``P()`` into None).
    """
    specs = task.state_logical_specs(abstract_state)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)
    try:
        jax.tree.map(lambda s, x: None, shardings, abstract_state,
                     is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding))
    except ValueError as e:
        raise ValueError(f"task.state_logical_specs does not match the state's tree structure "
                         f"(every leaf needs a PartitionSpec, P() for replicated): {e}") from None
    missing = [jax.tree_util.keystr(p) for p, s in jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: x is None)[0] if s is None]
    if missing:
        raise ValueError(f"task.state_logical_specs gave no PartitionSpec for {missing[:5]} "
                         "(use P() for replicated leaves)")
    # Dimensions a mesh axis does not divide (a 139-token vocabulary on model=2) are replicated.
    return fit_to_shapes(shardings, abstract_state)


def jit_init(init_state: Callable[[jax.Array], PyTree], out_shardings: Any = None) -> Callable[[jax.Array], PyTree]:
    """``init_state`` jitted (onto ``out_shardings`` when given) for the one call that makes a fresh state.

    On CPU it compiles at XLA backend optimisation level 0 (:func:`common_jax.quick_compile.quick_jit`): nearly
    all of that compile is LLVM on one threefry loop per initialiser, and the program runs once. A value may
    differ from an optimised compile in its last bit (6 of 584 leaves of configs/vqgan_tiny measured); every
    mesh and process compiles it the same way.
    """
    return quick_jit(init_state, **({} if out_shardings is None else {"out_shardings": out_shardings}))


# ------------------------------------------------------------------------------ gradient accumulation
def accumulate_gradients(loss_and_grad_fn: Callable[..., tuple[tuple[jax.Array, PyTree], PyTree]],
                         params: PyTree, batch: PyTree, num_micro: int,
                         rng: jax.Array | None = None) -> tuple[tuple[jax.Array, PyTree], PyTree]:
    """Mean of ``loss_and_grad_fn`` over ``num_micro`` micro-batches, with ``lax.scan`` (constant memory).

    ``loss_and_grad_fn(params, micro_batch[, rng]) -> ((loss, aux), grads)`` -- the output shape of
    ``jax.value_and_grad(loss_fn, has_aux=True)``; the result has the same shape, averaged. With ``rng``,
    micro-batch ``i`` gets ``fold_in(rng, i)``. Micro-batch ``i`` holds examples ``i, i+n, i+2n, ...``:
    the split keeps every device's batch shard local (no resharding).
    """
    if num_micro < 1:
        raise ValueError(f"accumulate_gradients: num_micro must be >= 1, got {num_micro}")
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"accumulate_gradients: batch leaves disagree on the batch size: {sorted(sizes)}")
    (b,) = sizes
    if b % num_micro:
        raise ValueError(f"accumulate_gradients: batch size {b} is not divisible by num_micro={num_micro}")

    def call(micro, i):
        if rng is None:
            return loss_and_grad_fn(params, micro)
        return loss_and_grad_fn(params, micro, jax.random.fold_in(rng, i))

    if num_micro == 1:
        return call(batch, 0)
    micro_batches = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(b // num_micro, num_micro, *x.shape[1:]), 0, 1), batch)

    def body(acc, xs):
        micro, i = xs
        out = call(micro, i)
        out = jax.tree.map(lambda v: v.astype(jnp.promote_types(v.dtype, jnp.float32)), out)
        return jax.tree.map(jnp.add, acc, out), None

    first_shape = jax.eval_shape(lambda: call(jax.tree.map(lambda x: x[0], micro_batches), 0))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), first_shape)
    total, _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(num_micro)))
    return jax.tree.map(lambda v: v / num_micro, total)


# ----------------------------------------------------------------------------------------- preemption
class _QuietOrbax(pylogging.Filter):
    """Drops orbax's INFO chatter (several lines per save) so the loop's own lines stay readable."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname.replace("\\", "/")


class _PreemptionFlag:
    """SIGTERM sets a flag that the loop checks once per step (single-process runs).

    Multi-host runs rely on JAX's preemption sync service instead (orbax ``reached_preemption``), which
    makes all hosts agree on the step to stop at; a per-host flag could make hosts disagree and hang.
    """

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "_PreemptionFlag":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
        return self

    def _handler(self, signum, frame) -> None:
        del signum, frame
        self.set = True

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


# ------------------------------------------------------------------------------------------ the loop
@dataclasses.dataclass
class RunResult:
    state: PyTree
    step: int
    train_metrics: dict  # the last logged averages
    eval_metrics: dict   # the last eval averages ({} when no eval ran)
    preempted: bool
    skipped_steps: int = 0  # steps of the run skipped for non-finite values (max_skipped_steps > 0)


def _require_loader_api(loader: Any) -> Iterator:
    if not hasattr(loader, "__next__"):
        if hasattr(loader, "get_state"):
            raise TypeError("run: train_loader must be an iterator (with __next__) exposing get_state/set_state")
        loader = iter(loader)
    if not (hasattr(loader, "get_state") and hasattr(loader, "set_state")):
        logging.warning("train_loader has no get_state/set_state: a resumed run restarts the data stream "
                        "(resume is not exact)")
    return loader


def _check_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh, step: int) -> None:
    n_split = mesh.shape["data"] * mesh.shape["fsdp"]
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = getattr(x, "shape", ())
        if not shape:
            raise ValueError(f"batch at step {step}: leaf {jax.tree_util.keystr(path)} is a scalar; "
                             "every batch leaf needs a leading batch dimension")
        if shape[0] % (n_split // jax.process_count() or 1):
            raise ValueError(f"batch at step {step}: leaf {jax.tree_util.keystr(path)} has host batch "
                             f"{shape[0]}, not divisible by this host's share of data*fsdp = "
                             f"{mesh.shape['data']}*{mesh.shape['fsdp']} over {jax.process_count()} process(es)")


def _checked(metrics: Mapping[str, Any]) -> list[str]:
    """The metric names checked for divergence: loss terms first (named first in the error line), then norms."""
    loss = sorted(k for k in metrics if k == "loss" or k.endswith("_loss"))
    loss.sort(key=lambda k: k not in ("loss", "total_loss"))
    names = loss + sorted(k for k in metrics if k == "grad_norm" or k.endswith("_grad_norm"))
    if not loss:
        raise ValueError(f"task.train_step returns no loss metric ('loss' or '*_loss') among {sorted(metrics)}; "
                         "the loop checks it for divergence")
    if len(names) > MAX_CHECKED_METRICS:
        raise ValueError(f"task.train_step returns {len(names)} loss/grad_norm metrics; at most "
                         f"{MAX_CHECKED_METRICS} are checked")
    return names


def _fresh_health() -> dict:
    """The device-side divergence record: how many steps were non-finite, the first and the latest of them,
    and the checked values at those steps (padded to ``MAX_CHECKED_METRICS``)."""
    none = lambda: jnp.full((), -1, jnp.int32)  # noqa: E731  (separate buffers: the record is donated)
    values = lambda: jnp.zeros((MAX_CHECKED_METRICS,), jnp.float32)  # noqa: E731
    return {"bad": jnp.zeros((), jnp.int32), "first_step": none(), "first_values": values(),
            "last_step": none(), "last_values": values()}


def _nonfinite_text(names: Sequence[str], values: Any) -> str:
    """'loss is nan, grad_norm is inf' for the checked values that are not finite."""
    bad = [f"{n} is {float(v)}" for n, v in zip(names, values) if not math.isfinite(float(v))]
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def _log_lines(lines: Iterable[str]) -> None:
    for line in lines:
        logging.info("%s", line)


def _grid_cols(n: int) -> int:
    return max(1, int(math.ceil(math.sqrt(n))))


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The loop's config fields, read and checked once (the loop has no defaults of its own)."""
    total: int
    seed: int
    log_every: int
    eval_every: int
    eval_steps: int
    image_every: int
    ckpt_every: int
    keep: Any
    async_save: bool
    shape_keys: tuple[str, ...]
    max_skips: int


def _settings(config: Any, task: Task) -> _Settings:
    total = get(config, "total_steps")
    if total is None:
        raise ValueError("run: config.total_steps is required (number of optimisation steps)")
    total = int(total)
    seed = int(require(config, "seed"))
    log_every = max(1, int(require(config, "log_every")))
    eval_every = int(require(config, "eval_every") or 0)
    eval_steps = int(require(config, "eval_steps") or 0)
    image_every = int(require(config, "image_every") or 0)
    ckpt_every = int(require(config, "checkpoint.every"))
    keep = require(config, "checkpoint.keep")
    async_save = bool(require(config, "checkpoint.async_save"))
    shape_keys = tuple(getattr(task, "shape_keys", ()))
    if not shape_keys:
        raise ValueError(f"run: task {type(task).__name__} declares no shape_keys (the config keys that define "
                         "its state's shapes, compared with a checkpoint's config on resume)")
    max_skips = int(require(config, "max_skipped_steps"))
    if max_skips < 0:
        raise ValueError(f"run: config.max_skipped_steps must be >= 0 (0: stop at the first non-finite loss or "
                         f"gradient norm; N: skip up to N such steps), got {max_skips}")
    return _Settings(total, seed, log_every, eval_every, eval_steps, image_every, ckpt_every, keep, async_save,
                     shape_keys, max_skips)


@dataclasses.dataclass
class _Run:
    """What every phase of one ``run`` call reads. ``manager`` is the open checkpoint manager: restoring may
    replace it (unreadable checkpoints moved aside reopen it), and the run closes whichever one is current."""
    config: Any
    workdir: str
    settings: _Settings
    mesh: jax.sharding.Mesh
    writer: Any
    train_loader: Iterator
    eval_loader_factory: Callable[[], Iterable] | None
    is_main: bool
    manager: Any = None

    def open_manager(self) -> Any:
        s = self.settings
        return ckpt.make_manager(self.workdir, keep=s.keep, every=s.ckpt_every, async_save=s.async_save)

    def newest_checkpoint(self) -> str:
        """Where the newest good checkpoint is, for the divergence error line."""
        self.manager.wait_until_finished()
        good = ckpt.latest_step(self.manager)
        return (f"the newest good checkpoint is step {good} in {self.manager.directory}" if good is not None
                else f"there is no checkpoint in {self.manager.directory} yet")


@dataclasses.dataclass
class _Start:
    """Where the loop starts: the state on the mesh, its step, the run's steps skipped before it, and the
    state's abstract shapes and shardings."""
    state: PyTree
    step: int
    skipped_before: int
    abstract: PyTree
    shardings: PyTree


def _saved_config(task: Task, meta: Mapping[str, Any]) -> dict:
    """The checkpoint's config in today's layout (the task's ``upgrade_saved_config``, when it has one)."""
    saved = dict(meta.get("config", {}))
    upgrade = getattr(task, "upgrade_saved_config", None)
    return upgrade(saved) if upgrade is not None and saved else saved


def restore_or_init(r: _Run, task: Task, init_key: jax.Array) -> _Start:
    """Phase 1 (under the mesh): the newest readable checkpoint of the workdir with the data position, its
    config checked against this one; or a fresh state, with ``init_from``'s weights when fine-tuning."""
    config = r.config
    abstract = jax.eval_shape(task.init_state, init_key)
    shardings = state_shardings(task, abstract, r.mesh)

    where = f"checkpoint in {r.workdir}"
    r.manager, start, restored = ckpt.restore_newest(
        r.manager, abstract, shardings,
        check_meta=lambda meta: _log_lines(check_config_compatible(_saved_config(task, meta), config,
                                                                   r.settings.shape_keys, source=where)),
        reopen=r.open_manager)
    skipped_before = 0
    if start is not None:
        state, meta, data_item = restored
        skipped_before = int(meta.get("skipped_steps", 0))
        if hasattr(r.train_loader, "set_state") and data_item:
            local = ckpt.local_process_state(data_item, where)
            if local is None:
                logging.warning("%s holds no data-iterator state; the data stream restarts", where)
            else:
                r.train_loader.set_state(local)
        logging.info("resumed from step %d of %s", start, r.manager.directory)
        if get(config, "init_from", ""):
            logging.info("init_from=%s is ignored: the run resumes from its own checkpoint",
                         get(config, "init_from"))
    else:
        state = jit_init(task.init_state, shardings)(init_key)
        start = 0
        logging.info("initialised a fresh state (no checkpoint in %s)", r.manager.directory)
        if get(config, "init_from", ""):     # fine-tuning: weights from another workdir
            from common_jax.init_from import init_from_workdir
            state = init_from_workdir(state, get(config, "init_from"), config)
    if r.is_main:
        with open(os.path.join(r.workdir, "config.json"), "w") as f:
            json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
        n_params = sum(x.size for x in jax.tree.leaves(abstract))
        logging.info("train state: %d values; mesh %s", n_params, dict(r.mesh.shape))
    return _Start(state, start, skipped_before, abstract, shardings)


@dataclasses.dataclass
class _Steps:
    """The jitted functions of a run (each compiles at its first call). ``checked`` names the metrics the
    divergence check reads; it is filled in when the train step is traced."""
    train_step: Callable
    eval_step: Callable | None
    summaries: Callable | None
    checked: list[str]


def compile_steps(r: _Run, task: Task, shardings: PyTree) -> _Steps:
    """Phase 2: the train step with its divergence record (and, with ``max_skipped_steps`` > 0, the skip of a
    non-finite step), the eval step and the image summaries, jitted on the run's shardings."""
    max_skips = r.settings.max_skips
    repl = replicated(r.mesh)
    batch_shard = batch_sharding(r.mesh, 1)  # prefix: leading dim split over (data, fsdp), rest replicated
    checked: list[str] = []

    def _train_step(state, batch, key, health):
        new, metrics = task.train_step(state, batch, jax.random.fold_in(key, state.step))
        checked[:] = _checked(metrics)
        values = jnp.stack([jnp.sum(jnp.asarray(metrics[k], jnp.float32)) for k in checked])
        bad = ~jnp.all(jnp.isfinite(values))
        values = jnp.pad(values, (0, MAX_CHECKED_METRICS - len(checked)))
        first = bad & (health["first_step"] < 0)
        health = {"bad": health["bad"] + bad.astype(jnp.int32),
                  "first_step": jnp.where(first, new.step, health["first_step"]),
                  "first_values": jnp.where(first, values, health["first_values"]),
                  "last_step": jnp.where(bad, new.step, health["last_step"]),
                  "last_values": jnp.where(bad, values, health["last_values"])}
        if max_skips > 0:  # compiled in only when skipping is allowed
            kept = state.replace(step=new.step)
            new = jax.tree.map(lambda k, n: jnp.where(bad, k, n), kept, new)
        return new, metrics, health

    train_step = jax.jit(_train_step, in_shardings=(shardings, batch_shard, repl, repl),
                         out_shardings=(shardings, repl, repl), donate_argnums=(0, 3))
    eval_fn = summaries_fn = None
    if r.eval_loader_factory is not None and hasattr(task, "eval_step"):
        eval_fn = jax.jit(task.eval_step, in_shardings=(shardings, batch_shard), out_shardings=repl)
    if hasattr(task, "summaries"):
        summaries_fn = jax.jit(task.summaries, in_shardings=(shardings, batch_shard), out_shardings=repl)
    return _Steps(train_step, eval_fn, summaries_fn, checked)


class _Health:
    """The device-side divergence record the train step updates, read by the host only where the loop syncs."""

    def __init__(self, r: _Run, steps: _Steps, skipped_before: int) -> None:
        self.record = jax.device_put(_fresh_health(), replicated(r.mesh))
        self._run, self._checked, self._skipped_before = r, steps.checked, skipped_before
        self._reported = 0

    def check(self) -> int:
        """Raise TrainingDiverged on a non-finite step (beyond max_skipped_steps); returns the number of
        skipped steps of the run. Reads the device record: call it only where the loop syncs."""
        max_skips, checked = self._run.settings.max_skips, self._checked
        h = jax.device_get(self.record)
        n_bad = int(h["bad"])
        if n_bad == 0:
            return self._skipped_before
        hint = ("lower the learning rate" + ("" if max_skips else
                ", or let --config.max_skipped_steps=N skip up to N isolated bad steps"))
        if max_skips == 0:
            raise TrainingDiverged(
                f"training diverged at step {int(h['first_step'])}: "
                f"{_nonfinite_text(checked, h['first_values'])} (non-finite); no checkpoint of the "
                f"diverged state was written; {self._run.newest_checkpoint()}; {hint}")
        total_skipped = self._skipped_before + n_bad
        if total_skipped > max_skips:
            raise TrainingDiverged(
                f"training diverged: {total_skipped} steps of this run had non-finite values, more than "
                f"max_skipped_steps={max_skips} (the last at step {int(h['last_step'])}: "
                f"{_nonfinite_text(checked, h['last_values'])}); no checkpoint was written after it; "
                f"{self._run.newest_checkpoint()}; {hint}")
        if n_bad > self._reported:
            logging.warning("skipped %d step(s) with non-finite values (the last at step %d: %s); the "
                            "state is unchanged by them; %d of at most %d skipped in this run",
                            n_bad - self._reported, int(h["last_step"]),
                            _nonfinite_text(checked, h["last_values"]), total_skipped, max_skips)
            self._reported = n_bad
        return total_skipped


def evaluate(r: _Run, eval_step: Callable, state: PyTree) -> dict:
    """Phase 3 (at eval steps): the eval step's sums over the eval loader (``eval_steps`` batches, 0: all),
    divided by the summed ``count`` (or the number of batches)."""
    sums, n_batches = None, 0
    for i, batch in enumerate(r.eval_loader_factory()):
        if r.settings.eval_steps and i >= r.settings.eval_steps:
            break
        out = eval_step(state, shard_batch(batch, r.mesh))
        sums = out if sums is None else mlib._tree_add(sums, out)
        n_batches += 1
    if sums is None:
        raise ValueError("run: the eval loader yielded no batches")
    host = {k: mlib.to_host(v) for k, v in sums.items()}
    count = host.pop("count", None)
    denom = float(count.sum()) if count is not None else float(n_batches)
    if denom <= 0:
        raise ValueError("run: eval 'count' summed to 0 (all examples masked?)")
    return {k: float(v.sum()) / denom if v.ndim else float(v) / denom for k, v in host.items()}


def _write_images(r: _Run, summaries: Callable, state: PyTree, batch: PyTree, step: int) -> None:
    images = jax.device_get(summaries(state, batch))
    for name, img in images.items():
        img = mlib.to_host(img)
        if img.dtype != jnp.uint8:
            img = mlib.to_uint8(img)
        grid = mlib.image_grid(img, _grid_cols(img.shape[0]))
        r.writer.write_images(step, {name: grid[None]})
        if r.is_main:
            mlib.save_png(os.path.join(r.workdir, "images", f"{name}_{step:08d}.png"), grid)


def _image_batch(r: _Run, fallback: PyTree) -> PyTree:
    if r.eval_loader_factory is None:
        return fallback
    return shard_batch(next(iter(r.eval_loader_factory())), r.mesh)


def train_loop(r: _Run, steps: _Steps, begin: _Start, base_key: jax.Array, stop_after: int | None) -> RunResult:
    """Phase 4: train steps until ``total_steps`` (or ``stop_after`` steps), with logging, evaluation, image
    summaries and checkpoints at their intervals; the divergence record is read before any of them, and a
    preemption saves and stops."""
    s, mesh, manager = r.settings, r.mesh, r.manager
    health = _Health(r, steps, begin.skipped_before)
    state, start, total, config = begin.state, begin.step, s.total, r.config
    averager = mlib.MetricAverager()
    progress = mlib.Progress(total, start=start)
    t_start = time.monotonic()
    train_metrics: dict = {}
    eval_metrics: dict = {}
    step = start
    preempted = False
    skipped = begin.skipped_before
    end = total if stop_after is None else min(total, start + int(stop_after))
    batch = None

    if start >= end:
        logging.info("nothing to do: step %d >= total_steps %d", start, end)
    with _PreemptionFlag() as flag:
        while step < end:
            try:
                host_batch = next(r.train_loader)
            except StopIteration:
                raise ValueError(f"run: the train loader ran out at step {step}; it must be "
                                 f"infinite (repeat) for {total} steps") from None
            if step == start:
                _check_batch(host_batch, mesh, step)
            batch = shard_batch(host_batch, mesh)
            state, step_metrics, health.record = steps.train_step(state, batch, base_key, health.record)
            step += 1
            averager.add(step_metrics)
            if step == start + 1:
                # Time the compile once, and keep it out of the steps/s and ETA.
                jax.block_until_ready(step_metrics)
                logging.info("first step (incl. compilation) took %.1f s", time.monotonic() - t_start)
                progress = mlib.Progress(total, start=step)

            log_now = step % s.log_every == 0 or step == end
            eval_now = steps.eval_step is not None and ((s.eval_every and step % s.eval_every == 0)
                                                        or step == total)
            images_now = steps.summaries is not None and ((s.image_every and step % s.image_every == 0)
                                                          or step == total)
            if flag.set or (jax.process_count() > 1 and manager.reached_preemption(step)):
                preempted = True
            save_now = step % s.ckpt_every == 0 or step == end or preempted
            if log_now or eval_now or images_now or save_now:
                skipped = health.check()  # before anything of this state is logged or saved

            if log_now:
                if int(state.step) != step:  # a task that forgets step+1 would repeat rngs
                    raise ValueError(f"task.train_step must increment state.step: after {step} "
                                     f"steps it is {int(state.step)}")
                train_metrics = averager.result()
                averager.reset()
                rate = progress.update(step)
                scalars = {f"train/{k}": v for k, v in train_metrics.items()}
                scalars["steps_per_sec"] = rate
                if s.max_skips:
                    scalars["skipped_steps"] = skipped
                r.writer.write_scalars(step, scalars)
                logging.info("%s", progress.line(step))
            if eval_now:
                eval_metrics = evaluate(r, steps.eval_step, state)
                r.writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
            if images_now:
                _write_images(r, steps.summaries, state, _image_batch(r, batch), step)
            if save_now:
                data = r.train_loader.get_state() if hasattr(r.train_loader, "get_state") else None
                ckpt.save(manager, step, state, {"config": config_to_dict(config), "skipped_steps": int(skipped)},
                          data, force=True)
            if preempted:
                logging.warning("preemption signal: saved step %d, stopping", step)
                break
    return RunResult(state=state, step=step, train_metrics=train_metrics,
                     eval_metrics=eval_metrics, preempted=preempted, skipped_steps=skipped)


def run(config: Any, workdir: str | os.PathLike, task: Task, train_loader: Iterable,
        eval_loader_factory: Callable[[], Iterable] | None = None, *,
        writer: Any = None, tensorboard: bool | None = None,
        mesh: jax.sharding.Mesh | None = None,
        stop_after: int | None = None, quiet_orbax: bool = True) -> RunResult:
    """Train ``task`` until ``config.total_steps`` (resuming from ``workdir`` if it holds a checkpoint).

    ``writer``: a clu-style metric writer (default: TensorBoard + logging on process 0, or logging only
    with ``tensorboard=False``; ``tensorboard`` defaults to ``config.tensorboard``).
    Resuming compares the config keys of ``task.shape_keys`` with the checkpoint's config. ``stop_after``:
    return after this many steps in this call (tests, debugging), saving a checkpoint there.
    ``quiet_orbax``: hide orbax's INFO logs during the run.
    Returns the final state (on the mesh) and the last metrics.

    The phases, in order: :func:`restore_or_init`, :func:`compile_steps`, :func:`train_loop` (which calls
    :func:`evaluate` at eval steps).
    """
    settings = _settings(config, task)
    workdir = os.path.abspath(os.fspath(workdir))
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
    mesh = mesh_from_config(config) if mesh is None else mesh
    own_writer = writer is None
    if own_writer:
        if tensorboard is None:
            tensorboard = bool(require(config, "tensorboard"))
        writer = mlib.create_writer(workdir, tensorboard=tensorboard)
    r = _Run(config, workdir, settings, mesh, writer, _require_loader_api(train_loader), eval_loader_factory,
             is_main)
    init_key, base_key = jax.random.split(jax.random.key(settings.seed))

    quiet = _QuietOrbax() if quiet_orbax else None
    if quiet is not None:
        pylogging.getLogger("absl").addFilter(quiet)
    try:
        r.manager = r.open_manager()
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            begin = restore_or_init(r, task, init_key)
            steps = compile_steps(r, task, begin.shardings)
            result = train_loop(r, steps, begin, base_key, stop_after)
            writer.flush()
            r.manager.wait_until_finished()
            return result
    finally:
        if r.manager is not None:
            r.manager.wait_until_finished()
            r.manager.close()
        if own_writer:
            writer.close()
        if quiet is not None:
            pylogging.getLogger("absl").removeFilter(quiet)

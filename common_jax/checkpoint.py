"""Orbax checkpointing for the train loop: train state + JSON meta (step, config) + data-iterator state.

Layout: ``<workdir>/checkpoints/<step>/{state,meta,data}``. Orbax writes each step into a temporary
directory (``<step>.orbax-checkpoint-tmp-*``) and renames it when complete, so a run killed mid-write
leaves only a tmp directory that ``latest_step`` never returns (and that is deleted on the next start).

Multi-host: the state is written by all processes (orbax coordinates); JSON items are written by the
primary process only. Each process's loader has its own position, so ``save`` first gathers every
process's ``get_state()`` into one dict keyed by process index (``{"process_count": N, "0": ..., "1":
...}``) and on restore each process picks its own entry; restoring with a different process count is
refused with a clear error, since per-process iterator positions cannot be re-split.
"""
from __future__ import annotations

import json
import logging as pylogging
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "meta", "data")
CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or incompatible with the requested restore."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_SUBDIR)


def make_manager(workdir: str | os.PathLike, *, keep: int | None = 3, every: int | None = None,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager for ``<workdir>/checkpoints`` holding the items ('state', 'meta', 'data').

    ``keep``: number of newest checkpoints kept (None: all). ``every``: orbax's save interval; the loop
    passes ``force=True`` for saves outside it (end of run, preemption).
    """
    if keep is not None and keep < 1:
        raise ValueError(f"make_manager: keep must be >= 1 or None, got {keep}")
    if every is not None and every < 1:
        raise ValueError(f"make_manager: every must be >= 1 or None, got {every}")
    options = ocp.CheckpointManagerOptions(
        # A read-only manager saves and deletes nothing; orbax warns unless these say so.
        max_to_keep=None if read_only else keep,
        save_interval_steps=0 if read_only else every or 1,
        create=not read_only,
        read_only=read_only,
        # An interrupted save leaves <step>.orbax-checkpoint-tmp-*; remove it rather than let it pile up.
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
    )
    quiet = _ReadOnlyNotices() if read_only else None
    absl_logger = pylogging.getLogger("absl")
    if quiet is not None:
        absl_logger.addFilter(quiet)
    try:
        return ocp.CheckpointManager(
            checkpoint_dir(workdir),
            options=options,
            item_names=ITEMS,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )
    finally:
        if quiet is not None:
            absl_logger.removeFilter(quiet)


class _ReadOnlyNotices(pylogging.Filter):
    """Drops the warning orbax logs for every read-only manager: read-only is what the loaders ask for, not a
    problem to report (loading a Sampler printed it twice, among four other notices now avoided by the options)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


# ----------------------------------------------------------------------------------- data iterator state
def gather_process_states(local_state: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every process's JSON-able iterator state, keyed by process index (collective on multi-host)."""
    text = json.dumps(local_state)
    n = jax.process_count()
    if n == 1:
        return {"process_count": 1, "0": json.loads(text)}
    from jax.experimental import multihost_utils
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(n, -1)
    out: dict[str, Any] = {"process_count": n}
    for i in range(n):
        out[str(i)] = json.loads(everyone[i, :lengths[i]].tobytes().decode("utf-8"))
    return out


def local_process_state(data_item: Mapping[str, Any], where: str = "checkpoint") -> Any:
    """This process's entry of a gathered data-iterator state."""
    saved_n = data_item.get("process_count")
    if saved_n != jax.process_count():
        raise CheckpointError(
            f"data iterator state in {where} was saved by {saved_n} processes, this run has "
            f"{jax.process_count()}; the per-process positions cannot be re-split (resume with the same "
            f"number of processes, or start the data stream afresh)")
    key = str(jax.process_index())
    if key not in data_item:
        raise CheckpointError(f"data iterator state in {where} has no entry for process {key}")
    return data_item[key]


# --------------------------------------------------------------------------------------------- save/load
def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: Mapping[str, Any],
         data_state: Mapping[str, Any] | None, *, force: bool = False) -> bool:
    """Save (asynchronously) at ``step``; returns whether a save was started.

    ``data_state`` is this process's loader state (or None); it is gathered over processes here, so
    every process must call ``save`` at the same steps.
    """
    if not force and not manager.should_save(step):
        return False
    data_item = gather_process_states(data_state)
    meta = dict(meta, step=int(step))
    return manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
            data=ocp.args.JsonSave(data_item),
        ),
        force=force,
    )


def latest_meta(workdir: str | os.PathLike) -> dict | None:
    """The meta item (``step``, ``config``, ...) of the newest checkpoint of ``workdir``; None when it has none."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    manager = make_manager(workdir, read_only=True, async_save=False)
    try:
        step = latest_step(manager)
        return None if step is None else read_meta(manager, step)
    finally:
        manager.close()


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    """Newest complete (finalized) checkpoint step; tmp directories of interrupted saves are ignored."""
    manager.reload()
    return manager.latest_step()


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The JSON meta item (step, config) of ``step``, without touching the (large) state."""
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])


def sharded_abstract(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (``shardings`` may be a tree prefix)."""
    def attach(sharding, subtree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), subtree)
    return jax.tree.map(attach, shardings, abstract_state,
                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            shardings: Any) -> tuple[Any, dict, dict]:
    """Restore (state, meta, data_item) of ``step`` with the state placed on ``shardings``.

    The target may be a different mesh than the one the checkpoint was written from.
    """
    target = sharded_abstract(abstract_state, shardings)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                meta=ocp.args.JsonRestore(),
                data=ocp.args.JsonRestore(),
            ),
        )
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(
            f"could not restore step {step} from {manager.directory}: {type(e).__name__}: {e}") from e
    return restored["state"], dict(restored["meta"]), dict(restored["data"] or {})

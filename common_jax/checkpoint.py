"""Orbax checkpointing for the train loop: train state + JSON meta (step, config) + data-iterator state.

Layout: ``<workdir>/checkpoints/<step>/{state,meta,data}``. Orbax writes each step into a temporary
directory (``<step>.orbax-checkpoint-tmp-*``) and renames it when complete, so a run killed mid-write
leaves only a tmp directory that ``latest_step`` never returns (and that is deleted on the next start).

Multi-host: the state is written by all processes (orbax coordinates); JSON items are written by the
primary process only. Each process's loader has its own position, so ``save`` first gathers every
process's ``get_state()`` into one dict keyed by process index (``{"process_count": N, "0": ..., "1":
...}``) and on restore each process picks its own entry; restoring with a different process count is
refused with a clear error, since per-process iterator positions cannot be re-split.

Damaged checkpoints (a truncated array file, a missing ``state/_METADATA``, an empty or stray step folder, a
missing item): :func:`restore_newest` tries the steps newest first, logs one line per damaged folder, restores
the next complete one and moves the damaged folders aside to ``<workdir>/checkpoints_damaged/`` (renamed,
never deleted), so their step numbers can be written again. Only when no step is readable does it raise one
:class:`CheckpointError`, and then it moves nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging as pylogging
import os
import re
import sys
import time
from typing import Any, Callable, Iterator, Mapping, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ("state", "meta", "data")
CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "checkpoints_damaged"

# What reading a damaged checkpoint raises: TensorStore reports a truncated or missing file as ValueError,
# orbax a missing item as KeyError, the file system OSError.
READ_ERRORS = (ValueError, KeyError, OSError)

T = TypeVar("T")


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
    quiet = [_StrayFolderNotices()] + ([_ReadOnlyNotices()] if read_only else [])
    absl_logger = pylogging.getLogger("absl")
    for f in quiet:
        absl_logger.addFilter(f)
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
        for f in quiet:
            absl_logger.removeFilter(f)


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
    """The meta item (``step``, ``config``, ...) of the newest checkpoint of ``workdir`` whose folder is complete
    and whose meta is readable (damaged newer ones are named in a warning and left in place); None when it has
    none."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    manager = make_manager(workdir, read_only=True, async_save=False)

    def attempt(step: int) -> dict:
        try:
            return read_meta(manager, step)
        except READ_ERRORS as e:
            raise DamagedCheckpoint(f"meta item unreadable: {brief_error(e)}") from None
    try:
        return first_readable(manager, attempt)[2]
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


# ------------------------------------------------------------------------------------- damaged checkpoints
class DamagedCheckpoint(Exception):
    """Raised by an ``attempt`` of :func:`first_readable`: this step cannot be read (the message says why)."""


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(os.fspath(manager.directory), str(int(step)))


def folder_problem(path: str) -> str | None:
    """Why the step folder ``path`` cannot hold a complete checkpoint, judged from its listing alone (None: it
    may). Orbax lists any folder named by an integer as a step, an empty or stray one included."""
    try:
        names = set(os.listdir(path))
    except OSError as e:
        return f"unreadable folder ({e.strerror})"
    if not names & set(ITEMS):
        return "no checkpoint items in it (an empty or stray folder)"
    missing = [item for item in ITEMS if item not in names]
    if missing:
        return f"item{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing"
    if not os.path.isfile(os.path.join(path, "state", "_METADATA")):
        return "state/_METADATA missing"
    return None


def brief_error(e: BaseException) -> str:
    """One short line for a read error. TensorStore's messages chain every layer ('Error opening "cast" driver:
    Error opening "zarr" driver: ...') and end in a JSON spec; its status code and the innermost cause say it."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    msg = msg.split(" [tensorstore_spec=")[0].strip().splitlines()[0] if msg.strip() else type(e).__name__
    status = re.match(r"([A-Z_]{4,}): ", msg)
    if status:
        parts = msg[status.end():].split(": ")
        msg = f"{status.group(1)}: {': '.join(parts[-2:])}"
    return msg if len(msg) <= 300 else msg[:297] + "..."


def structure_mismatch(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> str | None:
    """How the state saved at ``step`` differs from ``abstract_state`` in tree paths or shapes (None: it fits,
    or its metadata cannot be read). Tells a checkpoint of another model, which is refused, from a damaged one,
    which is moved aside."""
    try:
        saved = manager.item_metadata(step)["state"]
    except READ_ERRORS:
        return None
    if saved is None:
        return None

    def shapes(tree):
        return {"/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path):
                tuple(getattr(leaf, "shape", ())) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    have, want = shapes(saved), shapes(abstract_state)
    if have == want:
        return None
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        return (f"{len(missing)} array(s) of this run missing from it (first: {(missing or ['-'])[0]}), "
                f"{len(extra)} not in this run (first: {(extra or ['-'])[0]})")
    path = next(p for p in sorted(want) if want[p] != have[p])
    return f"{path} has shape {have[path]} there, {want[path]} here"


class _StrayFolderNotices(pylogging.Filter):
    """Drops orbax's warning about a step folder without its metadata file (an empty or stray folder, logged on
    every listing): :func:`first_readable` names such a folder in one line of its own."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return not str(record.msg).startswith("Metadata file does not exist")


class _LateReadErrors:
    """While damaged folders are probed: the 'Event loop is closed' errors that TensorStore reads still in flight
    report through ``sys.unraisablehook`` (dozens of tracebacks) once orbax has given up on a failed read."""

    def unraisable(self, info: Any) -> None:
        if isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value):
            return
        self.previous_hook(info)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        absl_logger, notices = pylogging.getLogger("absl"), _StrayFolderNotices()
        absl_logger.addFilter(notices)
        self.previous_hook = sys.unraisablehook
        sys.unraisablehook = self.unraisable
        self.failed = False
        try:
            yield
        finally:
            if self.failed:
                time.sleep(0.5)  # let the reads of a failed restore finish while their errors are still caught
            sys.unraisablehook = self.previous_hook
            absl_logger.removeFilter(notices)


def _agree(reason: str | None) -> str | None:
    """Multi-host: every process reads its own shards, so one may fail where others succeed; all then treat the
    step as damaged (process 0's reason when it has one)."""
    if jax.process_count() == 1:
        return reason
    from jax.experimental import multihost_utils
    flags = np.asarray(multihost_utils.process_allgather(np.int32(reason is not None))).reshape(-1)
    if reason is None and flags.any():
        reason = f"unreadable on process {', '.join(map(str, np.flatnonzero(flags)))}"
    return reason


def move_aside(workdir_checkpoints: str, step: int) -> str:
    """Rename ``checkpoints/<step>`` to ``checkpoints_damaged/<step>-<UTC time>``: never deleted, out of orbax's
    listing, and the step can be written again. Returns the new path."""
    target_dir = os.path.join(os.path.dirname(os.path.normpath(workdir_checkpoints)), DAMAGED_SUBDIR)
    os.makedirs(target_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = os.path.join(target_dir, f"{step}-{stamp}")
    n = 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(target_dir, f"{step}-{stamp}-{n}")
    os.rename(os.path.join(workdir_checkpoints, str(step)), target)
    return target


def first_readable(manager: ocp.CheckpointManager, attempt: Callable[[int], T], *,
                   reopen: Callable[[], ocp.CheckpointManager] | None = None
                   ) -> tuple[ocp.CheckpointManager, int | None, T | None]:
    """(manager, step, ``attempt(step)``) for the newest step whose folder is complete and whose ``attempt``
    does not raise :class:`DamagedCheckpoint`; (manager, None, None) when there is no checkpoint.

    Each damaged folder newer than that step gets one warning line. With ``reopen`` (a training run), they are
    moved aside (:func:`move_aside`, by process 0) and the returned manager is a fresh one from ``reopen`` whose
    step list no longer holds them; without it (a read-only loader) nothing is moved. Other errors of
    ``attempt`` (a config or shape mismatch) propagate. When every step is damaged, one
    :class:`CheckpointError` lists them and nothing is moved.
    """
    directory = os.fspath(manager.directory)
    quiet = _LateReadErrors()
    damaged: list[tuple[int, str]] = []
    found: int | None = None
    result = None
    with quiet.installed():
        manager.reload()
        for step in sorted(manager.all_steps(), reverse=True):
            reason = folder_problem(step_dir(manager, step))
            if reason is None:
                try:
                    result = attempt(step)
                except DamagedCheckpoint as e:
                    reason, quiet.failed = str(e), True
            reason = _agree(reason)
            if reason is None:
                found = step
                break
            damaged.append((step, reason))
    if found is None and damaged:
        listed = "; ".join(f"step {s}: {r}" for s, r in damaged)
        raise CheckpointError(f"no readable checkpoint in {directory} ({listed}); nothing was moved or deleted: "
                              f"move the damaged folders away to start afresh")
    if not damaged:
        return manager, found, result
    moved = {}
    if reopen is not None:
        if jax.process_index() == 0:
            moved = {s: move_aside(directory, s) for s, _ in damaged}
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("checkpoint folders moved aside")
        manager.close()
        manager = reopen()
    for step, reason in damaged:
        where = (f"moved to {moved[step]}" if step in moved
                 else "moved aside by process 0" if reopen is not None else "left in place")
        logging.warning("checkpoint %s is damaged (%s); %s; using step %d instead",
                        os.path.join(directory, str(step)), reason, where, found)
    return manager, found, result


def restore_newest(manager: ocp.CheckpointManager, abstract_state: Any, shardings: Any, *,
                   check_meta: Callable[[dict], None] | None = None,
                   reopen: Callable[[], ocp.CheckpointManager] | None = None
                   ) -> tuple[ocp.CheckpointManager, int | None, tuple[Any, dict, dict] | None]:
    """(manager, step, (state, meta, data_item)) of the newest readable checkpoint, falling back past damaged
    ones (:func:`first_readable`; ``reopen`` moves them aside). ``check_meta(meta)`` may refuse a checkpoint
    (e.g. another config): that error propagates, as does a state of other paths or shapes than
    ``abstract_state`` (a :class:`CheckpointError`); neither counts as damage."""
    target = sharded_abstract(abstract_state, shardings)

    def attempt(step: int) -> tuple[Any, dict, dict]:
        try:
            meta = read_meta(manager, step)
        except READ_ERRORS as e:
            raise DamagedCheckpoint(f"meta item unreadable: {brief_error(e)}") from None
        if check_meta is not None:
            check_meta(meta)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore(),
                data=ocp.args.JsonRestore()))
        except READ_ERRORS as e:
            mismatch = structure_mismatch(manager, step, abstract_state)
            if mismatch:
                raise CheckpointError(f"checkpoint step {step} in {manager.directory} does not fit this run's "
                                      f"state: {mismatch}") from None
            raise DamagedCheckpoint(brief_error(e)) from None
        return restored["state"], dict(restored["meta"]), dict(restored["data"] or {})

    return first_readable(manager, attempt, reopen=reopen)

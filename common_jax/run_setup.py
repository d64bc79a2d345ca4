"""What every entry point does before training: multi-host start-up, dataset preparation, loaders.

Shared by the stage train functions and the launch/ entry points, so those stay thin.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Sequence

import jax
from absl import logging

from common_jax import data as data_lib
from common_jax import datasets

BUILTIN = "builtin_photos"


def maybe_initialize_distributed(mode: str = "auto") -> None:
    """Start JAX's multi-controller runtime when launched as one of several processes.

    ``auto``: on when a coordinator is configured (JAX_COORDINATOR_ADDRESS), under SLURM with more than one
    task, or on a multi-host TPU slice; ``on``/``off`` force it. ``jax.distributed.initialize()`` reads the
    rest (process id, count, coordinator) from the environment on TPU and SLURM.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--multihost must be auto, on or off, got {mode!r}")
    env = os.environ
    want = mode == "on" or (mode == "auto" and (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1))
    if not want:
        return
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']} is set but "
                             f"{' and '.join(missing)} {verb} not: set all three for a multi-process run (or none)")
        kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    logging.info("multi-host: process %d of %d, %d devices in all", jax.process_index(),
                 jax.process_count(), jax.device_count())


def check_workdir(workdir: str) -> str:
    """Absolute workdir, created if needed; one clear error when it cannot be written."""
    if not workdir:
        raise ValueError("--workdir is required")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"workdir {workdir} is not writable: {e.strerror}") from None
    if jax.process_count() > 1:
        check_shared_workdir(workdir)
    return workdir


def check_shared_workdir(workdir: str, timeout_s: float = 2.0) -> None:
    """Raise unless every process sees the same ``workdir``: all of them write checkpoints, data positions and
    evaluation chunks there, and each host with a disk of its own would hold a part (a resume or an Inception
    Score then silently uses that part).

    Each process writes a probe file named by a token of process 0 (fresh names: no stale or negatively cached
    entries on NFS) and looks for every other process's probe, for up to ``timeout_s`` seconds.
    """
    import secrets

    import numpy as np
    from jax.experimental import multihost_utils
    me, count = jax.process_index(), jax.process_count()
    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31) if me == 0 else 0)))
    probe = lambda p: os.path.join(workdir, f".shared_probe_{token}_p{p}")  # noqa: E731
    with open(probe(me), "w"):
        pass
    _barrier("workdir probes written")
    deadline = time.monotonic() + timeout_s
    while (missing := [p for p in range(count) if not os.path.exists(probe(p))]) and time.monotonic() < deadline:
        time.sleep(0.5)
    _barrier("workdir probes read")
    os.remove(probe(me))
    if missing:
        raise ValueError(f"workdir {workdir} is not one shared path on all hosts: process {me} does not see the "
                         f"files of {_processes(missing)}; mount the same NFS / Lustre / gcsfuse path on every host")


def check_same_on_all_processes(value: str, what: str, remedy: str) -> None:
    """Raise on every process unless all processes hold the same ``value`` (e.g. a fingerprint of weights each
    one loaded from its own disk): replicated arrays built from differing host copies would silently mix them."""
    differ = _processes_differing_from_0(value)
    if differ:
        raise ValueError(f"{what} differ between processes: {_processes(differ)} loaded other ones than process 0; "
                         f"{remedy}")


def _processes(ids: list[int]) -> str:
    """'process 1' / 'processes 1, 3' for error messages."""
    return f"process{'es' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"


def _processes_differing_from_0(value: str) -> list[int]:
    """The processes whose ``value`` differs from process 0's (a digest gathered from all; the same list on every
    process)."""
    if jax.process_count() == 1:
        return []
    import hashlib

    import numpy as np
    from jax.experimental import multihost_utils
    digest = np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
    return [p for p in range(1, len(digests)) if not np.array_equal(digests[p], digests[0])]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def resolve_dataset(data_cfg: Any, workdir: str) -> tuple[str, str]:
    """(data_dir, dataset name); the built-in photos are prepared on first use (process 0, others wait)."""
    data_dir = os.path.expanduser(data_cfg.data_dir) if data_cfg.data_dir else os.path.join(workdir, "data")
    name = data_cfg.name
    if name == BUILTIN:
        kwargs = dict(crop_size=int(data_cfg.image_size),
                      crops_per_photo=int(data_cfg.get("builtin_crops_per_photo", 64)))
        if jax.process_index() == 0:
            datasets.prepare_builtin_photos(data_dir, **kwargs)
        _barrier("prepare_builtin_photos")
        name = datasets.builtin_photos_name(**kwargs)
    check_dataset_on_all_processes(data_dir, name)
    return data_dir, name


def check_dataset_on_all_processes(data_dir: str, name: str, attempts: int = 4, wait_s: float = 2.0) -> None:
    """Raise on every process unless all processes see the same files of dataset ``name`` (names, sizes,
    modification times: :func:`common_jax.datasets.dataset_fingerprint`). Each process reads its slice of every
    global batch by index, so host copies that differ would give batches from two datasets, an eval loop of
    another length on some hosts (a hang at the next collective), or pre-encoded codes under another name.

    Files that other hosts have just written (the built-in photos, pre-encoded shards) may reach a network file
    system's attribute cache late, so a difference is looked at again ``attempts`` times, ``wait_s`` apart.
    """
    if jax.process_count() == 1:
        return
    for attempt in range(attempts):
        try:
            value, missing = datasets.dataset_fingerprint(data_dir, name), None
        except datasets.DatasetNotPreparedError as e:
            value, missing = "missing", e        # every process still takes part in the comparison
        differ = _processes_differing_from_0(value)
        if not differ:
            break
        if attempt + 1 < attempts:
            time.sleep(wait_s)
    else:
        raise ValueError(f"the files of dataset '{name}' in data_dir {data_dir} differ between processes: "
                         f"{_processes(differ)} see{'' if len(differ) > 1 else 's'} other ones than process 0; "
                         "data_dir must be one shared path on all hosts (NFS, Lustre, a gcsfuse mount); copies made "
                         "at other times differ at least in modification times")
    if missing is not None:
        raise missing


def image_loaders(config: Any, workdir: str, features: Sequence[str] | None = None
                  ) -> tuple[data_lib.Loader, Callable[[], data_lib.Loader], str, str]:
    """(infinite train loader, eval loader factory, data_dir, name) of an image dataset; ``features`` as
    ``data.make_loader`` takes them (default image and label)."""
    d = config.data
    data_dir, name = resolve_dataset(d, workdir)
    train = data_lib.make_loader(data_dir, name, "train", int(d.global_batch_size), train=True,
                                 image_size=int(d.image_size), seed=int(config.seed),
                                 worker_count=int(d.worker_count), features=features)

    def eval_loader() -> data_lib.Loader:
        return data_lib.make_loader(data_dir, name, d.get("eval_split", "validation"), int(d.eval_batch_size),
                                    train=False, image_size=int(d.image_size), seed=int(config.seed),
                                    num_epochs=1, features=features)
    return train, eval_loader, data_dir, name


def cap_eval_steps(config: Any) -> None:
    """``eval_steps`` from ``data.eval_examples`` when it is left at 0."""
    if not int(config.get("eval_steps", 0) or 0) and int(config.data.get("eval_examples", 0) or 0):
        config.eval_steps = math.ceil(int(config.data.eval_examples) / int(config.data.eval_batch_size))


# Errors a user can cause (paths, configs, checkpoints, arguments): one line, no traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, PermissionError, NotADirectoryError)


def user_error_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return f"error: {msg.splitlines()[0] if msg else type(e).__name__}" + (
        "" if len(msg.splitlines()) <= 1 else "\n" + "\n".join(msg.splitlines()[1:]))


def config_flag_error_line(e: BaseException, argv: list[str] | None = None) -> str | None:
    """One line for the errors ml_collections' config flags raise (as multi-line OSError / AttributeError
    text or tracebacks), or None when ``e`` is not one of them.

    An unknown ``--config.a.b=...`` field fails while the entry point module defines its flags; a config file
    that cannot be loaded fails when the config is first read.
    """
    import re
    import sys
    argv = sys.argv[1:] if argv is None else argv
    msg = str(e)
    inner: Any = e
    while isinstance(inner, (KeyError, AttributeError)) and inner.args:  # AttributeError(KeyError('...'))
        inner = inner.args[0]
        msg = str(inner) if not isinstance(inner, BaseException) else msg
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if isinstance(e, OSError) and "Failed loading config file" in msg:
        errors = [ln for ln in lines if ln.startswith("[Errno") or "Error" in ln.split(":")[0]]
        attempted = [ln for ln in lines if os.sep in ln and not ln.startswith("[")]
        where = attempted[0] if attempted else "?"
        return f"error: config file {where} could not be loaded: {errors[-1] if errors else lines[-1]}"
    if isinstance(e, (KeyError, AttributeError)) and "Did you mean" in msg or (
            isinstance(e, (KeyError, AttributeError)) and lines and re.fullmatch(r"'[^']+'", lines[0])):
        field = re.search(r"'([^'\\]+)'", msg)
        field = field.group(1) if field else "?"
        overrides = [a.lstrip("-").split("=", 1)[0] for a in argv if a.startswith("--") and "." in a.split("=")[0]]
        named = [o for o in overrides if field in o.split(".")[1:]]
        hint = next((ln for ln in lines if ln.startswith("Did you mean")), "")
        flag = f"--{named[0]}" if named else "a --config override"
        return f"error: {flag}: the config has no field '{field}'" + (f" ({hint})" if hint else "")
    return None


def _install_entry_point_excepthook() -> None:
    """In a ``python -m launch.*`` process, errors raised before ``run_main`` can catch them (config flags
    are parsed while the entry point module is imported) still print one line and exit 1."""
    import sys
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is None or not str(getattr(spec, "name", "")).startswith("launch."):
        return
    previous = sys.excepthook

    def hook(tp, e, tb):
        line = None if os.environ.get("TAMING_JAX_TRACEBACK") else config_flag_error_line(e)
        if line is None:
            return previous(tp, e, tb)
        print(line, file=sys.stderr, flush=True)  # the interpreter then exits with status 1
    sys.excepthook = hook


_install_entry_point_excepthook()


def run_main(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """Wrap an absl main: user errors print as ``error: ...`` and exit 1 (TAMING_JAX_TRACEBACK=1 re-raises)."""
    import sys

    from common_jax.checkpoint import CheckpointError

    def wrapped(argv):
        try:
            return main(argv)
        except USER_ERRORS + (CheckpointError, RuntimeError, OSError, AttributeError) as e:
            if os.environ.get("TAMING_JAX_TRACEBACK"):
                raise
            # Only the loop raises TrainingDiverged; an entry point that never loaded it cannot see one.
            diverged = getattr(sys.modules.get("common_jax.training"), "TrainingDiverged", ())
            if isinstance(e, USER_ERRORS + (CheckpointError,)) or isinstance(e, diverged):
                line = user_error_line(e)
            else:
                line = config_flag_error_line(e)
                if line is None:
                    raise
            print(line, file=sys.stderr, flush=True)
            sys.exit(1)
    return wrapped


def train_app(train_fn: Callable[[Any, str], Any], default_config: str) -> None:
    """The absl app of a stage's entry point: --config (config_flags), --workdir, --multihost, then
    ``train_fn(config, workdir)``; the same for both stages."""
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", default_config, "config file (get_config())")
    workdir = flags.DEFINE_string("workdir", None, "where checkpoints, logs and images go")
    multihost = flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"], "start jax.distributed")

    def main(argv):
        del argv
        maybe_initialize_distributed(multihost.value)
        result = train_fn(config.value, check_workdir(workdir.value))
        logging.info("done at step %d: %s", result.step, result.eval_metrics)

    flags.mark_flag_as_required("workdir")
    app.run(run_main(main))

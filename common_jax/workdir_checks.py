"""The workdir of a run: created, writable, and one shared path when several hosts write to it."""
from __future__ import annotations

import os
import time

import jax

from common_jax import multihost


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
    multihost.barrier("workdir probes written")
    deadline = time.monotonic() + timeout_s
    while (missing := [p for p in range(count) if not os.path.exists(probe(p))]) and time.monotonic() < deadline:
        time.sleep(0.5)
    multihost.barrier("workdir probes read")
    os.remove(probe(me))
    if missing:
        raise ValueError(f"workdir {workdir} is not one shared path on all hosts: process {me} does not see the "
                         f"files of {multihost.process_list(missing)}; mount the same NFS / Lustre / gcsfuse path on "
                         "every host")

"""Several processes, one job: starting JAX's multi-controller runtime, and checking that every process holds
the same thing (weights, files) before they compute together."""
from __future__ import annotations

import os

import jax
from absl import logging


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


def check_same_on_all_processes(value: str, what: str, remedy: str) -> None:
    """Raise on every process unless all processes hold the same ``value`` (e.g. a fingerprint of weights each
    one loaded from its own disk): replicated arrays built from differing host copies would silently mix them."""
    differ = processes_differing_from_0(value)
    if differ:
        raise ValueError(f"{what} differ between processes: {process_list(differ)} loaded other ones than process 0; "
                         f"{remedy}")


def process_list(ids: list[int]) -> str:
    """'process 1' / 'processes 1, 3' for error messages."""
    return f"process{'es' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"


def processes_differing_from_0(value: str) -> list[int]:
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


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (nothing to wait for in a one-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)

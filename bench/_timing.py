"""What every benchmark here shares: the machine line of its header and JAX/PyTorch calls timed in turn."""
from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import jax


def machine() -> str:
    """CPU model, cores, Python, jax/jaxlib/flax versions and the default backend's devices."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    import flax
    import jaxlib
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (f"{cpu}, {os.cpu_count()} cores, python {platform.python_version()}, jax {jax.__version__} "
            f"(jaxlib {jaxlib.__version__}, {jax.default_backend()}: {devices}), flax {flax.__version__}")


def xla_flops(compiled: Any) -> float:
    """FLOPs of a compiled jax program by XLA's cost analysis (nan where the backend reports none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def alternate(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int
              ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm each function, then run them in turn ``repeats`` times; per-call wall and process-CPU seconds.

    Alternating keeps a change in machine load from favouring one side. CPU time (all threads) shows how
    much work a call is when other jobs share the cores.
    """
    for f in fns.values():
        for _ in range(warmup):
            f()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return wall, cpu

"""What every benchmark here shares: the machine line of its header and JAX/PyTorch calls timed in turn."""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Callable

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common_jax.host_memory import host_memory_kept  # noqa: E402


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
            f"(jaxlib {jaxlib.__version__}, {jax.default_backend()}: {devices}), flax {flax.__version__}, "
            f"host memory kept between calls: {host_memory_kept()}")


def xla_flops(compiled: Any) -> float:
    """FLOPs of a compiled jax program by XLA's cost analysis (nan where the backend reports none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def matmul_flops(fn: Callable[..., Any], *args: Any) -> float:
    """FLOPs (2 per multiply-add) of every dot_general and convolution in ``fn(*args)``'s jaxpr.

    The MFU numerator, independent of the backend: XLA's cost analysis counts nothing inside the
    cuBLAS/cuDNN calls a GPU program makes, so on GPUs it reports a small fraction of the real work.
    Sub-programs (jit, remat, custom derivatives) are walked; a scan counts ``length`` times; of a
    cond's branches the costliest counts.
    """
    import math

    from jax.extend import core as ecore

    def walk(jaxpr: Any) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            out = eqn.outvars[0].aval.shape
            if name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
            elif name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape
                spec = eqn.params["dimension_numbers"].rhs_spec   # (out feature, in feature, *spatial)
                per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
                total += 2.0 * math.prod(out) * per_output
            subs = [v for v in eqn.params.values() if isinstance(v, (ecore.Jaxpr, ecore.ClosedJaxpr))]
            branches = eqn.params.get("branches")
            if branches:
                total += max(walk(getattr(b, "jaxpr", b)) for b in branches)
            for sub in subs:
                total += walk(getattr(sub, "jaxpr", sub)) * (eqn.params.get("length", 1)
                                                             if name == "scan" else 1)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


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

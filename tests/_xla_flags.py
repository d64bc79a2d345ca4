"""XLA flags of every test process: the pytest workers and the entry points and scripts they start.

Most test programs run a few times at most, so XLA:CPU's compile (LLVM at optimisation level 2) costs more than
the run. At backend optimisation level 0 the compile of a tiny train step takes about a third less CPU, and the
compile-bound test files a third less in all; longer training tests gain less (their steps run slower). Values may
differ in their last bit from an optimised compile, far inside every tolerance (tests/README.md). Benchmarks and
users' runs do not use this.
"""
from __future__ import annotations

TEST_COMPILE = "--xla_backend_optimization_level=0"
# ``compiler_options`` of a program a test runs many times (a training run of tens of steps): level 1 compiles
# with less CPU than XLA's default and runs as fast, where level 0 runs a tiny VQGAN step 1.6x slower.
MANY_RUNS = {"xla_backend_optimization_level": 1}


def xla_flags(devices: int | None = None) -> str:
    """The XLA_FLAGS of a test process; ``devices`` simulated CPU devices, or a user's one device when None."""
    sim = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
    return " ".join(sim + [TEST_COMPILE])

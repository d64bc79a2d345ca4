"""Which CPU execution strategies run: each is a faster way to compute what the plain path computes, used on CPU
only, and each can be turned off (for an A/B benchmark against the plain path, or to rule it out).

``TAMING_JAX_CPU_PLAIN`` names the strategies to turn off, comma-separated, or ``all``; :func:`plain` does the
same inside a ``with`` block. The figures that keep each strategy are in bench/README.md ("CPU strategies,
measured again").
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax

# mixed_dense: a low-precision model's products through mixed_products.mixed_dense (bf16 operands both ways).
# decode_kernels: (out, in) kernel copies for a low-precision model's decode loops (decode_kernels.py).
# threads: row chunks of a sampled batch decoded concurrently on host threads (decode_threads.py).
STRATEGIES = ("mixed_dense", "decode_kernels", "threads")
PLAIN_ENV = "TAMING_JAX_CPU_PLAIN"


def _parse(value: str) -> frozenset[str]:
    names = {n.strip() for n in value.split(",") if n.strip()}
    if "all" in names:
        return frozenset(STRATEGIES)
    unknown = sorted(names - set(STRATEGIES))
    if unknown:
        raise ValueError(f"{PLAIN_ENV}: unknown CPU strategies {unknown}; choices: {', '.join(STRATEGIES)} or all")
    return frozenset(names)


_off: frozenset[str] = _parse(os.environ.get(PLAIN_ENV, ""))


def uses(strategy: str, backend: str | None = None) -> bool:
    """Whether ``strategy`` runs: on CPU (``backend``, default JAX's default backend) and not turned off."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown CPU strategy {strategy!r}; choices: {', '.join(STRATEGIES)}")
    return strategy not in _off and (backend or jax.default_backend()) == "cpu"


def turned_off() -> frozenset[str]:
    """The strategies turned off now: part of the cache key of every compiled program that depends on them."""
    return _off


@contextlib.contextmanager
def plain(*names: str) -> Iterator[None]:
    """Turn off the named strategies (none named: all) while tracing inside the block."""
    global _off
    before = _off
    _off = before | _parse(",".join(names) if names else "all")
    try:
        yield
    finally:
        _off = before

"""Host memory: keep freed buffers in the process instead of handing them back to the OS after every call.

XLA:CPU allocates a compiled program's temporaries on each call. glibc's malloc serves such large blocks from
fresh ``mmap`` pages, or from per-thread arenas that it trims on free, so every call faulted its temporaries in
again (a small-GPT train step on CPU: hundreds of thousands of minor page faults per step; bench/README.md has
the figures). Accelerator backends allocate device memory elsewhere, so there the setting only makes the host
heap keep its peak: it is applied on CPU hosts only, unless asked for.

``TAMING_JAX_KEEP_HOST_MEMORY``: unset (or empty) = automatic (applied when JAX's default backend will be the
CPU, :func:`default_backend_is_cpu`); ``1`` = applied on any host (explicit opt-in); ``0`` = never (opt-out).
"""
from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import os
import sys

# glibc <malloc.h> parameter numbers for mallopt().
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
OPT_OUT_ENV = "TAMING_JAX_KEEP_HOST_MEMORY"  # "0": opt out; "1": opt in on any host; unset: CPU hosts only
_kept = False


def _accelerator_present() -> bool:
    """Whether JAX would find an accelerator: an installed plugin (or libtpu) with its device nodes present."""
    try:
        plugins = [ep.name.lower() for ep in importlib.metadata.entry_points(group="jax_plugins")]
    except Exception:  # noqa: BLE001 - an unreadable distribution must not stop a training run
        plugins = []
    gpu_plugin = any("cuda" in n or "rocm" in n for n in plugins)
    tpu_plugin = importlib.util.find_spec("libtpu") is not None or any("tpu" in n for n in plugins)
    other_plugin = any(not any(k in n for k in ("cuda", "rocm", "tpu")) for n in plugins)
    gpu = gpu_plugin and bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/kfd"))
    tpu = tpu_plugin and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    return gpu or tpu or other_plugin


def default_backend_is_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without importing JAX (which would start threads
    and initialise a backend): the first platform of ``JAX_PLATFORMS`` when it is set, else whether no
    accelerator plugin with its devices is installed. A host with an accelerator plugin whose devices JAX
    cannot use falls back to the CPU at run time; opt in there with ``TAMING_JAX_KEEP_HOST_MEMORY=1``."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or os.environ.get("JAX_PLATFORM_NAME", "")
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not _accelerator_present()


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc serve every thread from one heap that never uses ``mmap`` and is never trimmed, on CPU
    hosts (or wherever ``TAMING_JAX_KEEP_HOST_MEMORY=1`` asks for it).

    Call it first thing in a process, before importing numpy, jax, TensorFlow or grain: once another native
    thread has allocated, glibc has fixed its arena count and the setting helps only partly. Process-wide and
    permanent: the resident size stays at its peak, which under concurrent load can exceed the working set
    (small allocations take pieces of a freed large block, so the next one is placed after it). Returns whether
    it took effect fully: False off glibc, when opted out (``TAMING_JAX_KEEP_HOST_MEMORY=0``), on an accelerator
    host without the opt-in, or when the process already had other threads.
    """
    global _kept
    if _kept:  # a later call (another entry module imported after the first) changes nothing
        return True
    choice = os.environ.get(OPT_OUT_ENV, "").strip()
    if choice not in ("", "0", "1"):
        raise ValueError(f"{OPT_OUT_ENV} must be 0 (never), 1 (on any host) or unset (CPU hosts only), "
                         f"got {choice!r}")
    if choice == "0" or not sys.platform.startswith("linux"):
        return False
    if choice == "" and not default_backend_is_cpu():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    single_threaded = len(os.listdir("/proc/self/task")) == 1
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    _kept = all(mallopt(param, value) == 1 for param, value in settings) and single_threaded
    return _kept


def host_memory_kept() -> bool:
    """Whether :func:`keep_freed_host_memory` took full effect in this process."""
    return _kept

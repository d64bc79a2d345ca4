"""Where the malloc setting applies (common_jax.host_memory): on CPU hosts by default, decided without importing
JAX; on accelerator hosts only with TAMING_JAX_KEEP_HOST_MEMORY=1; never with =0; a bad value is one error."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest

from common_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALL = ("import sys; from common_jax.host_memory import keep_freed_host_memory; print(keep_freed_host_memory(), "
        "'jax' in sys.modules)")


def _run(**env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME",
                                                            host_memory.OPT_OUT_ENV)}
    env.update(env_vars)
    return subprocess.run([sys.executable, "-c", CALL], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_applied_on_cpu_hosts_and_elsewhere_only_when_asked():
    assert _run(JAX_PLATFORMS="cpu").stdout.split() == ["True", "False"]      # without importing jax
    assert _run(JAX_PLATFORMS="tpu").stdout.split() == ["False", "False"]     # an accelerator host: not by default
    assert _run(JAX_PLATFORMS="cuda,cpu").stdout.split() == ["False", "False"]
    assert _run(JAX_PLATFORMS="tpu", TAMING_JAX_KEEP_HOST_MEMORY="1").stdout.split() == ["True", "False"]
    assert _run(JAX_PLATFORMS="cpu", TAMING_JAX_KEEP_HOST_MEMORY="0").stdout.split() == ["False", "False"]
    bad = _run(TAMING_JAX_KEEP_HOST_MEMORY="yes")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        "ValueError: TAMING_JAX_KEEP_HOST_MEMORY must be 0 (never), 1 (on any host) or unset (CPU hosts only), "
        "got 'yes'")


def test_without_jax_platforms_an_accelerator_plugin_with_devices_means_not_cpu(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delenv("JAX_PLATFORM_NAME", raising=False)

    class EntryPoint:
        name = "xla_cuda12"

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [EntryPoint()])
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    assert not host_memory.default_backend_is_cpu()
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: [])          # the plugin, but no GPU: CPU
    assert host_memory.default_backend_is_cpu()
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    assert host_memory.default_backend_is_cpu() == (importlib.util.find_spec("libtpu") is None)

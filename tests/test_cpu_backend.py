"""CPU strategies (transformer_jax.cpu_backend): turned off by name for an A/B against the plain path, with one
clear error for an unknown name; turning them off changes how products run, not what they compute."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import cpu_backend
from transformer_jax.cpu_products import matmul

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plain_turns_strategies_off_inside_the_block_only():
    assert cpu_backend.uses("mixed_dense", "cpu") and not cpu_backend.uses("mixed_dense", "gpu")
    with cpu_backend.plain("mixed_dense"):
        assert not cpu_backend.uses("mixed_dense", "cpu") and cpu_backend.uses("threads", "cpu")
        assert cpu_backend.turned_off() == {"mixed_dense"}
        with cpu_backend.plain():
            assert not any(cpu_backend.uses(s, "cpu") for s in cpu_backend.STRATEGIES)
    assert cpu_backend.turned_off() == frozenset()
    with pytest.raises(ValueError, match=r"unknown CPU strategies \['mixed'\]; choices: mixed_dense, "):
        with cpu_backend.plain("mixed"):
            pass
    with pytest.raises(ValueError, match="unknown CPU strategy 'fast'"):
        cpu_backend.uses("fast")


def test_plain_matmul_is_one_product_with_the_same_values():
    x = jax.random.normal(jax.random.key(0), (3, 64)).astype(jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (64, 32)).astype(jnp.bfloat16)
    # The switch is read while tracing: jax caches a trace per function, so each lowering traces a new one.
    with cpu_backend.plain("mixed_dense"):
        plain = jax.jit(lambda a, b: matmul(a, b)).lower(x, kernel).as_text()
        y_plain = jax.jit(lambda a, b: matmul(a, b))(x, kernel)
    default = jax.jit(lambda a, b: matmul(a, b)).lower(x, kernel).as_text()
    # mixed_dense on CPU: the bf16 product accumulates into a float32 result, rounded once afterwards.
    assert "-> tensor<3x32xbf16>" in plain and "-> tensor<3x32xf32>" not in plain
    f32_result = jax.default_backend() == "cpu"
    assert ("-> tensor<3x32xf32>" in default) == f32_result
    y = np.asarray(matmul(x, kernel), np.float32)
    np.testing.assert_allclose(np.asarray(y_plain, np.float32), y, rtol=0, atol=2 ** -7 * np.abs(y).max())


def test_unknown_name_in_the_environment_is_one_error():
    env = {**os.environ, cpu_backend.PLAIN_ENV: "threads,bogus"}
    out = subprocess.run([sys.executable, "-c", "import transformer_jax.cpu_backend"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "TAMING_JAX_CPU_PLAIN: unknown CPU strategies ['bogus']" in out.stderr.strip().splitlines()[-1]

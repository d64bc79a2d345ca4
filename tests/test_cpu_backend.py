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
    assert cpu_backend.uses("rowwise", "cpu") and not cpu_backend.uses("rowwise", "gpu")
    with cpu_backend.plain("rowwise"):
        assert not cpu_backend.uses("rowwise", "cpu") and cpu_backend.uses("threads", "cpu")
        assert cpu_backend.turned_off() == {"rowwise"}
        with cpu_backend.plain():
            assert not any(cpu_backend.uses(s, "cpu") for s in cpu_backend.STRATEGIES)
    assert cpu_backend.turned_off() == frozenset()
    with pytest.raises(ValueError, match=r"unknown CPU strategies \['rowise'\]; choices: rowwise, "):
        with cpu_backend.plain("rowise"):
            pass
    with pytest.raises(ValueError, match="unknown CPU strategy 'fast'"):
        cpu_backend.uses("fast")


def test_plain_matmul_is_one_product_with_the_same_values():
    x, kernel = jax.random.normal(jax.random.key(0), (3, 64)), jax.random.normal(jax.random.key(1), (64, 32))
    # The switch is read while tracing: jax caches a trace per function, so each lowering traces a new one.
    with cpu_backend.plain("rowwise"):
        plain = jax.jit(lambda a, b: matmul(a, b)).lower(x, kernel).as_text()
        y_plain = jax.jit(lambda a, b: matmul(a, b))(x, kernel)
    assert plain.count("dot_general") == 1
    rowwise = 3 if jax.default_backend() == "cpu" else 1
    assert jax.jit(lambda a, b: matmul(a, b)).lower(x, kernel).as_text().count("dot_general") == rowwise
    np.testing.assert_allclose(y_plain, matmul(x, kernel), rtol=1e-5, atol=1e-5)


def test_unknown_name_in_the_environment_is_one_error():
    env = {**os.environ, cpu_backend.PLAIN_ENV: "rowwise,bogus"}
    out = subprocess.run([sys.executable, "-c", "import transformer_jax.cpu_backend"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "TAMING_JAX_CPU_PLAIN: unknown CPU strategies ['bogus']" in out.stderr.strip().splitlines()[-1]

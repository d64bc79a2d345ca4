"""CPU strategies (transformer_jax.cpu_backend): turned off by name for an A/B against the plain path, with one
clear error for an unknown name; turned off, the model runs the plain path with the same values."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import cpu_backend
from transformer_jax.attention import use_explicit_attention
from transformer_jax.cpu_products import DECODE_KERNELS
from transformer_jax.decode_kernels import prepare_decode_variables, uses_decode_kernels
from transformer_jax.gpt import GPT, init_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plain_turns_strategies_off_inside_the_block_only():
    bf16 = GPT(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8, dtype=jnp.bfloat16)
    on_cpu = jax.default_backend() == "cpu"
    assert use_explicit_attention("", "cpu") and not use_explicit_attention("", "gpu")
    assert uses_decode_kernels(bf16) == on_cpu
    with cpu_backend.plain("explicit_attention"):
        assert not use_explicit_attention("", "cpu") and use_explicit_attention("explicit", "cpu")
        assert uses_decode_kernels(bf16) == on_cpu and cpu_backend.turned_off() == {"explicit_attention"}
        with cpu_backend.plain():
            assert not any(cpu_backend.uses(s, "cpu") for s in cpu_backend.STRATEGIES)
            assert not uses_decode_kernels(bf16)
            variables = init_variables(bf16, jax.random.key(0))
            assert DECODE_KERNELS not in prepare_decode_variables(bf16, variables)
    assert cpu_backend.turned_off() == frozenset()
    with pytest.raises(ValueError, match=r"unknown CPU strategies \[.rowwise.\]; choices: mixed_dense, decode_kernels, explicit_attention or all"):
        with cpu_backend.plain("rowwise"):
            pass
    with pytest.raises(ValueError, match="unknown CPU strategy 'fast'"):
        cpu_backend.uses("fast")


def test_plain_attention_has_the_same_values():
    model = GPT(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)
    variables = init_variables(model, jax.random.key(0))
    idx = jax.random.randint(jax.random.key(1), (2, 8), 0, 16)
    # The switch is read while tracing: jax caches a trace per function, so each side traces a new one.
    with cpu_backend.plain():
        plain = jax.jit(lambda v, i: model.apply(v, i))(variables, idx)
    default = jax.jit(lambda v, i: model.apply(v, i))(variables, idx)
    np.testing.assert_allclose(plain, default, rtol=0, atol=1e-5)


def test_unknown_name_in_the_environment_is_one_error():
    env = {**os.environ, cpu_backend.PLAIN_ENV: "decode_kernels,bogus"}
    out = subprocess.run([sys.executable, "-c", "import transformer_jax.cpu_backend"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "TAMING_JAX_CPU_PLAIN: unknown CPU strategies ['bogus']" in out.stderr.strip().splitlines()[-1]

"""Stage-two train step: sharded equals single-device, loss falls, config errors are clear."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _xla_flags import MANY_RUNS
from common_jax.mesh import LOGICAL_AXIS_RULES, batch_sharding, make_mesh, replicated
from common_jax.training import jit_init, state_shardings
from configs import transformer_tiny
from transformer_jax.code_encoder import unigram_entropy_bits
from transformer_jax.train import TransformerTask


def tiny_config(**over):
    c = transformer_tiny.get_config()
    c.data.global_batch_size = 8
    for k, v in over.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def fake_batch(b=8, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 10, (b,)).astype(np.int32)
    # codes depend on the label and position: learnable structure
    base = (np.arange(64)[None, :] * 3 + label[:, None] * 7) % 128
    noise = rng.integers(0, 128, (b, 64))
    codes = np.where(rng.random((b, 64)) < 0.8, base, noise).astype(np.int32).reshape(b, 8, 8)
    return {"codes": codes, "label": label}


def run_steps(task, mesh, n=1):
    import flax.linen as nn
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        abstract = jax.eval_shape(task.init_state, jax.random.key(0))
        sh = state_shardings(task, abstract, mesh)
        state = jit_init(task.init_state, sh)(jax.random.key(0))
        step = jax.jit(task.train_step, in_shardings=(sh, batch_sharding(mesh, 1), replicated(mesh)),
                       out_shardings=(sh, replicated(mesh)))
        for i in range(n):
            batch = jax.device_put(fake_batch(seed=i), batch_sharding(mesh, 1))
            state, metrics = step(state, batch, jax.random.key(i))
    return jax.device_get(state.params), metrics


@pytest.fixture(scope="module")
def reference():
    task = TransformerTask(tiny_config())
    return run_steps(task, make_mesh(data=1, devices=jax.devices()[:1]))


@pytest.mark.parametrize("shape", [(4, 2, 1), (4, 1, 2)])
def test_sharded_step_equals_one_device(reference, shape):
    ref_params, ref_metrics = reference
    task = TransformerTask(tiny_config())
    params, metrics = run_steps(task, make_mesh(*shape))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)


def test_params_shard_over_model_axis():
    import flax.linen as nn
    task = TransformerTask(tiny_config())
    mesh = make_mesh(4, 1, 2)
    abstract = jax.eval_shape(task.init_state, jax.random.key(0))
    sh = state_shardings(task, abstract, mesh)
    mlp = sh.params["blocks_0"]
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(mlp)[0]}
    assert any("model" in str(s) for s in specs.values()), specs


def test_grad_accumulation_matches_full_batch(reference):
    acc = TransformerTask(tiny_config(**{"optim.grad_accum_steps": 2}))
    p1, _ = reference
    p2, _ = run_steps(acc, make_mesh(data=1, devices=jax.devices()[:1]))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_training_beats_unigram_entropy_on_structured_codes():
    task = TransformerTask(tiny_config(**{"optim.base_learning_rate": 3e-3, "cond.cfg_dropout": 0.0}))
    state = task.init_state(jax.random.key(0))
    step = jax.jit(task.train_step, compiler_options=MANY_RUNS)   # 60 steps
    ev = jax.jit(task.eval_step)
    held = fake_batch(b=64, seed=999)
    for i in range(60):
        state, m = step(state, fake_batch(b=32, seed=i), jax.random.key(i))
    out = ev(state, held)
    bits = float(out["nll_bits_per_token"] / out["count"])
    assert bits < unigram_entropy_bits(held["codes"], 139) - 0.5


def test_bad_conditioning_config_is_one_clear_error():
    with pytest.raises(ValueError, match=r"class tokens reach 139 .* vocab_size is 139"):
        TransformerTask(tiny_config(**{"cond.class_offset": 130}))
    with pytest.raises(ValueError, match="block_size=60 is too small"):
        TransformerTask(tiny_config(**{"gpt.block_size": 60}))

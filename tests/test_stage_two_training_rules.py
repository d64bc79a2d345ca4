"""Stage-two training rules: pkeep input corruption, CFG prefix dropout, which logits predict which token,
which parameters weight decay reaches, and the learning-rate schedule.

No GPT is trained here: a stand-in model with known logits checks the loss alignment, and the optimizer is
driven with zero gradients, where AdamW's update is exactly ``-lr(step) * weight_decay * param``.
"""
import math
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import transformer_tiny
from transformer_jax.gpt import gpt_from_config
from transformer_jax.train import TransformerTask, learning_rate, make_optimizer

V = 139            # transformer_tiny's vocabulary: 128 codes, 10 classes at 128..137, null token 138
GRID = (4, 4)


def config(**cond):
    c = transformer_tiny.get_config()
    c.data.code_grid = GRID
    c.cond.update(dict(cfg_dropout=0.0, pkeep=1.0))
    c.cond.update(cond)
    return c


def class_batch(b, seed=0):
    rng = np.random.default_rng(seed)
    return {"codes": rng.integers(0, 128, (b, *GRID)).astype(np.int32),
            "label": rng.integers(0, 10, (b,)).astype(np.int32)}


def _bounds(p, n):
    """A 6-sigma binomial interval for a fraction with probability p over n draws (fixed keys: no flakes)."""
    s = 6 * math.sqrt(p * (1 - p) / n)
    return p - s, p + s


# ---------------------------------------------------------------------------------------- pkeep
def test_pkeep_replaces_input_tokens_at_random_and_keeps_targets():
    pkeep, b = 0.7, 1024
    task = TransformerTask(config(pkeep=pkeep))
    batch = class_batch(b)
    seq = jax.jit(task._sequence)
    inp, target = jax.device_get(seq(batch, jax.random.key(0)))
    codes = batch["codes"].reshape(b, -1)
    np.testing.assert_array_equal(target, codes)                  # the targets are never corrupted
    np.testing.assert_array_equal(inp[:, 0], batch["label"] + 128)  # nor the class prefix
    fed = inp[:, 1:]                                              # image inputs: codes[:, :-1], corrupted
    assert fed.shape == codes[:, :-1].shape
    changed = fed != codes[:, :-1]
    # a replacement is uniform over the vocabulary, so it equals the original token 1/V of the time
    lo, hi = _bounds((1 - pkeep) * (1 - 1 / V), changed.size)
    assert lo < changed.mean() < hi, changed.mean()
    new = fed[changed]
    assert new.min() >= 0 and new.max() < V
    assert len(np.unique(new)) == V         # drawn from the whole vocabulary (class and null ids included)
    assert np.mean(new >= 128) > 0.5 * 11 / V
    # a different key corrupts other positions; evaluation (no key) feeds the codes unchanged
    inp2, _ = jax.device_get(seq(batch, jax.random.key(1)))
    assert (inp2[:, 1:] != fed).any()
    inp_eval, _ = jax.device_get(jax.jit(lambda bt: task._sequence(bt, None))(batch))
    np.testing.assert_array_equal(inp_eval[:, 1:], codes[:, :-1])


# ------------------------------------------------------------------------------------ cfg dropout
@pytest.mark.parametrize("kind", ["class", "spatial"])
def test_cfg_dropout_replaces_whole_prefixes_by_the_null_token(kind):
    p, b = 0.3, 2048
    if kind == "class":
        task = TransformerTask(config(cfg_dropout=p))
        batch, prefix = class_batch(b), None
    else:
        task = TransformerTask(config(kind="spatial", cfg_dropout=p), cond_grid=(2, 2))
        batch = class_batch(b)
        batch = {"codes": batch["codes"],
                 "cond_codes": np.random.default_rng(5).integers(0, 128, (b, 2, 2)).astype(np.int32)}
    n_cond = task.n_cond
    inp, target = jax.device_get(jax.jit(task._sequence)(batch, jax.random.key(3)))
    prefix = (batch["label"][:, None] + 128) if kind == "class" else batch["cond_codes"].reshape(b, -1)
    got = inp[:, :n_cond]
    dropped = (got == 138).all(axis=1)
    kept = (got == prefix).all(axis=1)
    assert (dropped | kept).all()           # a prefix is dropped whole or kept whole
    lo, hi = _bounds(p, b)
    assert lo < dropped.mean() < hi, dropped.mean()
    # the image tokens are untouched (pkeep = 1) and so are the targets
    np.testing.assert_array_equal(inp[:, n_cond:], batch["codes"].reshape(b, -1)[:, :-1])
    np.testing.assert_array_equal(target, batch["codes"].reshape(b, -1))
    # no dropout when evaluating
    inp_eval, _ = jax.device_get(jax.jit(lambda bt: task._sequence(bt, None))(batch))
    np.testing.assert_array_equal(inp_eval[:, :n_cond], prefix)


# ------------------------------------------------------------------------------ loss alignment
class Successor(nn.Module):
    """Stand-in GPT: at every position, all its probability on (input token + 1) mod vocab."""
    vocab_size: int

    @nn.compact
    def __call__(self, idx, deterministic=True):
        self.param("unused", nn.initializers.zeros, ())
        return 60.0 * jax.nn.one_hot((idx + 1) % self.vocab_size, self.vocab_size)


@pytest.mark.parametrize("kind", ["class", "spatial"])
def test_logits_at_position_i_predict_token_i_plus_1_and_the_prefix_is_not_scored(kind):
    b, n_img = 4, GRID[0] * GRID[1]
    rng = np.random.default_rng(0)
    if kind == "class":
        task = TransformerTask(config())
        labels = rng.integers(0, 10, (b,)).astype(np.int32)
        batch, last_prefix = {"label": labels}, labels + 128
    else:
        task = TransformerTask(config(kind="spatial"), cond_grid=(2, 2))
        # the prefix's own successors are wrong: scoring any prefix position but the last would cost ~60 nats
        cond = rng.integers(0, 128, (b, 4)).astype(np.int32)
        batch, last_prefix = {"cond_codes": cond.reshape(b, 2, 2)}, cond[:, -1]
    # image codes that follow the successor rule from the prefix's last token on
    codes = (last_prefix[:, None] + 1 + np.arange(n_img)[None, :]) % V
    batch["codes"] = codes.reshape(b, *GRID).astype(np.int32)
    task.model = Successor(V)
    params = task.model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    for key in (None, jax.random.key(1)):                       # evaluation and training paths
        nll, correct = jax.device_get(task._nll(params, batch, key))
        assert nll.shape == (b, n_img)
        assert correct.all() and nll.max() < 1e-6, nll.max()
    # the stand-in is not right by construction: codes that step by 2 are missed at every position
    other = (last_prefix[:, None] + 2 + 2 * np.arange(n_img)[None, :]) % V
    nll, correct = jax.device_get(task._nll(params, dict(batch, codes=other.reshape(b, *GRID)), None))
    assert not correct.any() and nll.min() > 50
    # evaluation scores the image tokens only: count = tokens of real examples
    out = jax.device_get(task.eval_step(SimpleNamespace(params=params), dict(batch, mask=np.array([1, 1, 1, 0]))))
    assert float(out["count"]) == 3 * n_img
    assert float(out["accuracy"]) == 3 * n_img


# ----------------------------------------------------------------------- weight decay and schedule
def _decay_config(**optim):
    c = transformer_tiny.get_config()
    c.gpt.update(dict(n_layer=1, block_size=17))
    c.data.code_grid = GRID
    c.data.global_batch_size = 8
    c.total_steps = 110
    c.optim.update(dict(base_learning_rate=1e-3, scale_lr_by_batch=True, grad_accum_steps=2, warmup_steps=10,
                        min_lr_ratio=0.1, weight_decay=0.1, grad_clip=0.0))
    c.optim.update(optim)
    return c


def _expected_lr(step, peak, warmup, total, min_ratio):
    """Linear warmup from 0, then half a cosine from peak down to peak * min_ratio at total_steps."""
    if step < warmup:
        return peak * step / warmup
    t = min((step - warmup) / (total - warmup), 1.0)
    return peak * min_ratio + (peak - peak * min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def test_learning_rate_schedule_values():
    c = _decay_config()
    sched = learning_rate(c)
    peak = 1e-3 * 8 * 2                    # scale_lr_by_batch: x global batch x accumulation steps
    for step in (0, 1, 5, 10, 11, 35, 60, 100, 110, 150):
        np.testing.assert_allclose(float(sched(step)), _expected_lr(step, peak, 10, 110, 0.1), rtol=1e-6,
                                   atol=1e-12, err_msg=f"step {step}")
    assert float(sched(10)) == pytest.approx(peak, rel=1e-6)
    assert float(sched(110)) == pytest.approx(0.1 * peak, rel=1e-6)
    unscaled = learning_rate(_decay_config(scale_lr_by_batch=False, warmup_steps=0))
    for step in (0, 55, 110):
        np.testing.assert_allclose(float(unscaled(step)), _expected_lr(step, 1e-3, 0, 110, 0.1), rtol=1e-6)


def test_weight_decay_reaches_linear_kernels_only_at_the_scheduled_rate():
    c = _decay_config()
    shapes = nn.unbox(jax.eval_shape(lambda: gpt_from_config(c.gpt).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    rng = np.random.default_rng(0)   # any values do: the update is checked against them
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
    tx = make_optimizer(c)
    opt_state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [jax.tree_util.keystr(p) for p, _ in flat]
    # minGPT's rule: Linear weights decay; biases, LayerNorm, token and position embeddings do not.
    decays = {n: n.endswith("['kernel']") for n in names}
    assert decays["['head']['kernel']"] and decays["['blocks_0']['mlp_fc']['kernel']"]
    assert not any(decays[n] for n in ("['tok_emb']", "['pos_emb']", "['ln_f']['scale']",
                                       "['blocks_0']['ln1']['scale']", "['blocks_0']['mlp_fc']['bias']"))
    peak = 1e-3 * 8 * 2
    for step in range(13):
        upd, opt_state = update(zeros, opt_state, params)
        lr = _expected_lr(step, peak, 10, 110, 0.1)
        for (path, p), u in zip(flat, jax.tree.leaves(upd)):
            n = jax.tree_util.keystr(path)
            want = -lr * 0.1 * np.asarray(p, np.float64) if decays[n] else np.zeros(p.shape)
            np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-12, err_msg=f"{n} at step {step}")

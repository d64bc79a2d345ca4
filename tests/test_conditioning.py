"""The conditioning kinds (transformer_jax.conditions): the registry, each kind's prefixes (training with
condition dropout, evaluation/sampling, the null prefix of guidance), its config checks and the checks of the
condition a Sampler call passes. Expected values are written out (taming's SOS token, label + offset, cond
codes row-major), and the dropout draw is pinned to the key it has always used, so training numbers stay."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import conditions
from transformer_jax.conditions.base import Conditioning


def cond(kind, **kw):
    c = dict(kind=kind, sos_token=3, n_classes=10, class_offset=128, pkeep=1.0, cfg_dropout=0.0, null_token=138)
    c.update(kw)
    return SimpleNamespace(**c)


B = 6
LABELS = np.array([0, 9, 3, 3, 7, 1], np.int32)
COND_CODES = np.arange(B * 2 * 3, dtype=np.int32).reshape(B, 2, 3) % 128
BATCH = {"label": LABELS, "cond_codes": COND_CODES}
EXPECTED = {"unconditional": np.full((B, 1), 3), "class": LABELS[:, None] + 128,
            "spatial": COND_CODES.reshape(B, 6)}


def test_unknown_kind_is_one_error_listing_the_choices():
    with pytest.raises(ValueError, match=r"^cond.kind must be one of \['class', 'spatial', 'unconditional'\], "
                                         r"got 'depth'$"):
        conditions.from_config(cond("depth"))
    assert {k: c.name for k, c in conditions.KINDS.items()} == {k: k for k in conditions.KINDS}


def test_shape_keys_are_the_token_layout_keys():
    assert set(conditions.shape_keys()) == {f"cond.{k}" for k in
                                            ("kind", "n_classes", "class_offset", "sos_token", "null_token")}


@pytest.mark.parametrize("kind", ["unconditional", "class", "spatial"])
def test_prefixes_of_each_kind(kind):
    k = conditions.from_config(cond(kind), vocab_size=139)
    assert k.prefix_length((2, 3)) == EXPECTED[kind].shape[1]
    got = np.asarray(k.prefix(BATCH, B))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, EXPECTED[kind])
    np.testing.assert_array_equal(k.null_prefix(jnp.asarray(got)), np.full_like(got, 138))
    # no dropout configured: the training prefix is the prefix
    np.testing.assert_array_equal(k.training_prefix(BATCH, B, jax.random.key(0)), EXPECTED[kind])


@pytest.mark.parametrize("kind", ["class", "spatial"])
def test_training_prefix_drops_whole_prefixes_with_the_same_draw_as_before(kind):
    p, key = 0.5, jax.random.key(4)
    got = np.asarray(conditions.from_config(cond(kind, cfg_dropout=p)).training_prefix(BATCH, B, key))
    drop = np.asarray(jax.random.bernoulli(key, p, (B, 1)))      # the draw stage two has always made
    assert 0 < drop.sum() < B                                     # this key drops some rows and keeps some
    np.testing.assert_array_equal(got, np.where(drop, 138, EXPECTED[kind]))


def test_spatial_prefix_length_needs_the_cond_grid():
    with pytest.raises(ValueError, match="spatial conditioning needs the cond code grid size"):
        conditions.from_config(cond("spatial")).prefix_length(None)


@pytest.mark.parametrize("c,message", [
    (cond("unconditional", sos_token=139), r"^cond.sos_token=139 is outside the vocabulary \[0, 139\)$"),
    (cond("class", class_offset=130), r"^cond: class tokens reach 139 \(class_offset 130 \+ n_classes 10 - 1\) "
                                      r"but vocab_size is 139$"),
    (cond("spatial", cfg_dropout=0.1, null_token=-1), r"^cond.null_token=-1 is outside the vocabulary \[0, 139\)$"),
])
def test_tokens_outside_the_vocabulary_are_one_clear_error(c, message):
    with pytest.raises(ValueError, match=message):
        conditions.from_config(c, vocab_size=139)
    conditions.from_config(c)           # without a vocabulary nothing is checked (the launch scripts' use)


def test_null_token_is_only_checked_when_dropout_uses_it():
    conditions.from_config(cond("class", null_token=500), vocab_size=139)


# ------------------------------------------------------------------------------------- sampler arguments
@pytest.mark.parametrize("kind,args,message", [
    ("class", {}, r"^this model is class-conditional: pass labels \(one per sample\)$"),
    ("spatial", {}, r"^this model is spatially conditioned: pass cond_codes \(n, h, w\)$"),
    ("unconditional", dict(labels=LABELS), r"^labels are for class-conditional models; this one is unconditional$"),
    ("spatial", dict(labels=LABELS, cond_codes=COND_CODES),
     r"^labels are for class-conditional models; this one is spatial$"),
    ("class", dict(labels=LABELS, cond_codes=COND_CODES),
     r"^cond_codes are for spatially conditioned models; this one is class$"),
    ("class", dict(labels=LABELS[:4]), r"^got 4 labels for 6 samples$"),
    ("class", dict(labels=LABELS + 3), r"^labels must be in \[0, 10\), got \[12, 10\]$"),
    ("class", dict(labels=LABELS + 0.5), r"^labels must be integer class ids, got float64 values"),
    ("spatial", dict(cond_codes=COND_CODES[:, :1]), r"^cond_codes must be \(6, 2, 3\) integer codes .* got int32 "
                                                    r"\(6, 1, 3\)"),
])
def test_bad_sampler_conditions_are_one_clear_error(kind, args, message):
    with pytest.raises(ValueError, match=message):
        conditions.from_config(cond(kind)).sampling_prefix(B, dict(dict(labels=None, cond_codes=None), **args),
                                                           (2, 3))


@pytest.mark.parametrize("kind", ["unconditional", "class", "spatial"])
def test_sampling_prefix_and_window_condition(kind):
    k = conditions.from_config(cond(kind))
    arg = {"unconditional": {}, "class": dict(labels=LABELS.astype(np.float64)),   # whole floats are ids
           "spatial": dict(cond_codes=COND_CODES)}[kind]
    args = dict(dict(labels=None, cond_codes=None), **arg)
    np.testing.assert_array_equal(k.sampling_prefix(B, args, (2, 3)), EXPECTED[kind])
    prefix, grid = k.window_condition(B, args, (2, 3))
    if kind == "spatial":       # the window crops the grid itself, of any size
        assert prefix is None
        np.testing.assert_array_equal(grid, COND_CODES)
    else:
        assert grid is None
        np.testing.assert_array_equal(prefix, EXPECTED[kind])
    assert (k.takes_labels, k.takes_cond_codes) == (kind == "class", kind == "spatial")


def test_guidance_needs_a_conditional_model_trained_with_dropout():
    for kind in ("unconditional", "class", "spatial"):
        conditions.from_config(cond(kind)).check_guidance(None)
    with pytest.raises(ValueError, match=r"^guidance_scale needs a conditional model; this one is unconditional$"):
        conditions.from_config(cond("unconditional", cfg_dropout=0.1)).check_guidance(2.0)
    with pytest.raises(ValueError, match=r"^guidance_scale needs a model trained with condition dropout .* "
                                         r"cond.cfg_dropout=0.0$"):
        conditions.from_config(cond("class")).check_guidance(2.0)
    conditions.from_config(cond("spatial", cfg_dropout=0.1)).check_guidance(2.0)


# ---------------------------------------------------------------------------------------- a new kind
class ClassAndSOS(Conditioning):
    """A kind that no anchor has: SOS then the class token (two prefix tokens)."""
    name = "class_sos"
    description = "class-conditional"
    sampler_arg = "labels"
    layout_keys = ("sos_token", "n_classes", "class_offset")

    def prefix_length(self, cond_grid=None):
        return 2

    def prefix(self, batch, batch_size):
        label = jnp.asarray(batch["label"], jnp.int32).reshape(batch_size, 1) + self.cfg.class_offset
        return jnp.concatenate([jnp.full_like(label, self.cfg.sos_token), label], axis=1)

    def sampler_value(self, value, n, cond_grid):
        return np.asarray(value, np.int32).reshape(n)


def test_a_new_kind_is_one_class_and_one_registry_entry(monkeypatch):
    from configs import transformer_tiny
    from transformer_jax.train import TransformerTask
    monkeypatch.setitem(conditions.KINDS, "class_sos", ClassAndSOS)
    c = transformer_tiny.get_config()
    c.data.code_grid = (2, 2)
    c.cond.update(dict(kind="class_sos", sos_token=5, cfg_dropout=0.0))
    task = TransformerTask(c)
    assert task.n_cond == 2
    codes = np.arange(B * 4, dtype=np.int32).reshape(B, 2, 2) % 128
    inp, target = task._sequence({"codes": codes, "label": LABELS}, None)
    np.testing.assert_array_equal(inp[:, :2], np.stack([np.full(B, 5), LABELS + 128], 1))
    np.testing.assert_array_equal(inp[:, 2:], codes.reshape(B, 4)[:, :-1])
    np.testing.assert_array_equal(target, codes.reshape(B, 4))
    # the sampler-argument checks come with it
    k = conditions.from_config(c.cond)
    with pytest.raises(ValueError, match="cond_codes are for spatially conditioned models; this one is class_sos"):
        k.sampling_prefix(B, dict(labels=LABELS, cond_codes=COND_CODES))

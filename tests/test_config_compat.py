"""Config as the one source of truth: the loop's fields come from the configs only, and a resume compares each
task's declared shape-defining keys (other changes are allowed and logged)."""
import json
import logging as pylogging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_task
from common_jax.config_utils import ConfigMismatchError, check_config_compatible, config_to_dict, flatten
from common_jax.mesh import make_mesh
from common_jax.training import run
from configs import transformer_tiny, vqgan_tiny
from configs.loop import loop_config
from transformer_jax.gpt import gpt_from_config
from transformer_jax.train import TransformerTask
from vqgan_jax.segmentation import SegmentationVQTask
from vqgan_jax.train import VQGANTask, model_from_config

SAVED = {"gpt": {"n_layer": 2, "remat": False, "resid_pdrop": 0.0, "old": 1},
         "cond": {"kind": "class", "cfg_dropout": 0.0}, "total_steps": 10}
SHAPE_KEYS = ("gpt.n_layer", "cond.kind")


def _requested(**changes):
    flat = flatten(SAVED)
    flat.update(changes)
    out: dict = {}
    for key, value in flat.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# ------------------------------------------------------------------------------- the comparison itself
def test_other_keys_of_the_sections_may_change_and_are_described():
    notes = check_config_compatible(SAVED, _requested(**{
        "gpt.remat": True, "gpt.resid_pdrop": 0.1, "cond.cfg_dropout": 0.1, "gpt.old": None, "gpt.new": "x",
        "total_steps": 20}), SHAPE_KEYS)
    assert notes == ['resuming with cond.cfg_dropout changed: 0.0 -> 0.1',
                     'resuming with gpt.new added: "x"',
                     'resuming with gpt.old removed (was 1)',
                     'resuming with gpt.remat changed: false -> true',
                     'resuming with gpt.resid_pdrop changed: 0.0 -> 0.1']  # total_steps: outside the sections
    assert check_config_compatible(SAVED, _requested(), SHAPE_KEYS) == []


def test_a_shape_key_change_is_refused_in_one_line():
    with pytest.raises(ConfigMismatchError) as e:
        check_config_compatible(SAVED, _requested(**{"gpt.n_layer": 3, "gpt.remat": True}), SHAPE_KEYS,
                                source="checkpoint in /w")
    assert str(e.value) == "--config.gpt.n_layer=3 disagrees with checkpoint in /w: 2"
    with pytest.raises(ConfigMismatchError, match=r"^--config.cond.kind is missing from the requested config "
                                                  r"but checkpoint has 'class'$"):
        check_config_compatible(SAVED, _requested(**{"cond.kind": None}), SHAPE_KEYS)
    # A whole section as the entry: every key under it counts (the strict rule, for a task that wants it).
    with pytest.raises(ConfigMismatchError, match=r"^--config.gpt.remat=true disagrees with checkpoint: false$"):
        check_config_compatible(SAVED, _requested(**{"gpt.remat": True}), ("gpt",))


# ------------------------------------------------------------------------ every task's declared keys
def _perturbed(value, key):
    """Another valid value of a config field, to see whether it changes the state's shapes."""
    special = {"ch_mult": (1, 2, 2, 4), "attn_resolutions": (16, 8), "dtype": "bfloat16",
               "attention_impl": "explicit"}
    if key in special:
        return special[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return 2 * value if value else 1
    if isinstance(value, float):
        return value + 0.25
    raise AssertionError(f"no perturbation for {key}={value!r}")


def _shapes(tree):
    return [(jax.tree_util.keystr(p), x.shape, x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("task_cls,get_config,section,init", [
    (TransformerTask, transformer_tiny.get_config, "gpt",
     lambda cfg: gpt_from_config(cfg.gpt).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))),
    (VQGANTask, vqgan_tiny.get_config, "model",
     lambda cfg: model_from_config(cfg).init(
         {"params": jax.random.key(0), "gumbel": jax.random.key(1)},
         jnp.zeros((1, cfg.model.resolution, cfg.model.resolution, cfg.model.in_channels)))),
], ids=["gpt", "vqgan"])
def test_shape_keys_cover_every_model_key_that_changes_the_weights(task_cls, get_config, section, init):
    """Every model key the task does not declare is perturbed: none may change the weights' shapes (a key
    missing from the list would let a resume reach the restore with the wrong shapes)."""
    small = {"model": dict(ch=32, ch_mult=(1, 2), attn_resolutions=(16,), z_channels=32, embed_dim=8,
                           quantizer=dict(n_embed=16)),
             "gpt": dict(n_layer=1, n_embd=32)}[section]  # fewer layers to trace, the same kinds of fields
    declared = {"model": "model.quantizer.n_embed", "gpt": "gpt.n_layer"}[section]

    def shapes_with(key=None):
        cfg = get_config()
        cfg[section].update(small)
        if key is not None:  # a dotted key below the section (model.quantizer.beta)
            *parents, leaf = key.split(".")
            node = cfg[section]
            for p in parents:
                node = node[p]
            node[leaf] = _perturbed(node[leaf], leaf)
        return _shapes(jax.eval_shape(lambda: init(cfg)))

    want = shapes_with()
    undeclared = [k for k in sorted(flatten(config_to_dict(get_config()[section])))
                  if f"{section}.{k}" not in task_cls.shape_keys]
    assert shapes_with(declared.split(".", 1)[1]) != want  # the check sees a shape change at all
    assert [k for k in undeclared if shapes_with(k) != want] == []
    # what the issue names as changeable on resume stays changeable
    assert {"remat", "dtype"} <= set(undeclared) and any(k.endswith("dropout") or k.endswith("pdrop")
                                                         for k in undeclared), undeclared
    if task_cls is VQGANTask:  # the segmentation task trains the same model
        assert set(SegmentationVQTask.shape_keys) == {k for k in VQGANTask.shape_keys if k.startswith("model.")}


# ----------------------------------------------------------------------------- the loop has no defaults
@pytest.mark.parametrize("key", [k for k in flatten(config_to_dict(loop_config())) if not k.startswith("mesh.")])
def test_the_loop_requires_every_field_the_configs_define(tmp_path, key):
    cfg = toy_task.toy_config(total_steps=1)
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    del node[leaf]
    with pytest.raises(ValueError, match=rf"^run: config.{key} (is missing; the base configs define it|is required)"):
        run(cfg, tmp_path, toy_task.ToyTask(), toy_task.ToyLoader(16))


def test_a_task_without_shape_keys_is_refused(tmp_path):
    class NoKeys(toy_task.ToyTask):
        shape_keys = ()
    with pytest.raises(ValueError, match=r"^run: task NoKeys declares no shape_keys"):
        run(toy_task.toy_config(1), tmp_path, NoKeys(), toy_task.ToyLoader(16), tensorboard=False)


# ------------------------------------------------------------------------ a real resume of stage two
class CodesLoader:
    """Random 8x8 code grids with class labels: stage two's batches without a stage one."""

    def __init__(self, batch: int = 8):
        self.batch, self.index = batch, 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng(self.index)
        self.index += 1
        return {"codes": rng.integers(0, 128, (self.batch, 8, 8)).astype(np.int32),
                "label": rng.integers(0, 10, (self.batch,)).astype(np.int32)}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def _gpt_run(workdir, total, **gpt):
    cfg = transformer_tiny.get_config()
    cfg.gpt.update(dict(n_layer=1, n_head=2, n_embd=32), **gpt)
    cfg.total_steps, cfg.tensorboard = total, False
    cfg.checkpoint.update({"every": 1, "async_save": False})
    records = []

    class Grab(pylogging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    absl_logger = pylogging.getLogger("absl")
    handler, old_level = Grab(level=pylogging.INFO), absl_logger.level
    absl_logger.addHandler(handler)
    absl_logger.setLevel(pylogging.INFO)
    try:
        res = run(cfg, workdir, TransformerTask(cfg), CodesLoader(),
                  mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(old_level)
    return res, records


@pytest.mark.slow  # a real tiny stage-two run (one compile) and two resumes
def test_gpt_resume_allows_remat_and_refuses_n_layer(tmp_path):
    first, _ = _gpt_run(tmp_path, 1)
    assert first.step == 1
    # The resume restores the checkpoint under remat=True; with total_steps reached it compiles no step.
    res, records = _gpt_run(tmp_path, 1, remat=True)
    assert res.step == 1
    assert "resuming with gpt.remat changed: false -> true" in records, records
    assert any(r.startswith("resumed from step 1 ") for r in records), records
    for got, want in zip(jax.tree.leaves(res.state.params), jax.tree.leaves(first.state.params)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ConfigMismatchError) as e:
        _gpt_run(tmp_path, 1, n_layer=2)
    assert str(e.value) == f"--config.gpt.n_layer=2 disagrees with checkpoint in {tmp_path}: 1"


# ------------------------------------------------------------------------ documented switches exist
def test_every_config_switch_the_docs_name_is_in_a_config():
    """``--config.gpt.remat=True`` or ```gpt.attention_impl=cudnn``` in a README must name a key that some config
    has: ml_collections refuses an override of a key the config lacks."""
    import glob
    import importlib
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    keys = set()
    for path in glob.glob(os.path.join(root, "configs", "*.py")):
        module = importlib.import_module(f"configs.{os.path.basename(path)[:-3]}")
        if hasattr(module, "get_config"):
            keys |= set(flatten(config_to_dict(module.get_config())))
    sections = "|".join(sorted({k.split(".")[0] for k in keys}))
    switch = re.compile(rf"--config\.([A-Za-z_][\w.]*\w)|`((?:{sections})\.[A-Za-z_][\w.]*)=")
    named = {}
    for doc in [os.path.join(root, "README.md"), *glob.glob(os.path.join(root, "*", "*.md"))]:
        for a, b in switch.findall(open(doc, encoding="utf-8").read()):
            named.setdefault(a or b, os.path.relpath(doc, root))
    assert len(named) >= 3, named  # the pattern sees the READMEs' switches at all
    unknown = {k: doc for k, doc in named.items() if k not in keys and not any(x.startswith(k + ".") for x in keys)}
    assert unknown == {}


# Configs as workdirs written before the quantizer sub-config and the block selector recorded them (config.json of
# configs/*_tiny.py and vqgan_gumbel_f8_8192 at d9990da): such a workdir must resume under today's layout.
_OLD_LAYOUTS = os.path.join(os.path.dirname(__file__), "old_configs")


@pytest.mark.parametrize("name", ["vqgan_tiny", "vqgan_segmentation_tiny", "vqgan_gumbel_f8_8192",
                                  "transformer_tiny", "transformer_spatial_tiny"])
def test_workdirs_of_the_earlier_config_layout_resume(name):
    import importlib

    from common_jax import training

    task = {"vqgan_tiny": VQGANTask, "vqgan_gumbel_f8_8192": VQGANTask, "vqgan_segmentation_tiny": SegmentationVQTask,
            "transformer_tiny": TransformerTask, "transformer_spatial_tiny": TransformerTask}[name]
    with open(os.path.join(_OLD_LAYOUTS, f"{name}.json")) as f:
        saved = json.load(f)
    today = importlib.import_module(f"configs.{name}").get_config()
    with pytest.raises(ConfigMismatchError, match="older config layout"):
        check_config_compatible(saved, today, task.shape_keys)  # what the loop did before the upgrade
    notes = check_config_compatible(training._saved_config(task, {"config": saved}), today, task.shape_keys)
    assert all(n.startswith("resuming with") and " added: " in n for n in notes), notes
    # ... and a real change of a shape key in an old workdir is still refused
    section = "model" if "model" in saved else "gpt"
    key = "n_embed" if section == "model" else "n_layer"
    changed = json.loads(json.dumps(saved))
    changed[section][key] = changed[section][key] + 1
    with pytest.raises(ConfigMismatchError, match=key):
        check_config_compatible(training._saved_config(task, {"config": changed}), today, task.shape_keys)

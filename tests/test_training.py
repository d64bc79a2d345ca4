"""The generic train loop with the toy task: logging/TensorBoard, sharded == single-device, errors."""
import glob
import logging as pylogging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import toy_task
from common_jax import metrics as mlib
from common_jax.config_utils import ConfigMismatchError, check_config_compatible
from common_jax.mesh import make_mesh
from common_jax.training import accumulate_gradients, run


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def _run_logged(cfg, workdir, **kwargs):
    """``run`` on the toy task with the absl log records (INFO and up) captured: (result, messages)."""
    res, records = toy_task.run_logged(cfg, workdir, **kwargs)
    return res, [r.getMessage() for r in records]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One toy run with TensorBoard, eval and image summaries; its log records are captured."""
    workdir = tmp_path_factory.mktemp("logged")
    res, records = _run_logged(toy_task.toy_config(total_steps=4, every=1),  # keep=2
                               workdir, eval_loader_factory=lambda: toy_task.eval_batches(16, 2))
    return workdir, res, records


def test_run_writes_tensorboard_logs_images(logged_run):
    workdir, res, records = logged_run
    assert res.step == 4 and int(res.state.step) == 4 and not res.preempted
    assert glob.glob(os.path.join(workdir, "events.out.tfevents*")), os.listdir(workdir)
    assert any("step 4/4" in r and "ETA" in r for r in records), records[-20:]
    assert any("train/loss" in r for r in records)  # the clu logging writer
    assert np.isfinite(res.train_metrics["loss"]) and res.train_metrics["loss"] > 0
    png = os.path.join(workdir, "images", "pred_00000004.png")
    assert os.path.exists(png)
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "4"]  # keep=2 of 1..4


def test_config_tensorboard_false_logs_to_the_console_only(tmp_path):
    cfg = toy_task.toy_config(total_steps=2, every=100, tensorboard=False)
    res, records = _run_logged(cfg, tmp_path, eval_loader_factory=lambda: toy_task.eval_batches(16, 2))
    assert res.step == 2 and not glob.glob(os.path.join(tmp_path, "events.out.tfevents*"))
    assert any(r.startswith("[2] ") and "train/loss=" in r for r in records), records[-20:]
    assert any(r.startswith("[2] ") and "eval/" in r for r in records), records[-20:]


def test_eval_is_masked_mean_over_examples(logged_run):
    """The loop's eval average equals the masked per-example mean computed directly on the host."""
    _, res, _ = logged_run
    task = toy_task.ToyTask()
    params = jax.device_get(res.state.params)
    num = den = 0.0
    for b in toy_task.eval_batches(16, 2):
        pred = np.asarray(task.model.apply({"params": params}, b["x"]))
        num += float((((pred - b["y"]) ** 2).mean(-1) * b["mask"]).sum())
        den += float(b["mask"].sum())
    assert den == 24.0  # 16 + 8 real rows: the padded half of the last batch is excluded
    np.testing.assert_allclose(res.eval_metrics["loss"], num / den, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def one_device_params(tmp_path_factory):
    mesh1 = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg = toy_task.toy_config(total_steps=3, every=100)
    res = run(cfg, tmp_path_factory.mktemp("one"), toy_task.ToyTask(noise=0.1), toy_task.ToyLoader(16),
              tensorboard=False, mesh=mesh1)
    return _leaves(res.state)


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2)])
def test_sharded_run_matches_one_device(tmp_path, one_device_params, data, fsdp):
    cfg = toy_task.toy_config(total_steps=3, data=data, fsdp=fsdp, every=100)
    res = run(cfg, tmp_path, toy_task.ToyTask(noise=0.1), toy_task.ToyLoader(16), tensorboard=False)
    kernel = res.state.params["Dense_0"]["kernel"]
    # The logical table really placed it: 'embed' -> fsdp, 'mlp' -> model.
    assert kernel.sharding.spec == P("fsdp", "model")
    assert len(kernel.sharding.device_set) == 8
    if fsdp == 2:
        assert kernel.addressable_shards[0].data.shape == (toy_task.D_IN // 2, toy_task.D_HID)
    for got, want in zip(_leaves(res.state), one_device_params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_accumulate_gradients_equals_full_batch():
    task = toy_task.ToyTask()
    params = task.init_state(jax.random.key(1)).params
    batch = jax.tree.map(jnp.asarray, toy_task.make_batch(0, 0, 16))
    vg = jax.value_and_grad(task._loss, has_aux=True)
    (loss1, aux1), g1 = jax.jit(vg)(params, batch)
    (loss4, aux4), g4 = jax.jit(lambda p, b: accumulate_gradients(vg, p, b, 4))(params, batch)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    np.testing.assert_allclose(aux4["abs_err"], aux1["abs_err"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="not divisible by num_micro=3"):
        accumulate_gradients(vg, params, batch, 3)
    with pytest.raises(ValueError, match="num_micro must be >= 1"):
        accumulate_gradients(vg, params, batch, 0)


def test_config_mismatch_message(tmp_path):
    cfg = toy_task.toy_config(total_steps=1, every=1)
    run(cfg, tmp_path, toy_task.ToyTask(), toy_task.ToyLoader(16), tensorboard=False)
    bad = toy_task.toy_config(total_steps=2, every=1)
    bad.model.d_hid = 32
    with pytest.raises(ConfigMismatchError) as e:
        run(bad, tmp_path, toy_task.ToyTask(), toy_task.ToyLoader(16), tensorboard=False)
    assert str(e.value) == f"--config.model.d_hid=32 disagrees with checkpoint in {tmp_path}: 16"
    # Non-model fields (total_steps, checkpoint.every) may change on resume.
    check_config_compatible({"model": {"a": [1, 2]}, "total_steps": 5}, bad.__class__(
        {"model": {"a": (1, 2)}, "total_steps": 9}))
    with pytest.raises(ConfigMismatchError, match=r"--config.model.extra=1 is not in the config"):
        check_config_compatible({"model": {}}, bad.__class__({"model": {"extra": 1}}))
    # A workdir of the other stage (no model section at all) is named as such, not as an older layout.
    with pytest.raises(ConfigMismatchError, match=r"^checkpoint has no 'model' config section \(its sections: "
                                                  r"\['cond', 'gpt'\]\): a run of another kind, such as the other stage"):
        check_config_compatible({"gpt": {"n_layer": 2}, "cond": {}}, bad.__class__({"model": {"extra": 1}}))


def test_bad_inputs(tmp_path):
    cfg = toy_task.toy_config(total_steps=2)
    del cfg["total_steps"]
    with pytest.raises(ValueError, match="config.total_steps is required"):
        run(cfg, tmp_path / "a", toy_task.ToyTask(), toy_task.ToyLoader(16), tensorboard=False)
    with pytest.raises(ValueError, match="host batch 12, not divisible"):
        run(toy_task.toy_config(2), tmp_path / "b", toy_task.ToyTask(), toy_task.ToyLoader(12),
            tensorboard=False)
    with pytest.raises(ValueError, match="train loader ran out at step 1"):
        run(toy_task.toy_config(3), tmp_path / "c", toy_task.ToyTask(),
            iter([toy_task.make_batch(0, 0, 16)]), tensorboard=False)

    class NoSpecs(toy_task.ToyTask):
        def state_logical_specs(self, abstract_state):
            specs = super().state_logical_specs(abstract_state)
            return specs.replace(input_mean=None)
    with pytest.raises(ValueError, match="no PartitionSpec for .*input_mean"):
        run(toy_task.toy_config(2), tmp_path / "d", NoSpecs(), toy_task.ToyLoader(16), tensorboard=False)

    class Frozen(toy_task.ToyTask):
        def train_step(self, state, batch, rng):
            new, metrics = super().train_step(state, batch, rng)
            return new.replace(step=state.step), metrics
    with pytest.raises(ValueError, match="must increment state.step: after 2 steps it is 0"):
        run(toy_task.toy_config(2), tmp_path / "e", Frozen(), toy_task.ToyLoader(16), tensorboard=False)


# ------------------------------------------------------------------------------------------ metrics.py
def test_image_grid_and_png(tmp_path):
    imgs = np.stack([np.full((3, 2, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = mlib.image_grid(imgs, ncols=2, pad=1, pad_value=0)
    assert grid.shape == (3 * 3 + 4, 2 * 2 + 3, 3) and grid.dtype == np.uint8
    assert (grid[1:4, 1:3] == 10).all() and (grid[1:4, 4:6] == 20).all() and (grid[5:8, 1:3] == 30).all()
    assert (grid[9:12, 1:3] == 50).all() and (grid[9:12, 4:6] == 0).all()  # empty cell keeps pad
    path = tmp_path / "sub" / "g.png"
    mlib.save_png(path, grid)
    from PIL import Image
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    with pytest.raises(ValueError, match="expected uint8"):
        mlib.image_grid(imgs.astype(np.float32), 2)
    with pytest.raises(ValueError, match="expected NHWC"):
        mlib.image_grid(imgs[0], 2)
    with pytest.raises(ValueError, match="got shape"):
        mlib.save_png(tmp_path / "x.png", np.zeros((2, 2, 2), np.uint8))


def test_to_uint8_names_non_finite_values_when_given_a_name():
    x = np.array([[-1.0, 0.0], [1.0, np.nan]], np.float32)
    with pytest.raises(ValueError, match=r"decoded images holds 1 NaN or infinite values of 4 \(shape \(2, 2\)\)"):
        mlib.to_uint8(x, name="decoded images")
    np.testing.assert_array_equal(mlib.to_uint8(x[:1], name="decoded images"), [[0, 128]])
    with np.errstate(invalid="ignore"):   # training's summaries: converted as numpy casts, never an error
        assert mlib.to_uint8(x).shape == (2, 2)


def test_averager_and_progress():
    avg = mlib.MetricAverager()
    assert avg.result() == {}
    for v in (1.0, 2.0, 6.0):
        avg.add({"loss": jnp.asarray(v)})
    assert avg.result() == {"loss": 3.0}
    avg.reset()
    assert avg.result() == {} and avg.count == 0

    t = [100.0]
    prog = mlib.Progress(total=100, start=10, clock=lambda: t[0])
    t[0] += 5.0
    assert prog.update(20) == 2.0  # 10 steps in 5 s
    assert prog.eta_seconds(20) == 40.0
    assert "step 20/100 (20.0%)" in prog.line(20) and "ETA 0:00:40" in prog.line(20)


def test_progress_log_is_throttled_and_shown(caplog, capsys):
    # What progress_iter (code encoding) and Sampler.sample (images) show: a line at most every every_secs and one
    # at the total; through absl where it shows INFO (the launch scripts), else on stderr (a plain session).
    from absl import logging as absl_logging

    def shown_lines() -> tuple[list[str], list[str]]:
        t = [0.0]
        prog = mlib.Progress(total=5, desc="image", clock=lambda: t[0])
        caplog.clear()
        with caplog.at_level(pylogging.INFO):
            for done, dt in ((1, 4.0), (2, 11.0), (3, 1.0), (5, 1.0)):
                t[0] += dt
                prog.log(done, every_secs=10.0)
        return capsys.readouterr().err.splitlines(), [r.getMessage() for r in caplog.records if r.name == "absl"]

    before = absl_logging.get_verbosity()
    try:
        absl_logging.set_verbosity(absl_logging.WARNING)     # a plain script: absl hides INFO
        err, logged = shown_lines()
        absl_logging.set_verbosity(absl_logging.INFO)        # under absl.app
        err_app, logged_app = shown_lines()
    finally:
        absl_logging.set_verbosity(before)
    assert logged == [] and err_app == []
    for lines in (err, logged_app):
        assert len(lines) == 2, lines
        # The first item (compiling, 4 s) only starts the rate: 1 image in the 11 s after it, then 3 in the last 2 s.
        assert lines[0].startswith("image 2/5 (40.0%) 0.0909 images/s elapsed 0:00:15 ETA 0:00:33"), lines
        assert lines[1].startswith("image 5/5 (100.0%) 1.5 images/s elapsed 0:00:17"), lines


def test_quick_jit_compiles_at_level_0_on_cpu_with_the_same_draws(monkeypatch):
    from common_jax import quick_compile
    seen = []
    real_jit = jax.jit
    monkeypatch.setattr(quick_compile.jax, "jit", lambda fn, **kw: seen.append(kw) or real_jit(fn, **kw))
    draw = lambda key, n: jax.random.uniform(jax.random.fold_in(key, 3), (n, 2))  # noqa: E731
    quick = quick_compile.quick_jit(draw, static_argnums=1)
    np.testing.assert_array_equal(quick(jax.random.key(0), 5), real_jit(draw, static_argnums=1)(jax.random.key(0), 5))
    assert quick(jax.random.key(1), 4).shape == (4, 2)
    assert seen == [{"compiler_options": {"xla_backend_optimization_level": 0}, "static_argnums": 1}]  # built once
    # Inside another jit: part of that program (a nested jit may not carry compiler options).
    inner = real_jit(lambda key: quick(key, 5))(jax.random.key(0))
    np.testing.assert_array_equal(inner, quick(jax.random.key(0), 5))

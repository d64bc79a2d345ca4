"""The demo entry point end to end, at a small size (a few steps per stage, 8 crops per photo, 2 samples per
class): PNGs, summary.json and TensorBoard logs are written, its held-out numbers agree with the training loop's
own evaluation and with the pre-encoded codes, and a second run resumes both stages from their checkpoints
(read from its log and its unchanged numbers) instead of training again."""
import glob
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from _xla_flags import xla_flags
from common_jax.metrics import image_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQ_STEPS, GPT_STEPS, PANORAMA, CROPS, PER_CLASS = 4, 3, 3, 8, 2
N_CLASSES, N_CODES = 10, 128

pytestmark = pytest.mark.slow


def _run_demo(workdir, log_path, cache_dir):
    # A user's laptop: one CPU device (no simulated device count). Both runs share a compilation cache, as a
    # user's JAX_COMPILATION_CACHE_DIR would: the second run's evals and sampling load instead of compiling.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TAMING_JAX_TRACEBACK")}
    env["XLA_FLAGS"] = xla_flags()
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "launch.demo", f"--workdir={workdir}",
                                 f"--vqgan_steps={VQ_STEPS}", f"--gpt_steps={GPT_STEPS}",
                                 f"--panorama_width={PANORAMA}", f"--crops_per_photo={CROPS}",
                                 f"--samples_per_class={PER_CLASS}"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(1500)
        finally:
            if proc.poll() is None:
                proc.kill()
    return rc, open(log_path).read(), time.monotonic() - t0


def _checkpoints(workdir):
    return {stage: sorted(os.listdir(os.path.join(workdir, stage, "checkpoints"))) for stage in ("vqgan", "gpt")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    workdir = str(root / "run")
    first = _run_demo(workdir, str(root / "first.log"), str(root / "jax_cache"))
    assert first[0] == 0, first[1][-4000:]
    summary_first = json.load(open(os.path.join(workdir, "summary.json")))
    checkpoints_first = _checkpoints(workdir)
    second = _run_demo(workdir, str(root / "second.log"), str(root / "jax_cache"))
    return workdir, first, second, summary_first, checkpoints_first


def _png(path):
    assert os.path.isfile(path), path
    return np.asarray(Image.open(path))


def _last_eval(log):
    """{metric: value} of the training loop's evaluations in the log (its metric writer's "[step] eval/x=v"
    lines), the last value of each."""
    out = {}
    for key, value in re.findall(r"eval/(\w+)=([-+\d.eE]+|nan|inf)", log):
        out[key] = float(value)
    return out


def _heldout_codes(workdir):
    """The pre-encoded codes of the held-out crops, as stage two wrote them (another code path than the demo's
    metrics, which encode the held-out images again)."""
    from common_jax import data as data_lib
    from transformer_jax import codes_dataset  # noqa: F401  (registers the codes format with the loader)
    data_dir = os.path.join(workdir, "data")
    names = [os.path.basename(p) for p in glob.glob(os.path.join(data_dir, "codes_*"))]
    assert len(names) == 1, names
    loader = data_lib.make_loader(data_dir, names[0], "validation", 32, train=False, image_size=None, seed=0,
                                  num_epochs=1)
    return np.concatenate([b["codes"][b["mask"]] for b in loader])


def test_demo_writes_images_summary_and_logs(demo):
    workdir, (_, log, seconds), _, summary, _ = demo
    print(f"\nfirst demo run: {seconds:.0f} s")
    h = w = 32
    grid = _png(os.path.join(workdir, "samples_per_class.png"))
    assert grid.shape == image_grid(np.zeros((N_CLASSES * PER_CLASS, h, w, 3), np.uint8), PER_CLASS).shape
    assert grid.std() > 0
    pano = _png(os.path.join(workdir, "panorama.png"))
    # Two training crops tall, PANORAMA crops wide: sliding-window sampling beyond the training size.
    assert pano.shape == (2 * h, PANORAMA * w, 3)
    assert _png(os.path.join(workdir, "vqgan", "images", f"reconstructions_{VQ_STEPS:08d}.png")).ndim == 3
    for stage in ("vqgan", "gpt"):
        assert glob.glob(os.path.join(workdir, stage, "events.out.tfevents*")), os.listdir(os.path.join(workdir, stage))
    s = summary["samples"]
    assert s["panorama_shape"] == [2 * h, PANORAMA * w]
    assert s["samples_per_class_png"] == "samples_per_class.png" and s["panorama_png"] == "panorama.png"
    assert 0 < summary["seconds"] <= seconds            # the demo's own clock, within the run the test timed
    assert f"step {VQ_STEPS}/{VQ_STEPS}" in log and f"step {GPT_STEPS}/{GPT_STEPS}" in log
    # NaN pixels warn when cast to uint8: class and null tokens drawn as image codes once decoded to NaN.
    assert "invalid value encountered" not in log


def test_demo_heldout_numbers_agree_with_the_loop_and_the_codes(demo):
    workdir, (_, log, _), _, summary, _ = demo
    v, g = summary["vqgan"], summary["gpt"]
    codes = _heldout_codes(workdir)
    # 10 photos x CROPS crops, a quarter of each photo's crops held out; one 8x8 code grid per held-out crop.
    assert v["heldout_images"] == N_CLASSES * round(CROPS / 4) == len(codes)
    assert codes.shape[1:] == (8, 8)
    # The loop evaluated the final weights of each stage on the same whole held-out set (one eval batch each).
    loop = _last_eval(log)
    np.testing.assert_allclose(v["heldout_l1"], loop["l1"], rtol=2e-5)
    np.testing.assert_allclose(v["heldout_psnr_db"], loop["psnr"], rtol=2e-5)
    np.testing.assert_allclose(g["heldout_nll_bits_per_token"], loop["nll_bits_per_token"], rtol=2e-5)
    # Codebook usage and unigram entropy of the held-out codes, from the codes stage two trained on.
    assert v["heldout_codebook_usage"] == len(np.unique(codes)) / N_CODES
    p = np.bincount(codes.reshape(-1), minlength=N_CODES) / codes.size
    np.testing.assert_allclose(g["heldout_unigram_entropy_bits"], -np.sum(p[p > 0] * np.log2(p[p > 0])), rtol=1e-6)


def test_second_run_resumes_without_training(demo):
    workdir, first, (rc, log, seconds), summary_first, checkpoints_first = demo
    print(f"\nsecond demo run: {seconds:.0f} s (first {first[2]:.0f} s)")
    assert rc == 0, log[-4000:]
    assert log.count("resumed from step") == 2, log[-4000:]
    assert f"resumed from step {VQ_STEPS} " in log and f"resumed from step {GPT_STEPS} " in log
    assert log.count("nothing to do") == 2
    assert "first step (incl. compilation)" not in log  # no train step ran
    assert "first step (incl. compilation)" in first[1]
    assert "pre-encoding" not in log and "pre-encoding" in first[1]  # codes are reused too
    assert _checkpoints(workdir) == checkpoints_first               # no checkpoint written or rotated
    # The resumed weights are the trained ones: every held-out number is reproduced.
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["vqgan"] == summary_first["vqgan"] and summary["gpt"] == summary_first["gpt"]

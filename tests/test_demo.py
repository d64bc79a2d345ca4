"""The demo entry point end to end (a few steps per stage): PNGs, summary.json and TensorBoard logs are written,
and a second run resumes both stages from their checkpoints instead of training again."""
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from common_jax.metrics import image_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQ_STEPS, GPT_STEPS, PANORAMA = 4, 3, 4


def _run_demo(workdir, log_path, cache_dir):
    # A user's laptop: one CPU device (no simulated device count). Both runs share a compilation cache, as a
    # user's JAX_COMPILATION_CACHE_DIR would: the second run's evals and sampling load instead of compiling.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TAMING_JAX_TRACEBACK")}
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "launch.demo", f"--workdir={workdir}",
                                 f"--vqgan_steps={VQ_STEPS}", f"--gpt_steps={GPT_STEPS}",
                                 f"--panorama_width={PANORAMA}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        try:
            rc = proc.wait(1500)
        finally:
            if proc.poll() is None:
                proc.kill()
    return rc, open(log_path).read(), time.monotonic() - t0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    workdir = str(root / "run")
    first = _run_demo(workdir, str(root / "first.log"), str(root / "jax_cache"))
    assert first[0] == 0, first[1][-4000:]
    summary_first = json.load(open(os.path.join(workdir, "summary.json")))
    second = _run_demo(workdir, str(root / "second.log"), str(root / "jax_cache"))
    return workdir, first, second, summary_first


def _png(path):
    assert os.path.isfile(path), path
    return np.asarray(Image.open(path))


def test_demo_writes_images_summary_and_logs(demo):
    workdir, (_, log, seconds), _, summary = demo
    print(f"\nfirst demo run: {seconds:.0f} s")
    h = w = 32
    grid = _png(os.path.join(workdir, "samples_per_class.png"))
    assert grid.shape == image_grid(np.zeros((80, h, w, 3), np.uint8), 8).shape  # 10 classes x 8 samples
    assert grid.std() > 0
    pano = _png(os.path.join(workdir, "panorama.png"))
    # Two training crops tall, PANORAMA crops wide: sliding-window sampling beyond the training size.
    assert pano.shape == (2 * h, PANORAMA * w, 3)
    assert pano.shape[1] / pano.shape[0] == PANORAMA / 2
    assert _png(os.path.join(workdir, "vqgan", "images", f"reconstructions_{VQ_STEPS:08d}.png")).ndim == 3
    for stage in ("vqgan", "gpt"):
        assert glob.glob(os.path.join(workdir, stage, "events.out.tfevents*")), os.listdir(os.path.join(workdir, stage))

    v, g, s = summary["vqgan"], summary["gpt"], summary["samples"]
    assert v["heldout_images"] > 0 and np.isfinite(v["heldout_psnr_db"]) and v["heldout_l1"] > 0
    assert 0 < v["heldout_codebook_usage"] <= 1
    assert np.isfinite(g["heldout_nll_bits_per_token"]) and g["heldout_nll_bits_per_token"] > 0
    assert 0 < g["heldout_unigram_entropy_bits"] <= np.log2(128)
    assert s["panorama_shape"] == [2 * h, PANORAMA * w]
    assert s["samples_per_class_png"] == "samples_per_class.png" and s["panorama_png"] == "panorama.png"
    assert summary["seconds"] > 0
    assert f"step {VQ_STEPS}/{VQ_STEPS}" in log and f"step {GPT_STEPS}/{GPT_STEPS}" in log
    # NaN pixels warn when cast to uint8: class and null tokens drawn as image codes once decoded to NaN.
    assert "invalid value encountered" not in log


def test_second_run_resumes_without_training(demo):
    workdir, first, (rc, log, seconds), _ = demo
    print(f"\nsecond demo run: {seconds:.0f} s (first {first[2]:.0f} s)")
    assert rc == 0, log[-4000:]
    assert log.count("resumed from step") == 2, log[-4000:]
    assert f"resumed from step {VQ_STEPS} " in log and f"resumed from step {GPT_STEPS} " in log
    assert log.count("nothing to do") == 2
    assert "first step (incl. compilation)" not in log  # no train step ran
    assert "first step (incl. compilation)" in first[1]
    assert "pre-encoding" not in log and "pre-encoding" in first[1]  # codes are reused too
    assert seconds < 0.8 * first[2], (seconds, first[2])
    assert json.load(open(os.path.join(workdir, "summary.json")))["vqgan"]["heldout_images"] > 0

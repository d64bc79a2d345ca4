"""launch.eval_fid end to end: both modes on tiny models and real photographs, JSON result, resume by chunk."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats

from common_jax import checkpoint as ckpt
from common_jax.config_utils import config_to_dict
from common_jax.datasets import prepare_builtin_photos
from common_jax.training import jit_init
from configs import transformer_tiny, vqgan_tiny
from launch.convert_inception import convert_state_dict
from _stage_main import cache_env
from _xla_flags import xla_flags
from processes import free_port, run_all
from seeded_weights import golden, seeded_array
from transformer_jax.train import TransformerTask
from vqgan_jax.train import VQGANTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow   # every test runs launch.eval_fid in one or two subprocesses


def write_workdir(task, config, path, seed=0):
    """A workdir holding an (untrained) initial state, as a finished run would leave it."""
    manager = ckpt.make_manager(path, async_save=False)
    ckpt.save(manager, 1, jit_init(task.init_state)(jax.random.key(seed)), {"config": config_to_dict(config)}, None,
              force=True)
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fid")
    sd, _, _ = golden("inception_fid_small")
    sd["fc.weight"] = seeded_array("fc.weight", (1008, 2048), "linear", 0)
    sd["fc.bias"] = seeded_array("fc.bias", (1008,), "bias", 0)
    convert_state_dict(sd, str(tmp / "inception.npz"))
    info = prepare_builtin_photos(tmp / "data", crop_size=32, crops_per_photo=8)
    vq = vqgan_tiny.get_config()
    vq.loss.disc_num_layers = 2
    write_workdir(VQGANTask(vq), vq, str(tmp / "vq"))
    gpt = transformer_tiny.get_config()
    gpt.first_stage.workdir = str(tmp / "vq")
    write_workdir(TransformerTask(gpt), gpt, str(tmp / "gpt"))
    return tmp, info.name


def run(args, tmp, returncode=0):
    # The runs share a compilation cache: both modes embed 32 px images with the same InceptionV3 program.
    env = dict(cache_env(str(tmp / "jax_cache")), XLA_FLAGS=xla_flags(), TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.run([sys.executable, "-m", "launch.eval_fid", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == returncode, p.stderr[-3000:]
    return p


# launch.eval_fid with sampling made impossible: a run that reaches Sampler.sample stops with this marker, so a
# refusal seen instead happened before any sampling.
NO_SAMPLING = ("import runpy, sys; import transformer_jax.sampler as s; "
               "s.Sampler.sample = lambda *a, **k: sys.exit('SAMPLED'); "
               "runpy.run_module('launch.eval_fid', run_name='__main__', alter_sys=True)")


def run_refused(args):
    """(last stderr line) of a launch.eval_fid run that must be refused before any sampling."""
    p = subprocess.run([sys.executable, "-c", NO_SAMPLING, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, XLA_FLAGS=xla_flags(), TF_CPP_MIN_LOG_LEVEL="3"))
    assert "SAMPLED" not in p.stderr and p.returncode == 1, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), p.stderr[-3000:]
    return last


def saved_stats(path, name):
    """(mu, sigma) of stream ``name`` of a resumable state file, from its float64 sums."""
    z = np.load(path)
    n, total, outer = float(z[f"{name}/count"]), z[f"{name}/sum"], z[f"{name}/outer"]
    mu = total / n
    return mu, (outer - n * np.outer(mu, mu)) / (n - 1)


def scipy_fid(mu1, s1, mu2, s2):
    """pytorch-fid's formula (scipy.linalg.sqrtm of S1 S2), written independently of common_jax.fid, within the
    span of both covariances: a few images in 2048 dimensions leave S1 S2 singular, where sqrtm of the full product
    is unreliable, and tr sqrt(S1 S2) is unchanged by the restriction."""
    w, v = np.linalg.eigh(s1 + s2)
    q = v[:, w > w.max() * 1e-10]
    covmean = scipy.linalg.sqrtm((q.T @ s1 @ q) @ (q.T @ s2 @ q))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def assert_fid_matches_scipy(fid, fake, real):
    # float64 statistics throughout: agreement to 1e-6 of the traces, the largest terms of the sum
    (mu1, s1), (mu2, s2) = fake, real
    assert abs(fid - scipy_fid(mu1, s1, mu2, s2)) <= 1e-6 * (np.trace(s1) + np.trace(s2)), fid


def scipy_inception_score(logits, splits=10):
    """exp(E KL(p(y|x) || p(y))) per split, mean over splits, with scipy's softmax and entropy."""
    scores = []
    for part in np.array_split(np.asarray(logits, np.float64), splits):
        p = scipy.special.softmax(part, axis=1)
        scores.append(np.exp(scipy.stats.entropy(p, p.mean(axis=0)[None, :], axis=1).mean()))
    return float(np.mean(scores))


def test_samples_mode_writes_json_and_resumes(setup):
    tmp, name = setup
    args = ["--mode=samples", f"--workdir={tmp}/fid_s", f"--transformer_workdir={tmp}/gpt",
            f"--inception_weights={tmp}/inception.npz", f"--data_dir={tmp}/data", f"--dataset={name}",
            "--image_size=32", "--per_class=2", "--chunk_size=8", "--batch_size=8", "--top_k=10",
            "--save_images"]
    run(args, tmp)
    out = tmp / "fid_s"
    result = json.loads((out / "fid_samples.json").read_text())
    assert result["num_samples"] == 20 and result["reference"] == f"{name}/validation (20 images)"
    fake = saved_stats(out / "samples_state.npz", "fake")
    assert_fid_matches_scipy(result["fid"], fake, saved_stats(out / "ref_stats_validation_state.npz", "real"))
    chunks = sorted((out / "sample_chunks").glob("chunk_*.npz"))
    assert len(chunks) == 3
    logits = np.concatenate([np.load(c)["logits"] for c in chunks])
    assert logits.shape == (20, 1008)
    np.testing.assert_allclose(result["inception_score"], scipy_inception_score(logits), rtol=1e-9)
    arr = np.load(out / "samples_arr_0.npz")
    assert arr["arr_0"].shape == (20, 32, 32, 3) and arr["arr_0"].dtype == np.uint8
    # Against the training split: the samples are reused (every chunk is done), the reference statistics are
    # those of the train images, cached apart from the validation ones.
    written = {c.name: c.stat().st_mtime_ns for c in chunks}
    validation_cache = (out / "ref_stats_validation_state.npz").read_bytes()
    run(args + ["--split=train", "--max_examples=8"], tmp)
    again = json.loads((out / "fid_samples.json").read_text())
    assert again["num_samples"] == 20 and again["reference"] == f"{name}/train (8 images)"
    assert {c.name: c.stat().st_mtime_ns for c in chunks} == written
    assert (out / "ref_stats_validation_state.npz").read_bytes() == validation_cache
    assert_fid_matches_scipy(again["fid"], fake, saved_stats(out / "ref_stats_train_state.npz", "real"))
    # Other sampling options in the same workdir are refused before any sampling, and the saved sums are kept.
    saved = (tmp / "fid_s" / "samples_state.npz").read_bytes()
    p = subprocess.run([sys.executable, "-m", "launch.eval_fid", *[a for a in args if a != "--top_k=10"],
                        "--top_k=20"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, XLA_FLAGS=xla_flags()))
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "samples_state.npz holds 3 chunks of another evaluation" in last, last
    assert "'top_k': 10" in last and "'top_k': 20" in last, last
    assert (tmp / "fid_s" / "samples_state.npz").read_bytes() == saved


def reconstruction_args(tmp, name, workdir, inception="inception.npz"):
    return ["--mode=reconstruction", f"--workdir={workdir}", f"--vqgan_workdir={tmp}/vq",
            f"--inception_weights={tmp}/{inception}", f"--data_dir={tmp}/data", f"--dataset={name}",
            "--image_size=32", "--chunk_size=8", "--batch_size=8", "--max_examples=12"]


def two_processes(per_process_args, tmp):
    """Run launch.eval_fid as two JAX processes on loopback (gloo), one argument list each; (rc, output) each."""
    port = free_port()
    env = dict(cache_env(str(tmp / "jax_cache")), XLA_FLAGS=xla_flags(), TF_CPP_MIN_LOG_LEVEL="3",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    return run_all([([sys.executable, "-m", "launch.eval_fid", *args], dict(env, JAX_PROCESS_ID=str(i)))
                    for i, args in enumerate(per_process_args)],
                   [tmp / f"eval_fid_p{i}.log" for i in range(2)], timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def reconstruction(setup):
    tmp, name = setup
    run(reconstruction_args(tmp, name, tmp / "fid_r"), tmp)
    return json.loads((tmp / "fid_r" / "fid_reconstruction.json").read_text())


def test_reconstruction_mode(setup, reconstruction):
    # 12 of the 20 held-out images, rounded up to whole batches of 8 (the samples test reads all 20).
    tmp, _ = setup
    assert reconstruction["num_images"] == 16
    state = tmp / "fid_r" / "reconstruction_state.npz"
    assert_fid_matches_scipy(reconstruction["rfid"], saved_stats(state, "recon"), saved_stats(state, "real"))


def test_two_processes_share_the_images_and_match_one_process(setup, reconstruction):
    tmp, name = setup
    results = two_processes([reconstruction_args(tmp, name, tmp / "fid_r2")] * 2, tmp)
    for rc, out in results:
        assert rc == 0, out[-3000:]
    two = json.loads((tmp / "fid_r2" / "fid_reconstruction.json").read_text())
    # One global batch of 16 (8 a process) holds the same 16 images as the one process's two batches of 8.
    assert two["num_images"] == reconstruction["num_images"] == 16
    one_state, two_state = (np.load(tmp / d / "reconstruction_state.npz") for d in ("fid_r", "fid_r2"))
    for k in ("real/sum", "real/outer", "recon/sum", "recon/outer"):
        np.testing.assert_allclose(two_state[k], one_state[k], rtol=1e-5, atol=1e-8, err_msg=k)
    np.testing.assert_allclose(two["rfid"], reconstruction["rfid"], rtol=1e-4)


def test_processes_that_loaded_other_inception_weights_refuse(setup):
    # Each host reads --inception_weights from its own disk: a copy that differs would mix two networks'
    # features in one FID. Both processes refuse before any work, naming the one that differs.
    tmp, name = setup
    weights = dict(np.load(tmp / "inception.npz"))
    first = next(k for k, v in weights.items() if v.dtype.kind == "f")
    weights[first] = weights[first] * 1.01
    np.savez(tmp / "inception_other.npz", **weights)
    results = two_processes([reconstruction_args(tmp, name, tmp / "fid_refused"),
                             reconstruction_args(tmp, name, tmp / "fid_refused", "inception_other.npz")], tmp)
    for rc, out in results:
        assert rc == 1, out[-3000:]
        assert ("the weights of --inception_weights differ between processes: process 1 loaded other ones than "
                "process 0; give every host identical copies") in out, out[-3000:]
    assert not (tmp / "fid_refused" / "reconstruction_state.npz").exists()


def test_processes_that_loaded_another_transformer_refuse(setup):
    # The same for the models: a host copy of --transformer_workdir holding other weights.
    tmp, name = setup
    gpt = transformer_tiny.get_config()
    gpt.first_stage.workdir = str(tmp / "vq")
    write_workdir(TransformerTask(gpt), gpt, str(tmp / "gpt_other"), seed=1)

    def args(gpt_dir):
        return ["--mode=samples", f"--workdir={tmp}/fid_refused_s", f"--transformer_workdir={gpt_dir}",
                f"--inception_weights={tmp}/inception.npz", f"--data_dir={tmp}/data", f"--dataset={name}",
                "--image_size=32", "--per_class=1"]
    results = two_processes([args(tmp / "gpt"), args(tmp / "gpt_other")], tmp)
    for rc, out in results:
        assert rc == 1, out[-3000:]
        assert ("the weights of --transformer_workdir differ between processes: process 1 loaded other ones than "
                "process 0") in out, out[-3000:]
    assert not (tmp / "fid_refused_s" / "samples_state.npz").exists()


def test_missing_inception_weights_is_one_line(setup, tmp_path):
    tmp, name = setup
    p = subprocess.run([sys.executable, "-m", "launch.eval_fid", "--mode=reconstruction",
                        f"--workdir={tmp_path}", f"--vqgan_workdir={tmp}/vq",
                        f"--inception_weights={tmp_path}/none.npz", f"--data_dir={tmp}/data",
                        f"--dataset={name}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, XLA_FLAGS=xla_flags()))
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "none.npz" in last, p.stderr[-2000:]


def test_guidance_on_a_model_without_condition_dropout_fails_before_any_work(setup, tmp_path):
    tmp, name = setup
    gpt = transformer_tiny.get_config()
    gpt.first_stage.workdir = str(tmp / "vq")
    gpt.cond.cfg_dropout = 0.0
    write_workdir(TransformerTask(gpt), gpt, str(tmp_path / "gpt"))
    p = subprocess.run([sys.executable, "-m", "launch.eval_fid", "--mode=samples", f"--workdir={tmp_path}/fid",
                        f"--transformer_workdir={tmp_path}/gpt", f"--inception_weights={tmp}/inception.npz",
                        f"--data_dir={tmp}/data", f"--dataset={name}", "--guidance_scale=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, XLA_FLAGS=xla_flags()))
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "cond.cfg_dropout=0.0" in last, p.stderr[-2000:]
    assert not list((tmp_path / "fid").glob("ref_stats_*"))   # checked before the reference statistics


def refused_args(tmp, name, workdir, ref_stats):
    return ["--mode=samples", f"--workdir={workdir}", f"--transformer_workdir={tmp}/gpt",
            f"--inception_weights={tmp}/inception.npz", f"--data_dir={tmp}/data", f"--dataset={name}",
            "--image_size=32", "--per_class=1", f"--ref_stats={ref_stats}"]


def test_ref_stats_that_are_not_an_npz_are_refused_before_any_sampling(setup, tmp_path):
    # A pickle: numpy's own error names no file and suggests loading it unsafely.
    import pickle
    tmp, name = setup
    bad = tmp_path / "stats.pkl"
    bad.write_bytes(pickle.dumps({"mu": np.zeros(2048)}))
    last = run_refused(refused_args(tmp, name, tmp_path / "fid", bad))
    assert f"--ref_stats {bad} is not an .npz archive (it holds pickled Python objects" in last, last
    assert "allow_pickle" not in last
    assert not (tmp_path / "fid" / "samples_state.npz").exists()


def test_ref_stats_of_another_dimension_are_refused_before_any_sampling(setup, tmp_path):
    tmp, name = setup
    small = tmp_path / "stats64.npz"
    np.savez(small, mu=np.zeros(64), sigma=np.eye(64))
    last = run_refused(refused_args(tmp, name, tmp_path / "fid", small))
    assert f"--ref_stats {small}: 'mu' has shape (64,), expected (2048,)" in last, last
    assert not (tmp_path / "fid" / "samples_state.npz").exists()
    assert not (tmp_path / "fid" / "sample_chunks").exists()

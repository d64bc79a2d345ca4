"""Both stages over two real JAX processes (jax.distributed on 127.0.0.1, 2 CPU devices each, gloo):
SIGKILL mid-run after the first checkpoint, restart of both processes, and the resumed final state equal
to one process with the same 4 devices on the same global batches. Plus syntax and no-hard-coded-values
checks of the launch scripts.

One module fixture runs, in tests/_multihost_main.py processes:
  1. two processes: stage one, blocked after step 3 (checkpoint 2 written) -> SIGKILL process 1, then 0;
  2. two processes: stage one resumes from 2 and ends at 4; stage two (pre-encoding the photos with that
     VQGAN, each process its shard) blocks after step 3 -> SIGKILL process 0 (the coordinator), then 1;
  3. two processes: stage two resumes from 2 and ends at 4, with the default writers (TensorBoard on process 0;
     the other launches log to the console only);
  4. one process, 4 devices: both stages uninterrupted on the same photos; stage two reads the codes the
     two processes wrote, and the photos are also encoded again by this one process for comparison;
     alongside, the same on 1 device: how far two correct runs differ by float summation order alone.

Comparison: every state leaf within 1e-5 (norm-wise relative) of the 4-device reference, or, where the two
correct references already differ by more (leaves whose gradient is zero in exact arithmetic, such as
attention key biases and conv biases feeding a one-channel-per-group GroupNorm, and small-gradient biases
and Adam moments of the VQGAN, whose first Adam steps magnify rounding), within a few times that
difference; and all parameters together within 1e-4, well below what one step changes.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from processes import free_port
from _xla_flags import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MAIN = os.path.join(HERE, "_multihost_main.py")
TIMEOUT = 480      # seconds per launch (generous: other jobs may load the machine)
RTOL = 1e-5        # float reductions may group differently across processes
NOISE_FACTOR = 4   # allowed multiple of the 4-device vs 1-device reference difference
GLOBAL_RTOL = 1e-4  # all parameters together


class Launch:
    """``n`` processes of _multihost_main.py (one process: 4 devices; several: 2 devices each).

    Several processes share ``cache``, a persistent compilation cache, so later launches skip the compiles
    of earlier ones. A program's cache key is the same in every process (measured), so a later launch's
    processes find the same entries; within a launch an entry appears only once a peer has compiled it, so
    a process that loads it is behind that peer anyway. That matters because gloo gives up when processes
    reach a collective more than 30 s apart, as when one compiles while the other has loaded. (JAX's
    jax_share_binary_between_hosts, one process compiling for all, times out in gloo on CPU here, even
    with a warm cache.)
    The one-process references keep the environment's cache (the suite run's, tests/conftest.py), if any.
    """

    def __init__(self, tag: str, root, n: int, *args: str, devices: int = 4, cache=None):
        self.logs = [f"{root}.{tag}.{i}.log" for i in range(n)]
        port = free_port()
        env = dict(os.environ)
        env["XLA_FLAGS"] = xla_flags()   # the script sets its own device count
        if n > 1 and cache is not None:
            env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        self.procs = []
        for i in range(n):
            dist = ["--num-processes", str(n), "--process-id", str(i), "--coordinator",
                    f"127.0.0.1:{port}", "--devices", "2"] if n > 1 else ["--devices", str(devices)]
            with open(self.logs[i], "w") as log:  # files, not pipes: a full pipe would stall the process
                self.procs.append(subprocess.Popen(
                    [sys.executable, MAIN, str(root), *dist, *args],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO))

    def log(self, i: int) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def tails(self) -> str:
        return "\n".join(f"--- process {i} (rc {p.poll()}):\n{self.log(i)[-3000:]}"
                         for i, p in enumerate(self.procs))

    def wait_for(self, ready, what: str) -> None:
        """Poll until ``ready()``; fail with the logs if a process exits first or time runs out."""
        end = time.monotonic() + TIMEOUT
        while not ready():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > end:
                self.kill_all()
                pytest.fail(f"waiting for {what}: a process exited or time ran out\n{self.tails()}")
            time.sleep(0.5)

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(30)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)

    def finish(self) -> list[str]:
        try:
            for p in self.procs:
                p.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"timed out\n{self.tails()}")
        for p in self.procs:
            assert p.returncode == 0, self.tails()
        return [self.log(i) for i in range(len(self.procs))]


def _killed_after_checkpoint(launch: Launch, workdir: str, first_victim: int) -> None:
    """Both processes blocked after step 3 with checkpoint 2 complete: SIGKILL one, then the other (its
    peer is gone, so it could only hang or abort; a job scheduler restarts the whole job)."""
    ckpt2 = os.path.join(workdir, "checkpoints", "2")
    launch.wait_for(lambda: all(os.path.exists(os.path.join(workdir, f"hanging.{i}")) for i in range(2))
                    and os.path.isdir(ckpt2), f"both processes blocked after step 3 in {workdir}")
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "4"))
    launch.kill(first_victim)
    launch.kill_all()
    for i in range(2):
        os.remove(os.path.join(workdir, f"hanging.{i}"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    root, ref, ref1 = base / "mh", base / "ref", base / "ref1"
    timings, launches = {}, []

    def start(*args, **kwargs) -> Launch:
        launches.append(Launch(*args, **kwargs, cache=base / "jax_cache"))
        return launches[-1]

    try:
        t = time.monotonic()
        _killed_after_checkpoint(start("1", root, 2, "--hang", "vq:3"), str(root / "vq"), first_victim=1)
        data_item_vq = json.load(open(root / "vq" / "checkpoints" / "2" / "data" / "metadata"))
        timings["launch 1"] = time.monotonic() - t

        t = time.monotonic()
        second = start("2", root, 2, "--hang", "gpt:3")
        _killed_after_checkpoint(second, str(root / "gpt"), first_victim=0)
        logs_second = [second.log(i) for i in range(2)]
        data_item_gpt = json.load(open(root / "gpt" / "checkpoints" / "2" / "data" / "metadata"))
        timings["launch 2"] = time.monotonic() - t

        t = time.monotonic()
        logs_third = start("3", root, 2, "--stages", "gpt", "--tensorboard").finish()
        timings["launch 3"] = time.monotonic() - t

        t = time.monotonic()
        refs = [start("ref", ref, 1, "--ref", "--data", str(root / "data"), "--stages", "vq,gpt,codes",
                      "--first-stage", str(root / "vq")),
                start("ref1", ref1, 1, "--ref", "--data", str(root / "data"), devices=1)]
        for r in refs:
            r.finish()
        timings["references"] = time.monotonic() - t
    finally:
        for launch in launches:  # nothing outlives a failed fixture
            launch.kill_all()
    print("multihost timings (s):", {k: round(v, 1) for k, v in timings.items()})
    yield dict(root=root, ref=ref, ref1=ref1, logs_second=logs_second, logs_third=logs_third,
               data_item_vq=data_item_vq, data_item_gpt=data_item_gpt)
    shutil.rmtree(base, ignore_errors=True)


def _state(path) -> dict:
    return {k: v.astype(np.float64) for k, v in np.load(path).items()}


def _assert_matches_reference(got: dict, ref: dict, ref_other: dict) -> list:
    """Every leaf within RTOL of ``ref`` (norm-wise), or within NOISE_FACTOR x |ref - ref_other| where
    that is larger (rounding-noise leaves); returns the leaves that needed the noise allowance."""
    assert sorted(got) == sorted(ref) == sorted(ref_other)
    noisy = []
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        diff = np.linalg.norm(got[k] - ref[k])
        scale, floor = np.linalg.norm(ref[k]), np.linalg.norm(ref_other[k] - ref[k])
        assert diff <= RTOL * scale + NOISE_FACTOR * floor, (
            f"{k}: |two processes - one process| = {diff:.3g}, |reference| = {scale:.3g}, "
            f"|4-device - 1-device reference| = {floor:.3g}")
        if diff > RTOL * scale:
            noisy.append(k)
    return noisy


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vq", "gpt"])
def test_resumed_two_process_run_matches_one_process(runs, stage):
    done = json.load(open(runs["root"] / stage / "done.json"))
    assert done == {"step": 4, "preempted": False, "process_count": 2, "device_count": 4}
    for ref, devices in (("ref", 4), ("ref1", 1)):
        ref_done = json.load(open(runs[ref] / stage / "done.json"))
        assert ref_done == {"step": 4, "preempted": False, "process_count": 1, "device_count": devices}
    got = _state(runs["root"] / stage / "final_state.npz")
    noisy = _assert_matches_reference(got, _state(runs["ref"] / stage / "final_state.npz"),
                                      _state(runs["ref1"] / stage / "final_state.npz"))
    # The noise allowance must stay noise: over all parameters together, both the two-process run and the
    # 1-device reference are far closer to the 4-device reference than one optimisation step moves them
    # (a step changes them by ~1e-3 relative here), so a wrong batch, rng or update could not pass.
    params = [k for k in got if k.startswith(".params[")]
    flat = lambda s: np.concatenate([s[k].ravel() for k in params])
    ref, ref1 = flat(_state(runs["ref"] / stage / "final_state.npz")), flat(
        _state(runs["ref1"] / stage / "final_state.npz"))
    for other in (flat(got), ref1):
        assert np.linalg.norm(other - ref) <= GLOBAL_RTOL * np.linalg.norm(ref)
    print(f"{stage}: {len(noisy)} of {len(got)} leaves within the noise allowance only")


@pytest.mark.slow
def test_both_processes_resumed_from_the_checkpoint(runs):
    for out in runs["logs_second"]:
        assert re.search(r"resumed from step 2 of \S*/mh/vq/checkpoints", out), out[-2000:]
    for out in runs["logs_third"]:
        assert re.search(r"resumed from step 2 of \S*/mh/gpt/checkpoints", out), out[-2000:]


@pytest.mark.slow
def test_eval_and_images_ran_across_processes(runs):
    """The end-of-run eval (sharded, masked) and the image grid ran in the two-process runs; every process
    logs the same (global) eval numbers, with console-only writers (second launch) and with the default
    writers: TensorBoard on process 0, logging elsewhere (third launch)."""
    for logs, key in ((runs["logs_second"], "eval/psnr="), (runs["logs_third"], "eval/nll_bits_per_token=")):
        lines = [[ln for ln in out.splitlines() if key in ln] for out in logs]
        assert lines[0] and lines[0] == lines[1], lines
    assert (runs["root"] / "vq" / "images" / "reconstructions_00000004.png").is_file()
    assert not list((runs["root"] / "vq").glob("events.out.tfevents*"))
    assert list((runs["root"] / "gpt").glob("events.out.tfevents*"))
    # Only process 0 imports TensorFlow for its TensorBoard writer; the others log through a writer that needs none.
    for i, out in enumerate(runs["logs_third"]):
        assert f"(tensorflow imported: {i == 0})" in out, (i, out[-2000:])


@pytest.mark.slow
def test_checkpoint_holds_each_process_data_position(runs):
    for item in (runs["data_item_vq"], runs["data_item_gpt"]):
        assert item["process_count"] == 2
        assert {item[str(i)]["next_batch"] for i in range(2)} == {2}
        assert item["0"]["global_batch_size"] == item["1"]["global_batch_size"] == 8


def _codes_dirs(runs):
    (mh,) = [d for d in os.listdir(runs["root"] / "data") if d.startswith("codes_")]
    (one,) = [d for d in os.listdir(runs["ref"] / "codes") if d.startswith("codes_")]
    return runs["root"] / "data" / mh, runs["ref"] / "codes" / one


def _read_codes(path, split):
    from transformer_jax.codes_dataset import read_codes
    src = read_codes(path.parent, path.name, split)
    return [src[i] for i in range(len(src))]


@pytest.mark.slow
def test_pre_encoding_splits_the_work_and_loses_nothing(runs):
    mh, one = _codes_dirs(runs)
    assert mh.name == one.name  # same stage-one weights -> same fingerprint -> same dataset name
    assert sorted(f for f in os.listdir(mh) if f.endswith(".json")) == [
        "train-00000-of-00002.json", "train-00001-of-00002.json",
        "validation-00000-of-00002.json", "validation-00001-of-00002.json"]
    for split in ("train", "validation"):
        key = lambda ex: (int(ex["label"]), ex["codes"].tobytes())
        got, want = _read_codes(mh, split), _read_codes(one, split)
        assert len(got) == len(want) == {"train": 80, "validation": 20}[split]
        assert sorted(map(key, got)) == sorted(map(key, want)), split


@pytest.mark.slow
def test_stage_one_workdir_loads_in_another_process_layout(runs):
    path = runs["ref"] / "codes" / "load_workdir_error.txt"
    assert not path.exists(), path.read_text()[:500]


@pytest.mark.slow
def test_pre_encoded_order_does_not_depend_on_process_count(runs):
    mh, one = _codes_dirs(runs)
    got, want = _read_codes(mh, "train"), _read_codes(one, "train")
    assert [int(e["label"]) for e in got] == [int(e["label"]) for e in want]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["codes"], w["codes"])


# ------------------------------------------------------------------------------------- launch scripts
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = [os.path.join(LAUNCH, n) for n in ("tpu_pod.sh", "slurm_gpu.sbatch", "slurm_gpu.sh")]
FAKE = """#!/usr/bin/env bash
# Records its arguments (NUL-separated) and working directory, numbered by call order.
n=$(ls "$FAKE_LOG" | wc -l)
{ printf '%s\\0' "$(basename "$0")" "$PWD" "$@"; } > "$FAKE_LOG/$(printf %03d "$n")"
"""


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_launch_script_syntax(path):
    assert os.path.isfile(path), path
    out = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_launch_script_hard_codes_no_site(path):
    text = open(path).read()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    # No fixed GCP project/zone/bucket, home or scratch paths, or SLURM partition/account: all come from variables.
    for pattern in (r"--project[= ]['\"]?[a-z]", r"--zone[= ]['\"]?[a-z]", r"\b[a-z]+-[a-z]+\d+-[a-f]\b",
                    r"gs://\w", r"/home/\w", r"/scratch/\w", r"/(?:mnt|data|shared)/\w",
                    r"--partition[= ]['\"]?\w", r"--account[= ]['\"]?\w", r"--time[= ]['\"]?\d"):
        assert not re.search(pattern, code), (path, pattern, re.search(pattern, code).group(0))
    assert not re.search(r"#SBATCH\s+--(partition|account|time|nodes|gres|gpus)", text), path


def _fake_bin(tmp_path, *names):
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "calls").mkdir(exist_ok=True)
    for name in names:
        body = FAKE
        if name == "srun":  # after recording, run the task command (the trailing `bash -c ...`) once
            body += 'exec "${@: -3}"\n'
        (tmp_path / "bin" / name).write_text(body)
        (tmp_path / "bin" / name).chmod(0o755)
    return dict(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls"),
                HOME=os.environ.get("HOME", "/tmp"))


def _calls(tmp_path):
    out = []
    for f in sorted(os.listdir(tmp_path / "calls")):
        name, cwd, *args = (tmp_path / "calls" / f).read_bytes().decode().split("\0")[:-1]
        out.append((name, cwd, args))
    return out


def _run(script, env, *args):
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_tpu_pod_script_runs_the_entry_point_on_all_workers(tmp_path):
    env = _fake_bin(tmp_path, "gcloud")
    env.update(TPU_NAME="tpu-x", ZONE="zone-x", PROJECT="proj-x", CREATE="1", ACCELERATOR_TYPE="v9-64",
               RUNTIME_VERSION="rt-x", REPO_URL="https://example.invalid/taming-jax.git", BRANCH="dev",
               STAGE="transformer", CONFIG="configs/transformer_tiny.py", WORKDIR="gs://bkt/runs/gpt",
               DATA_DIR="/nfs/data x", FIRST_STAGE="gs://bkt/runs/vq")
    out = _run("tpu_pod.sh", env, "--config.mesh.fsdp=4", "--config.seed=1")
    assert out.returncode == 0, out.stderr
    (create, setup, train) = [args for name, _, args in _calls(tmp_path)]
    assert create[:4] == ["compute", "tpus", "tpu-vm", "create"] and "tpu-x" in create
    assert {"--zone=zone-x", "--project=proj-x", "--accelerator-type=v9-64", "--version=rt-x"} <= set(create)
    for ssh in (setup, train):
        assert ssh[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "tpu-x" in ssh
        assert {"--worker=all", "--zone=zone-x", "--project=proj-x"} <= set(ssh)
        (command,) = [a[len("--command="):] for a in ssh if a.startswith("--command=")]
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, (command, check.stderr)
        if ssh is setup:
            assert "git clone --quiet --branch dev https://example.invalid/taming-jax.git" in command
            assert "pip install --quiet -e ." in command
    assert "gcsfuse --implicit-dirs bkt" in command
    line = command.splitlines()[-1]
    assert line.startswith("python -m launch.train_transformer ")
    for flag in ('"--workdir=$HOME/gcs/bkt/runs/gpt"', '"--config.first_stage.workdir=$HOME/gcs/bkt/runs/vq"',
                 r"--config.data.data_dir=/nfs/data\ x", "--config=configs/transformer_tiny.py",
                 "--multihost=on", "--config.mesh.fsdp=4", "--config.seed=1"):
        assert flag in line, (flag, line)


def test_tpu_pod_script_errors_name_the_variable(tmp_path):
    env = _fake_bin(tmp_path, "gcloud")
    out = _run("tpu_pod.sh", env)
    assert out.returncode == 2 and "TPU_NAME is not set" in out.stderr, out.stderr
    env.update(TPU_NAME="t", ZONE="z", ACTION="train", STAGE="vq", CONFIG="c.py", WORKDIR="/w")
    out = _run("tpu_pod.sh", env)
    assert out.returncode == 2 and "STAGE must be vqgan or transformer, got 'vq'" in out.stderr, out.stderr
    env.update(ACTION="create")
    out = _run("tpu_pod.sh", env)
    assert out.returncode == 2 and "ACCELERATOR_TYPE is not set" in out.stderr, out.stderr
    assert _calls(tmp_path) == []


def test_slurm_scripts_submit_and_start_one_process_per_gpu(tmp_path):
    env = _fake_bin(tmp_path, "sbatch", "srun", "python")
    env.update(NODES="2", GPUS_PER_NODE="4", PARTITION="part-x", ACCOUNT="acct-x", TIME="2:00:00",
               STAGE="vqgan", CONFIG="configs/vqgan_tiny.py", WORKDIR=str(tmp_path / "run dir"))
    out = _run("slurm_gpu.sh", env, "--config.seed=2")
    assert out.returncode == 0, out.stderr
    ((name, _, sbatch),) = _calls(tmp_path)
    assert name == "sbatch" and sbatch[-2:] == [os.path.join(LAUNCH, "slurm_gpu.sbatch"), "--config.seed=2"]
    assert {"--nodes=2", "--ntasks-per-node=4", "--gres=gpu:4", "--partition=part-x", "--account=acct-x",
            "--time=2:00:00", "--export=ALL"} <= set(sbatch)

    # The batch script as SLURM would run it (its environment exported by sbatch).
    shutil.rmtree(tmp_path / "calls")
    env = _fake_bin(tmp_path, "srun", "python")
    venv = tmp_path / "venv x"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export ACTIVATED=1\n")
    env.update(SLURM_SUBMIT_DIR=REPO, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="4(x2)",
               SLURM_JOB_ID="123", STAGE="vqgan", CONFIG="configs/vqgan_tiny.py",
               WORKDIR=str(tmp_path / "run dir"), VENV=str(venv))
    out = _run("slurm_gpu.sbatch", env, "--config.seed=2")
    assert out.returncode == 0, out.stderr
    (srun, python) = _calls(tmp_path)
    assert srun[0] == "srun" and {"--nodes=2", "--ntasks-per-node=4", "--kill-on-bad-exit=1"} <= set(srun[2])
    assert python[0] == "python" and python[1] == REPO
    assert python[2] == ["-m", "launch.train_vqgan", "--config=configs/vqgan_tiny.py",
                         f"--workdir={tmp_path / 'run dir'}", "--multihost=auto", "--config.seed=2"]


def test_slurm_script_errors_name_the_variable(tmp_path):
    env = _fake_bin(tmp_path, "sbatch", "srun")
    out = _run("slurm_gpu.sh", env)
    assert out.returncode == 2 and "GPUS_PER_NODE is not set" in out.stderr, out.stderr
    env.update(STAGE="vqgan", CONFIG="c.py", WORKDIR="/w", SLURM_SUBMIT_DIR=str(tmp_path))
    out = _run("slurm_gpu.sbatch", env)
    assert out.returncode == 2 and "GPUS_PER_NODE is not set" in out.stderr, out.stderr
    env.update(GPUS_PER_NODE="2")
    out = _run("slurm_gpu.sbatch", env)
    assert out.returncode == 2 and "is not a taming-jax checkout" in out.stderr, out.stderr
    assert _calls(tmp_path) == []

"""Bad invocations of the command-line entry points: each exits non-zero and says what is wrong in one line
(no traceback). All invocations run as parallel subprocesses started once for the module."""
import os
import re
import subprocess
import sys

import pytest

import _stage_main as stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's own flag-parsing errors end with this fixed hint; it is part of absl's one-error format.
ABSL_HINT = "Pass --helpshort or --helpfull to see help on flags."
# absl Python log lines (I1126 14:23:04.46 ...) and C++ ones from TensorFlow (I0000 00:00:1795702984.92 ...)
LOG_LINE = re.compile(r"^([IWE]\d{4} \d\d:\d\d:\d+\.\d+ |WARNING: All log messages before absl::InitializeLog)")


def _cases(tmp):
    """name -> (argv after `python -m`, what the one error line must contain)."""
    blocker = os.path.join(tmp, "a_file")
    with open(blocker, "w") as f:
        f.write("not a folder")
    w = os.path.join(tmp, "w")
    return {
        # A workdir that cannot be created, even by root: its parent is a regular file.
        "workdir_under_file": (["launch.train_vqgan", f"--workdir={blocker}/sub"],
                               [f"workdir {blocker}/sub is not writable", "Not a directory"]),
        "unknown_config_key": (["launch.train_vqgan", f"--workdir={w}", "--config.model.quantizer.n_embd=3"],
                               ["--config.model.quantizer.n_embd", "n_embd", 'Did you mean "n_embed"']),
        "missing_config_file": (["launch.train_vqgan", f"--workdir={w}", f"--config={tmp}/no_such_config.py"],
                                [f"{tmp}/no_such_config.py", "No such file"]),
        "missing_workdir_flag": (["launch.train_vqgan"], ["--workdir"]),
        "n_embed_disagrees_with_checkpoint": None,  # filled in by the fixture (needs a checkpoint)
        "sample_bad_top_p": (["launch.sample", f"--workdir={w}", f"--out={tmp}/out", "--top_p=1.5"],
                             ["bad sampling options", "top_p=1.5"]),
        "sample_bad_temperature": (["launch.sample", f"--workdir={w}", f"--out={tmp}/out", "--temperature=0"],
                                   ["bad sampling options", "temperature=0.0"]),
        "sample_workdir_without_checkpoints": (["launch.sample", f"--workdir={tmp}/nothing_here",
                                                f"--out={tmp}/out"], [f"{tmp}/nothing_here", "no checkpoints/"]),
        "gpt_without_first_stage": (["launch.train_transformer", f"--workdir={tmp}/gpt"],
                                    ["a stage-one model is needed", "first_stage.workdir"]),
    }


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("launch"))
    cases = _cases(tmp)
    procs = {}

    def start(name):
        argv, _ = cases[name]
        procs[name] = subprocess.Popen([sys.executable, "-m"] + argv, cwd=REPO, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True,
                                       env={k: v for k, v in os.environ.items() if k != "TAMING_JAX_TRACEBACK"})

    for name in cases:
        if cases[name] is not None:
            start(name)
    # A stage-one workdir with a checkpoint of configs/vqgan_tiny (n_embed=128), and its data prepared, so
    # the resumed run reaches the config check at once.
    photos, vq = os.path.join(tmp, "photos"), os.path.join(tmp, "vq")
    stage.write_stage_one_workdir(photos, vq, step=2)
    before = _files(vq)
    cases["n_embed_disagrees_with_checkpoint"] = (
        ["launch.train_vqgan", f"--workdir={vq}", f"--config.data.data_dir={photos}", "--config.model.quantizer.n_embed=64"],
        ["--config.model.quantizer.n_embed=64 disagrees with checkpoint in", vq, "128"])
    start("n_embed_disagrees_with_checkpoint")
    cases["sample_on_a_stage_one_workdir"] = (
        ["launch.sample", f"--workdir={vq}", f"--out={tmp}/out"],
        [f"{vq} holds a stage-one (VQGAN) run; a stage-two (transformer) workdir is needed"])
    start("sample_on_a_stage_one_workdir")
    results = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        results[name] = (proc.returncode, out, cases[name][1])
    return {"results": results, "tmp": tmp, "vq": vq, "vq_before": before}


NAMES = ["workdir_under_file", "unknown_config_key", "missing_config_file", "missing_workdir_flag",
         "n_embed_disagrees_with_checkpoint", "sample_bad_top_p", "sample_bad_temperature",
         "sample_workdir_without_checkpoints", "gpt_without_first_stage", "sample_on_a_stage_one_workdir"]


def _files(root):
    """{path: (size, mtime)} of every file below ``root``."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            st = os.stat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_refused_runs_write_nothing(outputs):
    # Nothing already written is lost: every file of the stage-one workdir that two refused runs resumed or
    # sampled from is still there, unchanged (no checkpoint written, rotated or touched), and no refused run
    # left checkpoints or samples behind.
    tmp = outputs["tmp"]
    after = _files(outputs["vq"])
    assert {k: after.get(k) for k in outputs["vq_before"]} == outputs["vq_before"]
    assert sorted(os.listdir(os.path.join(outputs["vq"], "checkpoints"))) == ["2"]
    assert not _files(os.path.join(tmp, "out"))          # no sample written (an empty folder may be left)
    for d in ("w", "gpt", "nothing_here"):
        assert not os.path.exists(os.path.join(tmp, d, "checkpoints")), d


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_bad_invocation_prints_one_clear_line(outputs, name):
    rc, out, must_contain = outputs["results"][name]
    assert rc not in (0, None), out
    assert "Traceback" not in out, out
    # Progress logging before the failure (absl's "I1126 13:27:08.26 ..." lines, TensorFlow's start-up
    # notices) may precede it; the error itself is exactly one line, and the last one.
    lines = [ln for ln in out.splitlines() if ln.strip() and ln.strip() != ABSL_HINT and not LOG_LINE.match(ln)]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{out}"
    line = lines[0]
    assert line.startswith(("error: ", "FATAL Flags parsing error: ")), line
    assert [ln for ln in out.splitlines() if ln.strip() and ln.strip() != ABSL_HINT][-1] == line
    for text in must_contain:
        assert text in line, f"{text!r} not in {line!r}"

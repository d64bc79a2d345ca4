"""The console shows the project, not library noise: an entry point run (tests/_console_main.py, which imports
``launch`` first as every ``python -m launch.<entry>`` does) prints no TensorFlow/oneDNN banner, no TFDS
preparation notices or progress bars and no orbax read lines by default, and prints them with the opt-in."""
import os
import subprocess
import sys

import pytest

from common_jax import quiet

MAIN = os.path.join(os.path.dirname(__file__), "_console_main.py")
# Lines of a demo run's console that came from libraries, with the library that printed each.
NOISE = {
    "oneDNN custom operations": "TensorFlow",
    "All log messages before absl::InitializeLog": "TensorFlow",
    "Downloading and preparing dataset": "TFDS",
    "Generating splits": "TFDS (progress bar)",
    "Load dataset info from": "TFDS",
    "throughput:": "orbax (per read)",
    "Unable to initialize backend": "JAX",
}
# Printed on any x86 CPU host with the opt-in (the oneDNN banner and the backend probe depend on the machine).
ALWAYS_WHEN_VERBOSE = ("Downloading and preparing dataset", "Load dataset info from", "throughput:")


@pytest.fixture(scope="module")
def consoles(tmp_path_factory):
    """(default console, console with TAMING_JAX_VERBOSE=1), both runs started at once."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS",
                                                            quiet.VERBOSE_ENV)}
    env["XLA_FLAGS"] = ""
    runs = {}
    for mode, extra in (("default", {}), ("verbose", {quiet.VERBOSE_ENV: "1"})):
        runs[mode] = subprocess.Popen([sys.executable, MAIN, str(tmp_path_factory.mktemp(mode))],
                                      env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
    out = {}
    for mode, p in runs.items():
        out[mode] = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[mode][-3000:]
    return out["default"], out["verbose"]


@pytest.mark.slow  # two entry-point processes (TensorFlow, TFDS, orbax)
def test_no_library_noise_by_default(consoles):
    default, _ = consoles
    assert {line: who for line, who in NOISE.items() if line in default} == {}, default[-3000:]
    assert "project line: prepared builtin_photos/" in default and "project line: read back" in default


@pytest.mark.slow  # two entry-point processes (TensorFlow, TFDS, orbax)
def test_the_opt_in_brings_the_library_lines_back(consoles):
    _, verbose = consoles
    assert [line for line in ALWAYS_WHEN_VERBOSE if line not in verbose] == [], verbose[-3000:]
    assert "project line: read back" in verbose


@pytest.mark.parametrize("argv,env,want", [
    ([], "", False), (["--verbosity=1"], "", True), (["--verbosity", "2"], "", True), (["-v", "1"], "", True),
    (["-v=0"], "", False), (["--verbosity=-1"], "", False), (["--workdir=x"], "1", True), ([], "0", False),
])
def test_what_counts_as_asking_for_the_library_output(monkeypatch, argv, env, want):
    monkeypatch.setenv(quiet.VERBOSE_ENV, env)
    assert quiet.verbose_requested(argv) is want

"""Test setup: 8 simulated CPU devices and one persistent compilation cache per run (both set before jax is
imported), logging levels restored after each test, the longest files first, and the `slow` marks kept here."""
import logging
import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

# One persistent compilation cache for the whole run: the pytest process, its xdist workers and every subprocess
# a test starts inherit these variables, so a program compiled once (the tiny train steps, evals and samplers
# that many tests and entry-point runs build alike) is loaded by the others instead of compiled again. A cache
# entry is the compiled executable itself under a key of the program, its shapes, shardings, devices, flags and
# the jax/XLA version, so a hit runs exactly what a compile would have produced. The directory is fresh for each
# run and removed at its end (by the process that made it); a user's own JAX_COMPILATION_CACHE_DIR is used as is.
# (jax writes entries unlocked without a size limit: a process that reads one while another writes it gets a
# warning and compiles instead.)
_CACHE_OWNER = "TAMING_JAX_TEST_CACHE_OWNER"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="taming-jax-tests-jit-")
    os.environ[_CACHE_OWNER] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny programs too: they add up
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")  # as the jax docs: no size floor


def pytest_unconfigure(config):
    if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _restore_logging_levels():
    """A test that sets a logger's level leaves it as it found it. absl's set_verbosity(previous) does not:
    it turns the absl logger's NOTSET (follow the root logger) into WARNING, and a later test in the same worker
    that captures INFO records on the root logger would then see none of absl's."""
    from absl import logging as absl_logging
    loggers = [logging.getLogger(), logging.getLogger("absl")]
    levels, verbosity = [lg.level for lg in loggers], absl_logging.get_verbosity()
    yield
    if absl_logging.get_verbosity() != verbosity:
        absl_logging.set_verbosity(verbosity)
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)

# The longest files, longest first (proportions of `--durations` of the full suite, 2026-12-07). They are
# collected first so that `pytest -n 2 --dist loadfile`, which hands out files in collection order as workers
# free up, starts the long ones early instead of leaving one of them running alone at the end.
LONGEST_FIRST = ("test_multihost.py", "test_sampling.py", "test_vqgan_train.py", "test_spatial.py", "test_gpt.py",
                 "test_inception.py", "test_eval_fid.py", "test_gpt_resume.py", "test_demo.py", "test_data.py",
                 "test_training_multiprocess.py", "test_transformer_train.py", "test_vqgan_options.py",
                 "test_launch.py", "test_segmentation.py")

# Long tests in files whose marks live with their owners' changes; marked `slow` here so that the quick subset
# (`-m "not slow"`, tests/README.md) leaves them out. Everything else marks itself in its own file.
SLOW_ELSEWHERE = ("test_inception.py::test_sharded_batch_equals_one_device",
                  "test_data.py::test_worker_processes_give_same_batches",
                  "test_sampling.py::test_cache_phases_give_the_same_tokens")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order kept
    for item in items:
        if f"{item.path.name}::{item.name}" in SLOW_ELSEWHERE:
            item.add_marker(pytest.mark.slow)

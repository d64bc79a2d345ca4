"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared helpers."""
import os
import sys

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

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

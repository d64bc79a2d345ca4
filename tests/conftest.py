"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared helpers."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

# The longest files, longest first (measured totals, 1-7 minutes each on a 2-core Zen 3 host). They
# are collected first so that `pytest -n 2 --dist loadfile`, which hands out files in collection order as
# workers free up, starts the long ones early instead of leaving one of them running alone at the end.
LONGEST_FIRST = ("test_vqgan_train.py", "test_multihost.py", "test_demo.py", "test_sampling.py", "test_spatial.py",
                 "test_gpt_resume.py", "test_eval_fid.py", "test_gpt.py", "test_transformer_train.py",
                 "test_inception.py", "test_vqgan_options.py", "test_segmentation.py", "test_launch.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order kept

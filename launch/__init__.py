"""Command-line entry points (absl apps)."""
import os

# TensorFlow is imported by TFDS/clu only for dataset preparation and summaries; keep its C++ logs quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

"""Test setup: 8 simulated CPU devices and one persistent compilation cache per run (both set before jax is
imported), logging levels restored after each test, the longest files first, and the `slow` marks kept here."""
import logging
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _xla_flags import xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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

# The longest files, longest first (their CPU seconds alone and `--durations` of the full suite, 2026-12-07).
# They are collected first so that `pytest -n 2 --dist loadfile`, which hands out files in collection order as
# workers free up, starts the long ones early instead of leaving one of them running alone at the end.
LONGEST_FIRST = ("test_multihost.py", "test_vqgan_train.py", "test_sampling.py", "test_gpt.py", "test_fsq_lfq.py",
                 "test_eval_fid.py", "test_sliding_window.py", "test_spatial.py", "test_inception.py",
                 "test_demo.py", "test_llamagen_vq.py", "test_gpt_resume.py", "test_convert_taming.py",
                 "test_data.py", "test_training_multiprocess.py", "test_transformer_train.py",
                 "test_vqgan_options.py", "test_launch.py", "test_segmentation.py")

# Long tests in files whose marks live with their owners' changes (a name without [parameters] marks every
# parametrization); marked `slow` here so that the quick subset (`-m "not slow"`, tests/README.md) leaves them out.
# Everything else marks itself in its own file. What stays quick of each: its goldens and cheapest equivalences.
SLOW_ELSEWHERE = (
    "test_data.py::test_worker_processes_give_same_batches",
    # many compiled variants of the sampler / model, or threads
    "test_sampling.py::test_cache_phases_give_the_same_tokens",
    "test_sampling.py::test_row_chunks_on_threads_give_the_same_tokens",
    "test_sampling.py::test_step_t_draws_with_fold_in_t",
    "test_sampling.py::test_compiled_once_per_static_options",
    "test_sampling.py::test_determinism_keys_and_guidance_scale_one",
    "test_sampling.py::test_vocab_limit_draws_only_ids_below_it",
    "test_gpt.py::test_attention_impl_option",
    "test_gpt.py::test_decode_variables_of_a_bf16_model_hold_out_in_kernels",
    "test_gpt.py::test_causal_query_blocks_skip_only_masked_scores",
    "test_gpt.py::test_mixed_dense_and_einsum_match_float32_autodiff",
    "test_gpt.py::test_bf16_training_gradients_multiply_bf16_operands",
    "test_gpt.py::test_remat_same_values_and_grads",
    "test_sliding_window.py::test_buckets_and_cache_budget_change_cost_not_result",
    "test_sliding_window.py::test_row_chunks_keep_each_rows_codes",
    "test_sliding_window.py::test_window_sized_grid_equals_ordinary_sampling",
    "test_sliding_window.py::test_larger_grid_logits_match_plain_loop[True-options1]",   # the other four stay
    "test_sliding_window.py::test_larger_grid_logits_match_plain_loop[False-options4]",
    "test_llama_block.py::test_logical_axis_names_init_bf16_remat_and_dropout",
    "test_vqgan_convert.py::test_bf16_compute_runs_close_to_float32",
    "test_vqgan_convert.py::test_gumbel_config_and_round_trip",
    "test_transformer_train.py::test_grad_accumulation_matches_full_batch",
    "test_layers.py::test_conv_module_params_axes_and_gradients_under_each_policy",
    # sharded step equals one device: compiles on 8 devices
    "test_transformer_train.py::test_sharded_step_equals_one_device",
    "test_llamagen_launch.py::test_sharded_llama_step_equals_one_device",
    # training runs, entry points and other subprocesses
    "test_host_memory.py::test_results_reuse_memory_instead_of_faulting_it_in_again",
    "test_net2net.py::test_class_conditional_checkpoint",      # taming checkpoints converted and run
    "test_net2net.py::test_spatial_checkpoint_loads_cond_stage",
    "test_checkpoint.py::test_sigkill_then_resume_is_bit_identical",
    "test_checkpoint.py::test_sigterm_saves_and_exits_cleanly_then_resumes",
    "test_llamagen_vq.py::test_tiny_llamagen_tokenizer_trains_logs_usage_and_resumes",
    "test_llamagen_launch.py::test_command_lines_convert_and_sample_with_guidance",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order kept
    for item in items:
        names = {f"{item.path.name}::{item.name}", f"{item.path.name}::{getattr(item, 'originalname', item.name)}"}
        if names & set(SLOW_ELSEWHERE):
            item.add_marker(pytest.mark.slow)

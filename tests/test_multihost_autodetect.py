"""``--multihost=auto``: which environments start jax.distributed, and with what arguments.

In-process, with the environment set per case and ``jax.distributed.initialize`` replaced by a recorder: no
cluster, no second process. On SLURM and TPU the call gets no arguments (JAX reads the process id, count and
coordinator from the environment there); with JAX_COORDINATOR_ADDRESS it gets all three from our variables.
"""
import jax
import pytest

from common_jax import multihost

VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS", "SLURM_PROCID",
        "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID")


@pytest.fixture
def calls(monkeypatch):
    for v in VARS:
        monkeypatch.delenv(v, raising=False)
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    return seen


CASES = {
    "nothing": ({}, None),
    "slurm_one_task": ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}, None),
    "slurm_four_tasks": ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_ID": "7"}, {}),
    "tpu_one_host": ({"TPU_WORKER_HOSTNAMES": "t1v-0", "TPU_WORKER_ID": "0"}, None),
    "tpu_trailing_comma": ({"TPU_WORKER_HOSTNAMES": "t1v-0,", "TPU_WORKER_ID": "0"}, None),
    "tpu_pod_slice": ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3", "TPU_WORKER_ID": "1"}, {}),
    "coordinator": ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
                    {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}),
    # our variables win over a SLURM allocation around the run
    "coordinator_under_slurm": ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "0",
                                 "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"},
                                {"coordinator_address": "h:1", "num_processes": 3, "process_id": 0}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_auto_detection(calls, monkeypatch, name):
    env, want = CASES[name]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    multihost.maybe_initialize_distributed("auto")
    assert calls == ([] if want is None else [want])


def test_on_and_off_override_the_environment(calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    multihost.maybe_initialize_distributed("off")
    assert calls == []
    monkeypatch.delenv("SLURM_NTASKS")
    multihost.maybe_initialize_distributed("on")
    assert calls == [{}]


def test_bad_mode_and_incomplete_coordinator_are_one_clear_error(calls, monkeypatch):
    with pytest.raises(ValueError, match=r"^--multihost must be auto, on or off, got 'yes'$"):
        multihost.maybe_initialize_distributed("yes")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match=r"^JAX_COORDINATOR_ADDRESS=h:1 is set but JAX_NUM_PROCESSES is not"):
        multihost.maybe_initialize_distributed("auto")
    assert calls == []

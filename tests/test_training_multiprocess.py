"""Two JAX processes (4 CPU devices each, gloo collectives) run the loop, stop, and resume: per-process
data-iterator states are gathered into one checkpoint item, and the result matches one process. A workdir that
is not shared is refused by two real processes; the other refusals (weights, dataset copies that differ) run
in-process with the gathering across processes stubbed."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

import toy_task
from processes import free_port, run_all
from common_jax.training import run

MAIN = os.path.join(os.path.dirname(__file__), "_train_toy_main.py")
TOTAL = 8


def _two_processes(workdir, *extra, expect_rc=0):
    port = free_port()
    results = run_all(
        [[sys.executable, MAIN, str(workdir), str(TOTAL), "--data", "4", "--fsdp", "2", "--every", "100",
          "--num-processes", "2", "--process-id", str(i), "--coordinator", f"localhost:{port}", *extra]
         for i in range(2)], [f"{workdir}.{i}.log" for i in range(2)], timeout=180)
    for rc, out in results:
        assert rc == expect_rc, out[-3000:]
    return [out for _, out in results]


@pytest.mark.slow
def test_a_workdir_not_shared_by_the_processes_is_refused(tmp_path):
    # Each process on a disk of its own: each would checkpoint a part of the state (and eval_fid read a part of
    # the chunks). Both refuse before any training, naming the other one.
    outs = _two_processes(tmp_path / "own", "--per-process-workdir", expect_rc=1)
    for i, out in enumerate(outs):
        assert (f"own_p{i} is not one shared path on all hosts: process {i} does not see the files of process "
                f"{1 - i}") in out, out[-2000:]
        assert not os.path.exists(tmp_path / f"own_p{i}" / "checkpoints")
        assert os.listdir(tmp_path / f"own_p{i}") == []       # its probe file is removed


def _as_process(monkeypatch, index, count=2):
    """This process pretends to be ``index`` of ``count``: the refusal logic runs in-process, with the gathering
    across processes stubbed (one real two-process refusal above covers the collectives themselves)."""
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(jax, "process_index", lambda: index)


def _gathering(monkeypatch, views):
    """``process_allgather`` stubbed: it returns the digests of ``views`` (the value each process holds), as the
    real one would on every process; the digests each caller sent are recorded."""
    import hashlib

    from jax.experimental import multihost_utils
    digests = np.stack([np.frombuffer(hashlib.sha256(v.encode()).digest(), np.uint8) for v in views])
    sent = []
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: sent.append(np.asarray(x)) or digests)
    return digests, sent


def test_gathered_digests_name_the_processes_that_differ_from_process_0(monkeypatch):
    # Every process receives the same gathered digests and derives the same list of processes that differ
    # from process 0.
    from common_jax import multihost
    views = ["a", "b", "a", "c"]
    digests, sent = _gathering(monkeypatch, views)
    for me in range(4):
        _as_process(monkeypatch, me, count=4)
        assert multihost.processes_differing_from_0(views[me]) == [1, 3]
    np.testing.assert_array_equal(np.stack(sent), digests)       # each process sent the digest of its own view
    _gathering(monkeypatch, ["a"] * 4)
    assert multihost.processes_differing_from_0("a") == []


def test_weights_that_differ_between_the_processes_are_refused(monkeypatch):
    # Stage two checks the stage-one weights each host loaded (from its own disk, possibly another copy): every
    # process refuses before any training, naming the processes that differ from process 0.
    from common_jax import multihost
    views = ["weights of process 0", "weights of process 1"]
    _gathering(monkeypatch, views)
    for me in range(2):
        _as_process(monkeypatch, me)
        with pytest.raises(ValueError) as e:
            multihost.check_same_on_all_processes(views[me], "the toy weights", "load them from one place")
        assert str(e.value) == ("the toy weights differ between processes: process 1 loaded other ones than "
                                "process 0; load them from one place")
    _gathering(monkeypatch, ["weights"] * 2)
    multihost.check_same_on_all_processes("weights", "the toy weights", "load them from one place")


def test_dataset_copies_that_differ_between_the_processes_are_refused(monkeypatch, tmp_path):
    # Data must be one shared path: each process reads its slice of every global batch by index from its own
    # view of data_dir. A faithful copy (same names, sizes and modification times) passes; the same dataset
    # prepared again on another host (another modification time) is refused, after every attempt. Process 1's
    # view of the dataset (``other``) reaches process 0 through the stubbed gathering.
    from common_jax import dataset_resolution, datasets, multihost
    from common_jax.datasets import prepare_builtin_photos
    name = prepare_builtin_photos(tmp_path / "d0", crop_size=16, crops_per_photo=2).name
    shutil.copytree(tmp_path / "d0", tmp_path / "copy")              # copy2: modification times kept
    prepare_builtin_photos(tmp_path / "again", crop_size=16, crops_per_photo=2)
    sleeps = []
    monkeypatch.setattr(dataset_resolution.time, "sleep", sleeps.append)
    _as_process(monkeypatch, 0)
    mine = datasets.dataset_fingerprint(str(tmp_path / "d0"), name)
    digests, sent = _gathering(monkeypatch, [mine, datasets.dataset_fingerprint(str(tmp_path / "copy"), name)])
    dataset_resolution.check_dataset_on_all_processes(str(tmp_path / "d0"), name)
    assert len(sent) == 1 and not sleeps
    np.testing.assert_array_equal(sent[0], digests[0])              # process 0 sent its own view of d0
    _gathering(monkeypatch, [mine, datasets.dataset_fingerprint(str(tmp_path / "again"), name)])
    with pytest.raises(ValueError) as e:
        dataset_resolution.check_dataset_on_all_processes(str(tmp_path / "d0"), name)
    assert str(e.value).startswith(
        f"the files of dataset '{name}' in data_dir {tmp_path}/d0 differ between processes: process 1 "
        "sees other ones than process 0; data_dir must be one shared path on all hosts"), str(e.value)
    assert len(sleeps) == 3                                          # looked at 4 times before refusing


def test_a_dataset_difference_is_looked_at_again_before_refusing(monkeypatch, tmp_path):
    # The retries of the comparison, in one process with the gathering stubbed: a difference that is gone on a
    # later look (another host's files reaching an NFS attribute cache late) passes; one that stays through all
    # attempts is refused; a dataset missing everywhere, once all agree, raises its own "not prepared" error.
    from common_jax import dataset_resolution, datasets, multihost
    looks, sleeps = [], []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(dataset_resolution.time, "sleep", sleeps.append)
    monkeypatch.setattr(datasets, "dataset_fingerprint", lambda data_dir, name: f"files of {name}")

    def differing(answers):
        def gather(value):
            looks.append(value)
            return answers[len(looks) - 1]
        return gather

    monkeypatch.setattr(multihost, "processes_differing_from_0", differing([[1], [1], []]))
    dataset_resolution.check_dataset_on_all_processes(str(tmp_path), "photos", attempts=4, wait_s=0.5)
    assert looks == ["files of photos"] * 3 and sleeps == [0.5, 0.5]

    looks.clear()
    sleeps.clear()
    monkeypatch.setattr(multihost, "processes_differing_from_0", differing([[1, 3]] * 3))
    with pytest.raises(ValueError, match="processes 1, 3 see other ones than process 0"):
        dataset_resolution.check_dataset_on_all_processes(str(tmp_path), "photos", attempts=3, wait_s=0.5)
    assert len(looks) == 3 and sleeps == [0.5, 0.5]                  # no wait after the last look

    def missing(data_dir, name):
        raise datasets.DatasetNotPreparedError(f"dataset {name} not prepared in {data_dir}")
    looks.clear()
    monkeypatch.setattr(datasets, "dataset_fingerprint", missing)
    monkeypatch.setattr(multihost, "processes_differing_from_0", differing([[]]))
    with pytest.raises(datasets.DatasetNotPreparedError, match="not prepared"):
        dataset_resolution.check_dataset_on_all_processes(str(tmp_path), "photos")
    assert looks == ["missing"]


@pytest.mark.slow
def test_two_processes_stop_resume_match_one_process(tmp_path):
    workdir = tmp_path / "mp"
    _two_processes(workdir, "--stop-after", "3")
    with open(workdir / "checkpoints" / "3" / "data" / "metadata") as f:
        data_item = json.load(f)
    assert data_item == {"process_count": 2, "0": {"index": 3, "seed": 0}, "1": {"index": 3, "seed": 0}}
    os.makedirs(workdir / "checkpoints" / "999")  # a stray newest step folder: both processes fall back past it

    outs = _two_processes(workdir)
    assert all("resumed from step 3 " in out for out in outs), outs[0][-2000:]
    moved = os.listdir(workdir / "checkpoints_damaged")  # by process 0 alone, once
    assert len(moved) == 1 and moved[0].startswith("999-") and f"moved to {workdir}" in outs[0], outs[0][-2000:]
    assert json.load(open(workdir / "done.json"))["step"] == TOTAL
    got = dict(np.load(workdir / "final_state.npz"))

    ref = run(toy_task.toy_config(TOTAL, data=4, fsdp=2, every=100), tmp_path / "ref",
              toy_task.ToyTask(noise=0.1), toy_task.ToyLoader(16), tensorboard=False)
    want = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(ref.state))[0]}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)

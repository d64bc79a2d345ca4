"""common_jax.torch_io reads PyTorch files without PyTorch, and runs nothing from them.

The fixtures in tests/torch_files were written by real ``torch.save`` (tests/make_torch_files.py, in the
reference environment), in both serialisations.
"""
import io
import json
import os
import pathlib
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from common_jax import torch_io
from common_jax.torch_io import Opaque, find_state_dict, load_torch_file, read_torch_state_dict
from torch_files_writer import (TENSOR_LAYOUTS, Storage, StorageView, Tensor, write_legacy_file,
                                write_legacy_state_dict)

FILES = pathlib.Path(__file__).resolve().parent / "torch_files"
FORMATS = ("zip", "legacy")
MARKER = "torch_io_marker"  # what the malicious fixtures' payloads create in the cwd


@pytest.fixture(scope="module")
def expected():
    with np.load(FILES / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def _prefixed(expected, prefix):
    return {k[len(prefix):]: v for k, v in expected.items() if k.startswith(prefix)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_view_and_metadata(fmt, expected):
    sd = load_torch_file(str(FILES / f"state_dict_{fmt}.pt"))
    want = _prefixed(expected, "sd/")
    assert list(sd) == list(want)  # the OrderedDict's order is kept
    dtypes = {"f16": np.float16, "bf16": ml_dtypes.bfloat16, "i64": np.int64, "i32": np.int32, "u8": np.uint8,
              "bool": np.bool_, "1.num_batches_tracked": np.int64}
    for k, v in want.items():
        got = sd[k]
        assert got.dtype == np.dtype(dtypes.get(k, np.float32)), k
        assert got.shape == v.shape, k
        np.testing.assert_array_equal(got.astype(v.dtype), v, err_msg=k)  # bit-exact (bf16 -> f32 is exact)
    assert sd["i64"][3] == 2 ** 40
    # Views into one storage, with an offset and transposed strides, come back as their own arrays.
    np.testing.assert_array_equal(sd["shared_view"], np.arange(40.0).reshape(5, 8)[1:4, 2:7].T)
    assert sd["shared_view"].flags.writeable and not np.shares_memory(sd["shared_view"], sd["shared_base"])
    assert sd["empty"].shape == (0, 3) and sd["scalar"].shape == ()
    assert dict(sd._metadata) == json.loads((FILES / "expected_metadata.json").read_text())


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_state_dict_casts_floats_only(fmt, expected):
    sd = read_torch_state_dict(str(FILES / f"state_dict_{fmt}.pt"))
    want = _prefixed(expected, "sd/")
    for k in ("f16", "bf16", "f32", "shared_view", "param", "needs_grad"):
        assert sd[k].dtype == np.float32
        np.testing.assert_array_equal(sd[k], want[k].astype(np.float32), err_msg=k)
    for k in ("i64", "i32", "u8", "bool", "1.num_batches_tracked"):
        assert sd[k].dtype == want[k].dtype
        np.testing.assert_array_equal(sd[k], want[k], err_msg=k)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lightning_1_0_checkpoint(fmt, expected):
    path = str(FILES / f"lightning_{fmt}.ckpt")
    sd = read_torch_state_dict(path)
    want = _prefixed(expected, "ckpt/")
    assert sorted(sd) == ["bias", "weight"]
    for k in sd:
        np.testing.assert_array_equal(sd[k], want[k])
    ckpt = load_torch_file(path)
    assert ckpt["pytorch-lightning_version"] == "1.0.8" and ckpt["global_step"] == 1234
    # The callbacks dict is keyed by the ModelCheckpoint class: a placeholder class, usable as a key.
    (cls, cb), = ckpt["callbacks"].items()
    assert isinstance(cls, type) and issubclass(cls, Opaque)
    assert cls.global_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert cb["monitor"] == "val/rec_loss"
    np.testing.assert_array_equal(cb["best_model_score"], want["best_model_score"])
    hp = ckpt["hyper_parameters"]
    assert hp["args"].global_name == "argparse.Namespace" and isinstance(hp["args"], Opaque)
    assert hp["config"].global_name == "omegaconf.dictconfig.DictConfig"
    adam = ckpt["optimizer_states"][0]
    assert adam["param_groups"][0]["betas"] == (0.5, 0.9)
    for key, v in _prefixed(expected, "adam/").items():
        pid, name = key.split("/")
        np.testing.assert_array_equal(adam["state"][int(pid)][name], v, err_msg=key)


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_rebuilt_objects(fmt):
    obj = load_torch_file(str(FILES / f"extras_{fmt}.pt"))
    assert obj["size"] == (2, 3) and obj["bytes"] == b"\x00\x01abc" and obj["set"] == {1, 2}
    assert obj["complex"] == 1 + 2j and obj["dtype"] == np.float16
    np.testing.assert_array_equal(obj["sub"], np.arange(3.0, dtype=np.float32))  # a tensor subclass
    np.testing.assert_array_equal(obj["param_state"], np.ones(2, np.float32))  # a Parameter with state
    assert isinstance(obj["namespace"], Opaque) and obj["namespace"].global_name == "argparse.Namespace"


def _plain_unpickle(path: pathlib.Path) -> None:
    """Unpickle as an unguarded loader would (torch's rebuild functions stubbed, everything else real)."""
    class Plain(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("torch"):
                return lambda *a, **k: None
            return super().find_class(module, name)

        def persistent_load(self, pid):
            return None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            f = io.BytesIO(z.read(next(n for n in z.namelist() if n.endswith("/data.pkl"))))
    else:
        f = io.BytesIO(path.read_bytes())
        for _ in range(3):
            pickle.load(f)
    Plain(f).load()


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_that_runs_commands_runs_nothing(fmt, tmp_path, monkeypatch):
    path = FILES / f"malicious_{fmt}.pt"
    monkeypatch.chdir(tmp_path)
    obj = load_torch_file(str(path))
    sd = read_torch_state_dict(str(path))
    assert not os.path.exists(MARKER) and not os.path.exists(MARKER + "_exec")
    np.testing.assert_array_equal(sd["weight"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert sorted(sd) == ["weight"]
    assert isinstance(obj["payload"], Opaque) and obj["payload"].global_name == "posix.system"
    assert obj["payload"].args == (f"touch {MARKER}",)
    assert obj["also"][0].global_name == "builtins.exec"
    # The fixture is armed: an unguarded unpickler does run both payloads.
    _plain_unpickle(path)
    assert os.path.exists(MARKER) and os.path.exists(MARKER + "_exec")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file_is_one_clear_error(fmt, tmp_path):
    data = (FILES / f"state_dict_{fmt}.pt").read_bytes()
    for cut, what in ((len(data) - 20, "storage"), (len(data) // 3, ""), (30, "")):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated") as e:
            load_torch_file(str(bad))
        msg = str(e.value)
        assert msg.startswith(str(bad)) and "\n" not in msg and e.value.__cause__ is None
        if fmt == "legacy" and what:
            assert "storage" in msg and "remain" in msg  # names the storage and how short it is


def test_zip_without_a_storage_entry(tmp_path):
    src = FILES / "state_dict_zip.pt"
    bad = tmp_path / "lost_entry.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        names = zin.namelist()
        dropped = next(n for n in names if "/data/" in n)
        for n in names:
            if n != dropped:
                zout.writestr(n, zin.read(n))
    key = dropped.rsplit("/", 1)[1]
    with pytest.raises(ValueError, match=rf"lost_entry.pt is truncated or damaged: storage {key} \(.*\) is missing"):
        load_torch_file(str(bad))


def test_not_a_torch_file(tmp_path):
    rng = np.random.default_rng(0)
    cases = {"random.pt": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
             "text.pt": b"this is a text file\n" * 10, "empty.pt": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    for name in (*cases, "arrays.npz"):
        with pytest.raises(ValueError, match="is not a PyTorch file") as e:
            load_torch_file(str(tmp_path / name))
        assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value)


def test_tar_archive_and_deep_nesting(tmp_path):
    import tarfile
    path = tmp_path / "old.pth"
    (tmp_path / "pickle").write_bytes(b"x")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tmp_path / "pickle", arcname="pickle")
    with pytest.raises(ValueError, match="old.pth is a tar archive, the format of PyTorch's first releases"):
        load_torch_file(str(path))
    n = 100_000  # lists nested n deep: n EMPTY_LISTs, then n - 1 APPENDs
    header = b"".join(pickle.dumps(o, protocol=2) for o in (torch_io._LEGACY_MAGIC, torch_io._LEGACY_PROTOCOL, {}))
    path.write_bytes(header + b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"." + pickle.dumps([], protocol=2))
    with pytest.raises(ValueError, match="old.pth is damaged: its containers nest too deeply to walk"):
        load_torch_file(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_torch_state_dict(str(tmp_path / "nope.pth"))


def test_legacy_storage_views(tmp_path):
    # Old legacy files could name a storage view (key, offset, numel) into a root storage.
    root = Storage("140", np.arange(12, dtype=np.float32), "cpu")
    view = StorageView("141", root, 4, 6)
    path = tmp_path / "views.pt"
    write_legacy_file(str(path), {"root": Tensor(root, (3, 4), True), "view": Tensor(view, (2, 3), True)}, [root])
    sd = load_torch_file(str(path))
    np.testing.assert_array_equal(sd["root"], np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(sd["view"], np.arange(4.0, 10.0).reshape(2, 3))
    past = StorageView("142", root, 8, 6)  # elements 8..13 of a 12-element storage
    write_legacy_file(str(path), {"view": Tensor(past, (6,), True)}, [root])
    with pytest.raises(ValueError, match="views.pt is damaged: storage view 142 reaches past its storage 140"):
        load_torch_file(str(path))


def test_big_endian_zip(tmp_path):
    # A zip archive records the writer's byte order; storages of a big-endian writer are swapped on reading.
    src, dst = FILES / "state_dict_zip.pt", tmp_path / "big.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        names = zin.namelist()
        prefix = next(n for n in names if n.endswith("/data.pkl"))[:-len("data.pkl")]
        storages = {}
        torch_io._Unpickler(io.BytesIO(zin.read(prefix + "data.pkl")), storages, lambda s: None).load()
        assert prefix + "byteorder" in names
        for n in names:
            data = zin.read(n)
            if n == prefix + "byteorder":
                data = b"big"
            elif n.startswith(prefix + "data/"):
                size = storages[n[len(prefix + "data/"):]].dtype.itemsize
                data = np.frombuffer(data, f"<u{size}").astype(f">u{size}").tobytes()
            zout.writestr(n, data)
    little, big = load_torch_file(str(src)), load_torch_file(str(dst))
    assert list(little) == list(big)
    for k in little:
        assert big[k].dtype == little[k].dtype
        np.testing.assert_array_equal(big[k], little[k], err_msg=k)


def test_unknown_persistent_id_refused(tmp_path):
    marker = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("weird", 1) if obj is marker else None
    buf = io.BytesIO()
    for obj in (torch_io._LEGACY_MAGIC, torch_io._LEGACY_PROTOCOL, {}):
        pickle.dump(obj, buf, protocol=2)
    Pickler(buf, protocol=2).dump({"x": marker})
    pickle.dump([], buf, protocol=2)
    path = tmp_path / "weird.pt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"weird.pt is damaged: unknown persistent id \('weird', 1\)"):
        load_torch_file(str(path))


def test_tensor_past_its_storage_refused(tmp_path):
    # A crafted size that would make numpy read outside the storage's bytes.
    storage = Storage("0", np.arange(4, dtype=np.float32), "cpu")
    path = tmp_path / "overread.pt"
    write_legacy_file(str(path), {"w": Tensor(storage, (3, 3), True)}, [storage])
    with pytest.raises(ValueError, match=r"overread.pt is damaged: .*reads element 8 of storage 0, which holds 4"):
        load_torch_file(str(path))


def test_state_dict_lookup(tmp_path):
    path = tmp_path / "list.pt"
    write_legacy_file(str(path), [1, 2], [])
    assert load_torch_file(str(path)) == [1, 2]
    with pytest.raises(ValueError, match="list.pt holds a list, expected a state dict"):
        read_torch_state_dict(str(path))
    sd = {"w": np.zeros(2)}
    assert find_state_dict({"model": sd, "steps": 3}, "x") is sd
    assert find_state_dict({"state_dict": sd, "model": {}}, "x") is sd
    assert find_state_dict({"ema": sd, "model": {}}, "x", key="ema") is sd
    with pytest.raises(ValueError, match=r"x has no state dict under 'ema'; its entries: \['model'\]"):
        find_state_dict({"model": sd}, "x", key="ema")
    empty = tmp_path / "meta_only.pt"
    write_legacy_file(str(empty), {"epoch": 3}, [])
    with pytest.raises(ValueError, match=r"meta_only.pt holds no tensors in its state dict \(entries: \['epoch'\]\)"):
        read_torch_state_dict(str(empty))


@pytest.mark.parametrize("layout", TENSOR_LAYOUTS)
@pytest.mark.parametrize("python2", [True, False])
def test_writer_round_trip(python2, layout, tmp_path):
    # The writer the converter tests use, in every layout torch has written: values, dtypes, order and
    # _metadata come back.
    rng = np.random.default_rng(1)
    arrays = {"w": rng.normal(size=(3, 4)).astype(np.float32), "d": rng.normal(size=2),
              "h": rng.normal(size=5).astype(np.float16), "i": np.arange(-2, 3), "u": np.arange(4, dtype=np.uint8),
              "b": np.array([True, False])}
    path = tmp_path / "w.pth"
    write_legacy_state_dict(str(path), arrays, python2=python2, tensors=layout, metadata={"": {"version": 1}})
    sd = load_torch_file(str(path))
    assert list(sd) == list(arrays) and dict(sd._metadata) == {"": {"version": 1}}
    for k, v in arrays.items():
        assert sd[k].dtype == v.dtype
        np.testing.assert_array_equal(sd[k], v)

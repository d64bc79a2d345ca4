"""Writes tests/torch_files/: small files saved by real ``torch.save``, for tests/test_torch_io.py.

Run in the reference environment (PyTorch + pytorch-lightning 1.8.6 + omegaconf), never by the tests:

    /work/.venv-ref/bin/python tests/make_torch_files.py

Every file exists in both serialisations: ``*_zip.*`` (torch >= 1.6 archive) and ``*_legacy.*``
(``_use_new_zipfile_serialization=False``, the single-stream format of torch < 1.6). ``expected.npz``
holds the values the reader must return (bfloat16 stored as its exact float32 value). It also checks
tests/torch_files_writer.py against torch (see ``_check_writer``).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import sys
import tempfile

import numpy as np
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

OUT = pathlib.Path(__file__).resolve().parent / "torch_files"
sys.path.insert(0, str(OUT.parent))
MARKER = "torch_io_marker"  # created in the cwd if the payload ever runs


def _state_dict() -> dict:
    """A module's state dict (it carries ``_metadata``) plus one tensor of every dtype and shared views."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    net(torch.randn(2, 2, 4, 4))  # moves the running stats and num_batches_tracked (int64)
    sd = net.state_dict()
    sd["f32"] = torch.randn(3, 4)
    sd["f16"] = torch.randn(5).half()
    sd["bf16"] = torch.randn(2, 3).bfloat16()
    sd["i64"] = torch.tensor([-3, 0, 7, 2 ** 40])
    sd["i32"] = torch.tensor([1, -2], dtype=torch.int32)
    sd["u8"] = torch.tensor([0, 1, 128, 255], dtype=torch.uint8)
    sd["bool"] = torch.tensor([True, False, True])
    base = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    sd["shared_base"] = base
    sd["shared_view"] = base[1:4, 2:7].t()  # offset 10, strides (1, 8): a transposed slice of base
    sd["shared_row"] = base[3]  # offset 24, same storage again
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2))  # pickled through _rebuild_parameter
    sd["needs_grad"] = torch.randn(3).requires_grad_()
    sd["empty"] = torch.zeros(0, 3)
    sd["scalar"] = torch.tensor(2.5)
    return sd


def _lightning_checkpoint() -> dict:
    """A checkpoint laid out as pytorch-lightning 1.0.8 wrote them (callbacks keyed by the class)."""
    torch.manual_seed(1)
    model = torch.nn.Conv2d(2, 3, 3)
    opt = torch.optim.Adam(model.parameters(), lr=4.5e-6, betas=(0.5, 0.9))
    model(torch.randn(1, 2, 5, 5)).square().mean().backward()
    opt.step()
    return {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "1.0.8",
        "callbacks": {ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.125),
                                        "best_model_path": "logs/checkpoints/last.ckpt"}},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"args": argparse.Namespace(base=["configs/x.yaml"], seed=23),
                             "config": OmegaConf.create({"embed_dim": 4, "ddconfig": {"ch": 8}})},
        "state_dict": model.state_dict(),
    }


class _SubTensor(torch.Tensor):
    """A tensor subclass: pickled through torch._tensor._rebuild_from_type_v2."""


def _extras() -> dict:
    """Everything else the whitelist rebuilds: torch.Size, bytes, a tensor subclass, a Parameter with extra
    state, a torch dtype, a set, a complex number, plus a global that must stay a placeholder."""
    param = torch.nn.Parameter(torch.ones(2))
    param.note = "kept as state"
    return {"size": torch.Size([2, 3]), "bytes": b"\x00\x01abc", "sub": torch.arange(3.0).as_subclass(_SubTensor),
            "param_state": param, "dtype": torch.float16, "set": {1, 2}, "complex": 1 + 2j,
            "namespace": argparse.Namespace(lr=0.5)}


class _RunsCommand:
    """Unpickles as ``os.system(command)``: what a malicious checkpoint does."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


class _RunsPython:
    """Unpickles as ``exec(code)``."""

    def __reduce__(self):
        return exec, (f"open({MARKER + '_exec'!r}, 'w').close()",)


def _malicious() -> dict:
    return {"weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "payload": _RunsCommand(),
            "also": [_RunsPython()]}


def _save(obj, stem: str, ext: str) -> None:
    torch.save(obj, OUT / f"{stem}_zip.{ext}")
    torch.save(obj, OUT / f"{stem}_legacy.{ext}", _use_new_zipfile_serialization=False)


def _check_payload_runs() -> None:
    """The malicious files are live: a plain torch.load runs both payloads."""
    for fmt in ("zip", "legacy"):
        path = (OUT / f"malicious_{fmt}.pt").resolve()
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                torch.load(path, weights_only=False)
                assert os.path.exists(MARKER) and os.path.exists(MARKER + "_exec"), fmt
            finally:
                os.chdir(cwd)


def _check_writer() -> None:
    """tests/torch_files_writer.py (used where the tests need full-size published files) against torch:
    it reproduces lpips' shipped vgg.pth byte for byte, and torch.load reads every layout it writes (both
    pickle flavours, the three tensor layouts, storage views)."""
    import collections
    import io
    import lpips
    from torch_files_writer import (TENSOR_LAYOUTS, Storage, StorageView, Tensor, write_legacy_file,
                                    write_legacy_state_dict)

    real = pathlib.Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    sd = torch.load(real, map_location="cpu", weights_only=False)
    keys = []

    class KeyOrder(pickle.Unpickler):
        def find_class(self, module, name):
            return lambda *a, **k: _Inert()

        def persistent_load(self, pid):
            keys.append(pid[2].decode() if isinstance(pid[2], bytes) else pid[2])

    with open(real, "rb") as f:
        for _ in range(3):
            pickle.load(f)
        KeyOrder(f, encoding="bytes").load()
    with tempfile.TemporaryDirectory() as tmp:
        copy = pathlib.Path(tmp) / "vgg.pth"
        write_legacy_state_dict(str(copy), collections.OrderedDict((k, v.numpy()) for k, v in sd.items()),
                                python2=True, metadata={k: dict(v) for k, v in sd._metadata.items()},
                                location="cuda:0", storage_keys=keys)
        assert copy.read_bytes() == real.read_bytes(), "writer no longer reproduces lpips' vgg.pth"
        arrays = {"w": np.random.rand(3, 4).astype(np.float32), "h": np.arange(5, dtype=np.float16),
                  "i": np.arange(3), "u": np.arange(4, dtype=np.uint8), "b": np.array([True, False])}
        for python2 in (True, False):
            for layout in TENSOR_LAYOUTS:
                write_legacy_state_dict(str(copy), arrays, python2=python2, tensors=layout,
                                        metadata={"": {"version": 1}})
                for weights_only in ((False, True) if layout == "rebuild_v2" else (False,)):
                    t = torch.load(copy, weights_only=weights_only)
                    assert list(t) == list(arrays) and dict(t._metadata) == {"": {"version": 1}}, (python2, layout)
                    for k, v in arrays.items():
                        got = t[k].numpy()
                        assert got.dtype == v.dtype and np.array_equal(got, v), (python2, layout, k)
        root = Storage("140", np.arange(12, dtype=np.float32), "cpu")
        view = StorageView("141", root, 4, 6)
        write_legacy_file(str(copy), {"root": Tensor(root, (3, 4), True), "view": Tensor(view, (2, 3), True)}, [root])
        t = torch.load(copy, weights_only=False)
        assert np.array_equal(t["view"].numpy(), np.arange(4, 10, dtype=np.float32).reshape(2, 3))
    print("torch_files_writer: reproduces lpips vgg.pth byte for byte; torch.load reads all its layouts "
          "and storage views")


class _Inert:
    def __setstate__(self, state):
        pass

    def append(self, item):
        pass


def main() -> None:
    OUT.mkdir(exist_ok=True)
    sd = _state_dict()
    _save(sd, "state_dict", "pt")
    ckpt = _lightning_checkpoint()
    _save(ckpt, "lightning", "ckpt")
    _save(_malicious(), "malicious", "pt")
    _save(_extras(), "extras", "pt")
    _check_payload_runs()

    def np_value(t):
        t = t.detach()
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    expected = {f"sd/{k}": np_value(v) for k, v in sd.items()}
    expected.update({f"ckpt/{k}": np_value(v) for k, v in ckpt["state_dict"].items()})
    for pid, st in ckpt["optimizer_states"][0]["state"].items():
        expected.update({f"adam/{pid}/{k}": np_value(v) for k, v in st.items()})
    expected["ckpt/best_model_score"] = np_value(ckpt["callbacks"][ModelCheckpoint]["best_model_score"])
    np.savez(OUT / "expected.npz", **expected)
    (OUT / "expected_metadata.json").write_text(json.dumps(sd._metadata))
    _check_writer()
    for p in sorted(OUT.iterdir()):
        print(f"{p.name:28s} {p.stat().st_size:7d} bytes")


if __name__ == "__main__":
    main()

"""Writes tests/llamagen_files/: LlamaGen weight files as its releases and training scripts wrote them.

Run in the reference environment (PyTorch), never in CI:

    /work/.venv-ref/bin/python tests/make_llamagen_files.py [GOLDEN_DIR] [OUT_DIR]

GOLDEN_DIR (default ../shared/golden/llamagen, else tests/golden/llamagen) holds ``llamagen_gpt_small.npz`` and
``llamagen_vq_small.npz``, whose ``state_dict/<key>`` arrays are the state dicts of the tiny models LlamaGen's own
code built. Each file below is what ``torch.save`` (zip serialisation, torch 2.x) writes for:

- ``c2i_tiny.pt``: ``{"model": gpt_state_dict}``, as the released ``c2i_*.pt`` (and LlamaGen's DDP training);
- ``c2i_tiny_consolidated.pth``: the bare GPT state dict, as ``train_c2i_fsdp.py`` writes ``consolidated.pth``
  (LlamaGen loads it with ``--from-fsdp``);
- ``c2i_tiny_module.pt``: ``{"module": gpt_state_dict}`` (DeepSpeed's layout);
- ``c2i_tiny_ema.pt``: ``{"ema": gpt_state_dict, "steps": 1000, "args": argparse.Namespace(...)}`` (the EMA
  weights of a training checkpoint; ``args`` pickles a class the reader must not run);
- ``vq_tiny.pt``: ``{"model": vq_state_dict}``, as the released ``vq_ds16_c2i.pt``;
- ``no_weights.pt``: ``{"steps": 5, "optimizer": {...}}``: a file holding no weights (an error case).

The weights are the golden arrays, which the tests already carry in tests/golden/llamagen; storing them again
would add megabytes. So ``files.tar.xz`` holds each file exactly as torch wrote it except that the bytes of
every stored tensor (a ``<archive>/data/<n>`` zip entry, written uncompressed) are zeroed, and
``manifest.json`` says, per file, its sha256 as torch wrote it and which golden array fills each zeroed entry.
The tests put the arrays back and check the sha256: they read the very bytes torch wrote.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import struct
import sys
import tarfile
import zipfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SETS = {"gpt": "llamagen_gpt_small", "vq": "llamagen_vq_small"}


def golden_state_dict(folder: str, name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(folder, name + ".npz"), allow_pickle=False) as z:
        return {k[len("state_dict/"):]: z[k] for k in z.files if k.startswith("state_dict/")}


def entry_data_offset(blob: bytes, info: zipfile.ZipInfo) -> int:
    """Where an entry's bytes start: after its local header (30 bytes, name and extra field)."""
    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def skeleton(blob: bytes, sources: dict[str, dict[str, np.ndarray]]) -> tuple[bytes, dict]:
    """``blob`` with every tensor entry zeroed, and {entry name: [set, key]} naming the golden array whose
    bytes it held (any array with those exact bytes serves)."""
    by_bytes = {}
    for set_name, sd in sources.items():
        for key, arr in sd.items():
            by_bytes.setdefault(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes(),
                                [set_name, key])
    out = bytearray(blob)
    fill = {}
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        for info in zf.infolist():
            if "/data/" not in info.filename:
                continue
            assert info.compress_type == zipfile.ZIP_STORED, info
            start = entry_data_offset(blob, info)
            data = blob[start:start + info.file_size]
            assert data == zf.read(info.filename)
            if data not in by_bytes:
                raise SystemExit(f"entry {info.filename} holds bytes of no golden array")
            fill[info.filename] = by_bytes[data]
            out[start:start + info.file_size] = bytes(info.file_size)
    return bytes(out), fill


def tensors(sd: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    # A dict of parameters in the state dict's order, each its own storage, as module.state_dict() gives.
    import collections
    return collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in sd.items())


def main(golden: str, out: str) -> None:
    sources = {name: golden_state_dict(golden, stem) for name, stem in SETS.items()}
    gpt, vq = tensors(sources["gpt"]), tensors(sources["vq"])
    namespace = argparse.Namespace(gpt_model="GPT-B", gpt_type="c2i", vocab_size=512, image_size=256,
                                   downsample_size=16, num_classes=10, cls_token_num=1, ema=True)
    files = {
        "c2i_tiny.pt": {"model": gpt},
        "c2i_tiny_consolidated.pth": gpt,
        "c2i_tiny_module.pt": {"module": gpt},
        "c2i_tiny_ema.pt": {"ema": gpt, "steps": 1000, "args": namespace},
        "vq_tiny.pt": {"model": vq},
        "no_weights.pt": {"steps": 5, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}},
    }
    os.makedirs(out, exist_ok=True)
    manifest = {"torch": torch.__version__, "files": {}}
    tmp = os.path.join(out, "_tmp")
    os.makedirs(tmp, exist_ok=True)
    with tarfile.open(os.path.join(out, "files.tar.xz"), "w:xz", preset=9) as tar:
        for name, obj in files.items():
            path = os.path.join(tmp, name)
            torch.save(obj, path)
            blob = open(path, "rb").read()
            os.remove(path)
            # torch's own reader gets back what was saved (the test's reader is checked against the arrays)
            back = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
            assert type(back) is type(obj)
            zeroed, fill = skeleton(blob, sources)
            manifest["files"][name] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob),
                                       "fill": fill}
            info = tarfile.TarInfo(name)
            info.size = len(zeroed)
            tar.addfile(info, io.BytesIO(zeroed))
    os.rmdir(tmp)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    print("wrote", out, {n: m["size"] for n, m in manifest["files"].items()})


if __name__ == "__main__":
    default_golden = os.path.join(HERE, "..", "..", "shared", "golden", "llamagen")
    if not os.path.isdir(default_golden):
        default_golden = os.path.join(HERE, "golden", "llamagen")
    main(sys.argv[1] if len(sys.argv) > 1 else default_golden,
         sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "llamagen_files"))

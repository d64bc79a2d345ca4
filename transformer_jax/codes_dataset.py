"""Stage two's codes datasets on disk: one split at a time, one shard per host, read by random access.

A codes dataset is plain array_record shards, each with a JSON file, not TFDS: TFDS writes all splits of a dataset
in one ``download_and_prepare`` call, whereas codes are produced one split at a time, often by several hosts at once
(one shard each). See :func:`write_codes_dataset`. Importing this module registers the format with
:mod:`common_jax.datasets`, so ``open_split`` / ``describe_dataset`` / ``data.make_loader`` read these folders:
every path that reads codes (pre-encoding, stage-two training, the demo's metrics) imports it, through
:mod:`transformer_jax.codes`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from common_jax import datasets
from common_jax.datasets import DatasetNotPreparedError, PreparedDataset, SplitSource

KIND = "codes"
CODES_FORMAT = "taming_jax_codes"
CODES_FEATURES = ("codes", "label", "cond_codes")
DEFAULT_FEATURES = ("codes", "label")
_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.json$")


def is_codes_dir(path: Path) -> bool:
    """Whether ``path`` is a folder holding codes shards (their JSON files)."""
    return path.is_dir() and any(_SHARD_RE.match(p.name) for p in path.iterdir())


def _shard_stem(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}"


def _as_int32(value: Any, key: str, i: int) -> np.ndarray:
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"codes example {i}: '{key}' must be integer, got dtype {arr.dtype}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"codes example {i}: '{key}' does not fit in int32")
    return arr.astype("<i4")


def write_codes_dataset(data_dir: str | os.PathLike, name: str, split: str,
                        examples: Iterable[Mapping[str, Any]], *, shard_index: int = 0, shard_count: int = 1,
                        overwrite: bool = False) -> PreparedDataset:
    """Write one split (or one shard of it, e.g. one per host) of a codes dataset.

    Each example is ``{'codes': int (h, w) or (T,), 'label': int scalar, optional 'cond_codes': int array}``;
    all examples of a shard must have the same keys and shapes. Files:
    ``data_dir/name/{split}-{i:05d}-of-{n:05d}.array_record`` and ``.json`` (shapes, dtypes, count). Each
    record is the little-endian int32 bytes of the features, in the order listed in the JSON.
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"split name must be letters, digits or '_', got '{split}'")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    out = Path(data_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    stem = _shard_stem(split, shard_index, shard_count)
    rec_path, meta_path = out / f"{stem}.array_record", out / f"{stem}.json"
    if meta_path.exists() and not overwrite:
        raise FileExistsError(f"codes shard {meta_path} already exists; pass overwrite=True to replace it")
    tmp = out / f".{stem}.array_record.tmp"
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    spec: dict[str, dict[str, Any]] | None = None
    n = 0
    try:
        for i, ex in enumerate(examples):
            keys = sorted(ex)
            unknown = [k for k in keys if k not in CODES_FEATURES]
            if unknown or "codes" not in ex or "label" not in ex:
                raise KeyError(f"codes example {i}: keys {keys}; required 'codes' and 'label', optional "
                               f"'cond_codes', unknown {unknown}")
            arrays = {k: _as_int32(ex[k], k, i) for k in keys}
            if arrays["label"].shape != ():
                raise ValueError(f"codes example {i}: 'label' must be a scalar, got shape {arrays['label'].shape}")
            if spec is None:
                spec = {k: {"shape": list(a.shape), "dtype": "int32"} for k, a in arrays.items()}
            for k, a in arrays.items():
                if k not in spec or list(a.shape) != spec[k]["shape"]:
                    raise ValueError(f"codes example {i}: '{k}' has shape {list(a.shape)}, expected "
                                     f"{spec.get(k, {}).get('shape')} (as in example 0); keys {sorted(spec)}")
            if len(arrays) != len(spec):
                raise KeyError(f"codes example {i}: keys {keys}, expected {sorted(spec)} (as in example 0)")
            writer.write(b"".join(arrays[k].tobytes() for k in sorted(spec)))
            n += 1
    finally:
        writer.close()
    if spec is None:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"write_codes_dataset('{name}', '{split}'): no examples given")
    os.replace(tmp, rec_path)
    meta = {"format": CODES_FORMAT, "version": 1, "split": split, "shard_index": shard_index,
            "shard_count": shard_count, "num_examples": n, "features": spec, "order": sorted(spec)}
    meta_path.write_text(json.dumps(meta, indent=1))
    return PreparedDataset(name, str(data_dir), str(out), {split: n})


def _codes_shards(path: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for p in sorted(path.iterdir()):
        m = _SHARD_RE.match(p.name)
        if not m:
            continue
        try:
            meta = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"codes metadata {p} is not valid JSON ({e})") from e
        if meta.get("format") != CODES_FORMAT:
            raise ValueError(f"{p}: 'format' is {meta.get('format')!r}, expected {CODES_FORMAT!r}")
        meta["_path"] = str(p.with_suffix(".array_record"))
        out.setdefault(m["split"], []).append(meta)
    return out


class CodesSource:
    """Random-access reader of one codes split: ``src[i] -> {'codes': int32 array, 'label': int32, ...}``."""

    def __init__(self, paths: Sequence[str], spec: Mapping[str, Mapping[str, Any]], order: Sequence[str]):
        import grain
        self._paths = list(paths)
        self._reader = grain.sources.ArrayRecordDataSource(self._paths)
        self._spec = {k: tuple(v["shape"]) for k, v in spec.items()}
        self._order = list(order)
        self.features = tuple(self._order)
        self._sizes = [int(np.prod(self._spec[k], dtype=np.int64)) for k in self._order]

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        flat = np.frombuffer(self._reader[i], dtype="<i4")
        out, off = {}, 0
        for k, size in zip(self._order, self._sizes):
            out[k] = flat[off:off + size].reshape(self._spec[k]).astype(np.int32)
            off += size
        return out

    def __repr__(self) -> str:
        return f"CodesSource({len(self)} records, {self._spec})"


def read_codes(data_dir: str | os.PathLike, name: str, split: str) -> CodesSource:
    """Open a codes split written by :func:`write_codes_dataset` (all its shards, in shard order)."""
    path = Path(data_dir) / name
    if not is_codes_dir(path):
        raise DatasetNotPreparedError(f"codes dataset '{name}' is not in data_dir '{data_dir}' (no "
                                      f"{path}/<split>-00000-of-NNNNN.json); write it with "
                                      f"transformer_jax.codes_dataset.write_codes_dataset(data_dir, name, split, "
                                      f"examples)")
    shards = _codes_shards(path)
    if split not in shards:
        raise KeyError(f"codes dataset '{name}' at {path} has no split '{split}'; splits: {sorted(shards)}")
    metas = sorted(shards[split], key=lambda m: m["shard_index"])
    count = metas[0]["shard_count"]
    have = [m["shard_index"] for m in metas]
    if have != list(range(count)) or any(m["shard_count"] != count for m in metas):
        raise ValueError(f"codes dataset '{name}' split '{split}' at {path}: expected shards 0..{count - 1} of "
                         f"{count}, found {have}")
    for m in metas[1:]:
        if m["features"] != metas[0]["features"]:
            raise ValueError(f"codes dataset '{name}' split '{split}': shard {m['shard_index']} has features "
                             f"{m['features']}, shard 0 has {metas[0]['features']}")
    for m in metas:
        if not Path(m["_path"]).is_file():
            raise FileNotFoundError(f"codes shard file {m['_path']} is missing (its metadata exists)")
    return CodesSource([m["_path"] for m in metas], metas[0]["features"], metas[0]["order"])


# ----------------------------------------------------------------------------------------------------------
# The format as common_jax.datasets sees it.

def _open_split(data_dir: Path, name: str, split: str) -> SplitSource:
    src = read_codes(data_dir, name, split)
    return SplitSource(src, KIND, tuple(src.features), (), None, str(Path(data_dir) / name),
                       default_features=DEFAULT_FEATURES)


def _splits(path: Path) -> dict[str, int]:
    return {s: sum(m["num_examples"] for m in metas) for s, metas in _codes_shards(path).items()}


datasets.register_format(datasets.DatasetFormat(
    KIND, is_codes_dir, _open_split, _splits,
    "transformer_jax.codes_dataset.write_codes_dataset(data_dir, name, split, examples)"))

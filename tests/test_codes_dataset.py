"""Stage two's codes datasets: sharded writes, reads in shard order, refused bad examples and incomplete splits, and
the format seen through common_jax.datasets once transformer_jax.codes_dataset registered it."""
import json

import numpy as np
import pytest

from common_jax import datasets
from transformer_jax import codes_dataset


def _examples(n, start=0, hw=(2, 3), cond=False):
    for i in range(start, start + n):
        ex = {"codes": np.full(hw, i, np.int64), "label": i % 3}
        if cond:
            ex["cond_codes"] = np.arange(4) + i
        yield ex


def test_codes_round_trip(tmp_path):
    write = codes_dataset.write_codes_dataset
    write(tmp_path, "codes", "train", _examples(5, 0, cond=True), shard_index=0, shard_count=2)
    write(tmp_path, "codes", "train", _examples(4, 5, cond=True), shard_index=1, shard_count=2)
    out = codes_dataset.write_codes_dataset(tmp_path, "codes", "validation", _examples(3, cond=True))
    assert out.splits == {"validation": 3}
    src = codes_dataset.read_codes(tmp_path, "codes", "train")
    assert len(src) == 9
    for i in range(9):
        r = src[i]
        assert r["codes"].dtype == np.int32 and r["codes"].shape == (2, 3) and (r["codes"] == i).all()
        assert r["label"].dtype == np.int32 and r["label"].shape == () and int(r["label"]) == i % 3
        np.testing.assert_array_equal(r["cond_codes"], np.arange(4) + i)
    d = datasets.describe_dataset(tmp_path, "codes")
    assert d.splits == {"train": 9, "validation": 3}
    # The files as earlier versions wrote them, so datasets pre-encoded before stay readable: one JSON per shard and
    # records of little-endian int32 features concatenated in the JSON's order.
    meta = json.loads((tmp_path / "codes" / "train-00001-of-00002.json").read_text())
    spec = {"shape": [2, 3], "dtype": "int32"}
    assert meta == {"format": "taming_jax_codes", "version": 1, "split": "train", "shard_index": 1, "shard_count": 2,
                    "num_examples": 4, "order": ["codes", "cond_codes", "label"],
                    "features": {"codes": spec, "cond_codes": {"shape": [4], "dtype": "int32"},
                                 "label": {"shape": [], "dtype": "int32"}}}
    import grain
    raw = grain.sources.ArrayRecordDataSource([str(tmp_path / "codes" / "train-00001-of-00002.array_record")])
    want = np.concatenate([np.full(6, 5), np.arange(4) + 5, [5 % 3]]).astype("<i4").tobytes()
    assert len(raw) == 4 and raw[0] == want
    split = datasets.open_split(tmp_path, "codes", "validation")
    assert split.kind == "codes" and set(split.features) == {"codes", "label", "cond_codes"}


def test_codes_write_errors(tmp_path):
    with pytest.raises(KeyError, match="example 0.*required 'codes'"):
        codes_dataset.write_codes_dataset(tmp_path, "c", "train", [{"label": 1}])
    with pytest.raises(KeyError, match="unknown \\['extra'\\]"):
        codes_dataset.write_codes_dataset(tmp_path, "c", "train", [{"codes": [1], "label": 1, "extra": 2}])
    with pytest.raises(ValueError, match=r"example 1: 'codes' has shape \[3, 3\], expected \[2, 3\]"):
        codes_dataset.write_codes_dataset(tmp_path, "c", "train", [next(_examples(1)), next(_examples(1, hw=(3, 3)))])
    with pytest.raises(TypeError, match="'codes' must be integer, got dtype float"):
        codes_dataset.write_codes_dataset(tmp_path, "c", "train", [{"codes": np.zeros(3), "label": 0}])
    with pytest.raises(ValueError, match="'label' must be a scalar"):
        codes_dataset.write_codes_dataset(tmp_path, "c", "train", [{"codes": [1], "label": [1, 2]}])
    with pytest.raises(ValueError, match="no examples"):
        codes_dataset.write_codes_dataset(tmp_path, "c", "train", [])
    with pytest.raises(ValueError, match="shard_index"):
        codes_dataset.write_codes_dataset(tmp_path, "c", "train", _examples(1), shard_index=2, shard_count=2)
    assert not list((tmp_path / "c").glob("train-*"))  # failed writes leave nothing behind
    codes_dataset.write_codes_dataset(tmp_path, "c", "train", _examples(2))
    with pytest.raises(FileExistsError, match="train-00000-of-00001.json already exists"):
        codes_dataset.write_codes_dataset(tmp_path, "c", "train", _examples(2))
    codes_dataset.write_codes_dataset(tmp_path, "c", "train", _examples(3), overwrite=True)
    assert len(codes_dataset.read_codes(tmp_path, "c", "train")) == 3


def test_codes_read_errors(tmp_path):
    with pytest.raises(datasets.DatasetNotPreparedError, match="codes dataset 'c' is not in.*write_codes_dataset"):
        codes_dataset.read_codes(tmp_path, "c", "train")
    codes_dataset.write_codes_dataset(tmp_path, "c", "train", _examples(2), shard_index=1, shard_count=2)
    with pytest.raises(ValueError, match=r"expected shards 0..1 of 2, found \[1\]"):
        codes_dataset.read_codes(tmp_path, "c", "train")
    with pytest.raises(KeyError, match="no split 'validation'"):
        codes_dataset.read_codes(tmp_path, "c", "validation")
    with pytest.raises(datasets.DatasetNotPreparedError,
                       match=r"'nothing' is not prepared.*transformer_jax\.codes_dataset\.write_codes_dataset"):
        datasets.open_split(tmp_path, "nothing", "train")

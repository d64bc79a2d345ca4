"""Pre-encoding a dataset to codes once, so stage-two training reads integers instead of images. The files are
:mod:`transformer_jax.codes_dataset`'s; importing this module registers that format for the loader."""
from __future__ import annotations

import hashlib
import itertools
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging

from common_jax import data as data_lib
from common_jax import datasets
from transformer_jax import codes_dataset
from common_jax.metrics import progress_iter


Encoders = Mapping[str, tuple[str, Callable[[np.ndarray], Any]]]   # out key -> (batch key, batch -> codes)


def codes_dataset_name(data_dir: str, image_dataset: str, image_size: int, stage_one_id: str) -> str:
    """A name unique to (images, size, stage-one model), so a changed model or a dataset rebuilt under the same
    name (:func:`common_jax.datasets.dataset_fingerprint`) never reuses stale codes."""
    images = datasets.dataset_fingerprint(data_dir, image_dataset)
    h = hashlib.sha1(f"{image_dataset}|{images}|{image_size}|{stage_one_id}".encode()).hexdigest()[:12]
    return f"codes_{h}"


def encode_examples(loader: data_lib.Loader, encoders: Encoders, num_batches: int) -> Iterator[dict]:
    """Examples ``{'codes', 'label'[, 'cond_codes']}`` of the next ``num_batches`` of a finite (eval-mode,
    masked) loader; ``encoders`` maps each output key to (batch key, encoder). Datasets without labels
    (paired image/segmentation folders) store label 0."""
    for batch in progress_iter(itertools.islice(loader, num_batches), total=num_batches, desc="encode"):
        out = {k: np.asarray(fn(batch[src]), np.int32) for k, (src, fn) in encoders.items()}
        n = len(out["codes"])
        labels = np.asarray(batch["label"], np.int32) if "label" in batch else np.zeros(n, np.int32)
        for i in np.flatnonzero(batch.get("mask", np.ones(n, bool))):
            yield dict({k: v[i] for k, v in out.items()}, label=labels[i])


def _with_label(data_dir: str, name: str, split: str, inputs: tuple[str, ...]) -> tuple[str, ...]:
    """The encoders' inputs plus ``label`` where the dataset has one."""
    return inputs + (("label",) if "label" in datasets.open_split(data_dir, name, split).features else ())


def _complete(data_dir: str, name: str, split: str) -> bool:
    try:
        codes_dataset.read_codes(data_dir, name, split)
        return True
    except (FileNotFoundError, KeyError, ValueError):   # not written, split missing, shards incomplete
        return False


def codebook_usage(data_dir: str, name: str, n_embed: int, split: str = "train", max_examples: int = 4096
                   ) -> tuple[int, int]:
    """(distinct codes, examples read) in ``max_examples`` examples spread evenly over a codes split: enough to
    tell a collapsed stage one (a handful of codes) from a healthy one without reading a whole dataset."""
    src = codes_dataset.read_codes(data_dir, name, split)
    idx = np.unique(np.linspace(0, len(src) - 1, min(len(src), max_examples)).astype(np.int64))
    seen = np.zeros(n_embed, bool)
    for i in idx:
        c = src[int(i)]["codes"].reshape(-1)
        seen[c[(c >= 0) & (c < n_embed)]] = True
    return int(seen.sum()), len(idx)


def warn_if_collapsed(data_dir: str, name: str, n_embed: int, min_usage: float, split: str = "train") -> bool:
    """Log one warning (and return True) when the codes of ``split`` use fewer than ``min_usage`` (a fraction) of
    the ``n_embed`` codebook entries: a collapsed or diverged stage one, whose GPT would learn next to nothing
    (a single code is predicted with accuracy 1.0)."""
    if not 0.0 <= min_usage <= 1.0:
        raise ValueError(f"data.min_codebook_usage must be a fraction in [0, 1], got {min_usage}")
    used, examples = codebook_usage(data_dir, name, n_embed, split)
    if not examples or used >= min_usage * n_embed:
        return False
    logging.warning("the pre-encoded %s codes (%s) use %d of the %d codebook entries (%.2f%%, in %d examples), "
                    "fewer than data.min_codebook_usage=%g of them: the stage-one model looks collapsed; check its "
                    "reconstructions before training stage two on it", split, name, used, n_embed,
                    100.0 * used / n_embed, examples, min_usage)
    return True


def prepare_codes(data_dir: str, image_dataset: str, image_size: int,
                  encode: Callable[[np.ndarray], Any] | Encoders, stage_one_id: str, batch_size: int,
                  splits=("train", "validation")) -> str:
    """Encode each split once; returns the codes dataset name.

    ``encode``: images -> codes, or a mapping as :func:`encode_examples` takes (e.g. also
    ``{'cond_codes': ('segmentation', encode_segmentation)}``); ``stage_one_id`` must then identify every
    encoder's weights.

    Process i of n encodes the contiguous batches ``[i*nb/n, (i+1)*nb/n)`` of the whole split and writes
    shard i, so the stored order is the split's order whatever the number of processes, and a dataset
    encoded by another process count is reused as it is. Training from codes fixes one (center) crop per
    image, where on-the-fly encoding sees a new random crop every epoch: the usual trade for speed.
    """
    encoders = dict(encode) if isinstance(encode, Mapping) else {"codes": ("image", encode)}
    inputs = tuple(dict.fromkeys(src for src, _ in encoders.values()))
    name = codes_dataset_name(data_dir, image_dataset, image_size, stage_one_id)
    n, i = jax.process_count(), jax.process_index()
    for split in splits:
        if _complete(data_dir, name, split):
            continue
        loader = data_lib.make_loader(data_dir, image_dataset, split, batch_size, train=False,
                                      image_size=image_size, seed=0, num_epochs=1, process_index=0,
                                      process_count=1, features=_with_label(data_dir, image_dataset, split, inputs))
        nb = len(loader)
        start, stop = i * nb // n, (i + 1) * nb // n
        loader.set_state(dict(loader.get_state(), next_batch=start))
        logging.info("pre-encoding %s/%s batches [%d, %d) to %s", image_dataset, split, start, stop, name)
        codes_dataset.write_codes_dataset(data_dir, name, split, encode_examples(loader, encoders, stop - start),
                                          shard_index=i, shard_count=n, overwrite=True)
        if n > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"prepare_codes_{split}")
    return name

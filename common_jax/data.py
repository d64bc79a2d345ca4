"""Host-local input batches from prepared datasets, read with grain; checkpointable and process-sharded.

Batch layout: every *global* batch ``b`` is positions ``[b*G, (b+1)*G)`` of one stream (shuffled per epoch
for training, in order for evaluation) and process ``p`` of ``P`` gets positions ``[b*G + p*G/P, ...)`` of
it. So the global batches do not depend on the number of processes, the process slices are disjoint and
together form the global batch, and a loader's whole state is the index of its next global batch.

Training streams repeat forever (reshuffled each epoch, per-example random crop/flip seeded by stream
position) unless ``num_epochs`` is given, in which case the last incomplete global batch is dropped.
Evaluation streams (``train=False``) read each example once in stored order; the last global batch is
padded by repeating the final example and a boolean ``mask`` field marks the real examples (every process
then yields the same number of batches, which multi-host evaluation needs).
"""
from __future__ import annotations

import io
import os
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from common_jax.datasets import SplitSource, open_split

STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Image preprocessing (numpy/PIL, runs in grain threads or workers).

def decode_image(data: bytes | np.ndarray, min_side: int | None = None) -> Image.Image:
    """Encoded bytes (or a uint8 array) -> RGB PIL image. ``min_side`` lets JPEG decode at reduced scale
    while keeping both sides >= min_side (DCT scaling, much faster for large photos)."""
    if isinstance(data, np.ndarray):
        return Image.fromarray(data).convert("RGB")
    img = Image.open(io.BytesIO(data))
    if min_side is not None and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))
    return img.convert("RGB")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` (bicubic, antialiased when shrinking)."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(size, int(round(w * scale))), max(size, int(round(h * scale))))
    return img.resize(new, Image.Resampling.BICUBIC)


def to_float(img: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def preprocess_eval(data: bytes | np.ndarray, image_size: int | None) -> np.ndarray:
    """Resize shorter side to image_size and center-crop a square (no resize when image_size is None)."""
    img = decode_image(data, image_size)
    if image_size is None:
        return to_float(img)
    img = resize_shorter_side(img, image_size)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return to_float(img.crop((left, top, left + image_size, top + image_size)))


def preprocess_train(data: bytes | np.ndarray, image_size: int | None, rng: np.random.Generator,
                     random_flip: bool = True) -> np.ndarray:
    """Resize shorter side to image_size, random square crop, random horizontal flip."""
    img = decode_image(data, image_size)
    if image_size is not None:
        img = resize_shorter_side(img, image_size)
        w, h = img.size
        left = int(rng.integers(0, w - image_size + 1))
        top = int(rng.integers(0, h - image_size + 1))
        img = img.crop((left, top, left + image_size, top + image_size))
    out = to_float(img)
    if random_flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------------------------------------
# grain pieces (module-level classes so multiprocessing workers can pickle them).

class _Select:
    """Keep the requested features; label -> int32."""

    def __init__(self, features: Sequence[str]):
        self.features = tuple(features)

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        out = {k: record[k] for k in self.features}
        if "label" in out:
            out["label"] = np.int32(out["label"])
        return out


class _TrainTransform(grain.transforms.RandomMap):
    def __init__(self, image_keys: Sequence[str], image_size: int | None, random_flip: bool):
        self.image_keys, self.image_size, self.random_flip = tuple(image_keys), image_size, random_flip

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = dict(element)
        for k in self.image_keys:
            out[k] = preprocess_train(element[k], self.image_size, rng, self.random_flip)
        return out


class _EvalTransform(grain.transforms.Map):
    def __init__(self, image_keys: Sequence[str], image_size: int | None):
        self.image_keys, self.image_size = tuple(image_keys), image_size

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        out = dict(element)
        for k in self.image_keys:
            out[k] = preprocess_eval(element[k], self.image_size)
        return out


class _Padded(grain.sources.RandomAccessDataSource):
    """Index i < n: (i, True); n <= i < length: (n - 1, False). Pads the eval stream to whole batches."""

    def __init__(self, n: int, length: int):
        self.n, self.length = n, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[int, bool]:
        return (i, True) if i < self.n else (self.n - 1, False)


class _LookupMasked(grain.transforms.Map):
    def __init__(self, source: Any):
        self.source = source

    def map(self, element: tuple[int, bool]) -> dict[str, Any]:
        i, valid = element
        out = dict(self.source[int(i)])
        out["mask"] = np.bool_(valid)
        return out


class _GatherBatch(grain.transforms.Map):
    """Global batch index -> this process's slice of it, stacked."""

    def __init__(self, stream: grain.MapDataset, global_batch: int, local_batch: int, process_index: int):
        self.stream, self.g, self.l, self.p = stream, global_batch, local_batch, process_index

    def map(self, b: int) -> dict[str, np.ndarray]:
        start = int(b) * self.g + self.p * self.l
        items = [self.stream[start + i] for i in range(self.l)]
        try:
            return {k: np.stack([it[k] for it in items]) for k in items[0]}
        except ValueError as e:
            shapes = {k: sorted({np.shape(it[k]) for it in items}, key=str) for k in items[0]}
            raise ValueError(f"cannot stack a batch, examples differ in shape {shapes}; pass image_size to "
                             f"resize/crop images to one size") from e


# ----------------------------------------------------------------------------------------------------------
# Loader.

class Loader:
    """Iterator of host-local batches (dict of numpy) with JSON-serialisable ``get_state``/``set_state``."""

    def __init__(self, batches: grain.MapDataset, num_batches: int | None, identity: dict[str, Any],
                 worker_count: int, read_threads: int, class_names: list[str] | None, num_examples: int):
        self._batches = batches
        self.num_batches = num_batches          # None: infinite
        self._identity = identity
        self._worker_count = worker_count
        self._read_threads = read_threads
        self.class_names = class_names
        self.num_examples = num_examples         # records in the split (one epoch)
        self._next = 0
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _make_iterator(self) -> Iterator[dict[str, np.ndarray]]:
        stop = self.num_batches
        ds = self._batches.slice(slice(self._next, stop))
        threads = max(1, self._read_threads)
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
        if self._worker_count > 0:
            _ensure_absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
        return iter(it_ds)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._next >= self.num_batches:
            raise StopIteration
        if self._it is None:
            self._it = self._make_iterator()
        batch = next(self._it)
        self._next += 1
        return batch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("infinite training stream has no length (pass num_epochs for a finite one)")
        return self.num_batches

    def close(self) -> None:
        """Stop reader threads / worker processes (a later ``next`` starts them again)."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next global batch index plus what defines the stream."""
        return {"version": STATE_VERSION, "next_batch": self._next, **self._identity}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a state taken by ``get_state`` of a loader over the same stream (the process count
        may differ: global batches do not depend on it)."""
        if not isinstance(state, dict) or "next_batch" not in state:
            raise ValueError(f"loader state must be a dict from Loader.get_state() with 'next_batch', got {state!r}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        diff = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
        if diff:
            raise ValueError("loader state is for a different stream; (state, this loader): "
                             + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items()))
        nxt = int(state["next_batch"])
        if nxt < 0 or (self.num_batches is not None and nxt > self.num_batches):
            raise ValueError(f"loader state next_batch={nxt} is outside [0, {self.num_batches}]")
        self.close()
        self._next = nxt


def _ensure_absl_flags_parsed() -> None:
    """grain worker processes read absl flags; outside an absl app (pytest, notebooks) nobody parsed them."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_loader(data_dir: str | os.PathLike, name: str, split: str, global_batch_size: int, *, train: bool,
                image_size: int | None, seed: int, process_index: int | None = None,
                process_count: int | None = None, num_epochs: int | None = None, worker_count: int = 0,
                features: Sequence[str] | None = None, random_flip: bool = True,
                read_threads: int = 4) -> Loader:
    """Loader of host-local batches of ``global_batch_size // process_count`` examples.

    Image datasets: ``image`` float32 NHWC in [-1, 1] (train: resize shorter side + random crop + flip;
    eval: resize shorter side + center crop; ``image_size=None`` keeps stored sizes), ``label`` int32.
    Codes datasets: ``codes`` / ``cond_codes`` / ``label`` int32 as stored. ``features`` defaults to
    ``('image', 'label')`` or ``('codes', 'label')``. Eval batches add ``mask`` (bool; False on padding).
    ``worker_count > 0`` uses grain worker processes (same batches as 0).
    """
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be None or >= 1, got {image_size}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")

    src: SplitSource = open_split(data_dir, name, split)
    if features is None:
        features = ("codes", "label") if src.kind == "codes" else ("image", "label")
    features = tuple(features)
    missing = [f for f in features if f not in src.features]
    if missing:
        raise KeyError(f"dataset '{name}' split '{split}' has no feature(s) {missing}; it has {sorted(src.features)}")
    if src.kind == "codes" and image_size is not None:
        raise ValueError(f"'{name}' is a codes dataset; image_size must be None, got {image_size}")
    image_keys = [k for k in features if k in src.image_features]
    n = len(src.source)
    if n == 0:
        raise ValueError(f"dataset '{name}' split '{split}' at {src.path} is empty")
    G, L = global_batch_size, global_batch_size // process_count

    base = grain.MapDataset.source(src.source).map(_Select(features))
    if train:
        stream = base.shuffle(seed=seed).repeat(num_epochs)
        stream = stream.random_map(_TrainTransform(image_keys, image_size, random_flip), seed=seed)
        num_batches = None if num_epochs is None else len(stream) // G
    else:
        epochs = 1 if num_epochs is None else num_epochs
        per_epoch = -(-n // G) * G
        padded = grain.MapDataset.source(_Padded(n, per_epoch)).repeat(epochs, reseed_each_epoch=False)
        stream = padded.map(_LookupMasked(base)).map(_EvalTransform(image_keys, image_size))
        num_batches = epochs * per_epoch // G
    if num_batches == 0:
        raise ValueError(f"dataset '{name}' split '{split}' has {n} examples, fewer than one global batch of "
                         f"{G} for {num_epochs} epoch(s) with drop_remainder")
    length = np.iinfo(np.int64).max // G if num_batches is None else num_batches
    batches = grain.MapDataset.range(length).map(_GatherBatch(stream, G, L, process_index))
    identity = {"name": name, "split": split, "global_batch_size": G, "train": bool(train),
                "image_size": image_size, "seed": int(seed), "num_epochs": num_epochs,
                "features": list(features), "random_flip": bool(random_flip), "num_examples": n}
    return Loader(batches, num_batches, identity, worker_count, read_threads, src.class_names, n)

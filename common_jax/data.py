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

def _open_image(data: bytes | np.ndarray, min_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, stored (width, height)); the image is smaller than stored when JPEG draft mode applied."""
    if isinstance(data, np.ndarray):
        img = Image.fromarray(data)
        return img.convert("RGB"), img.size
    img = Image.open(io.BytesIO(data))
    size = img.size
    if min_side is not None and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))
    return img.convert("RGB"), size


def decode_image(data: bytes | np.ndarray, min_side: int | None = None) -> Image.Image:
    """Encoded bytes (or a uint8 array) -> RGB PIL image. ``min_side`` lets JPEG decode at reduced scale
    while keeping both sides >= min_side (DCT scaling, much faster for large photos)."""
    return _open_image(data, min_side)[0]


def decode_label_map(data: bytes | np.ndarray) -> Image.Image:
    """Encoded single-channel 8-bit map (or a uint8 (H, W[, 1]) array) -> mode 'L' image of class ids.
    A palette ('P') map gives its indices, never the palette colours."""
    if isinstance(data, np.ndarray):
        return Image.fromarray(np.asarray(data, np.uint8).reshape(data.shape[:2]), "L")
    img = Image.open(io.BytesIO(data))
    if img.mode not in ("L", "P"):
        raise ValueError(f"label map has mode {img.mode}; expected a single-channel 8-bit map (L or P)")
    return img if img.mode == "L" else Image.fromarray(np.asarray(img), "L")


def shorter_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is ``size``."""
    if min(w, h) == size:
        return w, h
    scale = size / min(w, h)
    return max(size, int(round(w * scale))), max(size, int(round(h * scale)))


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` (bicubic, antialiased when shrinking)."""
    new = shorter_side_size(*img.size, size)
    return img if new == img.size else img.resize(new, Image.Resampling.BICUBIC)


def to_float(img: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def _crop_flip(size: tuple[int, int], image_size: int | None, rng: np.random.Generator | None,
               random_flip: bool) -> tuple[tuple[int, int, int, int] | None, bool]:
    """(crop box or None, flip) for an image of ``size`` after the shorter-side resize: a random window
    (rng) or the center (no rng). Draws left, top, flip in the order preprocess_train does."""
    box = None
    if image_size is not None:
        w, h = size
        if rng is None:
            left, top = (w - image_size) // 2, (h - image_size) // 2
        else:
            left, top = int(rng.integers(0, w - image_size + 1)), int(rng.integers(0, h - image_size + 1))
        box = (left, top, left + image_size, top + image_size)
    return box, rng is not None and random_flip and bool(rng.random() < 0.5)


def preprocess_eval(data: bytes | np.ndarray, image_size: int | None) -> np.ndarray:
    """Resize shorter side to image_size and center-crop a square (no resize when image_size is None)."""
    img = decode_image(data, image_size)
    if image_size is None:
        return to_float(img)
    img = resize_shorter_side(img, image_size)
    box, _ = _crop_flip(img.size, image_size, None, False)
    return to_float(img.crop(box))


def preprocess_train(data: bytes | np.ndarray, image_size: int | None, rng: np.random.Generator,
                     random_flip: bool = True) -> np.ndarray:
    """Resize shorter side to image_size, random square crop, random horizontal flip."""
    img = decode_image(data, image_size)
    if image_size is not None:
        img = resize_shorter_side(img, image_size)
    box, flip = _crop_flip(img.size, image_size, rng, random_flip)
    out = to_float(img if box is None else img.crop(box))
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def preprocess_paired(images: dict[str, bytes | np.ndarray], label_maps: dict[str, bytes | np.ndarray],
                      image_size: int | None, rng: np.random.Generator | None = None,
                      random_flip: bool = True) -> dict[str, np.ndarray]:
    """One geometric transform for images and label maps of the same scene (at least one label map).

    Shorter side resized to ``image_size`` (images bicubic, label maps nearest: class ids are never
    interpolated), then a random (``rng`` given: training) or center square crop and, in training, a random
    horizontal flip, all shared. Images -> float32 [-1, 1] (H, W, 3); label maps -> int32 (H, W).
    """
    if not label_maps:
        raise ValueError("preprocess_paired needs at least one label map (use preprocess_train/eval for images)")
    maps = {k: decode_label_map(v) for k, v in label_maps.items()}
    decoded = {k: _open_image(v, image_size) for k, v in images.items()}
    ref, size = next((k, m.size) for k, m in maps.items())
    stored = {**{k: m.size for k, m in maps.items()}, **{k: s for k, (_, s) in decoded.items()}}
    for k, (w, h) in stored.items():
        if (w, h) != size:
            raise ValueError(f"'{k}' is {w}x{h} but '{ref}' is {size[0]}x{size[1]}; paired images and label "
                             f"maps must have the same size")
    target = size if image_size is None else shorter_side_size(*size, image_size)
    box, flip = _crop_flip(target, image_size, rng, random_flip)

    def geometry(img: Image.Image, resample: Image.Resampling) -> Image.Image:
        img = img if img.size == target else img.resize(target, resample)
        return img if box is None else img.crop(box)

    out = {}
    for k, (img, _) in decoded.items():
        out[k] = to_float(geometry(img, Image.Resampling.BICUBIC))
    for k, m in maps.items():
        out[k] = np.asarray(geometry(m, Image.Resampling.NEAREST), dtype=np.int32)
    return {k: np.ascontiguousarray(v[:, ::-1] if flip else v) for k, v in out.items()}


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


def _paired(element: dict[str, Any], image_keys: Sequence[str], label_map_keys: Sequence[str],
            image_size: int | None, rng: np.random.Generator | None, random_flip: bool) -> dict[str, Any]:
    out = dict(element)
    out.update(preprocess_paired({k: element[k] for k in image_keys}, {k: element[k] for k in label_map_keys},
                                 image_size, rng, random_flip))
    return out


class _TrainTransform(grain.transforms.RandomMap):
    """Independent random crop/flip per image; with label maps, one shared crop/flip for all (aligned)."""

    def __init__(self, image_keys: Sequence[str], image_size: int | None, random_flip: bool,
                 label_map_keys: Sequence[str] = ()):
        self.image_keys, self.image_size, self.random_flip = tuple(image_keys), image_size, random_flip
        self.label_map_keys = tuple(label_map_keys)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if self.label_map_keys:
            return _paired(element, self.image_keys, self.label_map_keys, self.image_size, rng, self.random_flip)
        out = dict(element)
        for k in self.image_keys:
            out[k] = preprocess_train(element[k], self.image_size, rng, self.random_flip)
        return out


class _EvalTransform(grain.transforms.Map):
    def __init__(self, image_keys: Sequence[str], image_size: int | None, label_map_keys: Sequence[str] = ()):
        self.image_keys, self.image_size = tuple(image_keys), image_size
        self.label_map_keys = tuple(label_map_keys)

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        if self.label_map_keys:
            return _paired(element, self.image_keys, self.label_map_keys, self.image_size, None, False)
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
    Label maps (paired datasets, e.g. ``features=('image', 'segmentation')``): ``segmentation`` int32
    (B, H, W) class ids, resized nearest, with the same crop/flip as the images of the same example.
    Datasets of a registered format (:func:`common_jax.datasets.register_format`: stage two's pre-encoded
    datasets): their records as stored. ``features`` defaults to ``('image', 'label')`` (``('image',)`` without labels) or the
    format's own default. Eval batches add ``mask`` (bool; False on padding).
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
        features = src.default_features or ("image",) + (("label",) if "label" in src.features else ())
    features = tuple(features)
    missing = [f for f in features if f not in src.features]
    if missing:
        raise KeyError(f"dataset '{name}' split '{split}' has no feature(s) {missing}; it has {sorted(src.features)}")
    if not src.image_features and image_size is not None:
        raise ValueError(f"'{name}' is a {src.kind} dataset; image_size must be None, got {image_size} (it holds no "
                         "images to resize)")
    label_map_keys = [k for k in features if k in src.label_map_features]
    image_keys = [k for k in features if k in src.image_features and k not in label_map_keys]
    n = len(src.source)
    if n == 0:
        raise ValueError(f"dataset '{name}' split '{split}' at {src.path} is empty")
    G, L = global_batch_size, global_batch_size // process_count

    base = grain.MapDataset.source(src.source).map(_Select(features))
    if train:
        stream = base.shuffle(seed=seed).repeat(num_epochs)
        stream = stream.random_map(_TrainTransform(image_keys, image_size, random_flip, label_map_keys),
                                   seed=seed)
        num_batches = None if num_epochs is None else len(stream) // G
    else:
        epochs = 1 if num_epochs is None else num_epochs
        per_epoch = -(-n // G) * G
        padded = grain.MapDataset.source(_Padded(n, per_epoch)).repeat(epochs, reseed_each_epoch=False)
        stream = padded.map(_LookupMasked(base)).map(_EvalTransform(image_keys, image_size, label_map_keys))
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

"""Preparing image datasets on disk (TFDS in array_record format) and opening prepared datasets.

Image datasets are TFDS datasets written with ``file_format='array_record'`` so they can be read by random
access (grain) without TensorFlow. Preparation uses TFDS (and so TensorFlow) once.

Other layouts (stage two's pre-encoded datasets) are defined where they are written, and registered here with
:func:`register_format`: :func:`open_split`, :func:`describe_dataset` and the loader then read them too, and this
module knows nothing of what they hold.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from common_jax import builtin_photos
from common_jax.quiet import library_output

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset is not in data_dir; the message says how to prepare it."""


@dataclasses.dataclass
class PreparedDataset:
    """Where a prepared dataset lives and what it holds. Pass ``name`` and ``data_dir`` to ``make_loader``."""
    name: str
    data_dir: str
    path: str
    splits: dict[str, int]
    class_names: list[str] | None = None
    reused: bool = False


@dataclasses.dataclass
class ImageFolderSummary(PreparedDataset):
    """Also lists files converted to RGB (path, original mode) and files skipped (path, reason)."""
    converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Locating and opening prepared datasets.

def _how_to_prepare(name: str) -> str:
    base = name.split("/")[0].split(":")[0]
    if base == "imagenet2012":
        return "prepare it with common_jax.datasets.prepare_imagenet2012(data_dir, manual_dir)"
    if base == "builtin_photos":
        return "prepare it with common_jax.datasets.prepare_builtin_photos(data_dir, ...)"
    others = "".join(f", {fmt.how_to_write}" for fmt in _FORMATS.values())
    return ("prepare it with common_jax.datasets.build_image_folder(src_dir, data_dir, name=...), "
            f"build_paired_folder(image_dir, segmentation_dir, data_dir, name=...), "
            f"prepare_builtin_photos(data_dir){others}")


def _split_name_version(name: str) -> tuple[str, str | None]:
    if ":" in name:
        base, version = name.rsplit(":", 1)
        return base, version
    return name, None


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in v.split("."))


def _find_tfds_dir(data_dir: Path, name: str) -> Path | None:
    """data_dir/name[/config]/version holding dataset_info.json (newest version if none is given)."""
    base, version = _split_name_version(name)
    root = data_dir / base
    if not root.is_dir():
        return None

    def versions(d: Path) -> list[Path]:
        return sorted((p for p in d.iterdir() if p.is_dir() and (p / "dataset_info.json").is_file()),
                      key=lambda p: _version_key(p.name))

    if version is not None:
        d = root / version
        return d if (d / "dataset_info.json").is_file() else None
    found = versions(root)
    if found:
        return found[-1]
    # "name" given for a dataset with configs: accept it when there is exactly one prepared config.
    configs = [c for c in root.iterdir() if c.is_dir() and versions(c)]
    if len(configs) == 1:
        return versions(configs[0])[-1]
    if len(configs) > 1:
        names = ", ".join(f"{base}/{c.name}" for c in sorted(configs))
        raise ValueError(f"dataset '{name}' in {data_dir} has several configs; name one of: {names}")
    return None


def dataset_path(data_dir: str | os.PathLike, name: str) -> tuple[str, Path]:
    """(format kind: 'tfds' or a registered one, directory) of a prepared dataset, or DatasetNotPreparedError
    naming how to prepare it."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetNotPreparedError(f"data_dir '{data_dir}' does not exist, so dataset '{name}' is not "
                                      f"there; {_how_to_prepare(name)}")
    for fmt in _FORMATS.values():
        if fmt.recognises(data_dir / name):
            return fmt.kind, data_dir / name
    found = _find_tfds_dir(data_dir, name)
    if found is None:
        raise DatasetNotPreparedError(f"dataset '{name}' is not prepared in data_dir '{data_dir}' (no "
                                      f"{data_dir / _split_name_version(name)[0]}/.../dataset_info.json); "
                                      f"{_how_to_prepare(name)}")
    return "tfds", found


@dataclasses.dataclass
class SplitSource:
    """A random-access source of one split: ``source[i]`` is a dict of numpy values / encoded image bytes."""
    source: Any
    kind: str                      # 'tfds' or a registered format's kind
    features: tuple[str, ...]      # keys of each record
    image_features: tuple[str, ...]  # keys holding encoded image bytes (decoded by the loader)
    class_names: list[str] | None
    path: str
    # The image features that are label maps (1 channel, pixel = class id): the loader decodes them as
    # integer maps and resizes them with nearest neighbour. A subset of image_features.
    label_map_features: tuple[str, ...] = ()
    # What a loader reads when no features are named; None: the image (and the label where there is one).
    default_features: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class DatasetFormat:
    """A dataset layout other than TFDS, registered by the module that writes it (:func:`register_format`)."""
    kind: str                                              # shown in SplitSource.kind and in messages
    recognises: Callable[[Path], bool]                     # data_dir/name -> is it a dataset of this format
    open_split: Callable[[Path, str, str], SplitSource]    # (data_dir, name, split) -> random-access source
    splits: Callable[[Path], dict[str, int]]               # data_dir/name -> {split: number of examples}
    how_to_write: str                                      # the call that writes one, for "not prepared" errors


_FORMATS: dict[str, DatasetFormat] = {}


def register_format(fmt: DatasetFormat) -> None:
    """Let :func:`open_split`, :func:`describe_dataset` and the loader read datasets of ``fmt``. Registering a kind
    again replaces it (a module imported twice registers twice)."""
    if fmt.kind == "tfds":
        raise ValueError("dataset format kind 'tfds' is built in; register another kind")
    _FORMATS[fmt.kind] = fmt


def open_split(data_dir: str | os.PathLike, name: str, split: str) -> SplitSource:
    """Open one split of a prepared dataset for random access (no TensorFlow needed)."""
    kind, path = dataset_path(data_dir, name)
    if kind != "tfds":
        return _FORMATS[kind].open_split(Path(data_dir), name, split)
    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory(str(path))
    info = builder.info
    fmt = getattr(info.file_format, "value", info.file_format)
    if str(fmt) != "array_record":
        raise ValueError(f"dataset '{name}' at {path} is stored as '{fmt}', but random access needs "
                         f"'array_record'; re-prepare it with file_format='array_record'")
    available = list(info.splits.keys())
    base_split = re.split(r"[\[+]", split)[0]
    if base_split not in available:
        raise KeyError(f"dataset '{name}' at {path} has no split '{split}'; splits: {available}")
    feats = info.features
    image_keys = tuple(k for k, f in feats.items() if isinstance(f, tfds.features.Image))
    label_map_keys = tuple(k for k in image_keys if tuple(feats[k].shape)[-1:] == (1,))
    decoders = {k: tfds.decode.SkipDecoding() for k in image_keys}
    source = builder.as_data_source(split=split, decoders=decoders)
    class_names = None
    if "label" in feats and isinstance(feats["label"], tfds.features.ClassLabel):
        class_names = list(feats["label"].names)
    return SplitSource(source, "tfds", tuple(feats.keys()), image_keys, class_names, str(path), label_map_keys)


def describe_dataset(data_dir: str | os.PathLike, name: str) -> PreparedDataset:
    """Splits, sizes and class names of a prepared dataset."""
    kind, path = dataset_path(data_dir, name)
    if kind != "tfds":
        return PreparedDataset(name, str(data_dir), str(path), _FORMATS[kind].splits(path), None, True)
    import tensorflow_datasets as tfds
    info = tfds.builder_from_directory(str(path)).info
    splits = {k: int(v.num_examples) for k, v in info.splits.items()}
    names = None
    if "label" in info.features and isinstance(info.features["label"], tfds.features.ClassLabel):
        names = list(info.features["label"].names)
    return PreparedDataset(name, str(data_dir), str(path), splits, names, True)


def dataset_fingerprint(data_dir: str | os.PathLike, name: str) -> str:
    """Identity of a prepared dataset's files (names, sizes, modification times): rebuilding it under the same
    name changes it, so data derived from it (a pre-encoded dataset) is not taken for current."""
    return source_record([dataset_path(data_dir, name)[1]])["digest"]


# ----------------------------------------------------------------------------------------------------------
# Image folder.

def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white (dropping alpha shows arbitrary colours)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image_file(path: str | os.PathLike) -> tuple[bytes, str | None]:
    """Fully decode an image file; return (bytes to store, original mode if it was converted else None).

    RGB JPEG/PNG files without EXIF rotation are stored as they are; anything else is converted to RGB
    (EXIF orientation applied) and stored as PNG. Raises OSError/ValueError for unreadable files.
    """
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as img:
        img.load()  # forces a full decode: truncated files fail here, not later in a reader worker
        orientation = img.getexif().get(0x0112, 1)
        if img.mode == "RGB" and img.format in ("JPEG", "PNG") and orientation == 1:
            return raw, None
        mode = img.mode if orientation == 1 else f"{img.mode}+exif_orientation"
        rgb = _to_rgb(ImageOps.exif_transpose(img))
    if rgb.width < 1 or rgb.height < 1:
        raise ValueError("image has zero size")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), mode


def _check_image(path: Path) -> tuple[bool, str | None]:
    """(True, converted-from mode or None) for a readable image, (False, reason) otherwise."""
    try:
        return True, load_image_file(path)[1]
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip and report this file"
        return False, f"{type(e).__name__}: {e}"


def _images_under(d: Path, recursive: bool, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Sorted non-hidden files below ``d`` whose extension (any case) is one of ``extensions``."""
    it = d.rglob("*") if recursive else d.iterdir()
    return sorted(p for p in it if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)


def _scan_folder(src: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[str, str]]]:
    """(class names, [(file, label)], skipped) with class = first-level subfolder, or one class."""
    subdirs = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    class_dirs = [d for d in subdirs if _images_under(d, True)]
    skipped: list[tuple[str, str]] = []
    if class_dirs:
        classes = [d.name for d in class_dirs]
        files = [(p, i) for i, d in enumerate(class_dirs) for p in _images_under(d, True)]
        for p in _images_under(src, False):
            skipped.append((str(p), "image at the top level while class subfolders exist"))
    else:
        classes = [src.resolve().name or "images"]
        files = [(p, 0) for p in _images_under(src, False)]
    return classes, files, skipped


def _assign_splits(files: list[tuple[Path, int]], n_classes: int, heldout_fraction: float,
                   seed: int) -> dict[str, list[tuple[Path, int]]]:
    """Per-class deterministic held-out selection (at least one held-out file overall if possible)."""
    rng = np.random.default_rng(seed)
    by_class: list[list[tuple[Path, int]]] = [[] for _ in range(n_classes)]
    for f in files:
        by_class[f[1]].append(f)
    train, val = [], []
    for members in by_class:
        order = rng.permutation(len(members))
        n_val = int(round(heldout_fraction * len(members)))
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    if heldout_fraction > 0 and not val and len(train) >= 2:
        val.append(train.pop())
    return {"train": train, "validation": val} if heldout_fraction > 0 else {"train": train}


def _check_build_args(name: str, heldout_fraction: float) -> None:
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset name must be lower_snake_case (TFDS rule), got '{name}'")


SOURCE_RECORD = "taming_jax_source.json"   # beside dataset_info.json: what a folder dataset was built from


def source_record(folders: Sequence[Path], **options: Any) -> dict:
    """What a folder dataset is built from: the folders, a digest of every file's path, size and mtime below them,
    and the build options. Listing only (no decoding), so checking a reused dataset against it stays cheap."""
    import hashlib
    digest, count = hashlib.sha256(), 0
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            for n in sorted(names):
                st = os.stat(os.path.join(root, n))
                digest.update(f"{os.path.relpath(os.path.join(root, n), folder)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                              .encode())
                count += 1
    return dict(folders=[str(Path(f).resolve()) for f in folders], files=count, digest=digest.hexdigest(),
                **options)


def _check_source(out_dir: Path, record: dict, name: str) -> None:
    """Raise if the dataset at ``out_dir`` was built from other folders, files or options than ``record`` says
    (reusing it would train on stale or foreign data). Datasets built before records existed pass."""
    path = out_dir / SOURCE_RECORD
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    changed = [k for k in sorted(set(saved) | set(record)) if k != "digest" and saved.get(k) != record.get(k)]
    if not changed and saved.get("digest") != record["digest"]:
        changed = ["the files' sizes or modification times"]
    if changed:
        detail = "; ".join(f"{k}: {saved.get(k)!r} then, {record.get(k)!r} now" if k in record else k
                           for k in changed)
        raise ValueError(f"dataset '{name}' at {out_dir} was prepared from other input ({detail}); pass "
                         "overwrite=True to rebuild it, or choose another name")


def _prepared_or_cleared(data_dir: Path, name: str, version: str, overwrite: bool,
                         what: str, record: dict) -> ImageFolderSummary | None:
    """The summary of an already prepared dataset (reused) built from the same input (``record``, an error
    otherwise), or None after removing it when ``overwrite``."""
    out_dir = data_dir / name / version
    if not (out_dir / "dataset_info.json").is_file():
        return None
    if overwrite:
        shutil.rmtree(out_dir)
        return None
    _check_source(out_dir, record, name)
    d = describe_dataset(data_dir, f"{name}:{version}")
    log.info("%s dataset '%s' already prepared at %s; reusing it", what, name, out_dir)
    return ImageFolderSummary(name, str(data_dir), str(out_dir), d.splits, d.class_names, reused=True)


def _train_and_validation(files: list[tuple[Path, int]], n_classes: int, heldout_fraction: float, seed: int,
                          what: str) -> dict[str, list[tuple[Path, int]]]:
    """:func:`_assign_splits`, dropping (with a warning) a validation split too small to hold anything."""
    splits = _assign_splits(files, n_classes, heldout_fraction, seed)
    if "validation" in splits and not splits["validation"]:
        log.warning("%s: too few usable examples for a validation split; writing train only", what)
        del splits["validation"]
    return splits


def build_image_folder(src_dir: str | os.PathLike, data_dir: str | os.PathLike, name: str = "image_folder",
                       heldout_fraction: float = 0.05, seed: int = 0, version: str = "1.0.0",
                       overwrite: bool = False) -> ImageFolderSummary:
    """Turn a folder of images into a TFDS array_record dataset with splits train/validation.

    Classes are the first-level subfolders of ``src_dir`` (images found recursively below each), or a single
    class named after the folder when it has none. Features: ``image`` (RGB), ``label`` (ClassLabel),
    ``file_name`` (path relative to ``src_dir``). Grey/RGBA/palette/CMYK/16-bit files are converted to RGB;
    unreadable files are skipped. Both are logged and listed in the returned summary. An existing dataset of
    the same name and version is reused (``reused=True``, nothing decoded again) unless ``overwrite``; reusing one
    built from another folder, other files or other options is an error (:func:`source_record`).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder '{src}' does not exist or is not a directory")
    _check_build_args(name, heldout_fraction)
    data_dir = Path(data_dir)
    record = source_record([src], heldout_fraction=heldout_fraction, seed=seed)
    prepared = _prepared_or_cleared(data_dir, name, version, overwrite, "image folder", record)
    if prepared is not None:
        return prepared

    classes, files, skipped = _scan_folder(src)
    if not files:
        raise ValueError(f"image folder '{src}' contains no image files (looked for {', '.join(IMAGE_EXTENSIONS)}"
                         f" directly in it or in its subfolders)")
    # Decode every file once up front (threads: PIL releases the GIL while decoding) so that bad files are
    # known before splits are assigned and TFDS never meets an empty split or an undecodable image.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        checked = list(pool.map(_check_image, (p for p, _ in files)))
    good: list[tuple[Path, int]] = []
    converted: list[tuple[str, str]] = []
    for (path, label), (ok, info) in zip(files, checked):
        if not ok:
            skipped.append((str(path), info))
            log.warning("skipping unreadable image %s (%s)", path, info)
            continue
        good.append((path, label))
        if info is not None:
            converted.append((str(path), info))
            log.warning("converting %s from mode %s to RGB", path, info)
    if skipped:
        log.warning("image folder %s: %d file(s) skipped: %s", src, len(skipped),
                    "; ".join(f"{p} ({r})" for p, r in skipped))
    if not good:
        raise ValueError(f"image folder '{src}': no readable training image; skipped: {skipped}")
    splits = _train_and_validation(good, len(classes), heldout_fraction, seed, f"image folder {src}")

    def generate(split: str):
        for path, label in splits[split]:
            rel = path.relative_to(src).as_posix()
            yield rel, {"image": load_image_file(path)[0], "label": label, "file_name": rel}

    import tensorflow_datasets as tfds
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=classes),
        "file_name": tfds.features.Text(),
    })
    with library_output():
        builder = tfds.dataset_builders.store_as_tfds_dataset(
            name=name, version=version, features=features,
            split_datasets={s: generate(s) for s in splits}, data_dir=str(data_dir),
            description=f"Images of {src} (classes: {', '.join(classes)}).", file_format="array_record")
    (Path(builder.data_dir) / SOURCE_RECORD).write_text(json.dumps(record))
    return ImageFolderSummary(name, str(data_dir), str(builder.data_dir), {s: len(v) for s, v in splits.items()},
                              classes, converted=converted, skipped=skipped)


# ----------------------------------------------------------------------------------------------------------
# Paired folders: images and their segmentation label maps (e.g. taming's S-FLCKR setup).

LABEL_MAP_MODES = ("L", "P")


def load_label_map_file(path: str | os.PathLike) -> tuple[bytes, tuple[int, int]]:
    """Fully decode a label map; return (bytes to store: a mode 'L' PNG, (width, height)).

    The map must be single-channel 8-bit: mode 'L', or 'P' whose palette *indices* are the labels (stored
    as 'L' so that no reader maps them through the palette). Pixel value = class id. Raises
    OSError/ValueError for unreadable files or other modes.
    """
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        if img.mode not in LABEL_MAP_MODES:
            raise ValueError(f"label map has mode {img.mode}; need a single-channel 8-bit map "
                             f"(mode {' or '.join(LABEL_MAP_MODES)}, pixel value = class id)")
        orientation = img.getexif().get(0x0112, 1)
        if img.mode == "L" and img.format == "PNG" and orientation == 1:
            return raw, img.size
        labels = np.asarray(ImageOps.exif_transpose(img))  # 'P': the indices, not the palette colours
    buf = io.BytesIO()
    Image.fromarray(labels, "L").save(buf, format="PNG")
    return buf.getvalue(), (labels.shape[1], labels.shape[0])


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """(H, W) int32 class ids of one label-map file (the rules of :func:`load_label_map_file`), e.g. to
    condition sampling; errors name the file."""
    try:
        data, _ = load_label_map_file(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"label map {path}: {e}") from e
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img, np.int32)


def _check_pair(pair: tuple[Path, Path]) -> tuple[bool, str | None]:
    """(True, image's converted-from mode or None) for a usable pair, (False, reason) otherwise."""
    image, seg = pair
    try:
        data, mode = load_image_file(image)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip and report this pair"
        return False, f"unreadable image ({type(e).__name__}: {e})"
    try:
        _, seg_size = load_label_map_file(seg)
    except Exception as e:  # noqa: BLE001
        return False, f"bad segmentation map {seg} ({type(e).__name__}: {e})"
    with Image.open(io.BytesIO(data)) as img:
        size = img.size
    if size != seg_size:
        return False, (f"segmentation map {seg} is {seg_size[0]}x{seg_size[1]} but the image is "
                       f"{size[0]}x{size[1]} (width x height)")
    return True, mode


def _scan_pairs(image_dir: Path, seg_dir: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]],
                                                          list[Path]]:
    """([(image, label map)], [(image, reason)] for images without a map, [maps without an image]).

    A map pairs with an image of the same relative path without extension. When ``seg_dir`` lies inside
    ``image_dir`` its files are not taken for images."""
    images = _images_under(image_dir, True)
    img_root, seg_root = image_dir.resolve(), seg_dir.resolve()
    if img_root in seg_root.parents:
        inner = seg_root.relative_to(img_root).parts
        images = [p for p in images if p.relative_to(image_dir).parts[:len(inner)] != inner]
    maps = {p.relative_to(seg_dir).with_suffix("").as_posix(): p for p in _images_under(seg_dir, True, (".png",))}
    pairs, missing, used = [], [], set()
    for p in images:
        key = p.relative_to(image_dir).with_suffix("").as_posix()
        if key in maps:
            pairs.append((p, maps[key]))
            used.add(key)
        else:
            missing.append((str(p), f"no segmentation map (expected {seg_dir / key}.png)"))
    orphans = [p for k, p in maps.items() if k not in used]
    return pairs, missing, orphans


def build_paired_folder(image_dir: str | os.PathLike, segmentation_dir: str | os.PathLike,
                        data_dir: str | os.PathLike, name: str = "paired_folder", heldout_fraction: float = 0.05,
                        seed: int = 0, version: str = "1.0.0", overwrite: bool = False) -> ImageFolderSummary:
    """Turn a folder of images and a parallel folder of label maps into a TFDS array_record dataset.

    Each image below ``image_dir`` (recursively) pairs with the PNG below ``segmentation_dir`` of the same
    relative path without extension. Label maps are single-channel 8-bit (mode 'L', or 'P' whose palette
    indices are the labels); pixel value = class id. Features: ``image`` (RGB), ``segmentation`` (uint8
    (H, W, 1) PNG), ``file_name`` (image path relative to ``image_dir``); no ``label``. Images converted to
    RGB are listed in ``converted``; images whose map is missing, unreadable, of another mode or of another
    size (or that are unreadable themselves) are skipped, logged and listed in ``skipped``; maps without an
    image are ignored with a warning. Splits train/validation as :func:`build_image_folder`; an existing
    dataset of the same name and version is reused unless ``overwrite``.
    """
    image_dir, seg_dir = Path(image_dir), Path(segmentation_dir)
    for what, d in (("image folder", image_dir), ("segmentation folder", seg_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} '{d}' does not exist or is not a directory")
    if image_dir.resolve() == seg_dir.resolve():
        raise ValueError(f"image and segmentation folders must differ, both are '{image_dir}'")
    _check_build_args(name, heldout_fraction)
    data_dir = Path(data_dir)
    record = source_record([image_dir, seg_dir], heldout_fraction=heldout_fraction, seed=seed)
    prepared = _prepared_or_cleared(data_dir, name, version, overwrite, "paired folder", record)
    if prepared is not None:
        return prepared

    pairs, skipped, orphans = _scan_pairs(image_dir, seg_dir)
    if not pairs and not skipped:
        raise ValueError(f"image folder '{image_dir}' contains no image files (looked recursively for "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    if orphans:
        log.warning("segmentation folder %s: ignoring %d label map(s) without an image: %s", seg_dir,
                    len(orphans), ", ".join(str(p) for p in orphans[:20]) + (" ..." if len(orphans) > 20 else ""))
    # Decode every pair once up front (as build_image_folder) so TFDS never meets a bad or mismatched pair.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        checked = list(pool.map(_check_pair, pairs))
    good: list[tuple[Path, int]] = []
    seg_of: dict[Path, Path] = {}
    converted: list[tuple[str, str]] = []
    for (path, seg), (ok, info) in zip(pairs, checked):
        if not ok:
            skipped.append((str(path), info))
            continue
        good.append((path, 0))
        seg_of[path] = seg
        if info is not None:
            converted.append((str(path), info))
            log.warning("converting %s from mode %s to RGB", path, info)
    for path, reason in skipped:
        log.warning("skipping image %s: %s", path, reason)
    if not good:
        raise ValueError(f"paired folder: no valid (image, segmentation map) pair in image folder '{image_dir}' "
                         f"and segmentation folder '{seg_dir}'; skipped: {skipped}")
    splits = _train_and_validation(good, 1, heldout_fraction, seed, f"paired folder {image_dir}")

    def generate(split: str):
        for path, _ in splits[split]:
            rel = path.relative_to(image_dir).as_posix()
            yield rel, {"image": load_image_file(path)[0], "segmentation": load_label_map_file(seg_of[path])[0],
                        "file_name": rel}

    import tensorflow_datasets as tfds
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "segmentation": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
        "file_name": tfds.features.Text(),
    })
    with library_output():
        builder = tfds.dataset_builders.store_as_tfds_dataset(
            name=name, version=version, features=features,
            split_datasets={s: generate(s) for s in splits}, data_dir=str(data_dir),
            description=f"Images of {image_dir} with segmentation label maps of {seg_dir}.",
            file_format="array_record")
    (Path(builder.data_dir) / SOURCE_RECORD).write_text(json.dumps(record))
    return ImageFolderSummary(name, str(data_dir), str(builder.data_dir), {s: len(v) for s, v in splits.items()},
                              None, converted=converted, skipped=skipped)


# ----------------------------------------------------------------------------------------------------------
# ImageNet (TFDS's own builder, manual download).

def prepare_imagenet2012(data_dir: str | os.PathLike, manual_dir: str | os.PathLike) -> PreparedDataset:
    """Prepare TFDS ``imagenet2012`` as array_record from the two archives in ``manual_dir``."""
    manual = Path(manual_dir)
    missing = [f for f in IMAGENET_MANUAL_FILES if not (manual / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"imagenet2012: manual_dir '{manual}' lacks {', '.join(missing)}; it must hold "
            f"{' and '.join(IMAGENET_MANUAL_FILES)} downloaded (after registering) from "
            f"https://image-net.org/download-images.php")
    import tensorflow_datasets as tfds
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    info = builder.info
    return PreparedDataset("imagenet2012", str(data_dir), str(builder.data_dir),
                           {k: int(v.num_examples) for k, v in info.splits.items()},
                           list(info.features["label"].names))


# ----------------------------------------------------------------------------------------------------------
# Built-in photos.

def builtin_photos_name(crop_size: int = 32, crops_per_photo: int = 64, seed: int = 0,
                        heldout_crops_per_photo: int | None = None, heldout_fraction: float = 0.25,
                        scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)) -> str:
    """The dataset name ('builtin_photos/<config>') that prepare_builtin_photos gives these arguments."""
    config = f"c{crop_size}_n{crops_per_photo}_s{seed}"
    if heldout_crops_per_photo is not None or heldout_fraction != 0.25 or tuple(scales) != (1.0, 1.5, 2.0, 3.0):
        config += f"_h{heldout_crops_per_photo}_f{heldout_fraction:g}_x" + "-".join(f"{s:g}" for s in scales)
    return "builtin_photos/" + config.replace(".", "p")


def prepare_builtin_photos(data_dir: str | os.PathLike, crop_size: int = 32, crops_per_photo: int = 64,
                           seed: int = 0, heldout_crops_per_photo: int | None = None,
                           heldout_fraction: float = 0.25,
                           scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)) -> PreparedDataset:
    """Crops of the ten photographs shipped with scikit-image/scikit-learn, label = photo index.

    Training crops come from the left part of each photo, ``validation`` crops from a disjoint right strip
    (``heldout_fraction`` of the width, separated by a gap), so evaluation never sees training pixels.
    Side lengths are ``scale * crop_size`` (clamped to fit), resized to ``crop_size``. Held-out crops per
    photo default to ``max(1, crops_per_photo // 4)``. Deterministic in the arguments; a second call with
    the same arguments reuses the prepared dataset. Returns ``name`` to pass to ``make_loader``.
    """
    if crop_size < 4 or crops_per_photo < 1:
        raise ValueError(f"need crop_size >= 4 and crops_per_photo >= 1, got {crop_size}, {crops_per_photo}")
    if not 0.0 < heldout_fraction < 0.5:
        raise ValueError(f"heldout_fraction must be in (0, 0.5), got {heldout_fraction}")
    if not scales or min(scales) < 1.0:
        raise ValueError(f"scales must be >= 1 (crop side = scale * crop_size), got {scales}")
    name = builtin_photos_name(crop_size, crops_per_photo, seed, heldout_crops_per_photo, heldout_fraction,
                               tuple(scales))
    n_held = max(1, crops_per_photo // 4) if heldout_crops_per_photo is None else heldout_crops_per_photo
    data_dir = Path(data_dir)
    base, config = name.split("/")
    if (data_dir / base / config / "1.0.0" / "dataset_info.json").is_file():
        return describe_dataset(data_dir, name)

    rng = np.random.default_rng(seed)
    per_split: dict[str, list] = {"train": [], "validation": []}
    for label, photo_name in enumerate(builtin_photos.PHOTO_NAMES):
        img = builtin_photos.load_photo(photo_name)
        train_cols, held_cols = builtin_photos.crop_regions(img.shape[1], heldout_fraction, crop_size)
        for split, cols, n in (("train", train_cols, crops_per_photo), ("validation", held_cols, n_held)):
            try:
                crops = builtin_photos.random_crops(img, cols, n, crop_size, scales, rng)
            except ValueError as e:
                raise ValueError(f"built-in photo '{photo_name}' ({img.shape[1]}x{img.shape[0]}), {split} "
                                 f"region: {e}; use a smaller crop_size or a larger heldout_fraction") from e
            for k, crop in enumerate(crops):
                buf = io.BytesIO()
                Image.fromarray(crop).save(buf, format="PNG")
                per_split[split].append((f"{photo_name}_{k:05d}", {"image": buf.getvalue(), "label": label}))

    import tensorflow_datasets as tfds
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(crop_size, crop_size, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=list(builtin_photos.PHOTO_NAMES)),
    })
    with library_output():
        tfds.dataset_builders.store_as_tfds_dataset(
            name=base, version="1.0.0", config=config, features=features, split_datasets=per_split,
            data_dir=str(data_dir), file_format="array_record",
            description="Crops of the photographs shipped with scikit-image and scikit-learn; "
                        "validation crops come from a held-out strip of each photo.")
    return dataclasses.replace(describe_dataset(data_dir, name), reused=False)

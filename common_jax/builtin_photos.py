"""The real photographs shipped inside scikit-image and scikit-learn, and crops taken from them.

These files are part of the installed wheels, so the built-in demo dataset needs no download. All ten were
checked to load offline with scikit-image 0.26 and scikit-learn 1.x (none needs ``pooch``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

# (class name, loader). The class index of a crop is the position of its photo in this tuple.
def _skimage(fn_name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data
        out = getattr(skimage.data, fn_name)()
        return out[0] if isinstance(out, tuple) else out  # stereo_motorcycle: (left, right, disparity)
    return load


def _sklearn(file_stem: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images
        bunch = load_sample_images()
        for path, img in zip(bunch.filenames, bunch.images):
            if path.replace("\\", "/").rsplit("/", 1)[-1].startswith(file_stem):
                return img
        raise FileNotFoundError(f"sklearn.datasets.load_sample_images() has no '{file_stem}' image "
                                f"(files: {bunch.filenames})")
    return load


PHOTOS: tuple[tuple[str, Callable[[], np.ndarray]], ...] = (
    ("astronaut", _skimage("astronaut")),
    ("coffee", _skimage("coffee")),
    ("chelsea", _skimage("chelsea")),
    ("rocket", _skimage("rocket")),
    ("hubble_deep_field", _skimage("hubble_deep_field")),
    ("immunohistochemistry", _skimage("immunohistochemistry")),
    ("retina", _skimage("retina")),
    ("stereo_motorcycle_left", _skimage("stereo_motorcycle")),
    ("china", _sklearn("china")),
    ("flower", _sklearn("flower")),
)
PHOTO_NAMES: tuple[str, ...] = tuple(name for name, _ in PHOTOS)


def load_photo(name: str) -> np.ndarray:
    """One built-in photograph as uint8 (H, W, 3)."""
    loaders = dict(PHOTOS)
    if name not in loaders:
        raise KeyError(f"unknown built-in photo '{name}'; available: {', '.join(PHOTO_NAMES)}")
    try:
        img = np.asarray(loaders[name]())
    except Exception as e:  # noqa: BLE001 - re-raised with the photo's name
        raise RuntimeError(f"built-in photo '{name}' could not be loaded from the installed scikit-image/"
                           f"scikit-learn packages ({type(e).__name__}: {e})") from e
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"built-in photo '{name}': expected uint8 (H, W, 3), got {img.dtype} {img.shape}")
    return img


def crop_regions(width: int, heldout_fraction: float, crop_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Column ranges [x0, x1) of the training region (left) and held-out strip (right) of a photo.

    A gap of ``crop_size // 2`` columns separates them so no crop of either split touches the other.
    """
    held_w = int(round(width * heldout_fraction))
    gap = crop_size // 2
    train = (0, width - held_w - gap)
    held = (width - held_w, width)
    return train, held


def random_crops(img: np.ndarray, cols: tuple[int, int], n: int, crop_size: int, scales: tuple[float, ...],
                 rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` square crops inside columns ``cols`` of ``img``, side ``scale * crop_size`` (clamped to fit),
    resized to ``crop_size`` with an antialiasing filter."""
    h = img.shape[0]
    x0, x1 = cols
    region_w = x1 - x0
    max_side = min(h, region_w)
    if max_side < crop_size:
        raise ValueError(f"region of {region_w}x{h} pixels is smaller than crop_size={crop_size}")
    out = []
    pil = Image.fromarray(img)
    for _ in range(n):
        side = int(min(max_side, round(crop_size * float(rng.choice(scales)))))
        top = int(rng.integers(0, h - side + 1))
        left = x0 + int(rng.integers(0, region_w - side + 1))
        crop = pil.crop((left, top, left + side, top + side))
        if side != crop_size:
            crop = crop.resize((crop_size, crop_size), Image.Resampling.BICUBIC)
        out.append(np.asarray(crop, dtype=np.uint8))
    return out

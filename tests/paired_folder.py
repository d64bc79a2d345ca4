"""A tiny paired dataset on disk: RGB images and 'L' label maps of random rectangles (S-FLCKR-like layout).

Each label id is painted in its own fixed colour (``label_colours``) plus a little noise, so an image is
predictable from its label map and the two can be checked for alignment after crops and flips.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

NOISE = 6  # +- per channel; far below the distance between two label colours


def label_colours(n_labels: int) -> np.ndarray:
    """(n_labels, 3) uint8: label id -> its colour (well separated for the first 8 ids)."""
    base = np.array([(30, 30, 30), (220, 40, 40), (40, 200, 60), (50, 70, 220), (230, 220, 50),
                     (200, 60, 210), (60, 210, 220), (235, 235, 235)], np.uint8)
    if n_labels <= len(base):
        return base[:n_labels]
    extra = np.random.default_rng(1234).integers(0, 256, (n_labels - len(base), 3), dtype=np.uint8)
    return np.concatenate([base, extra])


def random_label_map(rng: np.random.Generator, height: int, width: int, n_labels: int) -> np.ndarray:
    """(height, width) uint8: a random background label overpainted with 2-4 random rectangles."""
    labels = np.full((height, width), rng.integers(0, n_labels), np.uint8)
    min_h, min_w = min(height, max(2, height // 4)), min(width, max(2, width // 4))
    for _ in range(int(rng.integers(2, 5))):
        y0, x0 = int(rng.integers(0, height - min_h + 1)), int(rng.integers(0, width - min_w + 1))
        y1, x1 = int(rng.integers(y0 + min_h, height + 1)), int(rng.integers(x0 + min_w, width + 1))
        labels[y0:y1, x0:x1] = rng.integers(0, n_labels)
    return labels


def image_of(labels: np.ndarray, rng: np.random.Generator, n_labels: int) -> np.ndarray:
    """(H, W, 3) uint8: each pixel the colour of its label plus uniform noise in [-NOISE, NOISE]."""
    colours = label_colours(n_labels).astype(np.int16)[labels]
    noise = rng.integers(-NOISE, NOISE + 1, colours.shape, dtype=np.int16)
    return np.clip(colours + noise, 0, 255).astype(np.uint8)


def make_paired_folder(root: Path, n: int = 40, size: int = 32, n_labels: int = 5, seed: int = 0,
                       width: int | None = None) -> tuple[Path, Path]:
    """Write ``root/images/{i:03d}.png`` (RGB) and ``root/segmentation/{i:03d}.png`` (mode 'L', pixel =
    label id in [0, n_labels)), ``size`` px high and ``width`` (default ``size``) px wide.
    Returns (image_dir, segmentation_dir)."""
    if not 1 <= n_labels <= 256:
        raise ValueError(f"n_labels must be in [1, 256], got {n_labels}")
    root = Path(root)
    image_dir, seg_dir = root / "images", root / "segmentation"
    image_dir.mkdir(parents=True, exist_ok=True)
    seg_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        labels = random_label_map(rng, size, width or size, n_labels)
        Image.fromarray(image_of(labels, rng, n_labels), "RGB").save(image_dir / f"{i:03d}.png")
        Image.fromarray(labels, "L").save(seg_dir / f"{i:03d}.png")
    return image_dir, seg_dir

"""Metric writers, on-device metric averaging, image grids/PNGs and a progress/ETA reporter.

Shared by both training stages and the samplers. Only process 0 writes anything to disk.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------- writers
class LoggingOnlyWriter:
    """Minimal writer (clu MetricWriter duck type) that only logs; avoids importing TensorFlow.

    Logs through absl, as clu's logging writer and the train loop's progress lines do, so its lines show
    wherever those do."""

    def __init__(self, prefix: str = ""):
        self._prefix = prefix

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        body = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items()))
        absl_logging.info("%s[%d] %s", self._prefix, step, body)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        shapes = ", ".join(f"{k}={np.shape(v)}" for k, v in sorted(images.items()))
        absl_logging.info("%s[%d] images: %s", self._prefix, step, shapes)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for k, v in sorted(texts.items()):
            absl_logging.info("%s[%d] %s: %s", self._prefix, step, k, v)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        absl_logging.info("%shparams: %s", self._prefix, dict(hparams))

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None) -> None:
        del step, arrays, num_buckets

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def create_writer(workdir: str | os.PathLike | None, *, tensorboard: bool = True) -> Any:
    """TensorBoard + logging writer on process 0, logging only elsewhere (or when ``tensorboard=False``).

    clu's writers import TensorFlow (seconds, and its memory on every host); the logging-only writers here skip
    that import, so only process 0 of a TensorBoard run pays it.
    """
    if not tensorboard or workdir is None or jax.process_index() > 0:
        return LoggingOnlyWriter()
    from clu import metric_writers  # lazy: pulls in TensorFlow
    return metric_writers.create_default_writer(os.fspath(workdir))


# ----------------------------------------------------------------------------------------- host fetching
def to_host(x: Any) -> np.ndarray:
    """A (possibly multi-host, sharded) jax.Array as a full numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@jax.jit
def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


class MetricAverager:
    """Sums per-step metric trees on device; ``result()`` fetches once and divides by the count.

    Keeps the training loop free of host syncs between log steps.
    """

    def __init__(self) -> None:
        self._sum: Any = None
        self._count = 0

    def add(self, metrics: Mapping[str, Any]) -> None:
        metrics = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), dict(metrics))
        self._sum = metrics if self._sum is None else _tree_add(self._sum, metrics)
        self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def result(self) -> dict[str, float]:
        """Mean of every metric since the last reset (empty dict when nothing was added)."""
        if self._sum is None:
            return {}
        host = {k: to_host(v) for k, v in self._sum.items()}
        return {k: float(np.mean(v)) / self._count for k, v in host.items()}

    def reset(self) -> None:
        self._sum, self._count = None, 0


# ------------------------------------------------------------------------------------------------ images
def image_grid(images: Any, ncols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 NHWC images -> one uint8 HWC grid with ``ncols`` columns (rows as needed).

    Missing cells of the last row are filled with ``pad_value``.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"image_grid: expected NHWC images, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"image_grid: expected uint8 images, got {images.dtype} "
                         "(convert with to_uint8 first)")
    if ncols < 1:
        raise ValueError(f"image_grid: ncols must be >= 1, got {ncols}")
    n, h, w, c = images.shape
    ncols = min(ncols, max(n, 1))
    nrows = -(-n // ncols)
    grid = np.full((nrows * h + (nrows + 1) * pad, ncols * w + (ncols + 1) * pad, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def to_uint8(images: Any, low: float = -1.0, high: float = 1.0, name: str | None = None) -> np.ndarray:
    """Float images in [low, high] -> uint8 in [0, 255] (clipped).

    With ``name``, NaN or infinite values are a ValueError naming it: as pixels they would turn black, so an
    image of broken weights (a diverged run) would pass as a dark one, into a sample grid or an FID. Without it
    (training's image summaries) they convert as numpy casts them, so a picture never stops a run.
    """
    x = np.asarray(images, np.float32)
    bad = 0 if name is None else x.size - np.count_nonzero(np.isfinite(x))
    if bad:
        raise ValueError(f"{name} holds {bad} NaN or infinite values of {x.size} (shape {x.shape}): the weights "
                         "that made them are broken, e.g. a run that diverged")
    x = (x - low) / (high - low)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def save_png(path: str | os.PathLike, img: Any) -> None:
    """Write a uint8 HWC (C in 1, 3, 4) or HW image as PNG, creating parent directories."""
    from PIL import Image
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"save_png({path}): expected uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (3, 4)):
        raise ValueError(f"save_png({path}): expected HW, HWx1, HWx3 or HWx4, got shape {img.shape}")
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    Image.fromarray(img).save(path)


# ---------------------------------------------------------------------------------------------- progress
def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class Progress:
    """Rate and ETA over a known total: training steps, sampled batches, eval batches.

    ``update(done)`` returns the rate since the previous update; ``line(done)`` a human-readable status.
    The rate excludes time before the first update (compilation), so the ETA is not skewed by it.
    """

    def __init__(self, total: int, start: int = 0, desc: str = "step",
                 clock=time.monotonic) -> None:
        self.total, self.desc, self._clock = int(total), desc, clock
        self._t0, self._n0 = clock(), int(start)
        self._t_last, self._n_last = self._t0, int(start)
        self.rate = float("nan")
        self._started = False   # log() has seen its first item

    def update(self, done: int) -> float:
        now = self._clock()
        dt, dn = now - self._t_last, done - self._n_last
        if dt > 0 and dn > 0:
            self.rate = dn / dt
        self._t_last, self._n_last = now, done
        return self.rate

    def eta_seconds(self, done: int) -> float:
        if not np.isfinite(self.rate) or self.rate <= 0:
            return float("nan")
        return max(self.total - done, 0) / self.rate

    def log(self, done: int, every_secs: float = 10.0) -> None:
        """Show :meth:`line` (process 0) at most every ``every_secs`` after the first call and once ``done``
        reaches the total; the rate shown is over the interval since the previous call that updated it (the
        first call only starts it, so compilation stays out). Through absl where it shows INFO (the launch
        scripts), else on stderr: a plain Python session hides INFO logs."""
        if not self._started and done < self.total:
            self._started = True
            self.update(done)    # the first item (compilation) sets the start of the rate, silently
            return
        if done < self.total and self._clock() - self._t_last < every_secs:
            return
        self.update(done)
        if jax.process_index() == 0:
            if absl_logging.level_info():
                absl_logging.info("%s", self.line(done))
            else:
                print(self.line(done), file=sys.stderr, flush=True)

    def line(self, done: int) -> str:
        pct = 100.0 * done / max(self.total, 1)
        eta = self.eta_seconds(done)
        eta_s = format_duration(eta) if np.isfinite(eta) else "?"
        rate = f"{self.rate:.3g}" if np.isfinite(self.rate) else "?"
        elapsed = format_duration(self._clock() - self._t0)
        return f"{self.desc} {done}/{self.total} ({pct:.1f}%) {rate} {self.desc}s/s elapsed {elapsed} ETA {eta_s}"


def progress_iter(iterable: Iterable[T], total: int, desc: str = "batch",
                  every_secs: float = 10.0) -> Iterator[T]:
    """Yield from ``iterable`` and log a progress line with ETA at most every ``every_secs`` (process 0)."""
    prog = Progress(total, desc=desc)
    for i, item in enumerate(iterable):
        yield item
        prog.log(i + 1, every_secs)

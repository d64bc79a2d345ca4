"""Reference statistics files for FID: pytorch-fid's ``mu``/``sigma`` .npz and ADM evaluator batches.

pytorch-fid writes ``np.savez(path, mu=mu, sigma=sigma)``. OpenAI's ADM evaluator reference batches
(e.g. ``VIRTUAL_imagenet256_labeled.npz``) hold ``arr_0`` (N, H, W, 3) uint8 images plus ``mu``/``sigma``
computed with the TensorFlow Inception graph (whose resize differs from pytorch-fid's, so FIDs against
those stats are close to, not equal to, pytorch-fid's). ``source="images"`` recomputes them from
``arr_0`` with this project's network instead.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from common_jax.fid import FeatureStats

FeatureFn = Callable[[np.ndarray], Any]


def compute_stats(feature_fn: FeatureFn, batches: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 of ``feature_fn(batch)`` (N, D) over all batches (pytorch-fid convention)."""
    stats = FeatureStats()
    for batch in batches:
        stats.update(np.asarray(feature_fn(batch)))
    return stats.mean_cov()


def _check_mu_sigma(mu: np.ndarray, sigma: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1:
        raise ValueError(f"{where}: 'mu' must have shape (D,), found {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(f"{where}: 'sigma' must have shape ({d}, {d}) to match 'mu' {mu.shape}, "
                         f"found {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{where}: 'mu'/'sigma' contain non-finite values")
    return mu, sigma


def save_stats(path: str | os.PathLike, mu: Any, sigma: Any) -> None:
    """Write ``mu`` (D,) and ``sigma`` (D, D) as float64 to an .npz (pytorch-fid's format)."""
    mu, sigma = _check_mu_sigma(mu, sigma, f"save_stats({os.fspath(path)!r})")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:  # a file object keeps np.savez from appending another ".npz"
        np.savez(f, mu=mu, sigma=sigma)


def iter_npz_array(path: str | os.PathLike, key: str = "arr_0", batch_size: int = 250) -> Iterator[np.ndarray]:
    """Yield ``batch_size`` rows at a time of array ``key`` in an .npz without reading it all into memory."""
    path = os.fspath(path)
    if batch_size < 1:
        raise ValueError(f"iter_npz_array: batch_size must be >= 1, got {batch_size}")
    with zipfile.ZipFile(path) as zf:
        member = f"{key}.npy"
        if member not in zf.namelist():
            raise KeyError(f"{path}: no array {key!r} (found {[n[:-4] for n in zf.namelist()]})")
        with zf.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if fortran or dtype.hasobject or not shape:
                raise ValueError(f"{path}: {key!r} must be a C-ordered numeric array with a batch axis, "
                                 f"found shape {shape}, dtype {dtype}, fortran_order={fortran}")
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise ValueError(f"{path}: {key!r} is truncated (rows {start}..{start + n} of {shape[0]})")
                yield np.frombuffer(buf, dtype).reshape((n, *shape[1:]))


def load_stats(path: str | os.PathLike, feature_fn: FeatureFn | None = None, source: str = "auto",
               batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 from a statistics .npz.

    ``source``: ``"auto"`` uses ``mu``/``sigma`` when present, else computes them from the ``arr_0``
    image batch with ``feature_fn``; ``"stats"`` requires ``mu``/``sigma``; ``"images"`` always recomputes
    from ``arr_0`` (uint8 NHWC, read ``batch_size`` images at a time).
    """
    where = os.fspath(path)
    if source not in ("auto", "stats", "images"):
        raise ValueError(f"load_stats: source must be 'auto', 'stats' or 'images', got {source!r}")
    if not os.path.isfile(where):
        raise FileNotFoundError(f"FID statistics file {where!r} not found")
    with np.load(where, allow_pickle=False) as z:
        keys = set(z.files)
        has_stats = {"mu", "sigma"} <= keys
        if source == "stats" or (source == "auto" and has_stats):
            if not has_stats:
                raise KeyError(f"{where}: needs keys 'mu' and 'sigma', found {sorted(keys)}")
            return _check_mu_sigma(z["mu"], z["sigma"], where)
    if "arr_0" not in keys:
        raise KeyError(f"{where}: needs 'mu' and 'sigma' or an 'arr_0' image batch, found {sorted(keys)}")
    if feature_fn is None:
        raise ValueError(f"{where}: computing statistics from 'arr_0' images needs a feature_fn")

    def checked(batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for b in batches:
            if b.ndim != 4 or b.shape[-1] != 3 or b.dtype != np.uint8:
                raise ValueError(f"{where}: 'arr_0' must be uint8 images (N, H, W, 3), "
                                 f"found {b.dtype} rows of shape {b.shape[1:]}")
            yield b
    return compute_stats(feature_fn, checked(iter_npz_array(where, "arr_0", batch_size)))

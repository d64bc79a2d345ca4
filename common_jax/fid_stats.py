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
import zlib
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from common_jax.fid import FeatureStats

FeatureFn = Callable[[np.ndarray], Any]
STATS_FORMATS = ("pytorch-fid statistics ('mu' and 'sigma', as np.savez writes them) or an ADM reference batch "
                 "('arr_0' uint8 images)")


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


def _not_npz(path: str) -> str:
    """Why ``path`` cannot be read as an .npz, in our words: numpy's own message for a pickle points toward
    loading it unsafely, which a statistics file never needs."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "it is empty"
    if head[:1] == b"\x80":
        return "it holds pickled Python objects, which are never loaded"
    if head[:2] == b"PK":
        return "a damaged or truncated zip archive"
    return "it is not a zip archive"


def open_npz(path: str | os.PathLike, what: str = "file") -> np.lib.npyio.NpzFile:
    """``np.load(path, allow_pickle=False)`` of an .npz archive, or one error naming ``what`` and the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise ValueError(f"{what} {path} is not an .npz archive ({_not_npz(path)}); expected {STATS_FORMATS}"
                         ) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{what} {path} holds a single .npy array, not an .npz archive of named arrays; "
                         f"expected {STATS_FORMATS}")
    return z


def _read(z: np.lib.npyio.NpzFile, key: str, where: str) -> np.ndarray:
    try:
        return z[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error):
        raise ValueError(f"{where}: {key!r} cannot be read (a damaged archive, or an object array, which is never "
                         "unpickled)") from None


def _header(f: Any, path: str, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the .npy member ``f`` of an .npz, whose rows are then read in place."""
    try:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
    except ValueError:
        raise ValueError(f"{path}: {key!r} is not a readable .npy array") from None
    if fortran or dtype.hasobject or not shape:
        raise ValueError(f"{path}: {key!r} must be a C-ordered numeric array with a batch axis, "
                         f"found shape {shape}, dtype {dtype}, fortran_order={fortran}")
    return shape, dtype


def _member(zf: zipfile.ZipFile, path: str, key: str) -> str:
    member = f"{key}.npy"
    if member not in zf.namelist():
        raise KeyError(f"{path}: no array {key!r} (found {[n[:-4] for n in zf.namelist()]})")
    return member


def iter_npz_array(path: str | os.PathLike, key: str = "arr_0", batch_size: int = 250) -> Iterator[np.ndarray]:
    """Yield ``batch_size`` rows at a time of array ``key`` in an .npz without reading it all into memory."""
    path = os.fspath(path)
    if batch_size < 1:
        raise ValueError(f"iter_npz_array: batch_size must be >= 1, got {batch_size}")
    with zipfile.ZipFile(path) as zf, zf.open(_member(zf, path, key)) as f:
        shape, dtype = _header(f, path, key)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise ValueError(f"{path}: {key!r} is truncated (rows {start}..{start + n} of {shape[0]})")
            yield np.frombuffer(buf, dtype).reshape((n, *shape[1:]))


def _check_images_header(path: str, key: str = "arr_0") -> None:
    """An ADM image batch: ``key`` is uint8 (N >= 2, H, W, 3), checked from its header alone."""
    with zipfile.ZipFile(path) as zf, zf.open(_member(zf, path, key)) as f:
        shape, dtype = _header(f, path, key)
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8 or shape[0] < 2:
        raise ValueError(f"{path}: {key!r} must be at least 2 uint8 images (N, H, W, 3), found {dtype} of shape "
                         f"{shape}")


def check_stats_file(path: str | os.PathLike, dim: int, what: str = "FID statistics file") -> str:
    """Check a reference statistics file before any work: ``"stats"`` for ``mu`` (dim,) and ``sigma`` (dim, dim),
    finite; ``"images"`` for an ADM ``arr_0`` image batch without them (its statistics are then computed with the
    evaluation's own network, so any image size will do). One error naming ``what``, the file, the key and the
    expected against the found shape otherwise."""
    path = os.fspath(path)
    with open_npz(path, what) as z:
        keys = set(z.files)
        where = f"{what} {path}"
        if {"mu", "sigma"} <= keys:
            mu, sigma = _read(z, "mu", where), _read(z, "sigma", where)
            for key, arr, shape in (("mu", mu, (dim,)), ("sigma", sigma, (dim, dim))):
                if arr.shape != shape:
                    raise ValueError(f"{where}: {key!r} has shape {arr.shape}, expected {shape} (statistics of the "
                                     f"{dim} pool3 features of the FID InceptionV3)")
            _check_mu_sigma(mu, sigma, where)
            return "stats"
    if "arr_0" not in keys:
        raise KeyError(f"{where}: needs 'mu' and 'sigma' or an 'arr_0' image batch, found {sorted(keys)}")
    _check_images_header(path)
    return "images"


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
    with open_npz(where, "FID statistics file") as z:
        keys = set(z.files)
        has_stats = {"mu", "sigma"} <= keys
        if source == "stats" or (source == "auto" and has_stats):
            if not has_stats:
                raise KeyError(f"{where}: needs keys 'mu' and 'sigma', found {sorted(keys)}")
            return _check_mu_sigma(_read(z, "mu", where), _read(z, "sigma", where), where)
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

"""FID, Inception Score, improved precision/recall, and streaming feature statistics.

Statistics are accumulated on the host in float64 (as pytorch-fid does with ``np.cov``); the device side
only produces float32 partial sums of a (possibly sharded) batch.
"""
from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------

def _check_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> tuple[np.ndarray, ...]:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    for name, arr, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)),
                             ("sigma1", sigma1, (d, d)), ("sigma2", sigma2, (d, d))):
        if arr.shape != shape:
            raise ValueError(f"frechet_distance: {name} has shape {arr.shape}, expected {shape} "
                             f"(mu1 has dimension {d})")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"frechet_distance: {name} contains non-finite values")
    return mu1, sigma1, mu2, sigma2


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # S1 = R R^T with R = V_+ sqrt(w_+) (the non-null eigenpairs of S1). S1 S2 = R (R^T S2) has the
    # same non-zero eigenvalues as R^T S2 R: symmetric PSD, small when S1 is rank-deficient, and its
    # round-off negatives can be clipped, so singular covariances stay finite.
    w, v = np.linalg.eigh(0.5 * (sigma1 + sigma1.T))
    keep = w > max(w[-1], 0.0) * w.shape[0] * np.finfo(np.float64).eps
    r = v[:, keep] * np.sqrt(w[keep])
    a = r.T @ (0.5 * (sigma2 + sigma2.T)) @ r
    ev = np.linalg.eigvalsh(0.5 * (a + a.T))
    return float(np.sum(np.sqrt(np.clip(ev, 0.0, None))))


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    # pytorch-fid's calculate_frechet_distance, step by step.
    import scipy.linalg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular-matrix warnings: the eps fallback below handles them
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component "
                             f"{np.max(np.abs(covmean.imag)):.3g}; use method='eigh'")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, method: str = "eigh",
                     eps: float = 1e-6) -> float:
    """Frechet distance ``|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`` in float64.

    ``method="eigh"`` (default) takes the trace term from the eigenvalues of ``R^T S2 R`` with ``S1 = R R^T``:
    stable and finite for rank-deficient covariances. ``method="sqrtm"`` reproduces pytorch-fid exactly
    (``scipy.linalg.sqrtm(S1 S2)``, ``eps`` diagonal offset only when that is not finite).
    """
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"frechet_distance: method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_features(feats1: Any, feats2: Any) -> float:
    """FID between two feature sets (N, D), with ``np.mean`` / ``np.cov`` statistics in float64.

    When both sets have no more samples than dimensions, ``tr sqrt(S1 S2)`` is the nuclear norm of
    ``A1 A2^T`` (``A`` = centred features / sqrt(N-1)): exact for the rank-deficient covariances and
    cheap (an N1 x N2 SVD instead of D x D eigen-decompositions).
    """
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(f1.shape[0], f2.shape[0]) < 2:
        raise ValueError(f"frechet_distance_from_features: need (N, D) sets with N >= 2 and equal D, "
                         f"got {f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    if max(f1.shape[0], f2.shape[0]) > f1.shape[1]:
        return frechet_distance(mu1, np.cov(f1, rowvar=False), mu2, np.cov(f2, rowvar=False))
    a1 = (f1 - mu1) / np.sqrt(f1.shape[0] - 1)
    a2 = (f2 - mu2) / np.sqrt(f2.shape[0] - 1)
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(a1 * a1) + np.sum(a2 * a2) - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------------------------
# Streaming statistics
# ----------------------------------------------------------------------------------------------

def batch_partial_sums(feats: jax.Array, mask: jax.Array | None = None,
                       shift: jax.Array | None = None) -> dict[str, jax.Array]:
    """Jittable partial sums of one (possibly globally sharded) batch of features (B, D).

    Returns ``count`` (scalar), ``sum`` (D,) and ``outer`` (D, D) of ``feats - shift`` over the rows where
    ``mask`` is true (padding rows of a last, partial batch are masked out). Plain ``jnp.sum`` / matmul over
    the global batch axis: under ``jit`` XLA inserts the cross-device reduction, so no ``psum`` and the
    same code runs on one device, many devices or many hosts. Shifting by a rough mean (e.g. the first
    batch's) keeps the float32 outer products from cancelling; :meth:`FeatureStats.add_partial_sums`
    undoes the shift in float64.
    """
    x = feats.astype(jnp.float32)
    if shift is not None:
        x = x - jnp.asarray(shift, jnp.float32)
    if mask is None:
        count = jnp.asarray(x.shape[0], jnp.float32)
    else:
        m = jnp.asarray(mask).astype(jnp.float32)
        x = x * m[:, None]
        count = jnp.sum(m)
    return {"count": count, "sum": jnp.sum(x, axis=0),
            "outer": jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)}


class FeatureStats:
    """Running count, sum and sum of outer products of feature vectors, in float64 on the host."""

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self.sum = None if dim is None else np.zeros(dim, np.float64)
        self.outer = None if dim is None else np.zeros((dim, dim), np.float64)

    def _ensure(self, dim: int) -> None:
        if self.dim is None:
            self.dim = dim
            self.sum = np.zeros(dim, np.float64)
            self.outer = np.zeros((dim, dim), np.float64)
        elif dim != self.dim:
            raise ValueError(f"FeatureStats: features of dimension {dim}, expected {self.dim}")

    def update(self, feats: Any) -> "FeatureStats":
        """Add a batch of features (N, D)."""
        f = np.asarray(feats, np.float64)
        if f.ndim != 2:
            raise ValueError(f"FeatureStats.update: expected features of shape (N, D), got {f.shape}")
        self._ensure(f.shape[1])
        self.count += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f
        return self

    def add_partial_sums(self, partial: dict[str, Any], shift: Any = None) -> "FeatureStats":
        """Add the output of :func:`batch_partial_sums` (computed with the same ``shift``)."""
        try:
            n, s, o = (np.asarray(partial[k], np.float64) for k in ("count", "sum", "outer"))
        except KeyError as e:
            raise ValueError(f"FeatureStats.add_partial_sums: missing key {e} (need count, sum, outer)") from None
        if s.ndim != 1 or o.shape != (s.shape[0], s.shape[0]):
            raise ValueError(f"FeatureStats.add_partial_sums: sum {s.shape} / outer {o.shape} are not (D,) / (D, D)")
        self._ensure(s.shape[0])
        n = float(n)
        if shift is not None:  # sums of (f - c) -> sums of f
            c = np.asarray(shift, np.float64)
            o = o + np.outer(c, s) + np.outer(s, c) + n * np.outer(c, c)
            s = s + n * c
        self.count += int(round(n))
        self.sum += s
        self.outer += o
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another accumulator's statistics (e.g. from another host or shard)."""
        if other.dim is None:
            return self
        self._ensure(other.dim)
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) as ``np.mean(f, 0)``, ``np.cov(f, rowvar=False)`` (ddof 1) would give."""
        if self.count < 2:
            raise ValueError(f"FeatureStats.mean_cov: need at least 2 samples, have {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, 0.5 * (sigma + sigma.T)


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------

def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` equal chunks of ``exp(E_x KL(p(y|x) || p(y)))``, in float64.

    ``logits`` (N, C): the classifier's pre-softmax outputs (for the original IS: the FID Inception's
    1008 unbiased logits ``pool3 @ W``).
    """
    x = np.asarray(logits, np.float64)
    if x.ndim != 2:
        raise ValueError(f"inception_score: logits must be (N, classes), got shape {x.shape}")
    if not 1 <= splits <= x.shape[0]:
        raise ValueError(f"inception_score: splits={splits} must be in [1, N={x.shape[0]}]")
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(logp, splits):
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0))
        kl = np.sum(p * (part - log_py), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# Improved precision / recall (Kynkäänniemi et al. 2019)
# ----------------------------------------------------------------------------------------------

@jax.jit
def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    d = (jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :]
         - 2.0 * jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.maximum(d, 0.0)


def _kth_radii(feats: jax.Array, k: int, block: int) -> jax.Array:
    # k+1-th smallest squared distance to the set itself (the first is the point, at distance 0).
    out = []
    for i in range(0, feats.shape[0], block):
        d = _sq_dists(feats[i:i + block], feats)
        out.append(-jax.lax.top_k(-d, k + 1)[0][:, k])
    return jnp.concatenate(out)


def _coverage(query: jax.Array, ref: jax.Array, ref_radii: jax.Array, block: int) -> float:
    hits = []
    for i in range(0, query.shape[0], block):
        d = _sq_dists(query[i:i + block], ref)
        hits.append(jnp.any(d <= ref_radii[None, :], axis=1))
    return float(jnp.mean(jnp.concatenate(hits).astype(jnp.float32)))


def precision_recall(real_feats: Any, fake_feats: Any, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall with k-NN manifolds (k=3 as in the paper).

    precision: fraction of fake samples inside some real sample's k-NN ball; recall: the converse.
    Distances are computed in row blocks of ``block`` so N x N matrices are never held at once.
    """
    real = jnp.asarray(np.asarray(real_feats, np.float32))
    fake = jnp.asarray(np.asarray(fake_feats, np.float32))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: need (N, D) feature sets of equal D, got {real.shape} and {fake.shape}")
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"precision_recall: k={k} must be in [1, min(N_real, N_fake) - 1]")
    real_r = _kth_radii(real, k, block)
    fake_r = _kth_radii(fake, k, block)
    return _coverage(fake, real, real_r, block), _coverage(real, fake, fake_r, block)


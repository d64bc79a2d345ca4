"""Regenerates the seeded weights behind the golden files in tests/golden.

Spec (golden README): each array depends only on (seed, key, shape, kind) and is drawn from
``np.random.default_rng([seed, crc32(key)])``; kinds fix the distribution. Entries of kind ``stored``
are constants kept in the golden npz under ``stored/<key>``.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import zlib

import numpy as np

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"


def _draw(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else max(shape[0], 1)
    normal = {"conv": np.sqrt(2.0 / fan_in), "linear": np.sqrt(1.0 / fan_in), "bias": 0.05,
              "norm_bias": 0.1, "running_mean": 0.1, "embedding": 1.0, "position": 0.02}
    uniform = {"norm_weight": (0.8, 1.2), "running_var": (0.5, 1.5)}
    if kind in normal:
        return rng.normal(0.0, normal[kind], shape)
    if kind in uniform:
        return rng.uniform(*uniform[kind], shape)
    if kind == "zero":
        return np.zeros(shape)
    raise ValueError(f"unknown weight kind {kind!r}")


def seeded_array(key: str, shape, kind: str, seed: int) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return _draw(rng, shape, kind).astype(np.float32)


def golden(name: str) -> tuple[dict[str, np.ndarray], dict, dict[str, np.ndarray]]:
    """(state_dict in PyTorch layout, manifest, npz contents) for golden set ``name``."""
    manifest = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    with np.load(GOLDEN_DIR / f"{name}.npz", allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    seed = int(manifest["seed"])
    sd = {}
    for e in manifest["params"]:
        if e["kind"] == "stored":
            sd[e["key"]] = data["stored/" + e["key"]]
        else:
            sd[e["key"]] = seeded_array(e["key"], e["shape"], e["kind"], seed)
    return sd, manifest, data


def weights_sha256(sd: dict[str, np.ndarray], manifest: dict) -> str:
    h = hashlib.sha256()
    for e in manifest["params"]:
        h.update(np.ascontiguousarray(sd[e["key"]]).tobytes())
    return h.hexdigest()


EPS32 = float(np.finfo(np.float32).eps)
POLICY_ULPS = 4


def suggested_atol(manifest: dict, output: str) -> float:
    """The golden README's suggested atol (about 10x the reference's own float32 error), raised to the floor of
    the tolerance policy in tests/README.md: POLICY_ULPS float32 ulps of the largest reference magnitude, so that
    a comparison does not depend on XLA reproducing torch's rounding bit for bit. Outputs the reference marks as
    exact (a float32 and a float64 run identical: gathers) stay exact."""
    entry = manifest["outputs"][output]
    if float(entry["suggested_atol"]) == 0.0 and float(entry.get("fp32_error", 0.0)) == 0.0:
        return 0.0
    return max(float(entry["suggested_atol"]), float(entry.get("fp32_error", 0.0)),
               POLICY_ULPS * EPS32 * float(entry["max_abs_fp64"]))

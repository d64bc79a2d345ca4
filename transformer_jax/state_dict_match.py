"""A PyTorch state_dict checked against the keys and shapes a GPT converter expects (minGPT's and LlamaGen's)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np


def to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor; torch itself is never imported here
        v = v.detach().cpu().float().numpy()
    return np.asarray(v)


def matched_arrays(state_dict: Mapping[str, Any], expected: Mapping[str, tuple], what: str, *,
                   skip: Callable[[str], bool] = lambda k: False,
                   shown: Callable[[str], str] = lambda k: k) -> dict[str, np.ndarray]:
    """The float32 arrays of ``state_dict`` under ``expected``'s keys; keys for which ``skip`` holds are ignored.

    Every missing key, unexpected key and shape mismatch is collected into one ValueError line,
    ``"{what} ({n} problems): ..."`` (the first six named; a wholly different file would list hundreds), with
    each key written as ``shown(key)``."""
    problems = [f"missing key {shown(k)!r} (expected shape {shape})" for k, shape in expected.items()
                if k not in state_dict]
    arrays = {}
    for k, v in state_dict.items():
        if skip(k):
            continue
        if k not in expected:
            problems.append(f"unexpected key {shown(k)!r} (shape {tuple(np.shape(v))})")
            continue
        a = to_numpy(v)
        if a.shape != tuple(expected[k]):
            problems.append(f"shape mismatch for {shown(k)!r}: expected {expected[k]}, found {a.shape}")
        arrays[k] = a.astype(np.float32)
    if problems:
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise ValueError(f"{what} ({len(problems)} problems): " + "; ".join(problems[:6]) + more)
    return arrays

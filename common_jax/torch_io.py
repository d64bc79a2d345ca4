"""Reading PyTorch weight files (.pth / Lightning .ckpt) into numpy, for the converters only.

torch is imported lazily: nothing else in the project needs it.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """``{key: float32/int numpy array}`` from a state dict file or a checkpoint with a ``state_dict`` entry.

    Loads with ``torch.load(weights_only=True)``: no pickled code runs.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch, which is not installed: "
                          "pip install -e \".[reference]\"") from e
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many unpickling error types
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
            for k, v in sd.items() if hasattr(v, "detach")}

"""LPIPS(vgg) perceptual distance (lpips 0.1.4, version 0.1) in Flax, plus its weight converters.

The network is frozen: training differentiates LPIPS only through its inputs (see :func:`make_lpips_fn`).
Weights come from a local file (``load_lpips``) or a reference state dict (``from_lpips``); there is no
random fallback.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common_jax.layers import Conv, torch_conv_to_flax

# VGG16 ``features`` layout: (torchvision index of each conv, output channels), grouped by LPIPS slice.
# Slices 2..5 start with a 2x2 max pool; each slice ends at the tapped ReLU (relu1_2 ... relu5_3).
VGG16_SLICES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)
TAP_CHANNELS = tuple(s[-1][1] for s in VGG16_SLICES)
# lpips.pretrained_networks' ScalingLayer constants (ImageNet statistics mapped to [-1, 1]).
SCALING_SHIFT = (-0.030, -0.088, -0.188)
SCALING_SCALE = (0.458, 0.448, 0.450)
CONVERT_COMMAND = ("python -m launch.convert_lpips --vgg16=vgg16-397923af.pth --lin=vgg.pth "
                   "--out=lpips_vgg.npz")


def _conv_name(torch_index: int) -> str:
    return f"features_{torch_index}"


def _spatial_mean(x: jax.Array) -> jax.Array:
    """Mean over all but the batch axis by pairwise (tree) summation.

    Why: the lin outputs are signed and cancel; XLA:CPU's single reduce accumulated ~20x the
    reference's float32 error on a 32x32 map, the tree keeps it at O(log n) ulps.
    """
    b = x.shape[0]
    x = x.reshape(b, -1)
    n = x.shape[1]
    while x.shape[1] > 1:
        if x.shape[1] % 2:
            x = jnp.pad(x, ((0, 0), (0, 1)))
        half = x.shape[1] // 2
        x = x[:, :half] + x[:, half:]
    return x[:, 0] / n


def _unit_normalize(f: jax.Array) -> jax.Array:
    """f / (||f||_channels + 1e-10), with a finite gradient where a pixel's features are all zero.

    sqrt has an infinite derivative at 0 (ReLU features can vanish at a pixel); the forward value is
    the reference's, the gradient there is taken as 0 instead of NaN.
    """
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + 1e-10)


class LPIPS(nn.Module):
    """LPIPS(vgg) distance between NHWC images in [-1, 1].

    ``apply(variables, x0, x1)`` -> (B,) distances; ``per_layer=True`` -> (5, B) per-tap terms
    (relu1_2 ... relu5_3) whose sum is the distance. ``dtype`` is the compute dtype of the VGG convs;
    normalisation and the distance are computed in float32.
    """
    dtype: Any = None

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array, per_layer: bool = False) -> jax.Array:
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS: expected two NHWC images of the same shape (B, H, W, 3), "
                             f"got {x0.shape} and {x1.shape}")
        const = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",))
        shift = self.param("shift", const, (3,), jnp.float32)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (3,), jnp.float32)
        b = x0.shape[0]
        # One VGG pass over both images: half the launches, same numbers.
        h = (jnp.concatenate([x0, x1], axis=0).astype(jnp.float32) - shift) / scale
        terms = []
        for k, convs in enumerate(VGG16_SLICES):
            if k > 0:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for idx, ch in convs:
                h = nn.relu(Conv(ch, (3, 3), padding=1, dtype=self.dtype, name=_conv_name(idx))(h))
            f = _unit_normalize(h.astype(jnp.float32))
            diff = jnp.square(f[:b] - f[b:])
            # lin_k: 1x1 conv C -> 1 without bias (its dropout is inactive in eval).
            lin = Conv(1, (1, 1), use_bias=False, name=f"lin{k}")(diff)
            terms.append(_spatial_mean(lin))
        stacked = jnp.stack(terms)
        return stacked if per_layer else jnp.sum(stacked, axis=0)


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float32)


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"scaling_layer.shift": (1, 3, 1, 1), "scaling_layer.scale": (1, 3, 1, 1)}
    cin = 3
    for k, convs in enumerate(VGG16_SLICES):
        for idx, ch in convs:
            shapes[f"net.slice{k + 1}.{idx}.weight"] = (ch, cin, 3, 3)
            shapes[f"net.slice{k + 1}.{idx}.bias"] = (ch,)
            cin = ch
        shapes[f"lin{k}.model.1.weight"] = (1, cin, 1, 1)
    return shapes


def from_lpips(state_dict: Mapping[str, Any], dtype: Any = None) -> tuple[LPIPS, dict]:
    """lpips.LPIPS(net='vgg') state dict (reference key names, PyTorch layout) -> (model, variables).

    Accepts ``lin{k}.model.1.weight`` and/or their ``lins.{k}.model.1.weight`` aliases (they must agree).
    Missing, unexpected or wrongly shaped keys raise one ValueError listing them.
    """
    sd = dict(state_dict)
    shapes = _expected_shapes()
    for k in range(len(VGG16_SLICES)):
        alias, key = f"lins.{k}.model.1.weight", f"lin{k}.model.1.weight"
        if alias in sd:
            a = _to_numpy(sd.pop(alias))
            if key in sd and not np.array_equal(a, _to_numpy(sd[key])):
                raise ValueError(f"from_lpips: {alias} and {key} hold different values; they must be "
                                 f"the same tensor")
            sd.setdefault(key, a)
    missing = sorted(set(shapes) - set(sd))
    unexpected = sorted(set(sd) - set(shapes))
    bad = sorted(f"{k}: expected {shapes[k]}, got {tuple(np.shape(sd[k]))}"
                 for k in set(shapes) & set(sd) if tuple(np.shape(sd[k])) != shapes[k])
    if missing or unexpected or bad:
        raise ValueError("from_lpips: state dict does not match lpips.LPIPS(net='vgg'): "
                         f"missing keys {missing}; unexpected keys {unexpected}; wrong shapes {bad}")
    params: dict[str, Any] = {
        "shift": _to_numpy(sd["scaling_layer.shift"]).reshape(3),
        "scale": _to_numpy(sd["scaling_layer.scale"]).reshape(3),
    }
    for k, convs in enumerate(VGG16_SLICES):
        for idx, _ in convs:
            params[_conv_name(idx)] = {
                "kernel": torch_conv_to_flax(_to_numpy(sd[f"net.slice{k + 1}.{idx}.weight"])),
                "bias": _to_numpy(sd[f"net.slice{k + 1}.{idx}.bias"])}
        params[f"lin{k}"] = {"kernel": torch_conv_to_flax(_to_numpy(sd[f"lin{k}.model.1.weight"]))}
    model = LPIPS(dtype=dtype)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return model, {"params": _box_like(model, params)}


def _box_like(model: LPIPS, params: dict) -> dict:
    """Wrap converted arrays in the same logical-partitioning boxes that ``model.init`` produces."""
    dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy))["params"]

    def put(box, value):
        if isinstance(box, nn.LogicallyPartitioned):
            return box.replace_boxed(value)
        return value
    return jax.tree_util.tree_map(put, abstract, params,
                                  is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))


def state_dict_from_torchvision(vgg16_state_dict: Mapping[str, Any],
                                lin_state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torchvision ``vgg16`` state dict (``features.{i}.*``) + lpips ``vgg.pth`` (``lin{k}.model.1.weight``)
    -> an lpips.LPIPS(net='vgg') state dict (numpy, PyTorch layout), as :func:`from_lpips` takes.

    The classifier weights of the torchvision file are ignored.
    """
    sd: dict[str, np.ndarray] = {
        "scaling_layer.shift": np.asarray(SCALING_SHIFT, np.float32).reshape(1, 3, 1, 1),
        "scaling_layer.scale": np.asarray(SCALING_SCALE, np.float32).reshape(1, 3, 1, 1),
    }
    missing = []
    for k, convs in enumerate(VGG16_SLICES):
        for idx, _ in convs:
            for p in ("weight", "bias"):
                src = f"features.{idx}.{p}"
                if src not in vgg16_state_dict:
                    missing.append(src)
                else:
                    sd[f"net.slice{k + 1}.{idx}.{p}"] = _to_numpy(vgg16_state_dict[src])
    if missing:
        raise ValueError(f"VGG16 state dict lacks {missing}; expected torchvision vgg16 keys "
                         f"'features.{{i}}.weight/bias' (e.g. vgg16-397923af.pth); got keys "
                         f"{sorted(vgg16_state_dict)[:8]}...")
    lin_missing = []
    for k in range(len(VGG16_SLICES)):
        key = f"lin{k}.model.1.weight"
        alias = f"lins.{k}.model.1.weight"
        if key in lin_state_dict:
            sd[key] = _to_numpy(lin_state_dict[key])
        elif alias in lin_state_dict:
            sd[key] = _to_numpy(lin_state_dict[alias])
        else:
            lin_missing.append(key)
    if lin_missing:
        raise ValueError(f"LPIPS lin state dict lacks {lin_missing}; expected lpips's "
                         f"weights/v0.1/vgg.pth; got keys {sorted(lin_state_dict)}")
    return sd


def load_lpips(npz_path: str | os.PathLike, dtype: Any = None) -> tuple[LPIPS, dict]:
    """Load LPIPS(vgg) from the .npz written by ``launch.convert_lpips`` -> (model, variables)."""
    path = os.fspath(npz_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS weights file {path!r} not found. Create it from torchvision's VGG16 "
            f"(vgg16-397923af.pth, https://download.pytorch.org/models/vgg16-397923af.pth) and lpips's "
            f"lin weights (lpips/weights/v0.1/vgg.pth in the lpips package) with: {CONVERT_COMMAND}")
    with np.load(path, allow_pickle=False) as z:
        sd = {k: z[k] for k in z.files}
    try:
        return from_lpips(sd, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def make_lpips_fn(model: LPIPS, variables: Mapping[str, Any]) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(x0, x1) -> (B,) distances with the network frozen (gradients flow to the inputs only)."""
    def fn(x0: jax.Array, x1: jax.Array) -> jax.Array:
        return model.apply(jax.lax.stop_gradient(variables), x0, x1)
    return fn

"""InceptionV3 as used by pytorch-fid 0.3.0 for FID / Inception Score, and its weight conversion.

The network is torchvision's Inception3 with pytorch-fid's FID blocks (FIDInceptionA/C/E_1 average
pools exclude the padding, Mixed_7c pools with max), inference only: BatchNorm (eps 1e-3, running
statistics) is folded into the preceding convolution when the weights are converted.
Input preprocessing equals pytorch-fid's wrapper: [0, 1] images, bilinear resize to 299x299 without
antialiasing (align_corners=False), then ``2x - 1``.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from common_jax.layers import Conv, torch_conv_to_flax
from common_jax.mesh import batch_sharding, fit_to_shapes, logical_to_sharding

BN_EPS = 1e-3
INPUT_SIZE = 299
FEATURE_DIM = 2048
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   f"{FID_WEIGHTS_FILE}")
CONVERT_COMMAND = f"python -m launch.convert_inception --pth={FID_WEIGHTS_FILE} --out=<path>.npz"

# pytorch-fid wrapper prefixes (``blocks.i.j``) <-> torchvision Inception3 module names.
WRAPPER_TO_TORCHVISION: dict[str, str] = {
    "blocks.0.0": "Conv2d_1a_3x3", "blocks.0.1": "Conv2d_2a_3x3", "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1", "blocks.1.1": "Conv2d_4a_3x3",
    "blocks.2.0": "Mixed_5b", "blocks.2.1": "Mixed_5c", "blocks.2.2": "Mixed_5d", "blocks.2.3": "Mixed_6a",
    "blocks.2.4": "Mixed_6b", "blocks.2.5": "Mixed_6c", "blocks.2.6": "Mixed_6d", "blocks.2.7": "Mixed_6e",
    "blocks.3.0": "Mixed_7a", "blocks.3.1": "Mixed_7b", "blocks.3.2": "Mixed_7c",
}
TORCHVISION_TO_WRAPPER = {v: k for k, v in WRAPPER_TO_TORCHVISION.items()}


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class BasicConv(nn.Module):
    """Conv -> BatchNorm (inference) -> ReLU, with the BatchNorm folded into the conv bias/kernel."""
    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    padding: Any = 0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = Conv(self.features, self.kernel_size, self.strides, self.padding, use_bias=True,
                 dtype=self.dtype, name="conv")(x)
        return nn.relu(y)


def _avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    # pytorch-fid's FID blocks: avg_pool2d(3, 1, 1, count_include_pad=False)
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


def _max_pool_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
    pool_features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda f, k, p, name: BasicConv(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = c(64, (1, 1), 0, "branch1x1")(x)
        b5 = c(48, (1, 1), 0, "branch5x5_1")(x)
        b5 = c(64, (5, 5), 2, "branch5x5_2")(b5)
        b3 = c(64, (1, 1), 0, "branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), 1, "branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), 1, "branch3x3dbl_3")(b3)
        bp = c(self.pool_features, (1, 1), 0, "branch_pool")(_avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv(384, (3, 3), (2, 2), dtype=self.dtype, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), dtype=self.dtype, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=1, dtype=self.dtype, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), (2, 2), dtype=self.dtype, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1)


_P17 = ((0, 0), (3, 3))  # (1, 7) kernel
_P71 = ((3, 3), (0, 0))  # (7, 1) kernel
_P13 = ((0, 0), (1, 1))  # (1, 3) kernel
_P31 = ((1, 1), (0, 0))  # (3, 1) kernel


class InceptionC(nn.Module):
    channels_7x7: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        c = lambda f, k, p, name: BasicConv(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = c(192, (1, 1), 0, "branch1x1")(x)
        b7 = c(c7, (1, 1), 0, "branch7x7_1")(x)
        b7 = c(c7, (1, 7), _P17, "branch7x7_2")(b7)
        b7 = c(192, (7, 1), _P71, "branch7x7_3")(b7)
        bd = c(c7, (1, 1), 0, "branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), _P71, "branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), _P17, "branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), _P71, "branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), _P17, "branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), 0, "branch_pool")(_avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda f, k, p, name, s=(1, 1): BasicConv(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
        b3 = c(192, (1, 1), 0, "branch3x3_1")(x)
        b3 = c(320, (3, 3), 0, "branch3x3_2", (2, 2))(b3)
        b7 = c(192, (1, 1), 0, "branch7x7x3_1")(x)
        b7 = c(192, (1, 7), _P17, "branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), _P71, "branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), 0, "branch7x7x3_4", (2, 2))(b7)
        return jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (avg pool without padding count) or FIDInceptionE_2 (``max_pool=True``)."""
    max_pool: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda f, k, p, name: BasicConv(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = c(320, (1, 1), 0, "branch1x1")(x)
        b3 = c(384, (1, 1), 0, "branch3x3_1")(x)
        b3a = c(384, (1, 3), _P13, "branch3x3_2a")(b3)
        b3b = c(384, (3, 1), _P31, "branch3x3_2b")(b3)
        bd = c(448, (1, 1), 0, "branch3x3dbl_1")(x)
        bd = c(384, (3, 3), 1, "branch3x3dbl_2")(bd)
        bda = c(384, (1, 3), _P13, "branch3x3dbl_3a")(bd)
        bdb = c(384, (3, 1), _P31, "branch3x3dbl_3b")(bd)
        pooled = _max_pool_same(x) if self.max_pool else _avg_pool_exclude_pad(x)
        bp = c(192, (1, 1), 0, "branch_pool")(pooled)
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class Classifier(nn.Module):
    """The checkpoint's ``fc`` layer; returns (logits, logits without the bias)."""
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "vocab")), (x.shape[-1], self.num_classes))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                          (self.num_classes,))
        unbiased = jnp.dot(x, kernel, precision=jax.lax.Precision.HIGHEST)
        return unbiased + bias, unbiased


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (or float in [0, 1]) NHWC -> float32 299x299 in [-1, 1], as pytorch-fid's wrapper does."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"InceptionV3 expects NHWC images with 3 channels, got shape {images.shape}")
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 255.0
    else:
        x = images.astype(jnp.float32)
    b, h, w, _ = x.shape
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        # antialias=False: plain two-tap bilinear (half-pixel centres) like F.interpolate(align_corners=False)
        x = jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


class InceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3 (inference only, BatchNorm folded).

    ``__call__(images)`` -> pool3 features (B, 2048) float32. ``images``: NHWC uint8, or float in [0, 1].
    ``num_classes`` is the size of the ``fc`` layer (1008 in the FID checkpoint), ``None`` without it.
    """
    num_classes: int | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, images: jax.Array, return_logits: bool = False) -> Any:
        if return_logits and self.num_classes is None:
            raise ValueError("InceptionV3 has no fc layer (num_classes=None): logits need the released "
                             f"checkpoint {FID_WEIGHTS_FILE}, whose fc.weight/fc.bias the converter keeps")
        d = self.dtype
        x = preprocess(images)
        x = BasicConv(32, (3, 3), (2, 2), dtype=d, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), dtype=d, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=1, dtype=d, name="Conv2d_2b_3x3")(x)
        x = _max_pool_s2(x)
        x = BasicConv(80, (1, 1), dtype=d, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), dtype=d, name="Conv2d_4a_3x3")(x)
        x = _max_pool_s2(x)
        x = InceptionA(32, d, name="Mixed_5b")(x)
        x = InceptionA(64, d, name="Mixed_5c")(x)
        x = InceptionA(64, d, name="Mixed_5d")(x)
        x = InceptionB(d, name="Mixed_6a")(x)
        x = InceptionC(128, d, name="Mixed_6b")(x)
        x = InceptionC(160, d, name="Mixed_6c")(x)
        x = InceptionC(160, d, name="Mixed_6d")(x)
        x = InceptionC(192, d, name="Mixed_6e")(x)
        x = InceptionD(d, name="Mixed_7a")(x)
        x = InceptionE(False, d, name="Mixed_7b")(x)
        x = InceptionE(True, d, name="Mixed_7c")(x)
        feats = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if not return_logits:
            return feats
        logits, unbiased = Classifier(self.num_classes, name="fc")(feats)
        return feats, logits, unbiased

    def features_and_logits(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(pool3 features, fc logits, fc logits without bias). The original Inception Score code
        (and torch-fidelity) uses the unbiased logits ``pool3 @ W``."""
        return self(images, return_logits=True)


# ----------------------------------------------------------------------------------------------
# Conversion from pytorch-fid / torchvision state dicts
# ----------------------------------------------------------------------------------------------

def abstract_variables(model: InceptionV3) -> Any:
    """Shapes (and logical partitioning boxes) of ``model``'s variables, without computing anything."""
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x,
                                               return_logits=model.num_classes is not None), images)


def param_shardings(model: InceptionV3, mesh: Mesh, replicate: bool = True) -> Any:
    """NamedShardings of ``model``'s variables.

    ``replicate=True`` (default): every weight on every device. The network has 24M parameters (95 MB), so
    sharding them saves nothing, and on the XLA CPU backend of jax 0.10.2 the full network with kernels
    split over fsdp (outputs) and model (inputs) at once, batch over data x fsdp, computed wrong features.
    ``replicate=False``: the logical-axis table, dimensions a mesh axis does not divide replicated.
    """
    abstract = abstract_variables(model)
    if replicate:
        return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, PartitionSpec()), nn.unbox(abstract))
    return fit_to_shapes(logical_to_sharding(abstract, mesh), nn.unbox(abstract))


def feature_extractor(model: InceptionV3, variables: Any, mesh: Mesh | None = None,
                      replicate: bool = True) -> Any:
    """``fn(images) -> features`` (N, 2048) float32 numpy for host batches of NHWC uint8 images.

    With ``mesh``, weights are placed by :func:`param_shardings` and each batch is split over the mesh's
    batch axes (padded with copies of its last image up to a multiple of their size; the padding rows are
    dropped from the result). Compiles once per distinct batch shape. Single-process: with several hosts,
    call the jitted ``model.apply`` on globally sharded batches instead.
    """
    if mesh is None:
        apply = jax.jit(model.apply)
        return lambda images: np.asarray(apply(variables, jnp.asarray(images)))
    placed = jax.device_put(variables, param_shardings(model, mesh, replicate))
    spec = batch_sharding(mesh, 4)
    n_shards = int(np.prod([mesh.shape[a] for a in spec.spec[0]], dtype=np.int64))
    apply = jax.jit(model.apply, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def extract(images: Any) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"feature_extractor: expected a non-empty NHWC batch, got shape {images.shape}")
        n = images.shape[0]
        pad = -n % n_shards
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        return np.asarray(apply(placed, jax.device_put(images, spec)))[:n]
    return extract


def to_torchvision_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename pytorch-fid wrapper keys (``blocks.2.0.branch1x1...``) to torchvision ones; others kept."""
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"^(blocks\.\d+\.\d+)\.(.*)$", k)
        if m and m.group(1) in WRAPPER_TO_TORCHVISION:
            k = f"{WRAPPER_TO_TORCHVISION[m.group(1)]}.{m.group(2)}"
        out[k] = v
    return out


def to_wrapper_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename torchvision keys (``Mixed_5b.branch1x1...``) to pytorch-fid wrapper ones; others kept."""
    out = {}
    for k, v in state_dict.items():
        head, _, rest = k.partition(".")
        if head in TORCHVISION_TO_WRAPPER:
            k = f"{TORCHVISION_TO_WRAPPER[head]}.{rest}"
        out[k] = v
    return out


def _expected_torch_shapes(model: InceptionV3) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """torchvision-style key -> shape for every tensor the model needs, plus the flax conv paths."""
    params = nn.unbox(abstract_variables(model))["params"]
    shapes: dict[str, tuple[int, ...]] = {}
    conv_paths = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        if names[0] == "fc":
            if names[-1] == "kernel":
                shapes["fc.weight"] = (leaf.shape[1], leaf.shape[0])
                shapes["fc.bias"] = (leaf.shape[1],)
            continue
        if names[-1] != "kernel":
            continue  # conv biases come from the BatchNorm
        prefix = ".".join(names[:-2])
        kh, kw, cin, cout = leaf.shape
        shapes[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
        for bn in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{bn}"] = (cout,)
        conv_paths.append(prefix)
    return shapes, conv_paths


def _set_path(tree: dict, names: list[str], value: Any) -> None:
    for n in names[:-1]:
        tree = tree.setdefault(n, {})
    tree[names[-1]] = value


def from_pytorch_fid(state_dict: Mapping[str, Any], dtype: Any = None) -> tuple[InceptionV3, dict]:
    """pytorch-fid InceptionV3 state dict (numpy arrays or tensors) -> (model, variables).

    Accepts the wrapper's keys (``blocks.0.0.conv.weight``...) and the released checkpoint's torchvision
    keys (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b...``, ``fc.weight``). ``fc`` is optional (features only
    without it); ``num_batches_tracked`` buffers are ignored. BatchNorm is folded into the convs in float64.
    """
    sd = {k: np.asarray(v) for k, v in to_torchvision_names(state_dict).items()}
    sd = {k: v for k, v in sd.items() if not k.endswith(".num_batches_tracked")}
    has_fc = "fc.weight" in sd or "fc.bias" in sd
    num_classes = int(sd["fc.weight"].shape[0]) if "fc.weight" in sd and sd["fc.weight"].ndim == 2 else (
        1008 if has_fc else None)
    model = InceptionV3(num_classes=num_classes, dtype=dtype)
    expected, conv_paths = _expected_torch_shapes(model)

    missing = [f"missing key {k!r} (expected shape {shape})" for k, shape in expected.items() if k not in sd]
    wrong = [f"wrong shape for {k!r}: expected {shape}, found {tuple(sd[k].shape)}"
             for k, shape in expected.items() if k in sd and tuple(sd[k].shape) != shape]
    unexpected = [f"unexpected key {k!r} (shape {tuple(sd[k].shape)})" for k in sd if k not in expected]
    problems = missing + wrong + unexpected
    if problems:
        raise ValueError(
            f"pytorch-fid InceptionV3 state dict does not match ({len(problems)} problems: {len(missing)} missing, "
            f"{len(wrong)} wrong shapes, {len(unexpected)} unexpected of {len(sd)} keys given; expected the keys "
            f"of pytorch_fid.inception.InceptionV3 or of {FID_WEIGHTS_FILE}):\n  " + "\n  ".join(problems))

    params: dict = {}
    for prefix in conv_paths:
        w = sd[f"{prefix}.conv.weight"].astype(np.float64)
        gamma, beta, mean, var = (sd[f"{prefix}.bn.{n}"].astype(np.float64)
                                  for n in ("weight", "bias", "running_mean", "running_var"))
        scale = gamma / np.sqrt(var + BN_EPS)
        names = prefix.split(".") + ["conv"]
        _set_path(params, names + ["kernel"],
                  jnp.asarray(torch_conv_to_flax(w * scale[:, None, None, None]).astype(np.float32)))
        _set_path(params, names + ["bias"], jnp.asarray((beta - mean * scale).astype(np.float32)))
    if num_classes is not None:
        params["fc"] = {"kernel": jnp.asarray(sd["fc.weight"].T.astype(np.float32)),
                        "bias": jnp.asarray(sd["fc.bias"].astype(np.float32))}
    return model, {"params": params}


# ----------------------------------------------------------------------------------------------
# Pure-numpy weight files
# ----------------------------------------------------------------------------------------------

def save_state_dict_npz(path: str | os.PathLike, state_dict: Mapping[str, Any]) -> None:
    """Write a {key: array} state dict (torchvision key names) to one uncompressed .npz."""
    arrays = {k: np.asarray(v) for k, v in to_torchvision_names(state_dict).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:  # a file object keeps np.savez from appending a second ".npz"
        np.savez(f, **arrays)


def load_state_dict_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state dict written by :func:`save_state_dict_npz`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"InceptionV3 weights file {os.fspath(path)!r} not found. Download {FID_WEIGHTS_URL} and convert "
            f"it (no PyTorch needed): {CONVERT_COMMAND}")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_inception(npz_path: str | os.PathLike, dtype: Any = None) -> tuple[InceptionV3, dict]:
    """(model, variables) from an .npz written by ``launch.convert_inception``."""
    try:
        return from_pytorch_fid(load_state_dict_npz(npz_path), dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{os.fspath(npz_path)}: {e}") from e

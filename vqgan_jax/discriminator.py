"""PatchGAN discriminator (taming.modules.discriminator.model.NLayerDiscriminator) and its converter.

Norm layers follow PyTorch: BatchNorm2d (eps 1e-5, momentum 0.1; running variance updated with the
unbiased batch variance) or taming's ActNorm (data-dependent initialisation from the first batch).
Batch statistics are plain means over (N, H, W): under jit with a batch-sharded input they are global
means, so cross-device BatchNorm needs no axis_name.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common_jax.layers import Conv, torch_conv_to_flax

NORMS = ("batch", "actnorm")


def _normal(mean: float, std: float):
    def init(key, shape, dtype=jnp.float32):
        return mean + std * jax.random.normal(key, shape, dtype)
    return init


def _torch_default_bias(fan_in: int):
    """PyTorch Conv2d's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)); weights_init leaves it."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class BatchNorm2d(nn.Module):
    """BatchNorm over (N, H, W) of NHWC input, PyTorch semantics.

    train: normalise with the batch mean and biased variance; update running stats as
    ``(1 - momentum) * running + momentum * batch`` with the unbiased variance. eval: running stats.
    """
    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(_normal(1.0, 0.02), ("norm",)), (c,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
            if not self.is_initializing():
                n = x.shape[0] * x.shape[1] * x.shape[2]
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
                ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(unbiased)
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class ActNorm(nn.Module):
    """taming's ActNorm: ``scale * (x + loc)``, initialised at ``init`` from that batch so that the
    output has zero mean and unit (unbiased) std per channel (``loc = -mean``, ``scale = 1/(std+1e-6)``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        xf = jax.lax.stop_gradient(x.astype(jnp.float32)).reshape(-1, c)

        def loc_init(key, shape, dtype=jnp.float32):
            return -jnp.mean(xf, axis=0).astype(dtype)

        def scale_init(key, shape, dtype=jnp.float32):
            return (1.0 / (jnp.std(xf, axis=0, ddof=1) + 1e-6)).astype(dtype)
        loc = self.param("loc", nn.with_logical_partitioning(loc_init, ("norm",)), (c,))
        scale = self.param("scale", nn.with_logical_partitioning(scale_init, ("norm",)), (c,))
        return (scale * (x.astype(jnp.float32) + loc)).astype(x.dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``apply(variables, x, train)`` on NHWC images -> (B, h, w, 1) logits.

    With ``norm="batch"``, ``train=True`` uses batch statistics and needs ``mutable=["batch_stats"]``;
    ``train=False`` uses the running statistics. With ``norm="actnorm"`` ``train`` has no effect and
    ``init`` must see a real batch (taming initialises ActNorm from the first batch it sees).
    """
    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"NLayerDiscriminator: norm must be one of {NORMS}, got {self.norm!r}")
        if self.n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {self.n_layers}")
        if x.ndim != 4:
            raise ValueError(f"NLayerDiscriminator: expected NHWC input, got shape {x.shape}")
        # BatchNorm's affine parameters replace the conv bias; ActNorm keeps it (as taming does).
        use_bias = self.norm != "batch"
        lrelu = lambda h: nn.leaky_relu(h, 0.2)  # noqa: E731

        def conv(h, features, stride, bias, name):
            fan_in = h.shape[-1] * 16
            return Conv(features, (4, 4), strides=(stride, stride), padding=1, use_bias=bias,
                        dtype=self.dtype, kernel_init=_normal(0.0, 0.02),
                        bias_init=_torch_default_bias(fan_in), name=name)(h)

        def norm(h, name):
            if self.norm == "batch":
                return BatchNorm2d(name=name)(h, train)
            return ActNorm(name=name)(h)

        h = lrelu(conv(x, self.ndf, 2, True, "conv0"))
        mult = 1
        for n in range(1, self.n_layers):
            mult = min(2 ** n, 8)
            h = lrelu(norm(conv(h, self.ndf * mult, 2, use_bias, f"conv{n}"), f"norm{n}"))
        mult = min(2 ** self.n_layers, 8)
        n = self.n_layers
        h = lrelu(norm(conv(h, self.ndf * mult, 1, use_bias, f"conv{n}"), f"norm{n}"))
        return conv(h, 1, 1, True, f"conv{n + 1}")


def _torch_indices(n_layers: int) -> tuple[list[int], list[int]]:
    """Sequential indices of the convs and norm layers in taming's ``main``."""
    convs = [0] + [2 + 3 * (k - 1) for k in range(1, n_layers + 1)] + [2 + 3 * n_layers]
    norms = [c + 1 for c in convs[1:-1]]
    return convs, norms


_PREFIXES = ("loss.discriminator.main.", "discriminator.main.", "main.")


def from_taming_discriminator(state_dict: Mapping[str, Any], ndf: int | None = None,
                              n_layers: int | None = None, norm: str | None = None,
                              input_nc: int | None = None, dtype: Any = None
                              ) -> tuple[NLayerDiscriminator, dict]:
    """taming NLayerDiscriminator weights -> (model, variables).

    Keys ``main.{i}.*``; a VQGAN checkpoint's ``loss.discriminator.main.*`` (or ``discriminator.main.*``)
    are taken from a full state dict, other keys ignored. ``ndf``, ``n_layers``, ``norm`` and
    ``input_nc`` are read from the weights; when given they are checked against them.
    """
    prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in state_dict)), None)
    if prefix is None:
        raise ValueError(f"from_taming_discriminator: no keys starting with any of {_PREFIXES}; got "
                         f"{sorted(state_dict)[:10]}...")
    sd = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            sd[k[len(prefix):]] = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    conv_idx = sorted(int(k.split(".")[0]) for k in sd if k.endswith(".weight") and np.ndim(sd[k]) == 4)
    found_nl = len(conv_idx) - 2
    found_norm = ("actnorm" if any(k.endswith(".loc") for k in sd) else "batch")
    if "0.weight" not in sd or found_nl < 1:
        raise ValueError(f"from_taming_discriminator: expected conv weights {prefix}0.weight ... "
                         f"(at least 3 convs), found convs at {conv_idx}")
    found = {"ndf": int(sd["0.weight"].shape[0]), "n_layers": found_nl, "norm": found_norm,
             "input_nc": int(sd["0.weight"].shape[1])}
    given = {"ndf": ndf, "n_layers": n_layers, "norm": norm, "input_nc": input_nc}
    wrong = [f"{k}: given {v!r}, weights have {found[k]!r}" for k, v in given.items()
             if v is not None and v != found[k]]
    if wrong:
        raise ValueError(f"from_taming_discriminator: {'; '.join(wrong)}")
    model = NLayerDiscriminator(ndf=found["ndf"], n_layers=found_nl, norm=found_norm, dtype=dtype)

    # Expected keys and shapes from the model itself; everything is checked before conversion.
    convs, norms = _torch_indices(found_nl)
    x = jnp.zeros((2, 32, 32, found["input_nc"]), jnp.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    ap = abstract["params"]
    expected: dict[str, tuple[int, ...]] = {}
    mapping: dict[str, tuple[str, ...]] = {}
    for j, ci in enumerate(convs):
        k = ap[f"conv{j}"]["kernel"].value.shape
        expected[f"{ci}.weight"] = (k[3], k[2], k[0], k[1])
        mapping[f"{ci}.weight"] = ("params", f"conv{j}", "kernel")
        if "bias" in ap[f"conv{j}"]:
            expected[f"{ci}.bias"] = (k[3],)
            mapping[f"{ci}.bias"] = ("params", f"conv{j}", "bias")
    for j, ni in enumerate(norms, start=1):
        c = ap[f"norm{j}"]["scale"].value.shape[0]
        if found_norm == "batch":
            names = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                     "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
            optional = {"num_batches_tracked"}
        else:
            names = {"loc": ("params", "loc"), "scale": ("params", "scale")}
            optional = {"initialized"}
        for tk, (coll, name) in names.items():
            expected[f"{ni}.{tk}"] = (c,)
            mapping[f"{ni}.{tk}"] = (coll, f"norm{j}", name)
        for tk in optional:
            expected.setdefault(f"{ni}.{tk}", None)
    missing = sorted(k for k, s in expected.items() if s is not None and k not in sd)
    unexpected = sorted(prefix + k for k in sd if k not in expected)
    bad = []
    for k, s in expected.items():
        if s is None or k not in sd:
            continue
        got = tuple(np.shape(sd[k]))
        # PyTorch keeps ActNorm's loc/scale as (1, C, 1, 1).
        if got != s and not (int(np.prod(got)) == s[0] and len(s) == 1 and found_norm == "actnorm"):
            bad.append(f"{prefix}{k}: expected {s}, got {got}")
    if missing or unexpected or bad:
        raise ValueError(f"from_taming_discriminator: missing keys {[prefix + k for k in missing]}; "
                         f"unexpected keys {unexpected}; wrong shapes {bad}")

    return model, _fill(abstract, sd, mapping)


def _fill(abstract: Any, sd: Mapping[str, np.ndarray], mapping: Mapping[str, tuple[str, ...]]) -> dict:
    """Concrete variables shaped like ``abstract`` (logical boxes kept) from converted arrays."""
    values: dict[tuple[str, ...], np.ndarray] = {}
    for key, path in mapping.items():
        a = np.asarray(sd[key], np.float32)
        values[path] = torch_conv_to_flax(a) if path[-1] == "kernel" else a.reshape(-1)

    def put(path, leaf):
        p = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
        v = jnp.asarray(values[p])
        if isinstance(leaf, nn.LogicallyPartitioned):
            return leaf.replace_boxed(v)
        return v
    return jax.tree_util.tree_map_with_path(
        put, abstract, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))

"""Device mesh, the one logical-axis-rules table, and sharding helpers.

Modules only *name* the axes of their parameters and activations (``embed``, ``mlp``, ``conv_out``...);
this table decides where each name lives on the (data, fsdp, model) mesh. Changing the parallelism of a
run is a config change, never a model change.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). One table for both stages.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    # Transformer weights: FSDP shards the embedding dimension, tensor parallelism the wide ones.
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("length", None),
    # Convolution kernels (H, W, in, out): FSDP on the output channels. Input channels stay unsplit:
    # XLA:CPU (jax 0.10.2) computed wrong InceptionV3 features with kernels split on fsdp and model at once.
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
    # Codebooks: (n_embed, embed_dim); small, replicated.
    ("codes", None),
    ("code_dim", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, model) mesh. ``data=-1`` takes all devices not used by fsdp × model.

    Built with ``Mesh(devices, names)`` (Auto axis types): explicit axis types break linen Conv.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        if n % (fsdp * model):
            raise ValueError(f"mesh: {n} devices are not divisible by fsdp*model = {fsdp}*{model}")
        data = n // (fsdp * model)
    if data * fsdp * model != n:
        raise ValueError(f"mesh: data*fsdp*model = {data}*{fsdp}*{model} = {data * fsdp * model}, "
                         f"but there are {n} devices")
    try:  # topology-aware placement on TPU/GPU; plain reshape where that is not supported (CPU)
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh((data, fsdp, model), devices=devices)
    except Exception:  # noqa: BLE001 - mesh_utils raises different errors per backend
        arr = np.asarray(devices).reshape(data, fsdp, model)
    return Mesh(arr, MESH_AXES)


def mesh_from_config(cfg: Any) -> Mesh:
    """Mesh from a config with ``mesh.data``, ``mesh.fsdp``, ``mesh.model`` (``data=-1``: the rest)."""
    m = cfg.mesh
    return make_mesh(int(m.data), int(m.fsdp), int(m.model))


def logical_to_sharding(tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """Tree of boxed params (or of logical PartitionSpecs) -> tree of NamedShardings."""
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_spec)
    # get_partition_spec on PartitionSpecs would turn P() into None; pass specs through unchanged.
    specs = tree if leaves and all(is_spec(x) for x in leaves) else nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host-local numpy batch tree onto the mesh, split on the leading axis.

    With several processes each host passes its own slice; the global array is assembled from them.
    """
    def put(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree_util.tree_map(put, batch)


def fit_to_shapes(shardings: Any, abstract: Any) -> Any:
    """Drop mesh axes from dimensions they do not divide (e.g. a 139-token vocabulary on model=2).

    Such a dimension is replicated instead of failing at placement time; everything else keeps the
    table's layout.
    """
    def fit(sharding, leaf):
        if not isinstance(sharding, NamedSharding) or not hasattr(leaf, "shape"):
            return sharding
        spec = list(sharding.spec) + [None] * (len(leaf.shape) - len(sharding.spec))
        changed = False
        for i, (axes, dim) in enumerate(zip(spec, leaf.shape)):
            if axes is None:
                continue
            names = axes if isinstance(axes, tuple) else (axes,)
            size = int(np.prod([sharding.mesh.shape[a] for a in names]))
            if dim % size:
                spec[i], changed = None, True
        return NamedSharding(sharding.mesh, P(*spec)) if changed else sharding
    return jax.tree_util.tree_map(fit, shardings, abstract,
                                  is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))

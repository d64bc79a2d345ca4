"""taming-transformers and LlamaGen VQ checkpoints <-> this project's Flax variables.

``from_taming`` / ``to_taming`` are exact inverses: conv kernels OIHW <-> HWIO, GroupNorm ``weight`` <->
``scale``, module paths ``down.0.block.1`` <-> ``down_0_block_1``. ``loss.*`` keys (LPIPS and discriminator)
are ignored by the VQGAN converter. ``from_llamagen_vq`` reads LlamaGen's tokenizer (``VQModel``) the same way,
its module paths ``conv_blocks.2.attn.0`` <-> ``conv_blocks_2_attn_0``, ``mid.1`` <-> ``mid_1``.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common_jax.torch_io import read_torch_state_dict
from vqgan_jax import quantizers
from vqgan_jax.llamagen_tokenizer import LlamaGenVQ, llamagen_quantizer
from vqgan_jax.model import VQGAN

_TARGETS = {"taming.models.vqgan.VQModel": "vq", "taming.models.vqgan.GumbelVQ": "gumbel",
            "taming.models.vqgan.VQSegmentationModel": "vq"}
_DDCONFIG_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution",
                  "in_channels", "out_ch", "dropout", "double_z")
_LOSS_KEYS = ("disc_start", "codebook_weight", "pixelloss_weight", "disc_num_layers", "disc_in_channels",
              "disc_factor", "disc_weight", "perceptual_weight", "use_actnorm", "disc_conditional",
              "disc_ndf", "disc_loss")
# loss.* = LPIPS + discriminator; colorize = the segmentation model's random visualisation projection.
_IGNORED_PREFIXES = ("loss.", "colorize")
_SHOWN = 6      # problems named in a key-mismatch error


def config_from_taming(cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """ConfigDict(model=..., loss=..., temperature_schedule=...) from the ``model:`` section of a taming YAML.

    Accepts the whole YAML dict too (its ``model`` entry is used).
    """
    cfg = dict(cfg)
    if "model" in cfg and "target" not in cfg:
        cfg = dict(cfg["model"])
    target = cfg.get("target")
    if target not in _TARGETS:
        raise ValueError(f"taming config: model.target must be one of {sorted(_TARGETS)}, got {target!r}")
    params = dict(cfg.get("params") or {})
    missing = [k for k in ("ddconfig", "n_embed", "embed_dim") if k not in params]
    if missing:
        raise ValueError(f"taming config: model.params lacks {missing}")
    dd = dict(params["ddconfig"])
    absent = [k for k in _DDCONFIG_KEYS if k not in dd and k not in ("in_channels", "out_ch", "dropout",
                                                                      "double_z")]
    if absent:
        raise ValueError(f"taming config: model.params.ddconfig lacks {absent}")
    unknown = sorted(set(dd) - set(_DDCONFIG_KEYS))
    if unknown:
        raise ValueError(f"taming config: unsupported ddconfig keys {unknown}")
    model = {k: dd[k] for k in _DDCONFIG_KEYS if k in dd}
    model["ch_mult"] = tuple(int(c) for c in model["ch_mult"])
    model["attn_resolutions"] = tuple(int(r) for r in model["attn_resolutions"])
    model["embed_dim"] = int(params["embed_dim"])
    if params.get("remap") is not None:
        raise ValueError("taming config: index remapping (params.remap) is not supported")
    gumbel = target.endswith("GumbelVQ")
    q = {"n_embed": int(params["n_embed"])}
    if gumbel:
        sched = dict((params.get("temperature_scheduler_config") or {}).get("params") or {})
        q.update(kl_weight=float(params.get("kl_weight", 1e-8)), temperature=float(sched.get("lr_start", 1.0)))
    model["quantizer"] = quantizers.default_options(_TARGETS[target], **q)
    out = ml_collections.ConfigDict({"model": model})
    loss = dict((params.get("lossconfig") or {}).get("params") or {})
    out.loss = {k: loss[k] for k in _LOSS_KEYS if k in loss}
    if gumbel and params.get("temperature_scheduler_config"):
        out.temperature_schedule = dict(params["temperature_scheduler_config"].get("params", {}))
    if target.endswith("VQSegmentationModel"):
        out.n_labels = int(params.get("n_labels", model.get("in_channels", 0)))
    if "base_learning_rate" in cfg:
        out.base_learning_rate = float(cfg["base_learning_rate"])
    return out


def _model_config(config: Any) -> Any:
    return config["model"] if "model" in config else config


_MODULE_RE = [
    (re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$"), r"\1.\2.\3.\4"),
    (re.compile(r"^(down|up)_(\d+)_(downsample|upsample)$"), r"\1.\2.\3"),
    (re.compile(r"^mid_(block_1|block_2|attn_1)$"), r"mid.\1"),
]


def _taming_key(path: tuple[str, ...], module_re: Any = _MODULE_RE) -> str:
    parts = []
    for p in path[:-1]:
        for rx, rep in module_re:
            if rx.match(p):
                p = rx.sub(rep, p)
                break
        parts.append(p)
    leaf = path[-1]
    if path[:1] == ("quantize",) and leaf in ("embedding", "embed"):
        return f"quantize.{leaf}.weight"
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return ".".join(parts + [leaf])


def _param_table(model: Any, module_re: Any = _MODULE_RE) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """PyTorch key -> (flax path, expected PyTorch-layout shape)."""
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, model.resolution, model.resolution, model.in_channels)))))
    table = {}
    for path, s in flax.traverse_util.flatten_dict(shapes["params"]).items():
        shape = tuple(s.shape)
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2 and path[-1] == "kernel":
            shape = (shape[1], shape[0])
        table[_taming_key(path, module_re)] = (path, shape)
    return table


def _check_keys(state_dict: Mapping[str, Any], table: Mapping[str, tuple], what: str,
                ignored: tuple[str, ...] = _IGNORED_PREFIXES) -> None:
    problems = []
    for k, (_, shape) in table.items():
        if k not in state_dict:
            problems.append(f"  missing key {k!r}: expected shape {shape}")
        elif tuple(np.shape(state_dict[k])) != shape:
            problems.append(f"  key {k!r}: expected shape {shape}, found {tuple(np.shape(state_dict[k]))}")
    for k in state_dict:
        if k not in table and not k.startswith(ignored):
            problems.append(f"  unexpected key {k!r} (shape {tuple(np.shape(state_dict[k]))})")
    if problems:
        # One line (entry points print one error line); a wholly different file would list hundreds.
        shown = "; ".join(p.strip() for p in problems[:_SHOWN])
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise ValueError(f"{what}: state dict does not match the config ({len(problems)} problems): {shown}{more}")


def from_taming(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[VQGAN, dict]:
    """taming VQModel/GumbelVQ state dict (+ config from :func:`config_from_taming`) -> (model, variables)."""
    model = VQGAN.from_config(_model_config(config))
    table = _param_table(model)
    _check_keys(state_dict, table, "from_taming")
    return model, _variables(model, state_dict, table)


def _variables(model: Any, state_dict: Mapping[str, np.ndarray], table: Mapping[str, tuple]) -> dict:
    """Flax variables from a checked PyTorch state dict (kernels to HWIO / (in, out))."""
    flat = {}
    for key, (path, _) in table.items():
        w = np.asarray(state_dict[key], dtype=np.float32)
        if w.ndim == 4:
            w = w.transpose(2, 3, 1, 0)      # OIHW -> HWIO
        elif w.ndim == 2 and path[-1] == "kernel":
            w = w.T
        flat[path] = jnp.asarray(w)
    variables = {"params": flax.traverse_util.unflatten_dict(flat)}
    q_state = model.quantizer_def().initial_state(variables["params"]["quantize"])
    if q_state:
        variables["codebook_ema"] = {"quantize": q_state}
    return variables


def to_taming(variables: Mapping[str, Any], config: Any) -> dict[str, np.ndarray]:
    """Inverse of :func:`from_taming`: Flax variables -> taming state dict (numpy, PyTorch layout)."""
    model = VQGAN.from_config(_model_config(config))
    table = _param_table(model)
    flat = flax.traverse_util.flatten_dict(nn.unbox(dict(variables["params"])))
    by_path = {path: key for key, (path, _) in table.items()}
    unknown = sorted("/".join(p) for p in flat if p not in by_path)
    if unknown:
        raise ValueError(f"to_taming: parameters not in the config's model: {unknown}")
    out = {}
    for path, w in flat.items():
        w = np.asarray(w)
        if w.ndim == 4:
            w = w.transpose(3, 2, 0, 1)
        elif w.ndim == 2 and path[-1] == "kernel":
            w = w.T
        out[by_path[path]] = w
    missing = sorted(set(table) - set(out))
    if missing:
        raise ValueError(f"to_taming: variables lack {missing}")
    return out


def read_yaml(yaml_path: str) -> dict:
    """A taming YAML config as a dict; one error naming the file when it is missing or not such a file."""
    import yaml
    if not os.path.isfile(yaml_path):
        raise FileNotFoundError(f"config file not found: {yaml_path}")
    with open(yaml_path) as f:
        try:
            cfg = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{yaml_path}: not a readable YAML file: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{yaml_path}: expected a taming config (a mapping with 'model'), got {type(cfg).__name__}")
    return cfg


def load_taming_checkpoint(ckpt_path: str, yaml_path: str) -> tuple[VQGAN, dict]:
    """Official taming VQGAN (``last.ckpt`` + ``*-project.yaml``) -> (model, variables)."""
    yaml_cfg = read_yaml(yaml_path)
    try:
        config = config_from_taming(yaml_cfg)
    except ValueError as e:
        raise ValueError(f"{yaml_path}: {e}") from None
    sd = read_torch_state_dict(ckpt_path)
    try:
        return from_taming(sd, config)
    except ValueError as e:
        raise ValueError(f"{ckpt_path} with {yaml_path}: {e}") from e


# ------------------------------------------------------------------------------------------------ LlamaGen
# LlamaGen's VQ ModelArgs (tokenizer/tokenizer_image/vq_model.py) with its defaults, plus the encoder/decoder
# width ``ch`` its VQModel leaves at 128 and the training crop ``resolution``.
LLAMAGEN_VQ_ARGS: dict[str, Any] = dict(
    codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
    commit_loss_beta=0.25, entropy_loss_ratio=0.0, encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4),
    z_channels=256, dropout_p=0.0, ch=128, resolution=256)
# LlamaGen's VQ_models by name, as ModelArgs overrides: vq_ds16_c2i.pt is VQ-16, vq_ds8_c2i.pt VQ-8.
LLAMAGEN_VQ_MODELS: dict[str, dict[str, Any]] = {
    "VQ-16": dict(encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": dict(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
}
_LLAMAGEN_MODULE_RE = [
    (re.compile(r"^conv_blocks_(\d+)_(res|attn)_(\d+)$"), r"conv_blocks.\1.\2.\3"),
    (re.compile(r"^conv_blocks_(\d+)_(downsample|upsample)$"), r"conv_blocks.\1.\2"),
    (re.compile(r"^mid_(\d+)$"), r"mid.\1"),
]
# A buffer of the last 65536 code indices seen in training, for LlamaGen's codebook-usage log only: it
# plays no part in encoding or decoding, and this project measures usage itself (codebook_usage metrics).
_LLAMAGEN_SKIPPED = ("quantize.codebook_used",)


def _llamagen_args(model_args: Any) -> dict[str, Any]:
    """``model_args`` (a dict, or LlamaGen's ModelArgs or any object with those attributes) over the defaults."""
    given = dict(model_args) if isinstance(model_args, Mapping) else dict(vars(model_args))
    unknown = sorted(set(given) - set(LLAMAGEN_VQ_ARGS))
    if unknown:
        raise ValueError(f"LlamaGen VQ model_args: unknown field {unknown[0]!r} (known: {sorted(LLAMAGEN_VQ_ARGS)})")
    return {**LLAMAGEN_VQ_ARGS, **given}


def llamagen_vq_config(model_args: Any) -> dict[str, Any]:
    """This project's ``config.model`` (``arch="llamagen"``) for LlamaGen VQ ``ModelArgs`` fields (+ ``ch``,
    ``resolution``): the l2-normalised codebook is the ``vq`` quantizer with ``l2_normalize`` and beta on the
    commitment term (``legacy=False``), its entropy loss with LlamaGen's temperature and epsilon."""
    a = _llamagen_args(model_args)
    quantizer = llamagen_quantizer(int(a["codebook_size"]), float(a["commit_loss_beta"]), bool(a["codebook_l2_norm"]),
                                   float(a["entropy_loss_ratio"]))
    return dict(arch="llamagen", ch=int(a["ch"]), ch_mult=tuple(int(c) for c in a["encoder_ch_mult"]),
                decoder_ch_mult=tuple(int(c) for c in a["decoder_ch_mult"]), num_res_blocks=2,
                z_channels=int(a["z_channels"]), resolution=int(a["resolution"]), in_channels=3, out_ch=3,
                dropout=float(a["dropout_p"]), embed_dim=int(a["codebook_embed_dim"]), quantizer=quantizer,
                dtype="", remat=False)


def from_llamagen_vq(state_dict: Mapping[str, np.ndarray], model_args: Any) -> tuple[LlamaGenVQ, dict]:
    """LlamaGen ``VQModel`` state dict (PyTorch layout, numpy) + its ``ModelArgs`` fields -> (model, variables).

    Missing, unexpected or wrongly shaped keys are refused in one line; ``quantize.codebook_used`` is skipped."""
    model = LlamaGenVQ.from_config(llamagen_vq_config(model_args))
    table = _param_table(model, _LLAMAGEN_MODULE_RE)
    _check_keys(state_dict, table, "from_llamagen_vq", ignored=_LLAMAGEN_SKIPPED)
    return model, _variables(model, state_dict, table)

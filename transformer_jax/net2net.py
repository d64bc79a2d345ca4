"""Whole taming ``Net2NetTransformer`` checkpoints: transformer + first stage + cond stage in one file."""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import ml_collections
import numpy as np

from transformer_jax import conditions
from transformer_jax.convert import from_mingpt
from vqgan_jax import convert as vq_convert

_N2N = "taming.models.cond_transformer.Net2NetTransformer"
_GPT = "taming.modules.transformer.mingpt.GPT"


class TamingTransformer(NamedTuple):
    gpt: Any
    gpt_variables: Any
    first_stage: Any
    first_stage_variables: Any
    cond_stage: Any                   # a VQGAN for spatial conditioning, else None
    cond_stage_variables: Any
    cond: ml_collections.ConfigDict   # conditioning as this project describes it (transformer_jax.conditions)
    code_grid: tuple[int, int]        # image codes per side at the first stage's training resolution

    def sampler(self) -> Any:
        from transformer_jax.sampler import Sampler
        # A spatial cond stage (taming's segmentation model) takes one-hot label maps: one channel per label.
        cond_stage = None if self.cond_stage is None else (
            self.cond_stage, self.cond_stage_variables, int(self.cond_stage.in_channels))
        return Sampler(self.gpt, self.gpt_variables, self.first_stage, self.first_stage_variables, self.cond,
                       self.code_grid, cond_stage)


def _cond_config(params: Mapping[str, Any], vocab_size: int) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(kind="unconditional", sos_token=int(params.get("sos_token", 0)),
                                         n_classes=0, class_offset=0, pkeep=float(params.get("pkeep", 1.0)),
                                         cfg_dropout=0.0, null_token=0))
    csc = params.get("cond_stage_config")
    if csc in ("__is_unconditional__", None) or params.get("unconditional"):
        return cfg
    target = csc.get("target", "")
    cparams = csc.get("params") or {}
    if target.endswith("SOSProvider"):
        cfg.sos_token = int(cparams.get("sos_token", cfg.sos_token))
    elif target.endswith("Labelator"):
        cfg.kind, cfg.n_classes = "class", int(cparams.get("n_classes", vocab_size))
    elif target.startswith("taming.models.vqgan."):
        cfg.kind = "spatial"
    else:
        raise ValueError(f"Net2NetTransformer: unsupported cond_stage_config target {target!r}")
    return cfg


def _split(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _stage(state_dict: Mapping[str, Any], params: Mapping[str, Any], role: str) -> tuple[Any, Any, Any]:
    """(model, variables, config) of the first or cond stage; errors name the state-dict prefix and config key."""
    if not isinstance(params.get(f"{role}_config"), Mapping):
        raise ValueError(f"model.params.{role}_config is missing or not a model config")
    try:
        cfg = vq_convert.config_from_taming(params[f"{role}_config"])
    except ValueError as e:
        raise ValueError(f"model.params.{role}_config: {e}") from None
    try:
        model, variables = vq_convert.from_taming(_split(state_dict, f"{role}_model."), cfg)
    except ValueError as e:
        raise ValueError(f"{role}_model.* keys: {e}") from None
    return model, variables, cfg


def from_taming_transformer(state_dict: Mapping[str, Any], yaml_cfg: Mapping[str, Any]) -> TamingTransformer:
    """A Net2NetTransformer state dict (``transformer.*``, ``first_stage_model.*``, ``cond_stage_model.*``)
    and its YAML (whole file or ``model`` section) -> this project's objects."""
    cfg = dict(yaml_cfg.get("model", yaml_cfg))
    if cfg.get("target") != _N2N:
        raise ValueError(f"model.target must be {_N2N!r}, got {cfg.get('target')!r}")
    params = dict(cfg.get("params") or {})
    perm = (params.get("permuter_config") or {}).get("target", "taming.modules.transformer.permuter.Identity")
    if not perm.endswith("Identity"):
        raise ValueError(f"only the identity permuter is supported, got {perm!r}")
    if int(params.get("downsample_cond_size", -1)) > -1:
        raise ValueError(f"downsample_cond_size={params['downsample_cond_size']} (resizing the condition before "
                         "the cond stage) is not supported")
    tc = params.get("transformer_config") or {}
    if tc.get("target") != _GPT:
        raise ValueError(f"transformer_config.target must be {_GPT!r}, got {tc.get('target')!r}")
    tp = tc.get("params") or {}
    missing = [k for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd") if k not in tp]
    if missing:
        raise ValueError(f"transformer_config.params lacks {missing}")
    extra = {k: float(tp[k]) for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop") if k in tp}
    gpt, gpt_vars = from_mingpt(state_dict, int(tp["vocab_size"]), int(tp["block_size"]), int(tp["n_layer"]),
                                int(tp["n_head"]), int(tp["n_embd"]), prefix="transformer.",
                                n_unmasked=int(tp.get("n_unmasked", 0)), **extra)
    fs, fs_vars, fs_cfg = _stage(state_dict, params, "first_stage")
    cond = _cond_config(params, gpt.vocab_size)
    cs = cs_vars = None
    if conditions.from_config(cond).uses_cond_stage:
        cs, cs_vars, _ = _stage(state_dict, params, "cond_stage")
    side = int(fs_cfg.model.resolution) // 2 ** (len(fs_cfg.model.ch_mult) - 1)
    return TamingTransformer(gpt, gpt_vars, fs, fs_vars, cs, cs_vars, cond, (side, side))


def load_taming_transformer(ckpt_path: str, yaml_path: str) -> TamingTransformer:
    """Official Net2NetTransformer ``.ckpt`` + ``*-project.yaml`` -> :class:`TamingTransformer`."""
    yaml_cfg = vq_convert.read_yaml(yaml_path)
    sd = vq_convert.read_torch_state_dict(ckpt_path)
    try:
        return from_taming_transformer(sd, yaml_cfg)
    except ValueError as e:
        raise ValueError(f"{ckpt_path} with {yaml_path}: {e}") from e

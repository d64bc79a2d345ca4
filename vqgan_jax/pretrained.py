"""A frozen stage-one model for encoding/decoding: from this project's workdir or an official checkpoint."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections

from common_jax.pretrained import check_finite, check_stage, load_workdir
from vqgan_jax import architectures, convert


def load_vqgan(workdir: str = "", taming_ckpt: str = "", taming_yaml: str = "", use_ema: bool = True,
               role: str = "first_stage") -> tuple[Any, dict, ml_collections.ConfigDict]:
    """(model, variables, model config) from a stage-one workdir, or from a taming ``.ckpt`` + ``.yaml``.

    With ``use_ema`` the generator EMA weights are used when the run kept them. ``role`` names the config
    section (``first_stage`` / ``cond_stage``) in the error when neither source is given. Weights holding NaN or
    Inf are refused (:func:`common_jax.pretrained.check_finite`), from a workdir or a converted file.
    """
    if workdir:
        config, state, _ = load_workdir(workdir)
        check_stage(config, workdir, "stage-one (VQGAN)", f"as {role}.workdir")
        params = state.get("ema_params") if use_ema and state.get("ema_params") else state["params"]
        variables = {"params": jax.tree.map(jax.numpy.asarray, params)}
        return architectures.from_config(config.model), variables, config.model
    if taming_ckpt and taming_yaml:
        model, variables = convert.load_taming_checkpoint(taming_ckpt, taming_yaml)
        check_finite(variables, taming_ckpt, "the file is damaged, or holds the state of a diverged run")
        cfg = convert.config_from_taming(convert.read_yaml(taming_yaml))
        return model, variables, cfg.model
    what = "stage-one" if role == "first_stage" else role.replace("_", "-")
    raise ValueError(f"a {what} model is needed: set {role}.workdir (a stage-one workdir of "
                     f"this project) or {role}.taming_ckpt and {role}.taming_yaml (an official checkpoint)")

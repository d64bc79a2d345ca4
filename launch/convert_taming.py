"""Convert an official taming-transformers checkpoint (``last.ckpt`` + ``model.yaml``) into workdirs of this project.

    python -m launch.convert_taming --ckpt=last.ckpt --yaml=model.yaml --workdir=runs/vqgan_f16_1024
    python -m launch.convert_taming --ckpt=cin/last.ckpt --yaml=cin/model.yaml --workdir=runs/cin

The file is read without PyTorch (common_jax.torch_io), in either serialisation (zip, or the pre-1.6 pickle).
- VQModel, GumbelVQ, VQSegmentationModel: ``--workdir`` becomes a stage-one workdir.
- Net2NetTransformer: ``--workdir`` becomes a stage-two workdir and its first stage ``<workdir>_first_stage``
  (plus ``<workdir>_cond_stage`` for a spatially conditioned model, taming's segmentation cond stage); the
  stage-two config names them (``first_stage.workdir``, ``cond_stage.workdir``, absolute paths) and records
  their ``stage_one_fingerprint``, as a trained run does.

Each workdir holds ``config.json`` and checkpoint 0 of the converted weights (``step`` and ``params``; no
optimizer state): sample, score and encode with it as with a trained run, use a converted stage one as
``--config.first_stage.workdir`` of stage two, and fine-tune either stage in a new workdir with
``--config.init_from=<workdir>``. ``loss.*`` keys (LPIPS, discriminator) and the segmentation model's
``colorize`` buffer are not converted. Workdirs that already hold checkpoints are refused, before anything is
written.
"""
from __future__ import annotations

import logging as pylogging
import os
from typing import Any

import ml_collections
from absl import app, flags, logging

from common_jax.cli_errors import install_excepthook, run_main
from launch.converted_workdirs import not_orbax_info, refuse_existing, write_workdir

VQ_TARGETS = ("taming.models.vqgan.VQModel", "taming.models.vqgan.GumbelVQ",
              "taming.models.vqgan.VQSegmentationModel")
N2N_TARGET = "taming.models.cond_transformer.Net2NetTransformer"


def stage_one_config(taming_cfg: ml_collections.ConfigDict, target: str) -> ml_collections.ConfigDict:
    """A stage-one config of this project (configs/vqgan_base) holding a taming model's settings."""
    from configs.vqgan_base import base_config, vqgan_model
    c = base_config(vqgan_model(**dict(taming_cfg.model)))
    for k, v in dict(taming_cfg.get("loss", {})).items():
        if k in c.loss:         # taming's loss keys without a counterpart here (disc_conditional) are dropped
            c.loss[k] = v
    if target.endswith("VQSegmentationModel"):
        c.task = "segmentation"
        c.loss.perceptual_weight = 0.0
    if "temperature_schedule" in taming_cfg:
        c.temperature_schedule = ml_collections.ConfigDict(dict(taming_cfg.temperature_schedule))
    if "base_learning_rate" in taming_cfg:
        c.optim.base_learning_rate = float(taming_cfg.base_learning_rate)
    c.data.image_size = int(c.model.resolution)
    return c


def stage_two_config(tt: Any, first_stage_workdir: str, cond_stage_workdir: str,
                     image_size: int) -> ml_collections.ConfigDict:
    """A stage-two config of this project (configs/transformer_base) for a converted Net2NetTransformer."""
    from configs.transformer_base import base_config
    g = tt.gpt
    c = base_config(vocab_size=g.vocab_size, block_size=g.block_size, n_layer=g.n_layer, n_head=g.n_head,
                    n_embd=g.n_embd, embd_pdrop=g.embd_pdrop, resid_pdrop=g.resid_pdrop, attn_pdrop=g.attn_pdrop,
                    n_unmasked=g.n_unmasked)
    c.cond.update(dict(tt.cond))
    c.first_stage.workdir = first_stage_workdir
    c.cond_stage.workdir = cond_stage_workdir
    c.data.image_size = int(image_size)
    c.data.code_grid = tuple(int(s) for s in tt.code_grid)
    c.sampling.guidance_scale = 0.0         # taming's models were trained without condition dropout
    return c


def _target(yaml_cfg: dict, yaml_path: str) -> str:
    model = yaml_cfg.get("model", yaml_cfg) if isinstance(yaml_cfg, dict) else None
    target = model.get("target") if isinstance(model, dict) else None
    if target not in VQ_TARGETS + (N2N_TARGET,):
        raise ValueError(f"{yaml_path}: model.target {target!r} is not supported; supported: "
                         f"{', '.join(VQ_TARGETS + (N2N_TARGET,))}")
    return target


def convert(ckpt_path: str, yaml_path: str, workdir: str) -> list[str]:
    """Convert ``ckpt_path`` (+ ``yaml_path``) into workdir(s) of this project; returns the workdirs written.

    Everything is read and converted before the first write, so a bad file leaves no half-written workdir.
    """
    from vqgan_jax import convert as vq_convert
    for path, what in ((ckpt_path, "checkpoint"), (yaml_path, "config")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} file not found: {path}")
    workdir = os.path.abspath(workdir)
    source = {"ckpt": os.path.abspath(ckpt_path), "yaml": os.path.abspath(yaml_path)}
    yaml_cfg = vq_convert.read_yaml(yaml_path)
    target = _target(yaml_cfg, yaml_path)
    source["target"] = target
    if target in VQ_TARGETS:
        refuse_existing(workdir)
        _, variables = vq_convert.load_taming_checkpoint(ckpt_path, yaml_path)
        config = stage_one_config(vq_convert.config_from_taming(yaml_cfg), target)
        config.converted_from = source
        write_workdir(workdir, config, variables)
        return [workdir]

    from transformer_jax.code_encoder import stage_one_fingerprint
    from transformer_jax.net2net import load_taming_transformer
    from vqgan_jax.pretrained import load_vqgan
    tt = load_taming_transformer(ckpt_path, yaml_path)
    params = dict(yaml_cfg.get("model", yaml_cfg)["params"])
    first = workdir + "_first_stage"
    cond = workdir + "_cond_stage" if tt.cond_stage is not None else ""
    stages = [(first, params["first_stage_config"], tt.first_stage_variables)]
    if cond:
        stages.append((cond, params["cond_stage_config"], tt.cond_stage_variables))
    for w in [workdir] + [s[0] for s in stages]:
        refuse_existing(w)
    for w, cfg, variables in stages:
        config = stage_one_config(vq_convert.config_from_taming(cfg), cfg["target"])
        config.converted_from = dict(source, part="cond_stage_model" if w == cond else "first_stage_model")
        write_workdir(w, config, variables)
    # The fingerprint stage two records and the Sampler checks, of the weights as they load back.
    stage_one_id = stage_one_fingerprint(*(load_vqgan(w, role=r)[1] for w, r in
                                           [(first, "first_stage")] + ([(cond, "cond_stage")] if cond else [])))
    config = stage_two_config(tt, first, cond, int(tt.first_stage.resolution))
    config.stage_one_fingerprint = stage_one_id
    config.converted_from = source
    write_workdir(workdir, config, tt.gpt_variables)
    return [workdir] + [s[0] for s in stages]


def main(argv):
    del argv
    pylogging.getLogger("absl").addFilter(not_orbax_info)
    written = convert(flags.FLAGS.ckpt, flags.FLAGS.yaml, flags.FLAGS.workdir)
    logging.info("wrote %s", ", ".join(written))


if __name__ == "__main__":
    # Flags are defined only when run as a script: tests import convert() beside launch.sample's flags.
    flags.DEFINE_string("ckpt", None, "taming checkpoint (Lightning .ckpt or a .pth state dict)")
    flags.DEFINE_string("yaml", None, "its config (taming's model.yaml / *-project.yaml)")
    flags.DEFINE_string("workdir", None, "workdir to write (Net2NetTransformer: also <workdir>_first_stage, "
                                         "<workdir>_cond_stage)")
    flags.mark_flags_as_required(["ckpt", "yaml", "workdir"])
    install_excepthook()
    app.run(run_main(main))

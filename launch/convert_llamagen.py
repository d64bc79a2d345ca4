"""Convert LlamaGen's released class-conditional models (GPT + VQ tokenizer) into workdirs of this project.

    python -m launch.convert_llamagen --gpt_ckpt=c2i_L_256.pt --gpt_model=GPT-L --vq_ckpt=vq_ds16_c2i.pt \\
        --image_size=256 --workdir=runs/llamagen_L
    python -m launch.sample --workdir=runs/llamagen_L --out=samples --classes=207,360 --guidance_scale=4 --top_k=2000

The files are read without PyTorch (common_jax.torch_io). Their weights may sit under ``model`` (the releases,
LlamaGen's DDP training), ``module`` (DeepSpeed), ``state_dict`` or ``ema`` (the EMA weights of a training
checkpoint), or be the bare state dict of an FSDP-consolidated ``consolidated.pth``; the first of those keys
present is used, unless ``--gpt_key`` / ``--vq_key`` name one.

``--workdir`` becomes a stage-two workdir (``gpt.block="llama"``, configs/transformer_llamagen_imagenet.py's
training settings) and ``<workdir>_first_stage`` a stage-one workdir of the tokenizer (``model.arch="llamagen"``),
written as launch.convert_taming writes its workdirs: config.json and checkpoint 0 of the weights, the stage-two
config naming the first stage and its fingerprint. Sample, score (launch.eval_fid) and fine-tune
(``--config.init_from``) them as trained runs. Guidance is LlamaGen's (the null class ``num_classes`` as the
unconditional branch): pass ``--guidance_scale`` to launch.sample / launch.eval_fid.

Model sizes: ``--gpt_model`` GPT-B/L/XL/XXL/3B (LlamaGen's class-conditional releases), or ``tiny``
(configs/transformer_llamagen_tiny.py); ``--vq_model`` VQ-16 or VQ-8. Other ``ModelArgs`` fields (LlamaGen's
names) through ``--gpt_arg=name=value`` / ``--vq_arg=name=value`` (repeatable), e.g. the test fixtures' sizes.
A file that does not hold the named model is refused with one line naming the file and the key, before anything
is written; workdirs that already hold checkpoints are refused too.
"""
from __future__ import annotations

import ast
import logging as pylogging
import os
import re
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging

from common_jax.cli_errors import install_excepthook, run_main
from launch.converted_workdirs import not_orbax_info, refuse_existing, write_workdir

# Where LlamaGen's scripts put the weights, in the order its sample_c2i.py looks (then the EMA weights).
WEIGHT_KEYS = ("model", "module", "state_dict", "ema")
# The architecture fields ``--gpt_model=tiny`` takes from configs/transformer_llamagen_tiny.py.
_SIZE_FIELDS = ("n_layer", "n_head", "dim", "multiple_of")


def read_weights(path: str, key: str = "") -> dict[str, np.ndarray]:
    """The state dict (name -> array, floats as float32) of a LlamaGen file: under ``key`` when given, else the
    first of :data:`WEIGHT_KEYS` holding one, else the file's top level when it is a bare state dict
    (FSDP-consolidated); one ValueError naming the file otherwise."""
    from common_jax.torch_io import read_torch_state_dict
    return read_torch_state_dict(path, key or None, keys=WEIGHT_KEYS, bare_tensors_only=True)


def parse_args(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    """``name=value`` strings (value a Python literal, else a string) -> dict."""
    out = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--{flag} takes name=value (a LlamaGen ModelArgs field), got {pair!r}")
        try:
            out[name.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name.strip()] = value
    return out


def gpt_sizes() -> dict[str, dict[str, Any]]:
    """``--gpt_model`` names -> ModelArgs size fields: LlamaGen's, and ``tiny``."""
    from configs.transformer_llamagen_tiny import TINY_ARGS
    from transformer_jax.convert import LLAMAGEN_GPT_SIZES
    return {**LLAMAGEN_GPT_SIZES, "tiny": {k: TINY_ARGS[k] for k in _SIZE_FIELDS}}


def vq_model_args(vq_model: str, codebook_size: int, codebook_embed_dim: int, image_size: int,
                  extra: Mapping[str, Any] = ()) -> dict[str, Any]:
    from vqgan_jax.convert import LLAMAGEN_VQ_MODELS
    if vq_model not in LLAMAGEN_VQ_MODELS:
        raise ValueError(f"--vq_model={vq_model!r} is not one of {', '.join(LLAMAGEN_VQ_MODELS)}")
    return {**LLAMAGEN_VQ_MODELS[vq_model], "codebook_size": codebook_size, "codebook_embed_dim": codebook_embed_dim,
            "resolution": image_size, **dict(extra)}


def gpt_model_args(gpt_model: str, vocab_size: int, num_classes: int, cls_token_num: int,
                   extra: Mapping[str, Any] = ()) -> dict[str, Any]:
    sizes = gpt_sizes()
    if gpt_model not in sizes:
        raise ValueError(f"--gpt_model={gpt_model!r} is not one of {', '.join(sizes)}")
    return {**sizes[gpt_model], "vocab_size": vocab_size, "num_classes": num_classes, "cls_token_num": cls_token_num,
            **dict(extra)}


def _held_model(sd: Mapping[str, np.ndarray]) -> str:
    """What a GPT state dict holds, for the error of a file that does not fit the size asked for."""
    emb = sd.get("tok_embeddings.weight")
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"layers\.(\d+)\.", k)] if m}
    if emb is None or emb.ndim != 2:
        return "no tok_embeddings.weight (not a LlamaGen GPT?)"
    return f"n_layer={len(layers)}, dim={emb.shape[1]}, vocab_size={emb.shape[0]}"


def convert(gpt_ckpt: str, vq_ckpt: str, workdir: str, image_size: int, gpt_model: str = "GPT-B",
            vq_model: str = "VQ-16", codebook_size: int = 16384, codebook_embed_dim: int = 8,
            num_classes: int = 1000, cls_token_num: int = 1, gpt_args: Mapping[str, Any] = (),
            vq_args: Mapping[str, Any] = (), gpt_key: str = "", vq_key: str = "") -> list[str]:
    """Convert a LlamaGen GPT file and its tokenizer file into ``workdir`` and ``workdir + "_first_stage"``;
    returns the workdirs written. Everything is read and converted before the first write."""
    from configs.transformer_llamagen_imagenet import llamagen_config
    from configs.vqgan_llamagen_ds16 import get_config as vq_base_config
    from transformer_jax.code_encoder import stage_one_fingerprint
    from transformer_jax.convert import from_llamagen
    from vqgan_jax.convert import from_llamagen_vq, llamagen_vq_config
    from vqgan_jax.pretrained import load_vqgan

    workdir = os.path.abspath(workdir)
    first = workdir + "_first_stage"
    vq_margs = vq_model_args(vq_model, codebook_size, codebook_embed_dim, image_size, vq_args)
    f = 2 ** (len(vq_margs["encoder_ch_mult"]) - 1)
    if image_size <= 0 or image_size % f:
        raise ValueError(f"--image_size={image_size} must be a positive multiple of the tokenizer's downsampling "
                         f"factor {f} ({vq_model})")
    grid = image_size // f
    gpt_margs = gpt_model_args(gpt_model, codebook_size, num_classes, cls_token_num, gpt_args)
    gpt_margs.setdefault("block_size", grid * grid)
    for w in (workdir, first):
        refuse_existing(w)

    vq_sd = read_weights(vq_ckpt, vq_key)
    try:
        _, vq_variables = from_llamagen_vq(vq_sd, vq_margs)
    except ValueError as e:
        raise ValueError(f"{vq_ckpt} does not hold the tokenizer --vq_model={vq_model} describes: {e}") from None
    gpt_sd = read_weights(gpt_ckpt, gpt_key)
    try:
        gpt, gpt_variables = from_llamagen(gpt_sd, gpt_margs)
    except ValueError as e:
        raise ValueError(f"{gpt_ckpt} does not hold --gpt_model={gpt_model} (the file holds {_held_model(gpt_sd)}): "
                         f"{e}") from None
    if int(gpt_margs["block_size"]) != grid * grid:
        raise ValueError(f"block_size={gpt_margs['block_size']} (--gpt_arg) but --image_size={image_size} with "
                         f"{vq_model} gives {grid}x{grid} codes")
    n_codes = int(vq_margs["codebook_size"])
    if gpt.vocab_size < n_codes:
        raise ValueError(f"{gpt_ckpt}: the GPT's vocabulary ({gpt.vocab_size}) is smaller than the tokenizer's "
                         f"codebook ({n_codes} codes in {vq_ckpt})")

    source = {"gpt_ckpt": os.path.abspath(gpt_ckpt), "vq_ckpt": os.path.abspath(vq_ckpt), "gpt_model": gpt_model,
              "vq_model": vq_model}
    vq_config = vq_base_config()
    vq_config.model = ml_collections.ConfigDict(llamagen_vq_config(vq_margs))
    vq_config.data.image_size = int(image_size)
    vq_config.converted_from = dict(source, part="vq_model")
    write_workdir(first, vq_config, vq_variables)
    stage_one_id = stage_one_fingerprint(load_vqgan(first)[1])   # of the weights as they load back

    config = llamagen_config(gpt_margs, grid)
    config.first_stage.workdir = first
    config.data.image_size = int(image_size)
    config.stage_one_fingerprint = stage_one_id
    config.converted_from = dict(source, part="gpt_model")
    write_workdir(workdir, config, gpt_variables)
    return [workdir, first]


def main(argv):
    del argv
    pylogging.getLogger("absl").addFilter(not_orbax_info)
    F = flags.FLAGS
    written = convert(F.gpt_ckpt, F.vq_ckpt, F.workdir, F.image_size, F.gpt_model, F.vq_model, F.codebook_size,
                      F.codebook_embed_dim, F.num_classes, F.cls_token_num, parse_args(F.gpt_arg, "gpt_arg"),
                      parse_args(F.vq_arg, "vq_arg"), F.gpt_key, F.vq_key)
    logging.info("wrote %s", ", ".join(written))


if __name__ == "__main__":
    # Flags are defined only when run as a script: tests import convert() beside launch.sample's flags.
    flags.DEFINE_string("gpt_ckpt", None, "LlamaGen GPT weights (c2i_*.pt, or an FSDP consolidated.pth)")
    flags.DEFINE_string("gpt_model", "GPT-B", "GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B or tiny")
    flags.DEFINE_multi_string("gpt_arg", [], "name=value: another LlamaGen GPT ModelArgs field (repeatable)")
    flags.DEFINE_string("gpt_key", "", "the file's entry holding the weights (default: model, module, state_dict, "
                                       "ema, or a bare state dict)")
    flags.DEFINE_string("vq_ckpt", None, "LlamaGen tokenizer weights (vq_ds16_c2i.pt, vq_ds8_c2i.pt)")
    flags.DEFINE_string("vq_model", "VQ-16", "VQ-16 or VQ-8")
    flags.DEFINE_multi_string("vq_arg", [], "name=value: another LlamaGen VQ ModelArgs field, or ch (repeatable)")
    flags.DEFINE_string("vq_key", "", "the tokenizer file's entry holding the weights (default as --gpt_key)")
    flags.DEFINE_integer("codebook_size", 16384, "tokenizer codes = the GPT's vocab_size (LlamaGen's rule)")
    flags.DEFINE_integer("codebook_embed_dim", 8, "tokenizer code dimension")
    flags.DEFINE_integer("image_size", 256, "image size the GPT was trained at (256 or 384 for the releases)")
    flags.DEFINE_integer("num_classes", 1000, "classes (the null class of guidance is this id)")
    flags.DEFINE_integer("cls_token_num", 1, "class token positions (1 for LlamaGen's c2i models)")
    flags.DEFINE_string("workdir", None, "stage-two workdir to write (the tokenizer goes to <workdir>_first_stage)")
    flags.mark_flags_as_required(["gpt_ckpt", "vq_ckpt", "workdir"])
    install_excepthook()
    app.run(run_main(main))

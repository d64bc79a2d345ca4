"""Sample images from a trained stage-two model.

    python -m launch.sample --workdir=runs/gpt --out=runs/gpt/samples --per_class=8
    python -m launch.sample --workdir=runs/gpt --out=pano --width=1280 --height=464   # sliding window
    python -m launch.sample --workdir=runs/sflckr --out=scene --segmentation=map.png   # spatial conditioning

Writes one PNG grid per class (or one grid for unconditional models), or, with --width/--height, images of that
size made by sliding-window sampling (one per --classes entry, class 0 by default; no --guidance_scale there).
Models trained with condition dropout (e.g. LlamaGen's, launch.convert_llamagen) sample with classifier-free
guidance: --guidance_scale=4, optionally LlamaGen's --cfg_interval.
A spatially conditioned model takes a label map (--segmentation: a single-channel PNG of class ids): at the
training size it writes a grid of --per_class samples for that map, larger maps give one sliding-window image of
the map's size; the map itself is written beside them in palette colours.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags, logging

from common_jax.metrics import image_grid, save_png
from common_jax.cli_errors import install_excepthook, run_main
from common_jax.workdir_checks import check_workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "stage-two workdir (its config names the stage-one model)")
_FIRST_STAGE = flags.DEFINE_string("first_stage_workdir", "", "override the stage-one workdir")
_COND_STAGE = flags.DEFINE_string("cond_stage_workdir", "", "override the cond-stage (segmentation) workdir")
_SEGMENTATION = flags.DEFINE_string("segmentation", "", "label-map PNG conditioning a spatial model")
_OUT = flags.DEFINE_string("out", None, "output folder for PNGs")
_PER_CLASS = flags.DEFINE_integer("per_class", 8, "samples per class (or in all, unconditional)")
_CLASSES = flags.DEFINE_list("classes", [], "class ids to sample (default: all)")
_WIDTH = flags.DEFINE_integer("width", 0, "pixels; larger than the training size -> sliding window")
_HEIGHT = flags.DEFINE_integer("height", 0, "pixels; larger than the training size -> sliding window")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0: no top-k filter")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1.0: no nucleus filter")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "softmax temperature")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 0.0, "classifier-free guidance scale (0: off)")
_CFG_INTERVAL = flags.DEFINE_integer("cfg_interval", -1, "guide only the tokens up to this step, as LlamaGen's "
                                     "cfg_interval (-1: every token)")
_BATCH = flags.DEFINE_integer("batch_size", 16, "samples per compiled batch")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def _without_guidance(opts: dict, where: str) -> dict:
    """``opts`` for the sliding window, which has no classifier-free guidance: a scale given is an error, not
    silently dropped."""
    if opts.get("guidance_scale") is not None:
        raise ValueError(f"--guidance_scale: {where} has no classifier-free guidance; leave it at 0")
    return {k: v for k, v in opts.items() if k != "guidance_scale"}


def parse_classes(sampler, classes: list[str]) -> list[int]:
    """--classes as ints; an error for a model that takes no class (the flag would be dropped) or ids out of range."""
    if not classes:
        return []
    if not sampler.conditioning.takes_labels:
        raise ValueError(f"--classes is for class-conditional models; this one is {sampler.cond.kind}")
    try:
        ids = [int(c) for c in classes]
    except ValueError:
        raise ValueError(f"--classes must be integer class ids, got {','.join(classes)}") from None
    bad = [c for c in ids if not 0 <= c < sampler.cond.n_classes]
    if bad:
        raise ValueError(f"--classes {bad} outside [0, {sampler.cond.n_classes}) (the model's cond.n_classes)")
    return ids


def write_class_grids(sampler, out: str, per_class: int, classes: list[int], opts: dict, seed: int,
                      batch_size: int) -> list[str]:
    rng = jax.random.key(seed)
    paths = []
    if sampler.conditioning.takes_labels:
        classes = classes or list(range(sampler.cond.n_classes))
        labels = np.repeat(np.asarray(classes, np.int32), per_class)
        images = sampler.sample(rng, len(labels), labels, batch_size=batch_size, **opts)
        for k, c in enumerate(classes):
            path = os.path.join(out, f"class_{c:04d}.png")
            save_png(path, image_grid(images[k * per_class:(k + 1) * per_class], min(per_class, 8)))
            paths.append(path)
    else:
        images = sampler.sample(rng, per_class, batch_size=batch_size, **opts)
        path = os.path.join(out, "samples.png")
        save_png(path, image_grid(images, min(per_class, 8)))
        paths.append(path)
    return paths


def write_large(sampler, out: str, height: int, width: int, classes: list[int], opts: dict, seed: int
                ) -> list[str]:
    f = sampler.vqgan.downsample_factor
    if not (height > 0 and width > 0):
        raise ValueError(f"--height and --width go together (both > 0), got {height}x{width}")
    if height % f or width % f:
        raise ValueError(f"--height/--width must be multiples of the stage-one factor {f}, got {height}x{width}")
    opts = _without_guidance(opts, "sliding-window sampling (--height/--width)")
    paths = []
    for c in (classes or [0]) if sampler.conditioning.takes_labels else [None]:
        labels = None if c is None else np.asarray([c], np.int32)
        img = sampler.sample_large(jax.random.key(seed), (height // f, width // f), labels=labels, **opts)[0]
        path = os.path.join(out, f"large_{height}x{width}" + ("" if c is None else f"_class_{c:04d}") + ".png")
        save_png(path, img)
        paths.append(path)
    return paths


def write_spatial(sampler, out: str, seg_path: str, per_class: int, opts: dict, seed: int, batch_size: int,
                  height: int = 0, width: int = 0) -> list[str]:
    """Samples conditioned on one label map: a grid at the training size, else one sliding-window image."""
    from common_jax.datasets import read_label_map
    from vqgan_jax.label_maps import label_palette
    if not seg_path:
        raise ValueError("this model is spatially conditioned: pass --segmentation=<label-map PNG>")
    seg = read_label_map(seg_path)
    h, w = seg.shape
    if (height or width) and (height, width) != (h, w):
        raise ValueError(f"--height/--width {height}x{width} disagree with --segmentation {seg_path} ({h}x{w}); "
                         f"the label map sets the output size")
    f = sampler.vqgan.downsample_factor
    if h % f or w % f:
        raise ValueError(f"--segmentation {seg_path} is {h}x{w}; both sides must be multiples of the stage-one "
                         f"factor {f}")
    at_size = (h // f, w // f) == sampler.grid
    if not at_size:
        opts = _without_guidance(opts, f"sliding-window sampling (a {h}x{w} label map, not the training size)")
    cond = np.asarray(sampler.encode_condition(seg[None]))
    paths = [os.path.join(out, "segmentation.png")]
    save_png(paths[0], np.asarray(label_palette(sampler.cond_stage[2]))[seg])
    if at_size:
        images = sampler.sample(jax.random.key(seed), per_class, batch_size=batch_size,
                                cond_codes=np.repeat(cond, per_class, axis=0), **opts)
        paths.append(os.path.join(out, "samples.png"))
        save_png(paths[-1], image_grid(images, min(per_class, 8)))
    else:
        img = sampler.sample_large(jax.random.key(seed), (h // f, w // f), cond_codes=cond, **opts)[0]
        paths.append(os.path.join(out, f"large_{h}x{w}.png"))
        save_png(paths[-1], img)
    return paths


def main(argv):
    del argv
    from transformer_jax.sampler import Sampler, sampling_options
    opts = sampling_options(_TOP_K.value, _TOP_P.value, _TEMPERATURE.value, _GUIDANCE.value, _CFG_INTERVAL.value)
    out = check_workdir(_OUT.value)
    sampler = Sampler.from_workdirs(_WORKDIR.value, _FIRST_STAGE.value, _COND_STAGE.value)
    classes = parse_classes(sampler, _CLASSES.value)
    if sampler.conditioning.takes_cond_codes:
        paths = write_spatial(sampler, out, _SEGMENTATION.value, _PER_CLASS.value, opts, _SEED.value,
                              _BATCH.value, _HEIGHT.value, _WIDTH.value)
    elif _SEGMENTATION.value:
        raise ValueError(f"--segmentation is for spatially conditioned models; this one is {sampler.cond.kind}")
    elif _WIDTH.value or _HEIGHT.value:
        paths = write_large(sampler, out, _HEIGHT.value, _WIDTH.value, classes, opts, _SEED.value)
    else:
        paths = write_class_grids(sampler, out, _PER_CLASS.value, classes, opts, _SEED.value, _BATCH.value)
    logging.info("wrote %s", ", ".join(paths))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "out"])
    install_excepthook()
    app.run(run_main(main))

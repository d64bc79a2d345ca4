"""The main job on a laptop CPU: both stages on real photographs, no download.

    python -m launch.demo --workdir=demo_run

1. prepares the built-in dataset (crops of 10 photos shipped with scikit-image / scikit-learn, label = photo),
2. trains a tiny VQGAN (32 px, f=4, 128 codes), 3. trains a tiny class-conditional GPT on its codes,
4. samples a grid per class and a sliding-window panorama several times wider than the training crop,
5. writes PNGs, TensorBoard logs and summary.json to the workdir.
Rerunning resumes each stage from its checkpoints instead of starting over.

    python -m launch.demo --workdir=demo_llama --gpt_block=llama      # stage two with LlamaGen's LLaMA block
    python -m launch.demo --workdir=demo_fsq --quantizer=fsq          # stage one with FSQ (or lfq)

``--gpt_block=llama`` trains configs/transformer_llamagen_tiny.py (sized like minGPT's configs/transformer_tiny.py)
and ``--quantizer`` picks configs/vqgan_tiny.py (vq), vqgan_tiny_fsq.py or vqgan_tiny_lfq.py; summary.json
records both choices and the GPT's parameter count beside its held-out NLL.
"""
from __future__ import annotations

from common_jax.host_memory import keep_freed_host_memory

keep_freed_host_memory()  # first, before any library starts threads: the demo is mostly training

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from common_jax import data as data_lib  # noqa: E402
from common_jax.metrics import image_grid, save_png  # noqa: E402
from configs import (transformer_llamagen_tiny, transformer_tiny, vqgan_tiny, vqgan_tiny_fsq,  # noqa: E402
                     vqgan_tiny_lfq)
from common_jax.cli_errors import install_excepthook, run_main  # noqa: E402
from common_jax.dataset_resolution import resolve_dataset  # noqa: E402
from common_jax.workdir_checks import check_workdir  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "demo_run", "output folder (rerun to resume)")
_VQ_STEPS = flags.DEFINE_integer("vqgan_steps", 1200, "stage-one steps")
_GPT_STEPS = flags.DEFINE_integer("gpt_steps", 600, "stage-two steps")
_PANORAMA = flags.DEFINE_integer("panorama_width", 6, "panorama width in training-crop widths")
_CROPS = flags.DEFINE_integer("crops_per_photo", 256, "training crops cut from each of the 10 photos")
_PER_CLASS = flags.DEFINE_integer("samples_per_class", 8, "images sampled per class for the grid")
# The choices below: flag value -> config module.
GPT_CONFIGS = {"mingpt": transformer_tiny, "llama": transformer_llamagen_tiny}
VQ_CONFIGS = {"vq": vqgan_tiny, "fsq": vqgan_tiny_fsq, "lfq": vqgan_tiny_lfq}
_GPT_BLOCK = flags.DEFINE_enum("gpt_block", "mingpt", list(GPT_CONFIGS), "stage two's block: taming's minGPT or "
                               "LlamaGen's LLaMA block (configs/transformer_llamagen_tiny.py)")
_QUANTIZER = flags.DEFINE_enum("quantizer", "vq", list(VQ_CONFIGS), "stage one's quantizer (configs/vqgan_tiny.py, "
                               "vqgan_tiny_fsq.py, vqgan_tiny_lfq.py)")


def demo_configs(workdir: str, vq_steps: int, gpt_steps: int, crops_per_photo: int = 256,
                 gpt_block: str = "mingpt", quantizer: str = "vq"):
    data_dir = os.path.join(workdir, "data")
    vq = VQ_CONFIGS[quantizer].get_config()
    vq.data.data_dir = data_dir
    vq.data.builtin_crops_per_photo = crops_per_photo
    vq.total_steps = vq_steps
    vq.loss.disc_start = vq_steps * 2 // 3          # GAN on for the last third, as taming starts it late
    vq.eval_every = vq.image_every = vq.checkpoint.every = max(vq_steps // 4, 1)
    vq.log_every = 50
    gpt = GPT_CONFIGS[gpt_block].get_config()
    gpt.data.data_dir = data_dir
    gpt.data.builtin_crops_per_photo = crops_per_photo
    gpt.first_stage.workdir = os.path.join(workdir, "vqgan")
    gpt.total_steps = gpt_steps
    gpt.eval_every = gpt.checkpoint.every = max(gpt_steps // 3, 1)
    gpt.log_every = 50
    return vq, gpt


def vqgan_metrics(vq_workdir: str, vq_config) -> dict:
    """Held-out PSNR / L1 of reconstructions and the fraction of the codebook the held-out set uses."""
    from vqgan_jax.pretrained import load_vqgan
    from vqgan_jax.train import psnr
    model, variables, _ = load_vqgan(vq_workdir)
    data_dir, name = resolve_dataset(vq_config.data, vq_workdir)
    loader = data_lib.make_loader(data_dir, name, "validation", 32, train=False,
                                  image_size=int(vq_config.data.image_size), seed=0, num_epochs=1)
    fn = jax.jit(lambda v, x: model.apply(v, x))
    p, l1, used, n = 0.0, 0.0, np.zeros(model.codebook_size, bool), 0
    for batch in loader:
        m = batch["mask"]
        xrec, enc = fn(variables, jnp.asarray(batch["image"]))
        p += float(np.sum(np.asarray(psnr(jnp.asarray(batch["image"]), xrec))[m]))
        l1 += float(np.sum(np.mean(np.abs(np.asarray(xrec) - batch["image"]), axis=(1, 2, 3))[m]))
        used[np.asarray(enc.indices)[m].reshape(-1)] = True
        n += int(m.sum())
    return {"heldout_psnr_db": p / n, "heldout_l1": l1 / n, "heldout_codebook_usage": float(used.mean()),
            "heldout_images": n}


def gpt_metrics(gpt_workdir: str) -> dict:
    """Held-out NLL (bits per token) against the unigram entropy of the held-out codes."""
    from common_jax.pretrained import load_workdir, params_fingerprint
    from transformer_jax.codes import codes_dataset_name
    from transformer_jax.code_encoder import unigram_entropy_bits
    from transformer_jax.train import GPTState, TransformerTask
    from vqgan_jax.pretrained import load_vqgan
    config, state, _ = load_workdir(gpt_workdir)
    _, vq_vars, _ = load_vqgan(config.first_stage.workdir)
    data_dir, image_name = resolve_dataset(config.data, gpt_workdir)
    name = codes_dataset_name(data_dir, image_name, int(config.data.image_size), params_fingerprint(vq_vars))
    task = TransformerTask(config)
    st = GPTState(step=jnp.zeros((), jnp.int32), params=state["params"], opt_state=None)
    ev = jax.jit(task.eval_step)
    bits = count = 0.0
    all_codes = []
    for batch in data_lib.make_loader(data_dir, name, "validation", 32, train=False, image_size=None, seed=0,
                                      num_epochs=1):
        out = ev(st, batch)
        bits += float(out["nll_bits_per_token"])
        count += float(out["count"])
        all_codes.append(batch["codes"][batch["mask"]])
    entropy = unigram_entropy_bits(np.concatenate(all_codes), config.gpt.vocab_size)
    return {"heldout_nll_bits_per_token": bits / count, "heldout_unigram_entropy_bits": entropy,
            "block": config.gpt.block, "parameters": int(sum(np.size(x) for x in jax.tree.leaves(state["params"])))}


def write_samples(workdir: str, gpt_workdir: str, panorama_width: int, per_class: int = 8) -> dict:
    from transformer_jax.sampler import Sampler
    sampler = Sampler.from_workdirs(gpt_workdir)
    n_classes = sampler.cond.n_classes
    labels = np.repeat(np.arange(n_classes, dtype=np.int32), per_class)
    t0 = time.time()
    images = sampler.sample(jax.random.key(0), len(labels), labels, batch_size=min(40, len(labels)), top_k=64)
    t_grid = time.time() - t0
    save_png(os.path.join(workdir, "samples_per_class.png"), image_grid(images, per_class))
    h, w = sampler.grid
    t0 = time.time()
    pano = sampler.sample_large(jax.random.key(1), (2 * h, panorama_width * w), labels=np.array([0]), top_k=64)
    t_pano = time.time() - t0
    save_png(os.path.join(workdir, "panorama.png"), pano[0])
    return {"samples_per_class_png": "samples_per_class.png", "panorama_png": "panorama.png",
            "panorama_shape": list(pano.shape[1:3]), f"sample_seconds_{len(labels)}_images": round(t_grid, 2),
            "panorama_seconds": round(t_pano, 2)}


def _stopped(result, stage: str) -> bool:
    """Whether a stage's run was preempted (SIGTERM): the demo stops there rather than go on from a half-trained
    stage; rerunning resumes it."""
    if result.preempted:
        logging.warning("%s stopped at step %d (preempted); rerun the same command to resume", stage, result.step)
    return result.preempted


def run_demo(workdir: str, vq_steps: int, gpt_steps: int, panorama_width: int, crops_per_photo: int = 256,
             samples_per_class: int = 8, gpt_block: str = "mingpt", quantizer: str = "vq") -> dict:
    from transformer_jax.train import train as train_gpt
    from vqgan_jax.train import train as train_vq
    workdir = check_workdir(workdir)
    vq_cfg, gpt_cfg = demo_configs(workdir, vq_steps, gpt_steps, crops_per_photo, gpt_block, quantizer)
    t0 = time.time()
    logging.info("[1/3] stage one: tiny VQGAN (%s) for %d steps", quantizer, vq_steps)
    if _stopped(train_vq(vq_cfg, os.path.join(workdir, "vqgan")), "stage one"):
        return {"preempted": "vqgan"}
    summary = {"vqgan": dict(vqgan_metrics(os.path.join(workdir, "vqgan"), vq_cfg), quantizer=quantizer)}
    logging.info("stage one: %s", summary["vqgan"])
    logging.info("[2/3] stage two: tiny class-conditional GPT (%s block) for %d steps", gpt_block, gpt_steps)
    if _stopped(train_gpt(gpt_cfg, os.path.join(workdir, "gpt")), "stage two"):
        return dict(summary, preempted="gpt")
    summary["gpt"] = gpt_metrics(os.path.join(workdir, "gpt"))
    logging.info("stage two: %s", summary["gpt"])
    logging.info("[3/3] sampling a grid per class and a panorama")
    summary["samples"] = write_samples(workdir, os.path.join(workdir, "gpt"), panorama_width, samples_per_class)
    summary["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv):
    del argv
    summary = run_demo(_WORKDIR.value, _VQ_STEPS.value, _GPT_STEPS.value, _PANORAMA.value, _CROPS.value,
                       _PER_CLASS.value, _GPT_BLOCK.value, _QUANTIZER.value)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    install_excepthook()
    app.run(run_main(main))

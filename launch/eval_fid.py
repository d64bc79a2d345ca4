"""FID / IS of class-conditional samples, or rFID of VQGAN reconstructions, with pytorch-fid's InceptionV3.

    python -m launch.eval_fid --mode=samples --workdir=runs/fid --transformer_workdir=runs/gpt \
        --inception_weights=inception_fid.npz --ref_stats=imagenet_val_stats.npz --per_class=50
    python -m launch.eval_fid --mode=reconstruction --workdir=runs/rfid --vqgan_workdir=runs/vq \
        --inception_weights=inception_fid.npz --dataset=imagenet2012 --data_dir=~/data --image_size=256

Work is split into chunks; after each the running statistics are saved, so rerunning resumes. Every process
of a multi-host job takes its share of each chunk. The result is ``<workdir>/fid_<mode>.json``.

Reference statistics of samples mode: ``--ref_stats`` (pytorch-fid's ``mu``/``sigma`` .npz, or an ADM reference
batch), or the images of ``--dataset``'s ``--split``: ``validation`` (the default) or ``train``. taming's authors
list the sample FID of their FFHQ, CelebA-HQ and class-conditional ImageNet models against the training set, that
of the segmentation-conditioned ADE20K and COCO-Stuff models against the validation set, and the rFID of their
VQGANs against both. The statistics of each split are cached in the workdir under the split's name, so one set
of samples can be scored against either. Everything that can be refused (the reference file, every model's
weights) is checked before any sampling.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable

import jax
import numpy as np
from absl import app, flags, logging

from common_jax import multihost
from common_jax.cli_errors import install_excepthook, run_main
from common_jax.dataset_resolution import check_dataset_on_all_processes
from common_jax.workdir_checks import check_workdir

_MODE = flags.DEFINE_enum("mode", None, ["samples", "reconstruction"], "what to evaluate")
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (JSON result, resumable state)")
_INCEPTION = flags.DEFINE_string("inception_weights", None, "converted pytorch-fid weights (.npz)")
_TRANSFORMER = flags.DEFINE_string("transformer_workdir", "", "stage-two workdir (samples mode)")
_VQGAN = flags.DEFINE_string("vqgan_workdir", "", "stage-one workdir (reconstruction mode)")
_TAMING_CKPT = flags.DEFINE_string("taming_ckpt", "", "official VQGAN .ckpt instead of --vqgan_workdir")
_TAMING_YAML = flags.DEFINE_string("taming_yaml", "", "its .yaml")
_REF_STATS = flags.DEFINE_string("ref_stats", "", "reference statistics .npz of samples mode: 'mu'/'sigma' of the "
                                 "2048 pool3 features (pytorch-fid), or an ADM batch ('arr_0' images); empty: computed "
                                 "from --dataset/--split and cached in the workdir")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir")
_DATASET = flags.DEFINE_string("dataset", "", "dataset name (reference images / images to reconstruct)")
_SPLIT = flags.DEFINE_string("split", "validation", "split of --dataset: the reference images of samples mode, "
                             "the images to reconstruct in reconstruction mode. validation (default), or train: "
                             "taming's authors computed the sample FID of their FFHQ, CelebA-HQ and ImageNet models "
                             "against training-set statistics")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "center-crop size of dataset images")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "cap on dataset images, rounded up to whole batches of "
                                     "--batch_size per process (0: the whole split)")
_PER_CLASS = flags.DEFINE_integer("per_class", 50, "samples per class (FID-50k on ImageNet: 50)")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 50000, "samples of an unconditional model")
_CHUNK = flags.DEFINE_integer("chunk_size", 1000, "images per resumable chunk")
_BATCH = flags.DEFINE_integer("batch_size", 50, "images per compiled batch")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0: off")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1.0: off")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 0.0, "0: off")
_CFG_INTERVAL = flags.DEFINE_integer("cfg_interval", -1, "guide only the tokens up to this step, as LlamaGen's "
                                     "cfg_interval (-1: every token)")
_SEED = flags.DEFINE_integer("seed", 0, "")
_SAVE_IMAGES = flags.DEFINE_bool("save_images", False, "also write the samples as an ADM-style arr_0 .npz")


def _check_same_everywhere(what: str, fingerprint: Callable[[], str]) -> None:
    """Every process reads its inputs from its own disk: host copies that differ would mix models or features in
    one result without an error, so all processes refuse before any work. ``fingerprint`` (a pass over all the
    weights) is computed only when there are several processes."""
    if jax.process_count() > 1:
        multihost.check_same_on_all_processes(fingerprint(), what,
                                              "give every host identical copies (or one shared path)")


def _inception(path: str):
    """images uint8 -> (pool3 features, logits, unbiased logits); logits are None without the fc layer."""
    from common_jax.inception import load_inception
    from common_jax.pretrained import check_finite, params_fingerprint
    model, variables = load_inception(path)
    check_finite(variables, f"--inception_weights {path}", "convert the pytorch-fid weights again")
    _check_same_everywhere("the weights of --inception_weights", lambda: params_fingerprint(variables))
    if model.num_classes:
        fn = jax.jit(lambda v, x: model.apply(v, x, method="features_and_logits"))
    else:
        fn = jax.jit(lambda v, x: (model.apply(v, x), None, None))
    return lambda images: [None if a is None else np.asarray(a) for a in fn(variables, images)]


def _image_loader(batch_size: int):
    from common_jax import data as data_lib
    if not _DATASET.value or not _DATA_DIR.value:
        raise ValueError("--dataset and --data_dir are required for dataset images")
    check_dataset_on_all_processes(os.path.expanduser(_DATA_DIR.value), _DATASET.value)
    return data_lib.make_loader(os.path.expanduser(_DATA_DIR.value), _DATASET.value, _SPLIT.value,
                                batch_size * jax.process_count(), train=False, image_size=_IMAGE_SIZE.value,
                                seed=0, num_epochs=1)


def _dataset_chunks():
    """(number of chunks, chunk k -> list of (uint8 images, mask) batches of this process) over the dataset
    images: --chunk_size images a chunk, --max_examples rounded up to whole global batches (the loader is already
    sharded)."""
    from itertools import islice

    from common_jax.metrics import to_uint8
    loader = _image_loader(_BATCH.value)
    batches_per_chunk = max(1, _CHUNK.value // _BATCH.value)
    # The loader's batches are global (--batch_size images per process).
    max_batches = -(-_MAX_EXAMPLES.value // (_BATCH.value * jax.process_count())) if _MAX_EXAMPLES.value else 0
    n = len(loader) if not max_batches else min(len(loader), max_batches)
    num_chunks = -(-n // batches_per_chunk)

    def chunk(k):
        loader.set_state(dict(loader.get_state(), next_batch=k * batches_per_chunk))
        out = []
        for batch in islice(loader, min(batches_per_chunk, n - k * batches_per_chunk)):
            out.append((to_uint8(batch["image"]), batch["mask"].astype(bool)))
        return out
    return num_chunks, chunk


def _checkpoint_step(workdir: str) -> int | None:
    from common_jax import checkpoint as ckpt
    return (ckpt.latest_meta(workdir) or {}).get("step")


def _signature(**extra) -> dict:
    """What decides a resumable state's chunks, beside ``extra``: chunking, batching and the process count (each
    process takes its share of a chunk)."""
    return dict(extra, chunk_size=_CHUNK.value, batch_size=_BATCH.value, processes=jax.process_count())


def _dataset_signature() -> dict:
    return _signature(dataset=_DATASET.value, data_dir=os.path.abspath(os.path.expanduser(_DATA_DIR.value)),
                      split=_SPLIT.value, image_size=_IMAGE_SIZE.value, max_examples=_MAX_EXAMPLES.value)


def check_inputs() -> None:
    """What can be refused without loading a model, checked before any work: the reference statistics file (a
    readable .npz of statistics of the Inception network's feature dimension), or the dataset flags that stand
    in for it. Wrong statistics would otherwise be found only after all sampling, at the FID."""
    from common_jax.fid_stats import check_stats_file
    from common_jax.inception import FEATURE_DIM
    if _MODE.value != "samples":
        if _REF_STATS.value:
            raise ValueError("--ref_stats is for --mode=samples; reconstruction mode compares with the images of "
                             "--dataset/--split themselves")
        return
    if _REF_STATS.value:
        check_stats_file(_REF_STATS.value, FEATURE_DIM, "--ref_stats")
    elif not _DATASET.value or not _DATA_DIR.value:
        raise ValueError("--mode=samples needs reference statistics: --ref_stats, or --dataset and --data_dir (and "
                         "--split: validation or train) to compute them from")


def reference_cache(workdir: str) -> str:
    """The resumable reference statistics of --split: one file per split, so switching splits never reuses
    another split's statistics."""
    import re
    return os.path.join(workdir, f"ref_stats_{re.sub(r'[^A-Za-z0-9_.-]', '_', _SPLIT.value)}_state.npz")


def reference_stats(workdir: str, features) -> tuple[np.ndarray, np.ndarray, str]:
    from common_jax.fid_eval import ChunkedStats, run_chunks
    from common_jax.fid_stats import load_stats
    if _REF_STATS.value:
        mu, sigma = load_stats(_REF_STATS.value, feature_fn=lambda x: features(x)[0])
        _check_same_everywhere("the statistics of --ref_stats",
                               lambda: hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest())
        return mu, sigma, _REF_STATS.value
    num_chunks, chunk = _dataset_chunks()
    state = ChunkedStats(reference_cache(workdir), ("real",), signature=_dataset_signature())
    stats = run_chunks(state, num_chunks, lambda k: {"real": np.concatenate(
        [features(x)[0][m] for x, m in chunk(k)] or [np.zeros((0, 2048))])}, desc="reference chunk")
    mu, sigma = stats["real"].mean_cov()
    return mu, sigma, f"{_DATASET.value}/{_SPLIT.value} ({stats['real'].count} images)"


def eval_samples(workdir: str) -> dict:
    from common_jax.fid import frechet_distance, inception_score
    from common_jax.fid_eval import ChunkedStats, chunk_file, chunk_files, chunk_items, run_chunks
    from transformer_jax.sampler import Sampler, sampling_options
    if not _TRANSFORMER.value:
        raise ValueError("--transformer_workdir is required in samples mode")
    opts = sampling_options(_TOP_K.value, _TOP_P.value, _TEMPERATURE.value, _GUIDANCE.value,
                            _CFG_INTERVAL.value)
    sampler = Sampler.from_workdirs(_TRANSFORMER.value)
    _check_same_everywhere("the weights of --transformer_workdir", sampler.weights_fingerprint)
    # Everything that can be refused is checked before the reference statistics, not after them.
    if sampler.conditioning.takes_cond_codes:
        raise ValueError("--mode=samples draws unconditional or class-conditional models; this one is spatially "
                         "conditioned (its samples need label maps)")
    sampler.check_guidance(opts["guidance_scale"])
    labels = None
    if sampler.conditioning.takes_labels:
        labels = np.repeat(np.arange(sampler.cond.n_classes, dtype=np.int32), _PER_CLASS.value)
    n = len(labels) if labels is not None else _NUM_SAMPLES.value
    state = ChunkedStats(os.path.join(workdir, "samples_state.npz"), ("fake",), signature=_signature(
        transformer_workdir=os.path.abspath(_TRANSFORMER.value), step=_checkpoint_step(_TRANSFORMER.value),
        sampling=opts, num_samples=n, seed=_SEED.value))
    features = _inception(_INCEPTION.value)
    mu_r, sigma_r, ref = reference_stats(workdir, features)
    num_chunks = -(-n // _CHUNK.value)
    chunk_dir = os.path.join(workdir, "sample_chunks")
    os.makedirs(chunk_dir, exist_ok=True)
    pi, pc = jax.process_index(), jax.process_count()
    key = jax.random.key(_SEED.value)

    def compute(k):
        idx = chunk_items(n, _CHUNK.value, k, pi, pc)
        if not len(idx):
            return {"fake": np.zeros((0, 2048))}
        lab = None if labels is None else labels[idx]
        images = sampler.sample(jax.random.fold_in(jax.random.fold_in(key, k), pi), len(idx), lab,
                                batch_size=_BATCH.value, progress=False, **opts)
        feats, logits = [], []
        for s in range(0, len(images), _BATCH.value):
            f, _, unbiased = features(images[s:s + _BATCH.value])
            feats.append(f)
            logits.append(unbiased if unbiased is not None else np.zeros((len(f), 0)))
        np.savez(chunk_file(chunk_dir, k, pi), logits=np.concatenate(logits),
                 **({"images": images, "labels": lab if lab is not None else np.zeros(0)} if _SAVE_IMAGES.value
                    else {}))
        return {"fake": np.concatenate(feats)}

    stats = run_chunks(state, num_chunks, compute, desc="sample chunk")
    mu, sigma = stats["fake"].mean_cov()
    result = {"mode": "samples", "fid": frechet_distance(mu, sigma, mu_r, sigma_r), "num_samples": stats["fake"].count,
              "reference": ref, "transformer_workdir": _TRANSFORMER.value, "sampling": opts}
    files = chunk_files(chunk_dir, n, _CHUNK.value, pc)
    logits = [np.load(f)["logits"] for f in files]
    if logits and logits[0].shape[1]:
        result["inception_score"], result["inception_score_std"] = inception_score(np.concatenate(logits))
    if _SAVE_IMAGES.value and pi == 0:
        parts = [np.load(f) for f in files]
        np.savez(os.path.join(workdir, "samples_arr_0.npz"), arr_0=np.concatenate([p["images"] for p in parts]),
                 arr_1=np.concatenate([p["labels"] for p in parts]))
        result["images_npz"] = "samples_arr_0.npz"
    return result


def eval_reconstruction(workdir: str) -> dict:
    from common_jax.fid import frechet_distance
    from common_jax.fid_eval import ChunkedStats, run_chunks
    from common_jax.data import to_float
    from common_jax.metrics import to_uint8
    from common_jax.pretrained import params_fingerprint
    from vqgan_jax.pretrained import load_vqgan
    model, variables, _ = load_vqgan(_VQGAN.value, _TAMING_CKPT.value, _TAMING_YAML.value)
    _check_same_everywhere(f"the weights of --{'vqgan_workdir' if _VQGAN.value else 'taming_ckpt'}",
                           lambda: params_fingerprint(variables))
    source = (dict(vqgan_workdir=os.path.abspath(_VQGAN.value), step=_checkpoint_step(_VQGAN.value)) if _VQGAN.value
              else dict(taming_ckpt=os.path.abspath(_TAMING_CKPT.value)))
    state = ChunkedStats(os.path.join(workdir, "reconstruction_state.npz"), ("real", "recon"),
                         signature=dict(_dataset_signature(), **source))
    features = _inception(_INCEPTION.value)
    recon = jax.jit(lambda v, x: model.apply(v, x)[0])
    num_chunks, chunk = _dataset_chunks()

    def compute(k):
        real, rec = [], []
        for x, m in chunk(k):
            xr = to_uint8(recon(variables, to_float(x)), name="the VQGAN's reconstructions")
            real.append(features(x)[0][m])
            rec.append(features(xr)[0][m])
        return {"real": np.concatenate(real), "recon": np.concatenate(rec)}

    stats = run_chunks(state, num_chunks, compute, desc="reconstruction chunk")
    rfid = frechet_distance(*stats["recon"].mean_cov(), *stats["real"].mean_cov())
    return {"mode": "reconstruction", "rfid": rfid, "num_images": stats["real"].count,
            "dataset": f"{_DATASET.value}/{_SPLIT.value}", "image_size": _IMAGE_SIZE.value,
            "vqgan": _VQGAN.value or _TAMING_CKPT.value}


def main(argv):
    del argv
    multihost.maybe_initialize_distributed("auto")
    workdir = check_workdir(_WORKDIR.value)
    if _CHUNK.value < 1 or _BATCH.value < 1:
        raise ValueError(f"--chunk_size and --batch_size must be >= 1, got {_CHUNK.value}, {_BATCH.value}")
    check_inputs()
    t0 = time.time()
    result = eval_samples(workdir) if _MODE.value == "samples" else eval_reconstruction(workdir)
    result["seconds"] = round(time.time() - t0, 1)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"fid_{_MODE.value}.json"), "w") as f:
            json.dump(result, f, indent=2)
    logging.info("%s", result)
    print(json.dumps(result))


if __name__ == "__main__":
    flags.mark_flags_as_required(["mode", "workdir", "inception_weights"])
    install_excepthook()
    app.run(run_main(main))

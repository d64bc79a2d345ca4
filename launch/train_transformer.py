"""Stage two: train the GPT over a frozen VQGAN's codes.

    python -m launch.train_transformer --config=configs/transformer_tiny.py --workdir=runs/gpt \
        --config.first_stage.workdir=runs/vq

The stage-one model comes from a stage-one workdir of this project or an official taming checkpoint
(--config.first_stage.taming_ckpt=... --config.first_stage.taming_yaml=...). With data.pre_encoded (default)
the dataset is encoded to codes once and training reads integers; otherwise every batch is encoded on the fly.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from common_jax import data as data_lib
from common_jax import training
from launch import setup_run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/transformer_tiny.py", "stage-two config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and images go")
_MULTIHOST = flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"], "start jax.distributed")


def check_first_stage(config, vq_model_cfg) -> None:
    """The GPT's code grid and vocabulary must fit the stage-one model it trains on."""
    f = 2 ** (len(vq_model_cfg.ch_mult) - 1)
    grid = (config.data.image_size // f,) * 2
    if tuple(config.data.code_grid) != grid:
        raise ValueError(f"data.code_grid={tuple(config.data.code_grid)} but the stage-one model (f={f}) gives "
                         f"{grid} codes for data.image_size={config.data.image_size}")
    if config.gpt.vocab_size < vq_model_cfg.n_embed:
        raise ValueError(f"gpt.vocab_size={config.gpt.vocab_size} is smaller than the stage-one codebook "
                         f"(n_embed={vq_model_cfg.n_embed})")


def train(config, workdir: str) -> training.RunResult:
    from transformer_jax import codes as codes_lib
    from transformer_jax.train import EncodingLoader, TransformerTask, make_encoder
    from vqgan_jax.pretrained import load_vqgan

    if config.cond.kind == "spatial":
        raise ValueError("cond.kind='spatial' needs a paired (image, condition) dataset; the launcher "
                         "supports unconditional and class conditioning (spatial works from Python: "
                         "TransformerTask with batches holding 'cond_codes')")
    task = TransformerTask(config)
    vq, vq_vars, vq_cfg = load_vqgan(**config.first_stage)
    check_first_stage(config, vq_cfg)
    encode = make_encoder(vq, vq_vars)
    d = config.data
    data_dir, image_name = setup_run.resolve_dataset(d, workdir)
    setup_run.cap_eval_steps(config)
    if d.pre_encoded:
        name = codes_lib.prepare_codes(data_dir, image_name, int(d.image_size), encode,
                                       codes_lib.params_fingerprint(vq_vars), int(d.eval_batch_size))
        train_loader = data_lib.make_loader(data_dir, name, "train", int(d.global_batch_size), train=True,
                                            image_size=None, seed=int(config.seed))
        eval_loader = lambda: data_lib.make_loader(data_dir, name, "validation", int(d.eval_batch_size),
                                                   train=False, image_size=None, seed=0, num_epochs=1)
    else:
        train_images, eval_images, _, _ = setup_run.image_loaders(config, workdir)
        train_loader = EncodingLoader(train_images, encode)
        eval_loader = lambda: EncodingLoader(eval_images(), encode)
    logging.info("stage two on %s codes (%s), global batch %d", image_name,
                 "pre-encoded" if d.pre_encoded else "on the fly", d.global_batch_size)
    return training.run(config, workdir, task, train_loader, eval_loader, compat_prefixes=("gpt", "cond"))


def main(argv):
    del argv
    setup_run.maybe_initialize_distributed(_MULTIHOST.value)
    workdir = setup_run.check_workdir(_WORKDIR.value)
    result = train(_CONFIG.value, workdir)
    logging.info("done at step %d: %s", result.step, result.eval_metrics)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(setup_run.run_main(main))

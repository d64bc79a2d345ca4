"""Stage two: train the GPT over a frozen VQGAN's codes.

    python -m launch.train_transformer --config=configs/transformer_tiny.py --workdir=runs/gpt \
        --config.first_stage.workdir=runs/vq

The stage-one model comes from a stage-one workdir of this project or an official taming checkpoint
(--config.first_stage.taming_ckpt=... --config.first_stage.taming_yaml=...). With data.pre_encoded (default)
the dataset is encoded to codes once and training reads integers; otherwise every batch is encoded on the fly.
"""
from common_jax.run_setup import train_app
from transformer_jax.train import train

if __name__ == "__main__":
    train_app(train, "configs/transformer_tiny.py")

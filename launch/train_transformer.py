"""Stage two: train the GPT over a frozen VQGAN's codes.

    python -m launch.train_transformer --config=configs/transformer_tiny.py --workdir=runs/gpt \
        --config.first_stage.workdir=runs/vq

The stage-one model comes from a stage-one workdir of this project or an official taming checkpoint
(--config.first_stage.taming_ckpt=... --config.first_stage.taming_yaml=...). With data.pre_encoded (default)
the dataset is encoded to codes once and training reads integers; otherwise every batch is encoded on the fly.
"""
from common_jax.host_memory import keep_freed_host_memory

keep_freed_host_memory()  # first, before any library starts threads (see common_jax/host_memory.py)

from common_jax.cli_errors import install_excepthook  # noqa: E402
from common_jax.train_app import train_app  # noqa: E402
from transformer_jax.train import train  # noqa: E402

if __name__ == "__main__":
    install_excepthook()
    train_app(train, "configs/transformer_tiny.py")

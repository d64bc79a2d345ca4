"""Stage one: train a VQGAN.  python -m launch.train_vqgan --config=configs/vqgan_tiny.py --workdir=runs/vq

Any config field can be overridden, e.g. --config.data.global_batch_size=64 --config.mesh.fsdp=4.
Rerunning with the same workdir resumes from its newest checkpoint. --multihost=on forces
jax.distributed.initialize() (automatic on TPU pods, under SLURM or with JAX_COORDINATOR_ADDRESS set).
"""
from common_jax.host_memory import keep_freed_host_memory

keep_freed_host_memory()  # first, before any library starts threads (see common_jax/host_memory.py)

from common_jax.cli_errors import install_excepthook  # noqa: E402
from common_jax.train_app import train_app  # noqa: E402
from vqgan_jax.train import train  # noqa: E402

if __name__ == "__main__":
    install_excepthook()
    train_app(train, "configs/vqgan_tiny.py")

"""taming-jax: VQGAN + autoregressive transformer (Taming Transformers) in JAX/Flax."""
from setuptools import setup

# Ranges are the ones this project was tested with (jax 0.10.2, flax 0.12.8, orbax 0.12.8, TF 2.21).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml_collections>=1.1,<2",
    "tensorflow-datasets>=4.9.10,<5",
    "importlib_resources>=6",          # TFDS imports it without declaring it
    "grain>=0.2.18,<0.3",
    "array_record>=0.8,<0.9",
    "clu>=0.0.12,<0.1",
    # clu's metric writers and TFDS dataset preparation import TensorFlow; the CPU wheel is enough.
    "tensorflow-cpu>=2.21,<2.22",
    "tensorboard>=2.21,<2.22",
    "numpy>=2.0,<3",
    "scipy>=1.13,<2",
    "pillow>=10",
    "scikit-image>=0.24,<0.27",       # ships the real photographs of the built-in demo dataset
    "scikit-learn>=1.5,<2",            # ships two more (china, flower)
    "absl-py>=2.1",
    "PyYAML>=6",
]

EXTRAS = {
    "dev": ["pytest>=8,<10", "pytest-xdist>=3.6,<4"],
    # Only for running the PyTorch originals side by side (benchmarks, regenerating goldens and test
    # fixtures). Converting weights (taming, LPIPS, InceptionV3) needs none of it: common_jax.torch_io
    # reads .pth/.ckpt files without PyTorch.
    "reference": [
        "torch==2.14.1",
        "torchvision==0.29.1",
        "pytorch-lightning==1.8.6",
        "setuptools<81",
        "omegaconf",
        "transformers==4.38.2",
        "taming-transformers-rom1504==0.0.6",
        "pytorch-fid==0.3.0",
        "lpips==0.1.4",
    ],
}

setup(
    name="taming-jax",
    version="0.1.0",
    description="Taming Transformers (VQGAN + GPT) in JAX/Flax with pod-scale sharding",
    python_requires=">=3.11",
    packages=["vqgan_jax", "transformer_jax", "common_jax", "configs", "launch"],
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)

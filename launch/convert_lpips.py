"""Convert torchvision's VGG16 and lpips's lin weights into one LPIPS(vgg) .npz for common_jax.lpips.

    python -m launch.convert_lpips --vgg16=vgg16-397923af.pth --lin=vgg.pth --out=lpips_vgg.npz

``vgg16-397923af.pth``: https://download.pytorch.org/models/vgg16-397923af.pth (torchvision's ImageNet
VGG16). ``vgg.pth``: ``lpips/weights/v0.1/vgg.pth`` inside the lpips package (pip install lpips==0.1.4).
Both .pth files are read without PyTorch (common_jax.torch_io).
"""
from __future__ import annotations

import numpy as np
from absl import app, flags

from common_jax.lpips import from_lpips, state_dict_from_torchvision
from common_jax.torch_io import read_torch_state_dict

FLAGS = flags.FLAGS


def convert(vgg16_path: str, lin_path: str, out_path: str) -> dict[str, np.ndarray]:
    """Read both .pth files (no PyTorch needed), check the result loads, write ``out_path``; returns the
    state dict."""
    sd = state_dict_from_torchvision(read_torch_state_dict(vgg16_path), read_torch_state_dict(lin_path))
    from_lpips(sd)  # fail here, not at training time, if anything is off
    np.savez(out_path, **sd)
    return sd


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.vgg16 or not FLAGS.lin:
        raise app.UsageError("--vgg16 and --lin are required")
    convert(FLAGS.vgg16, FLAGS.lin, FLAGS.out)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    # Flags are defined only when run as a program: importing both converters must not clash.
    flags.DEFINE_string("vgg16", None, "torchvision vgg16 state dict (.pth), e.g. vgg16-397923af.pth")
    flags.DEFINE_string("lin", None, "lpips lin weights (.pth), lpips/weights/v0.1/vgg.pth")
    flags.DEFINE_string("out", "lpips_vgg.npz", "output .npz")
    app.run(main)

"""Convert pytorch-fid's InceptionV3 weights into an .npz for common_jax.inception.load_inception.

    python -m launch.convert_inception --pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

The .pth is pytorch-fid's FID checkpoint (the TF 2015-12-05 Inception graph ported to PyTorch):
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
A state dict of pytorch_fid.inception.InceptionV3 (``blocks.0.0.conv.weight``...) is accepted too; the
output always uses the released names. The .pth is read without PyTorch (common_jax.torch_io).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from absl import app, flags

from common_jax.inception import from_pytorch_fid, save_state_dict_npz, to_torchvision_names
from common_jax.torch_io import read_torch_state_dict

FLAGS = flags.FLAGS


def convert_state_dict(state_dict: dict[str, Any], out_path: str) -> dict[str, np.ndarray]:
    """Check that ``state_dict`` loads (both key conventions), then write it under the released names."""
    sd = {k: np.asarray(v) for k, v in to_torchvision_names(state_dict).items()}
    from_pytorch_fid(sd)  # fail here with the full key report, not at evaluation time
    save_state_dict_npz(out_path, sd)
    return sd


def convert(pth_path: str, out_path: str) -> dict[str, np.ndarray]:
    """Read the .pth (no PyTorch needed), check it loads, write ``out_path``; returns the state dict."""
    return convert_state_dict(read_torch_state_dict(pth_path), out_path)


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.pth:
        raise app.UsageError("--pth is required (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    sd = convert(FLAGS.pth, FLAGS.out)
    print(f"wrote {FLAGS.out} ({len(sd)} arrays, {'with' if 'fc.weight' in sd else 'without'} the fc layer)")


if __name__ == "__main__":
    # Flags are defined only when run as a program: importing both converters must not clash.
    flags.DEFINE_string("pth", None, "pytorch-fid weights (.pth), e.g. pt_inception-2015-12-05-6726825d.pth")
    flags.DEFINE_string("out", "inception_fid.npz", "output .npz")
    app.run(main)

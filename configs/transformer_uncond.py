"""Unconditional GPT over 16x16 image codes (taming's FFHQ / CelebA-HQ models): one SOS token, then the codes.

taming trains these with ``cond_stage_config: __is_unconditional__`` (an SOSProvider prepending ``sos_token``);
the sizes follow the paper's unconditional face models (24 layers x 1664, 16 heads, the f16 VQGAN's 1024 codes).
Set ``data.name`` / ``data.data_dir`` to the image dataset and ``first_stage.workdir`` to its VQGAN, e.g. one
converted by ``launch.convert_taming``.
"""
import ml_collections

from configs.transformer_base import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    # The SOS token shares the vocabulary with the codes (taming uses id 0); positions tell them apart.
    c = base_config(vocab_size=1024, block_size=256, n_layer=24, n_head=16, n_embd=1664)
    c.cond.update(dict(kind="unconditional", sos_token=0, n_classes=0, class_offset=0))
    c.data.update(dict(name="image_folder", image_size=256, code_grid=(16, 16)))
    c.sampling.guidance_scale = 0.0       # nothing to guide towards
    return c

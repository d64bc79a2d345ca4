"""Segmentation-conditioned landscapes (S-FLCKR): GPT over [16x16 segmentation codes | 16x16 image codes]."""
import ml_collections

from configs.transformer_base import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024)
    c.cond.update(dict(kind="spatial"))
    c.data.update(dict(name="sflckr", code_grid=(16, 16)))
    return c

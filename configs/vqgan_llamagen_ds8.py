"""LlamaGen's VQ-8 tokenizer (``vq_ds8_c2i.pt``: f=8, 16384 8-d l2-normalised codes, ch 128, ch_mult 1,2,2,4).

Training settings as configs/vqgan_llamagen_ds16.py.
"""
import ml_collections

from configs.vqgan_llamagen_ds16 import llamagen_stage_one


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return llamagen_stage_one("VQ-8")

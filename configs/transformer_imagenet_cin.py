"""Class-conditional ImageNet transformer of the paper (cIN, on the f16-16384 VQGAN): 24 layers x 1536."""
import ml_collections

from configs.transformer_base import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    # 16384 codes; class tokens share the table (labels 0..999 as in taming's Labelator)
    c = base_config(vocab_size=16384, block_size=256, n_layer=24, n_head=16, n_embd=1536)
    c.cond.update(dict(kind="class", n_classes=1000, class_offset=0))
    c.optim.base_learning_rate = 4.5e-6
    return c

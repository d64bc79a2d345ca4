"""LlamaGen's GPT-B (111 M parameters, 12 layers x 768) on ImageNet codes: configs/transformer_llamagen_imagenet.py
at size GPT-B (that file takes any size by name: ``...imagenet.py:GPT-L``)."""
import ml_collections

from configs import transformer_llamagen_imagenet


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return transformer_llamagen_imagenet.get_config("GPT-B")

"""LlamaGen class-to-image GPT state_dict (FoundationVision/LlamaGen ``autoregressive/models/gpt.py``,
``Transformer``) -> :class:`transformer_jax.gpt.GPT` with the "llama" block, and the matching ``config.gpt``.

LlamaGen's keys: ``cls_embedding.embedding_table.weight``, ``tok_embeddings.weight``,
``layers.{i}.attention.wqkv.weight`` (query, key and value rows stacked), ``layers.{i}.attention.wo.weight``,
``layers.{i}.feed_forward.w1/w3/w2.weight``, ``layers.{i}.attention_norm/ffn_norm.weight``, ``norm.weight``,
``output.weight``; every Linear is PyTorch's (out, in).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from transformer_jax.blocks.llama import swiglu_hidden
from transformer_jax.gpt import GPT, gpt_from_config
from transformer_jax.state_dict_match import matched_arrays

# LlamaGen's ModelArgs and its defaults (a released checkpoint's arguments are these plus the size and the
# sampling script's vocab_size / block_size / num_classes / cls_token_num).
LLAMAGEN_MODEL_ARGS: dict[str, Any] = dict(
    dim=4096, n_layer=32, n_head=32, n_kv_head=None, multiple_of=256, ffn_dim_multiplier=None, rope_base=10000,
    norm_eps=1e-5, initializer_range=0.02, token_dropout_p=0.1, attn_dropout_p=0.0, resid_dropout_p=0.1,
    ffn_dropout_p=0.1, drop_path_rate=0.0, num_classes=1000, caption_dim=2048, class_dropout_prob=0.1,
    model_type="c2i", vocab_size=16384, cls_token_num=1, block_size=256, max_batch_size=32, max_seq_len=2048)

# The class-conditional sizes by name, as LlamaGen's gpt.py defines them (GPT_B ... GPT_XXL; GPT-3B is its
# text-conditional 3B shape, which its c2i_3B checkpoints use).
LLAMAGEN_GPT_SIZES: dict[str, dict[str, int]] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
}

# Buffers a LlamaGen state_dict may hold that are no weights: the RoPE table (recomputed from the config by
# transformer_jax.rope), and the KV caches and causal mask that setup_caches registers for sampling.
_BUFFER_SUFFIXES = (".kv_cache.k_cache", ".kv_cache.v_cache")
_BUFFER_KEYS = ("freqs_cis", "causal_mask")


def llamagen_model_args(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """LlamaGen's ModelArgs fields: ``model_args`` over LlamaGen's defaults, checked for what this port runs."""
    unknown = sorted(set(model_args) - set(LLAMAGEN_MODEL_ARGS))
    if unknown:
        raise ValueError(f"LlamaGen model_args: unknown fields {unknown}; known: {sorted(LLAMAGEN_MODEL_ARGS)}")
    a = {**LLAMAGEN_MODEL_ARGS, **dict(model_args)}
    if a["model_type"] != "c2i":
        raise ValueError(f"LlamaGen model_args: model_type {a['model_type']!r} is not supported; only 'c2i' "
                         "(class-conditional) models convert")
    if float(a["drop_path_rate"]) > 0:
        raise ValueError(f"LlamaGen model_args: drop_path_rate={a['drop_path_rate']} is not supported (the llama "
                         "block has no stochastic depth); use 0")
    if a["cls_token_num"] != 1:
        raise ValueError(f"LlamaGen model_args: cls_token_num={a['cls_token_num']} is not supported; LlamaGen's "
                         "class embedder gives one class token (cls_token_num=1)")
    grid = math.isqrt(int(a["block_size"]))
    if grid * grid != a["block_size"]:
        raise ValueError(f"LlamaGen model_args: block_size={a['block_size']} must be a square (the code grid)")
    if a["dim"] % a["n_head"]:
        raise ValueError(f"LlamaGen model_args: dim ({a['dim']}) must be divisible by n_head ({a['n_head']})")
    return a


def llamagen_gpt_config(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """The project's ``config.gpt`` (a plain dict) for a LlamaGen model: the llama block and its options; the
    GPT's block_size is the input length ``cls_token_num + codes - 1``; dropouts are LlamaGen's."""
    a = llamagen_model_args(model_args)
    return dict(
        vocab_size=int(a["vocab_size"]),
        block_size=int(a["cls_token_num"] + a["block_size"] - 1),
        n_layer=int(a["n_layer"]), n_head=int(a["n_head"]), n_embd=int(a["dim"]),
        embd_pdrop=float(a["token_dropout_p"]), resid_pdrop=float(a["resid_dropout_p"]),
        attn_pdrop=float(a["attn_dropout_p"]),
        block="llama",
        block_options=dict(
            grid_size=math.isqrt(int(a["block_size"])), cls_token_num=int(a["cls_token_num"]),
            num_classes=int(a["num_classes"]), null_class=bool(float(a["class_dropout_prob"]) > 0),
            n_kv_head=int(a["n_kv_head"] or 0), multiple_of=int(a["multiple_of"]),
            ffn_dim_multiplier=float(a["ffn_dim_multiplier"] or 0.0), rope_base=float(a["rope_base"]),
            norm_eps=float(a["norm_eps"]), ffn_pdrop=float(a["ffn_dropout_p"])),
    )


def llamagen_state_shapes(model_args: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The weights of a LlamaGen c2i Transformer with these ModelArgs: state_dict key -> shape (buffers aside)."""
    a = llamagen_model_args(model_args)
    c, h = a["dim"], a["n_head"]
    d, kv = c // h, a["n_kv_head"] or h
    hidden = swiglu_hidden(c, a["multiple_of"], a["ffn_dim_multiplier"])
    shapes = {"cls_embedding.embedding_table.weight": (a["num_classes"] + int(a["class_dropout_prob"] > 0), c),
              "tok_embeddings.weight": (a["vocab_size"], c)}
    for i in range(a["n_layer"]):
        b = f"layers.{i}."
        shapes[b + "attention.wqkv.weight"] = ((h + 2 * kv) * d, c)
        shapes[b + "attention.wo.weight"] = (c, c)
        shapes[b + "feed_forward.w1.weight"] = (hidden, c)
        shapes[b + "feed_forward.w3.weight"] = (hidden, c)
        shapes[b + "feed_forward.w2.weight"] = (c, hidden)
        shapes[b + "attention_norm.weight"] = (c,)
        shapes[b + "ffn_norm.weight"] = (c,)
    shapes["norm.weight"] = (c,)
    shapes["output.weight"] = (a["vocab_size"], c)
    return shapes


def _is_buffer(key: str) -> bool:
    return key in _BUFFER_KEYS or key.endswith(_BUFFER_SUFFIXES)


def from_llamagen(state_dict: Mapping[str, Any], model_args: Mapping[str, Any], **gpt_kwargs: Any
                  ) -> tuple[GPT, dict]:
    """``(GPT, {"params": ...})`` from a LlamaGen c2i ``Transformer`` state_dict (numpy or torch values) and its
    ``ModelArgs`` fields. Extra GPT fields (``dtype``, ``remat``, ``attention_impl``) go through ``gpt_kwargs``.

    Any missing key, unexpected key or shape mismatch raises one ValueError line naming them.
    """
    a = llamagen_model_args(model_args)
    arrays = matched_arrays(
        state_dict, llamagen_state_shapes(a),
        f"from_llamagen: state_dict does not match LlamaGen Transformer(dim={a['dim']}, n_layer={a['n_layer']}, "
        f"n_head={a['n_head']}, vocab_size={a['vocab_size']}, num_classes={a['num_classes']})", skip=_is_buffer)

    c, h = a["dim"], a["n_head"]
    d, kv = c // h, a["n_kv_head"] or h
    params: dict[str, Any] = {
        "tok_emb": arrays["tok_embeddings.weight"],
        "cls_emb": arrays["cls_embedding.embedding_table.weight"],
        "ln_f": {"scale": arrays["norm.weight"]},
        "head": {"kernel": arrays["output.weight"].T},
    }
    for i in range(a["n_layer"]):
        b = f"layers.{i}."
        wq, wk, wv = np.split(arrays[b + "attention.wqkv.weight"], [h * d, (h + kv) * d], axis=0)
        params[f"blocks_{i}"] = {
            "attention_norm": {"scale": arrays[b + "attention_norm.weight"]},
            "wq": {"kernel": wq.T.reshape(c, h, d)},
            "wk": {"kernel": wk.T.reshape(c, kv, d)},
            "wv": {"kernel": wv.T.reshape(c, kv, d)},
            "wo": {"kernel": arrays[b + "attention.wo.weight"].T.reshape(h, d, c)},
            "ffn_norm": {"scale": arrays[b + "ffn_norm.weight"]},
            "w1": {"kernel": arrays[b + "feed_forward.w1.weight"].T},
            "w3": {"kernel": arrays[b + "feed_forward.w3.weight"].T},
            "w2": {"kernel": arrays[b + "feed_forward.w2.weight"].T},
        }
    params = _contiguous(params)
    model = gpt_from_config({**llamagen_gpt_config(a), **gpt_kwargs})
    return model, {"params": params}


def _contiguous(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree)

"""taming minGPT state_dict <-> flax variables of :class:`transformer_jax.gpt.GPT`.

Key names are taming's (``tok_emb.weight``, ``pos_emb``, ``blocks.{i}.ln1/ln2/attn.key/query/value/proj``,
``blocks.{i}.mlp.0/mlp.2``, ``ln_f``, ``head.weight``); ``blocks.{i}.attn.mask`` buffers are ignored on
input (the model builds its mask from ``n_unmasked``) and regenerated on output. LlamaGen's GPT converts through
:func:`from_llamagen` (:mod:`transformer_jax.convert_llamagen`, re-exported here).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from transformer_jax.convert_llamagen import (LLAMAGEN_GPT_SIZES, from_llamagen,  # noqa: F401 (re-exported)
                                              llamagen_gpt_config)
from transformer_jax.gpt import GPT
from transformer_jax.state_dict_match import matched_arrays


def _expected_shapes(vocab_size: int, block_size: int, n_layer: int, n_embd: int) -> dict[str, tuple]:
    c = n_embd
    shapes = {"tok_emb.weight": (vocab_size, c), "pos_emb": (1, block_size, c)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[b + ln + ".weight"] = (c,)
            shapes[b + ln + ".bias"] = (c,)
        for name in ("key", "query", "value", "proj"):
            shapes[b + f"attn.{name}.weight"] = (c, c)
            shapes[b + f"attn.{name}.bias"] = (c,)
        shapes[b + "mlp.0.weight"] = (4 * c, c)
        shapes[b + "mlp.0.bias"] = (4 * c,)
        shapes[b + "mlp.2.weight"] = (c, 4 * c)
        shapes[b + "mlp.2.bias"] = (c,)
    shapes["ln_f.weight"] = (c,)
    shapes["ln_f.bias"] = (c,)
    shapes["head.weight"] = (vocab_size, c)
    return shapes


def _is_mask_key(key: str, n_layer: int) -> bool:
    return any(key == f"blocks.{i}.attn.mask" for i in range(n_layer))


def from_mingpt(state_dict: Mapping[str, Any], vocab_size: int, block_size: int, n_layer: int,
                n_head: int, n_embd: int, prefix: str = "", **gpt_kwargs: Any) -> tuple[GPT, dict]:
    """Build ``(GPT(...), {"params": ...})`` from a taming minGPT state_dict (numpy or torch values).

    ``prefix`` is stripped from the keys (e.g. ``"transformer."`` for a Net2NetTransformer checkpoint);
    other keys are ignored only if they do not start with ``prefix``. Extra GPT fields (``n_unmasked``,
    ``dtype``, dropouts, ``remat``) go through ``gpt_kwargs``. Any missing key, unexpected key or shape
    mismatch raises one ValueError listing them all.
    """
    if n_embd % n_head:
        raise ValueError(f"from_mingpt: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    arrays = matched_arrays(
        sd, _expected_shapes(vocab_size, block_size, n_layer, n_embd),
        f"from_mingpt: state_dict does not match GPT(vocab_size={vocab_size}, block_size={block_size}, "
        f"n_layer={n_layer}, n_embd={n_embd})", skip=lambda k: _is_mask_key(k, n_layer), shown=lambda k: prefix + k)

    c, h = n_embd, n_head
    d = c // h
    params: dict[str, Any] = {
        "tok_emb": arrays["tok_emb.weight"],
        "pos_emb": arrays["pos_emb"][0],
        "ln_f": {"scale": arrays["ln_f.weight"], "bias": arrays["ln_f.bias"]},
        "head": {"kernel": arrays["head.weight"].T},
    }
    for i in range(n_layer):
        b = f"blocks.{i}."
        attn = {name: {"kernel": arrays[b + f"attn.{name}.weight"].T.reshape(c, h, d),
                       "bias": arrays[b + f"attn.{name}.bias"].reshape(h, d)}
                for name in ("query", "key", "value")}
        attn["proj"] = {"kernel": arrays[b + "attn.proj.weight"].T.reshape(h, d, c),
                        "bias": arrays[b + "attn.proj.bias"]}
        params[f"blocks_{i}"] = {
            "ln1": {"scale": arrays[b + "ln1.weight"], "bias": arrays[b + "ln1.bias"]},
            "ln2": {"scale": arrays[b + "ln2.weight"], "bias": arrays[b + "ln2.bias"]},
            "attn": attn,
            "mlp_fc": {"kernel": arrays[b + "mlp.0.weight"].T, "bias": arrays[b + "mlp.0.bias"]},
            "mlp_out": {"kernel": arrays[b + "mlp.2.weight"].T, "bias": arrays[b + "mlp.2.bias"]},
        }
    params = _contiguous(params)
    model = GPT(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                n_embd=n_embd, **gpt_kwargs)
    return model, {"params": params}


def _contiguous(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree)


def to_mingpt(variables: Mapping[str, Any], n_unmasked: int = 0, include_mask: bool = True,
              prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of :func:`from_mingpt`: a taming-layout state_dict of numpy arrays (exact round trip).

    Sizes are read from the parameter shapes. ``include_mask`` adds the ``attn.mask`` buffers
    (lower-triangular, first ``n_unmasked`` tokens fully visible) so taming loads it with strict=True.
    """
    p = variables["params"] if "params" in variables else variables
    p = nn.meta.unbox(p)
    try:
        n_layer = sum(1 for k in p if k.startswith("blocks_"))
        block_size, c = np.shape(p["pos_emb"])
        h, d = np.shape(p["blocks_0"]["attn"]["query"]["kernel"])[1:]
    except (KeyError, ValueError) as e:
        raise ValueError(f"to_mingpt: variables do not look like GPT params ({e!r}); "
                         f"top-level keys: {sorted(p)}") from e
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    sd = {"pos_emb": f32(p["pos_emb"])[None], "tok_emb.weight": f32(p["tok_emb"])}
    mask = np.tril(np.ones((block_size, block_size), np.float32))
    mask[:n_unmasked, :n_unmasked] = 1.0
    for i in range(n_layer):
        blk, b = p[f"blocks_{i}"], f"blocks.{i}."
        sd[b + "ln1.weight"], sd[b + "ln1.bias"] = f32(blk["ln1"]["scale"]), f32(blk["ln1"]["bias"])
        sd[b + "ln2.weight"], sd[b + "ln2.bias"] = f32(blk["ln2"]["scale"]), f32(blk["ln2"]["bias"])
        if include_mask:
            sd[b + "attn.mask"] = mask[None, None].copy()
        for name in ("key", "query", "value"):
            sd[b + f"attn.{name}.weight"] = np.ascontiguousarray(
                f32(blk["attn"][name]["kernel"]).reshape(c, h * d).T)
            sd[b + f"attn.{name}.bias"] = f32(blk["attn"][name]["bias"]).reshape(h * d)
        sd[b + "attn.proj.weight"] = np.ascontiguousarray(
            f32(blk["attn"]["proj"]["kernel"]).reshape(h * d, c).T)
        sd[b + "attn.proj.bias"] = f32(blk["attn"]["proj"]["bias"])
        sd[b + "mlp.0.weight"] = np.ascontiguousarray(f32(blk["mlp_fc"]["kernel"]).T)
        sd[b + "mlp.0.bias"] = f32(blk["mlp_fc"]["bias"])
        sd[b + "mlp.2.weight"] = np.ascontiguousarray(f32(blk["mlp_out"]["kernel"]).T)
        sd[b + "mlp.2.bias"] = f32(blk["mlp_out"]["bias"])
    sd["ln_f.weight"], sd["ln_f.bias"] = f32(p["ln_f"]["scale"]), f32(p["ln_f"]["bias"])
    sd["head.weight"] = np.ascontiguousarray(f32(p["head"]["kernel"]).T)
    return {prefix + k: v for k, v in sd.items()}

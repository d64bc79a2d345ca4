"""The quantizer registry: ``model.quantizer.kind`` -> class, and the config rules around it.

``model.quantizer`` is a sub-config: ``kind`` plus that kind's options, which are the quantizer class's
dataclass fields after ``embed_dim`` (``embed_dim`` stays on the model). Adding a kind is one file with the
class (see :mod:`vqgan_jax.quantizers.base` for the contract) and one line in ``KINDS``. Nothing outside
this package compares the kind.

Configs written before the sub-config existed held the options flat on ``model`` (``model.n_embed``,
``model.quantizer='vq'``, ``model.use_ema``, ...); :func:`migrate_model_config` moves them under
``model.quantizer`` wherever a model config is read.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from vqgan_jax.quantizers.base import QuantizerHooks, QuantizerOutput
from vqgan_jax.quantizers.fsq import FSQ
from vqgan_jax.quantizers.gumbel import GumbelQuantize
from vqgan_jax.quantizers.lfq import LFQ
from vqgan_jax.quantizers.vq import VectorQuantizer

KINDS: dict[str, type] = {"vq": VectorQuantizer, "gumbel": GumbelQuantize, "fsq": FSQ, "lfq": LFQ}

_NOT_OPTIONS = {"embed_dim", "dtype", "parent", "name"}
# The previous layout's flat model keys and their defaults there (a key another kind uses is dropped when
# it holds that default, since the old base config carried every kind's keys).
_FLAT_DEFAULTS = dict(n_embed=1024, beta=0.25, legacy=True, kl_weight=5e-4, temperature=1.0,
                      l2_normalize=False, codebook_dim=0, use_ema=False, ema_decay=0.99, entropy_weight=0.0)

__all__ = ["KINDS", "QuantizerHooks", "QuantizerOutput", "build", "build_options", "codebook_size", "check_training",
           "default_options", "migrate_model_config", "options_of", "shape_keys"]


def _kind_class(kind: Any) -> type:
    if kind not in KINDS:
        raise ValueError(f"model.quantizer.kind must be one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind]


def options_of(kind: str) -> dict[str, Any]:
    """The options of ``kind`` with their defaults (its dataclass fields minus embed_dim); a required
    option (no default) maps to ``dataclasses.MISSING``."""
    fields = _kind_class(kind).__dataclass_fields__
    return {k: f.default for k, f in fields.items() if k not in _NOT_OPTIONS and f.init}


def default_options(kind: str = "vq", **overrides: Any) -> dict[str, Any]:
    """``{"kind": kind, **options}``: every option at its default except ``overrides`` (for configs)."""
    d = {"kind": kind, **{k: v for k, v in options_of(kind).items() if v is not dataclasses.MISSING}}
    d.update(overrides)
    _checked(d)
    return d


def migrate_model_config(model: Mapping[str, Any]) -> dict[str, Any]:
    """A model config with the quantizer's options under ``quantizer`` (the previous flat layout moved there).

    A flat key beside a ``quantizer`` sub-config is an error (one place per option); a flat key that the old
    layout's kind would not use is dropped when it holds the old default, refused otherwise.
    """
    d = dict(model)
    flat = {k: d.pop(k) for k in list(_FLAT_DEFAULTS) if k in d}
    q = d.get("quantizer", "vq")
    if isinstance(q, Mapping) or hasattr(q, "items"):
        if flat:
            raise ValueError(f"model.{sorted(flat)[0]}: the quantizer's options live under model.quantizer "
                             f"(model.quantizer.{sorted(flat)[0]}); remove the flat key")
        d["quantizer"] = dict(q.items())
        return d
    kind = q
    known = options_of(kind)
    opts = {}
    for k, v in flat.items():
        if k in known:
            opts[k] = v
        elif v and v != _FLAT_DEFAULTS[k]:
            raise ValueError(f"model.quantizer.kind={kind!r} does not use model.{k} (an option of another "
                             f"kind): turn it off or choose that kind")
    d["quantizer"] = {"kind": kind, **opts}
    return d


def _checked(q: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    kind = q.get("kind", "vq")
    cls = _kind_class(kind)
    known = options_of(kind)
    opts = {k: v for k, v in q.items() if k != "kind"}
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(f"model.quantizer.kind={kind!r} does not use model.quantizer.{unknown[0]} (its options: "
                         f"{sorted(known)}): remove it or choose another kind")
    required = sorted(k for k, v in known.items() if v is dataclasses.MISSING and k not in opts)
    if required:
        raise ValueError(f"model.quantizer.kind={kind!r} needs model.quantizer.{required[0]}")
    # JSON (config.json) turns tuples into lists; module fields must stay hashable
    opts = {k: (tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else v) for k, v in opts.items()}
    return cls, opts


def build_options(quantizer: Mapping[str, Any]) -> dict[str, Any]:
    """``{"kind", **options}`` checked against the kind, with JSON lists back as tuples."""
    _, opts = _checked(quantizer)
    return {"kind": quantizer.get("kind", "vq"), **opts}


def build(quantizer: Mapping[str, Any], embed_dim: int, **module_kwargs: Any) -> Any:
    """The quantizer module for a ``model.quantizer`` sub-config (unbound outside a module's setup)."""
    cls, opts = _checked(quantizer)
    cls.check_options(quantizer.get("kind", "vq"), opts, int(embed_dim))
    return cls(embed_dim=int(embed_dim), **opts, **module_kwargs)


def codebook_size(model: Mapping[str, Any]) -> int:
    """How many codes the quantizer of a model config (either layout) has: stage two's vocabulary."""
    m = migrate_model_config(model)
    return build(m["quantizer"], int(m.get("embed_dim", 256))).codebook_size


def check_training(config: Any) -> None:
    """Refuse training options the configured quantizer would silently ignore (one line)."""
    q = migrate_model_config(config.model)["quantizer"]
    cls, opts = _checked(q)
    cls.check_training(q.get("kind", "vq"), opts, config.loss)


def shape_keys() -> tuple[str, ...]:
    """The ``model.quantizer.*`` keys that define weight or state shapes, over every kind."""
    names = {"kind"}
    for cls in KINDS.values():
        names.update(cls.shape_options)
    return tuple(f"model.quantizer.{k}" for k in sorted(names))

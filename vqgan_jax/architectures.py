"""The stage-one architecture registry: ``model.arch`` -> model class, and the one place that builds a model.

``taming`` (:class:`vqgan_jax.model.VQGAN`, the default when ``model.arch`` is absent, as in every config written
before the key existed) or ``llamagen`` (:class:`vqgan_jax.llamagen_tokenizer.LlamaGenVQ`). Every class offers
the same methods (:class:`vqgan_jax.model.StageOneMethods`), so the stage-one Task, the code encoder, the Sampler
and the converters use any of them unchanged. Adding one is a module with the class (``arch``,
``shape_options``, ``from_config``) and one line in ``ARCHS``.
"""
from __future__ import annotations

from typing import Any, Mapping

from vqgan_jax.llamagen_tokenizer import LlamaGenVQ
from vqgan_jax.model import VQGAN

ARCHS: dict[str, type] = {"taming": VQGAN, "llamagen": LlamaGenVQ}
DEFAULT = "taming"


def arch_class(model: Mapping[str, Any]) -> type:
    """The class of ``model.arch`` (taming when the key is absent); one line naming the choices otherwise."""
    arch = model.get("arch", DEFAULT)
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {sorted(ARCHS)}, got {arch!r}")
    return ARCHS[arch]


def from_config(model: Any) -> Any:
    """The stage-one model of a ``config.model`` (either quantizer layout, any architecture)."""
    return arch_class(model).from_config(model)


def shape_keys() -> tuple[str, ...]:
    """The ``model.*`` keys (outside ``model.quantizer``) that define weight shapes, over every architecture."""
    names = {"arch"}
    for cls in ARCHS.values():
        names.update(cls.shape_options)
    return tuple(f"model.{k}" for k in sorted(names))

"""What every conditioning kind provides, and the parts they share (the null prefix, condition dropout,
classifier-free guidance checks, the checks of the condition a Sampler call passes).

The stage-two GPT sees ``[cond tokens | image tokens]`` in one shared vocabulary (as in taming, cond and image
ids may overlap; positions tell them apart). A kind turns a batch's condition into those cond tokens. For
classifier-free guidance (beyond taming) the whole prefix is replaced by ``cond.null_token`` with probability
``cond.cfg_dropout`` in training, and sampling mixes the logits of the conditional and the null prefix.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def drop_condition(rng: jax.Array, prefix: jax.Array, p: float, null_token: int) -> jax.Array:
    """Replace whole prefixes by ``null_token`` with probability ``p`` per example (CFG training)."""
    if p <= 0:
        return prefix
    drop = jax.random.bernoulli(rng, p, (prefix.shape[0], 1))
    return jnp.where(drop, jnp.int32(null_token), prefix)


class Conditioning:
    """One conditioning kind over the ``cond`` config section.

    The section's fields are read when needed, not copied at construction, so any object holding the fields a
    method needs serves (a stand-in with ``kind`` and ``n_classes`` is enough for the launch scripts' checks).
    A kind sets the class attributes below and implements :meth:`prefix` (and :meth:`sampler_value` if it
    takes a condition at sampling); the rest is shared.
    """
    name: ClassVar[str]                 # its ``cond.kind``
    description: ClassVar[str]          # how messages name its models, e.g. "class-conditional"
    conditional: ClassVar[bool] = True  # whether the prefix depends on the example (classifier-free guidance)
    # The keyword of Sampler.sample / sample_codes / sample_large that carries the condition (None: none), and
    # how the error for a missing one describes it.
    sampler_arg: ClassVar[str | None] = None
    sampler_arg_help: ClassVar[str] = ""
    # What a dataset example provides: the image dataset's feature, and the batch key the prefix reads (the
    # same feature, or the cond stage's codes of it).
    example_feature: ClassVar[str] = "label"
    batch_key: ClassVar[str] = "label"
    uses_cond_stage: ClassVar[bool] = False  # a second frozen VQ model encodes example_feature to batch_key
    # cond.* keys that fix which tokens the weights learnt (a resume may not change them).
    layout_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # -- config --------------------------------------------------------------------------------
    def check(self, vocab_size: int, prefix_table: tuple[int, int] = (0, 0)) -> None:
        """One clear error for a config whose tokens do not fit the vocabulary, or, for a GPT whose block embeds
        its leading positions from a table of its own (``prefix_table`` = (positions, rows), e.g. the LLaMA
        block's class table), that table."""
        if prefix_table[0]:
            self.check_table(*prefix_table)
            return
        self.check_layout(vocab_size)
        if self.cfg.cfg_dropout > 0 and not 0 <= self.cfg.null_token < vocab_size:
            raise ValueError(f"cond.null_token={self.cfg.null_token} is outside the vocabulary [0, {vocab_size})")

    def check_layout(self, vocab_size: int) -> None:
        """The kind's own token checks."""

    def check_table(self, positions: int, rows: int) -> None:
        """The kind's checks against a block's own prefix table; only kinds whose prefix is table ids pass."""
        raise ValueError(f"cond.kind={self.name!r} does not fit this GPT: its block embeds the first {positions} "
                         f"position(s) from a class table of its own ({rows} rows); use cond.kind='class'")

    def prefix_length(self, cond_grid: tuple[int, int] | None = None) -> int:
        """Tokens in the prefix; ``cond_grid``: the cond stage's code grid, for kinds that use one."""
        return 1

    # -- prefixes ------------------------------------------------------------------------------
    def prefix(self, batch: Mapping[str, Any], batch_size: int) -> jax.Array:
        """(B, n_cond) int32 prefix of a batch holding ``batch_key`` (evaluation and sampling)."""
        raise NotImplementedError

    def training_prefix(self, batch: Mapping[str, Any], batch_size: int, rng: jax.Array) -> jax.Array:
        """:meth:`prefix` with whole prefixes dropped to the null token at rate ``cond.cfg_dropout``."""
        return drop_condition(rng, self.prefix(batch, batch_size), self.cfg.cfg_dropout, self.cfg.null_token)

    def null_prefix(self, like: jax.Array) -> jax.Array:
        """The prefix of the unconditional branch of classifier-free guidance."""
        return jnp.full_like(like, self.cfg.null_token)

    # -- sampler arguments ---------------------------------------------------------------------
    @property
    def takes_labels(self) -> bool:
        return self.sampler_arg == "labels"

    @property
    def takes_cond_codes(self) -> bool:
        return self.sampler_arg == "cond_codes"

    def taken(self, conditions: Mapping[str, Any]) -> Any:
        """The value of this kind's sampler argument among ``conditions`` (keyword -> value or None); a missing
        one, or one this kind does not take, is an error, not silently ignored."""
        arg = self.sampler_arg
        if arg is not None and conditions.get(arg) is None:
            raise ValueError(f"this model is {self.description}: pass {arg} {self.sampler_arg_help}")
        for other, value in conditions.items():
            if value is not None and other != arg:
                from transformer_jax.conditions import KINDS
                owner = next((k.description for k in KINDS.values() if k.sampler_arg == other), "other")
                raise ValueError(f"{other} are for {owner} models; this one is {self.name}")
        return None if arg is None else conditions[arg]

    def sampler_value(self, value: Any, n: int, cond_grid: tuple[int, int] | None) -> np.ndarray:
        """The sampler argument of ``n`` samples, checked, as the batch's ``batch_key``."""
        raise NotImplementedError

    def sampling_prefix(self, n: int, conditions: Mapping[str, Any],
                        cond_grid: tuple[int, int] | None = None) -> jax.Array:
        """The prefix of ``n`` samples from the Sampler's keyword arguments ``conditions``; ``cond_grid``: the
        cond stage's grid at the training size, when known."""
        value = self.taken(conditions)
        batch = {} if value is None else {self.batch_key: self.sampler_value(value, n, cond_grid)}
        return self.prefix(batch, n)

    def window_condition(self, n: int, conditions: Mapping[str, Any], cond_grid: tuple[int, int] | None = None
                         ) -> tuple[jax.Array | None, jax.Array | None]:
        """(prefix, cond_grid) of sliding-window sampling: a fixed prefix here; a kind whose condition is a
        grid cropped with the window returns that grid instead."""
        return self.sampling_prefix(n, conditions, cond_grid), None

    def check_guidance(self, guidance_scale: float | None) -> None:
        """Raise unless this model supports classifier-free guidance (or ``guidance_scale`` is None)."""
        if guidance_scale is None:
            return
        if not self.conditional:
            raise ValueError(f"guidance_scale needs a conditional model; this one is {self.name}")
        if not self.cfg.cfg_dropout > 0:
            # The null prefix is then a token the model never saw in that role: no unconditional branch.
            raise ValueError("guidance_scale needs a model trained with condition dropout (cond.cfg_dropout > 0); "
                             f"this one has cond.cfg_dropout={self.cfg.cfg_dropout}")

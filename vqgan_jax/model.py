"""VQGAN: taming's Encoder / Decoder around a vector quantizer, NHWC.

The Encoder and Decoder serve every stage-one architecture: each supplies only its module names (:class:`Names`)
and the levels that carry attention. ``VQGAN`` is configured by the fields of taming's ``ddconfig`` plus
``embed_dim`` and ``quantizer`` (a sub-config: ``kind`` and that kind's options, :mod:`vqgan_jax.quantizers`);
parameter names mirror taming's state-dict keys (``down_0_block_1`` <-> ``down.0.block.1``) so checkpoints
convert one to one.
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax.layers import Conv
from vqgan_jax.layers import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample, swish
from vqgan_jax import quantizers


# Rematerialise each ResnetBlock in training when memory, not compute, is the limit.
RematResnetBlock = nn.remat(ResnetBlock, static_argnums=(2,))


class Names(NamedTuple):
    """How an architecture names the modules of its encoder or decoder (its checkpoints' keys, so they convert one
    to one). Each name is a format string of ``i``, the level (0 at full resolution, as the encoder counts),
    ``k``, the level's place in the loop (the encoder's k is i; the decoder's is 0 at the lowest resolution), and,
    for blocks and attention, ``j``, the block within the level."""
    block: str
    attn: str
    resample: str                       # the encoder's Downsample, the decoder's Upsample, after each level but one
    middle: tuple[str, str, str]        # resnet block, attention, resnet block at the lowest resolution


class Trunk(nn.Module):
    """An encoder's or decoder's fields: base channels, per-level multipliers, blocks per level, ``conv_out``'s
    channels, the architecture's module names, and the levels (0 at full resolution) whose ResnetBlocks are each
    followed by attention."""
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int
    names: Names
    attn_levels: Sequence[int]
    dropout: float = 0.0
    dtype: Any = None
    remat: bool = False

    # The helpers below create submodules: they run inside the subclass's compact __call__, which owns them.
    def _block(self, h: jax.Array, name: str, features: int, deterministic: bool) -> jax.Array:
        block = RematResnetBlock if self.remat else ResnetBlock
        return block(features, self.dropout, self.dtype, name=name)(h, deterministic)

    def _level(self, h: jax.Array, i: int, k: int, blocks: int, deterministic: bool) -> jax.Array:
        """The ResnetBlocks of level ``i`` at ``ch * ch_mult[i]`` channels, each with its attention if any."""
        for j in range(blocks):
            h = self._block(h, self.names.block.format(i=i, k=k, j=j), self.ch * self.ch_mult[i], deterministic)
            if i in self.attn_levels:
                h = AttnBlock(self.dtype, name=self.names.attn.format(i=i, k=k, j=j))(h)
        return h

    def _middle(self, h: jax.Array, deterministic: bool) -> jax.Array:
        block_1, attn, block_2 = self.names.middle
        h = self._block(h, block_1, h.shape[-1], deterministic)
        h = AttnBlock(self.dtype, name=attn)(h)
        return self._block(h, block_2, h.shape[-1], deterministic)

    def _out(self, h: jax.Array, pre_out_only: bool = False) -> jax.Array:
        """GroupNorm ``norm_out``, swish, then the 3x3 ``conv_out``; ``pre_out_only`` stops before the conv (the
        adaptive GAN weight needs that activation)."""
        h = swish(Normalize("norm_out", self.dtype)(h))
        return h if pre_out_only else Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(h)


class Encoder(Trunk):
    """Images -> latents: ``conv_in``, the levels from full resolution down, the middle, ``conv_out``."""

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        n = len(self.ch_mult)
        h = Conv(self.ch, (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x)
        for i in range(n):
            h = self._level(h, i, i, self.num_res_blocks, deterministic)
            if i != n - 1:
                h = Downsample(self.dtype, name=self.names.resample.format(i=i, k=i))(h)
        return self._out(self._middle(h, deterministic))


class Decoder(Trunk):
    """Latents -> images: ``conv_in``, the middle, the levels from the lowest resolution up (one more block each
    than the encoder's), ``conv_out``."""

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True, pre_out_only: bool = False) -> jax.Array:
        """``pre_out_only`` stops before ``conv_out`` (the adaptive GAN weight needs it)."""
        n = len(self.ch_mult)
        h = Conv(self.ch * self.ch_mult[-1], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(z)
        h = self._middle(h, deterministic)
        for k, i in enumerate(reversed(range(n))):
            h = self._level(h, i, k, self.num_res_blocks + 1, deterministic)
            if i != 0:
                h = Upsample(self.dtype, name=self.names.resample.format(i=i, k=k))(h)
        return self._out(h, pre_out_only)


TAMING_MIDDLE = ("mid_block_1", "mid_attn_1", "mid_block_2")
TAMING_ENCODER = Names("down_{i}_block_{j}", "down_{i}_attn_{j}", "down_{i}_downsample", TAMING_MIDDLE)
TAMING_DECODER = Names("up_{i}_block_{j}", "up_{i}_attn_{j}", "up_{i}_upsample", TAMING_MIDDLE)


def taming_attn_levels(resolution: int, levels: int, attn_resolutions: Sequence[int]
                       ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The encoder's and the decoder's attention levels: those whose size in pixels is in ``attn_resolutions``.

    As in taming, the encoder halves ``resolution`` per level and the decoder doubles the lowest level's size, so
    the two differ when ``resolution`` is not a multiple of ``2 ** (levels - 1)``."""
    lowest = resolution // 2 ** (levels - 1)
    enc = tuple(i for i in range(levels) if resolution // 2 ** i in attn_resolutions)
    dec = tuple(i for i in range(levels) if lowest * 2 ** (levels - 1 - i) in attn_resolutions)
    return enc, dec


class EncodeOutput(NamedTuple):
    h: jax.Array            # encoder output (B, h, w, z_channels)
    z: jax.Array            # after quant_conv (B, h, w, embed_dim)
    z_q: jax.Array          # quantized, straight-through (B, h, w, embed_dim)
    indices: jax.Array      # (B, h, w) int32
    loss: jax.Array         # codebook (+ commitment / KL) loss
    perplexity: jax.Array
    usage: jax.Array        # (codebook_size,) counts in this batch


def fields_from_config(cls: type, cfg: Any, tuple_keys: Sequence[str]) -> dict[str, Any]:
    """A stage-one model's constructor arguments from a config/dict; unknown keys are an error (one line).

    A config of the previous layout (quantizer options flat on the model) is moved first; ``arch`` is the
    registry's key (:mod:`vqgan_jax.architectures`), checked against ``cls.arch`` and dropped."""
    d = quantizers.migrate_model_config(cfg)
    arch = d.pop("arch", "taming")
    if arch != cls.arch:
        raise ValueError(f"model.arch={arch!r} is not built by {cls.__name__} (model.arch={cls.arch!r}); build "
                         "stage-one models with vqgan_jax.architectures.from_config")
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} config: unknown keys {unknown}; known: {sorted(fields | {'arch'})}")
    for k in tuple_keys:
        if k in d:
            d[k] = tuple(int(v) for v in d[k])
    if isinstance(d.get("dtype"), str):
        d["dtype"] = jnp.dtype(d["dtype"]) if d["dtype"] else None
    embed_dim = int(d.get("embed_dim", cls.__dataclass_fields__["embed_dim"].default))
    quantizers.build(d["quantizer"], embed_dim)  # refuse bad options here
    d["quantizer"] = tuple(sorted(quantizers.build_options(d["quantizer"]).items()))
    return d


class StageOneMethods:
    """What the stage-one Task, the code encoder, the Sampler and the converters call on any architecture.

    A subclass is a Flax module whose ``setup`` defines ``encoder``, ``decoder`` (taking ``deterministic`` and
    ``pre_out_only``, its last conv named ``conv_out``), ``quant_conv``, ``post_quant_conv`` and ``quantize``,
    and has the fields ``embed_dim``, ``quantizer`` and ``ch_mult`` (the encoder's levels)."""

    def quantizer_def(self) -> Any:
        """The quantizer as an unbound module: its codebook size, options and state-update rules."""
        return quantizers.build(dict(self.quantizer), self.embed_dim, parent=None)

    @property
    def codebook_size(self) -> int:
        return self.quantizer_def().codebook_size

    @property
    def downsample_factor(self) -> int:
        """Image pixels per code along each side: one halving per level after the first of ``ch_mult``."""
        return 2 ** (len(self.ch_mult) - 1)

    def encode(self, x: jax.Array, train: bool = False, temperature: Any = None) -> EncodeOutput:
        """Images NHWC in [-1, 1] -> codes and quantized latents."""
        h = self.encoder(x, deterministic=not train)
        z = self.quant_conv(h).astype(jnp.float32)
        q = self.quantize(z, train=train, temperature=temperature)
        return EncodeOutput(h, z, q.z_q, q.indices, q.loss, q.perplexity, q.usage)

    def decode_pre_out(self, z_q: jax.Array, train: bool = False) -> jax.Array:
        """Quantized latents -> decoder activation entering ``decoder.conv_out``."""
        return self.decoder(self.post_quant_conv(z_q), deterministic=not train, pre_out_only=True)

    def decode(self, z_q: jax.Array, train: bool = False) -> jax.Array:
        return self.decoder(self.post_quant_conv(z_q), deterministic=not train)

    def embed_code(self, indices: jax.Array) -> jax.Array:
        """Codes (B, h, w) -> quantized latents (B, h, w, embed_dim)."""
        return self.quantize.embed_code(indices)

    def decode_code(self, indices: jax.Array) -> jax.Array:
        """Codes (B, h, w) int -> reconstructed images NHWC (unbounded, nominally [-1, 1])."""
        return self.decode(self.embed_code(indices))

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, EncodeOutput]:
        enc = self.encode(x, train=train)
        return self.decode(enc.z_q, train=train), enc


class VQGAN(StageOneMethods, nn.Module):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> Decoder (taming ``VQModel``/``GumbelVQ``)."""
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    double_z: bool = False
    embed_dim: int = 256
    # ``model.quantizer`` as sorted (option, value) pairs, "kind" among them (hashable, as module fields are)
    quantizer: tuple = (("kind", "vq"), ("n_embed", 1024))
    dtype: Any = None               # compute dtype (e.g. jnp.bfloat16); params stay float32
    remat: bool = False

    arch: ClassVar[str] = "taming"
    # model keys (beside model.quantizer.*) that define the weights' shapes
    shape_options: ClassVar[tuple[str, ...]] = (
        "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution", "in_channels", "out_ch",
        "double_z", "embed_dim")

    @classmethod
    def from_config(cls, cfg: Any) -> "VQGAN":
        """Build from a config/dict holding (a subset of) this module's fields; unknown keys are an error.

        A config of the previous layout (quantizer options flat on the model) is moved first."""
        return cls(**fields_from_config(cls, cfg, ("ch_mult", "attn_resolutions")))

    def setup(self):
        enc_attn, dec_attn = taming_attn_levels(self.resolution, len(self.ch_mult), tuple(self.attn_resolutions))
        trunk = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                     dropout=self.dropout, dtype=self.dtype, remat=self.remat)
        self.encoder = Encoder(out_channels=2 * self.z_channels if self.double_z else self.z_channels,
                               names=TAMING_ENCODER, attn_levels=enc_attn, **trunk)
        self.decoder = Decoder(out_channels=self.out_ch, names=TAMING_DECODER, attn_levels=dec_attn, **trunk)
        self.quant_conv = Conv(self.embed_dim, (1, 1))
        self.post_quant_conv = Conv(self.z_channels, (1, 1))
        self.quantize = quantizers.build(dict(self.quantizer), self.embed_dim)

"""VQGAN: taming's Encoder / Decoder around a vector quantizer, NHWC.

Configured by the fields of taming's ``ddconfig`` plus ``embed_dim`` and ``quantizer`` (a sub-config: ``kind`` and
that kind's options, :mod:`vqgan_jax.quantizers`); parameter names mirror
taming's state-dict keys (``down_0_block_1`` <-> ``down.0.block.1``) so checkpoints convert one to one.
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax.layers import Conv
from vqgan_jax.layers import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample, swish
from vqgan_jax import quantizers


def resnet_block(remat: bool):
    # Rematerialise each ResnetBlock in training when memory, not compute, is the limit.
    return nn.remat(ResnetBlock, static_argnums=(2,)) if remat else ResnetBlock


TAMING_MIDDLE = ("mid_block_1", "mid_attn_1", "mid_block_2")


def middle(h: jax.Array, block: Any, dropout: float, dtype: Any, deterministic: bool, names: Sequence[str]
           ) -> jax.Array:
    """The lowest-resolution middle of an encoder or decoder: resnet block, attention, resnet block (called inside
    a compact method, whose module owns the three, under ``names``)."""
    c = h.shape[-1]
    h = block(c, dropout, dtype, name=names[0])(h, deterministic)
    h = AttnBlock(dtype, name=names[1])(h)
    return block(c, dropout, dtype, name=names[2])(h, deterministic)


def out_conv(h: jax.Array, features: int, dtype: Any, pre_out_only: bool = False) -> jax.Array:
    """GroupNorm ``norm_out``, swish, then the 3x3 ``conv_out``; ``pre_out_only`` stops before the conv (the
    adaptive GAN weight needs that activation)."""
    h = swish(Normalize("norm_out", dtype)(h))
    return h if pre_out_only else Conv(features, (3, 3), padding=1, dtype=dtype, name="conv_out")(h)


class Trunk(nn.Module):
    """The fields every encoder and decoder takes first: base channels, per-level multipliers, blocks per level."""
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int


class Encoder(Trunk):
    attn_resolutions: Sequence[int]
    z_channels: int
    resolution: int
    dropout: float = 0.0
    double_z: bool = False
    dtype: Any = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        block = resnet_block(self.remat)
        h = Conv(self.ch, (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x)
        res = self.resolution
        n = len(self.ch_mult)
        for i in range(n):
            for j in range(self.num_res_blocks):
                h = block(self.ch * self.ch_mult[i], self.dropout, self.dtype,
                          name=f"down_{i}_block_{j}")(h, deterministic)
                if res in self.attn_resolutions:
                    h = AttnBlock(self.dtype, name=f"down_{i}_attn_{j}")(h)
            if i != n - 1:
                h = Downsample(self.dtype, name=f"down_{i}_downsample")(h)
                res //= 2
        h = middle(h, block, self.dropout, self.dtype, deterministic, TAMING_MIDDLE)
        return out_conv(h, 2 * self.z_channels if self.double_z else self.z_channels, self.dtype)


class Decoder(Trunk):
    attn_resolutions: Sequence[int]
    out_ch: int
    resolution: int
    dropout: float = 0.0
    dtype: Any = None
    remat: bool = False

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True, pre_out_only: bool = False) -> jax.Array:
        """Latents -> images; ``pre_out_only`` stops before ``conv_out`` (the adaptive GAN weight needs it)."""
        block = resnet_block(self.remat)
        n = len(self.ch_mult)
        c = self.ch * self.ch_mult[-1]
        res = self.resolution // 2 ** (n - 1)
        h = Conv(c, (3, 3), padding=1, dtype=self.dtype, name="conv_in")(z)
        h = middle(h, block, self.dropout, self.dtype, deterministic, TAMING_MIDDLE)
        for i in reversed(range(n)):
            for j in range(self.num_res_blocks + 1):
                h = block(self.ch * self.ch_mult[i], self.dropout, self.dtype,
                          name=f"up_{i}_block_{j}")(h, deterministic)
                if res in self.attn_resolutions:
                    h = AttnBlock(self.dtype, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = Upsample(self.dtype, name=f"up_{i}_upsample")(h)
                res *= 2
        return out_conv(h, self.out_ch, self.dtype, pre_out_only)


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
        dd = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                  dropout=self.dropout, dtype=self.dtype, remat=self.remat)
        self.encoder = Encoder(z_channels=self.z_channels, double_z=self.double_z, **dd)
        self.decoder = Decoder(out_ch=self.out_ch, **dd)
        self.quant_conv = Conv(self.embed_dim, (1, 1))
        self.post_quant_conv = Conv(self.z_channels, (1, 1))
        self.quantize = quantizers.build(dict(self.quantizer), self.embed_dim)

"""LlamaGen's VQ tokenizer (``tokenizer/tokenizer_image/vq_model.py``) as a stage-one architecture, NHWC.

``model.arch = "llamagen"``. The building blocks are taming's (:mod:`vqgan_jax.layers`: GroupNorm(32), swish,
ResnetBlock, single-head AttnBlock, padded stride-2 Downsample, nearest Upsample); what differs from the taming
VQGAN is where they sit:
- attention only at the lowest resolution, after each ResnetBlock of the last encoder level and of the first
  decoder level, whatever the image size (taming places it by ``attn_resolutions`` in pixels);
- the encoder's and decoder's channel multipliers are separate (``ch_mult`` and ``decoder_ch_mult``);
- the decoder's ``conv_blocks`` are numbered from the lowest resolution up;
- the codebook is low-dimensional (``embed_dim``, 8 in the releases) with both the latents and the codes
  l2-normalised: the ``vq`` quantizer with ``l2_normalize=True`` and ``legacy=False`` (beta on the commitment
  term), see :func:`vqgan_jax.convert.llamagen_vq_config`.

Parameter names mirror LlamaGen's state-dict keys (``conv_blocks_2_attn_0`` <-> ``conv_blocks.2.attn.0``,
``mid_1`` <-> ``mid.1``) so its checkpoints convert one to one.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax

from common_jax.layers import Conv
from vqgan_jax import quantizers
from vqgan_jax.layers import AttnBlock, Downsample, Upsample
from vqgan_jax.model import StageOneMethods, Trunk, fields_from_config, middle, out_conv, resnet_block

LLAMAGEN_MIDDLE = ("mid_0", "mid_1", "mid_2")


class LlamaGenEncoder(Trunk):
    z_channels: int
    dropout: float = 0.0
    dtype: Any = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        block = resnet_block(self.remat)
        n = len(self.ch_mult)
        h = Conv(self.ch, (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x)
        for i in range(n):
            for j in range(self.num_res_blocks):
                h = block(self.ch * self.ch_mult[i], self.dropout, self.dtype,
                          name=f"conv_blocks_{i}_res_{j}")(h, deterministic)
                if i == n - 1:
                    h = AttnBlock(self.dtype, name=f"conv_blocks_{i}_attn_{j}")(h)
            if i != n - 1:
                h = Downsample(self.dtype, name=f"conv_blocks_{i}_downsample")(h)
        h = middle(h, block, self.dropout, self.dtype, deterministic, LLAMAGEN_MIDDLE)
        return out_conv(h, self.z_channels, self.dtype)


class LlamaGenDecoder(Trunk):
    out_ch: int
    dropout: float = 0.0
    dtype: Any = None
    remat: bool = False

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True, pre_out_only: bool = False) -> jax.Array:
        """Latents -> images; ``pre_out_only`` stops before ``conv_out`` (the adaptive GAN weight needs it)."""
        block = resnet_block(self.remat)
        n = len(self.ch_mult)
        c = self.ch * self.ch_mult[-1]
        h = Conv(c, (3, 3), padding=1, dtype=self.dtype, name="conv_in")(z)
        h = middle(h, block, self.dropout, self.dtype, deterministic, LLAMAGEN_MIDDLE)
        # conv_blocks_0 is the lowest resolution (level n-1 of the encoder), the last one full resolution.
        for k, level in enumerate(reversed(range(n))):
            for j in range(self.num_res_blocks + 1):
                h = block(self.ch * self.ch_mult[level], self.dropout, self.dtype,
                          name=f"conv_blocks_{k}_res_{j}")(h, deterministic)
                if k == 0:
                    h = AttnBlock(self.dtype, name=f"conv_blocks_{k}_attn_{j}")(h)
            if level != 0:
                h = Upsample(self.dtype, name=f"conv_blocks_{k}_upsample")(h)
        return out_conv(h, self.out_ch, self.dtype, pre_out_only)


# LlamaGen's VQ ModelArgs defaults, in this project's names (the released c2i tokenizers use them).
DEFAULT_QUANTIZER = (("beta", 0.25), ("codebook_dim", 0), ("entropy_eps", 1e-5), ("entropy_temperature", 0.01),
                     ("entropy_weight", 0.0), ("kind", "vq"), ("l2_normalize", True), ("legacy", False),
                     ("n_embed", 16384))


class LlamaGenVQ(StageOneMethods, nn.Module):
    """Encoder -> quant_conv -> l2-normalised VQ -> post_quant_conv -> Decoder (LlamaGen ``VQModel``)."""
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)        # LlamaGen's encoder_ch_mult
    decoder_ch_mult: Sequence[int] = ()             # empty: the same as ch_mult
    num_res_blocks: int = 2
    z_channels: int = 256
    resolution: int = 256       # the training crop only: the architecture works at any multiple of the factor
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    embed_dim: int = 8          # LlamaGen's codebook_embed_dim
    quantizer: tuple = DEFAULT_QUANTIZER
    dtype: Any = None
    remat: bool = False

    arch: ClassVar[str] = "llamagen"
    shape_options: ClassVar[tuple[str, ...]] = (
        "ch", "ch_mult", "decoder_ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch", "embed_dim")

    @classmethod
    def from_config(cls, cfg: Any) -> "LlamaGenVQ":
        """Build from a config/dict of this module's fields (``arch`` may be given); unknown keys are an error."""
        d = fields_from_config(cls, cfg, ("ch_mult", "decoder_ch_mult"))
        enc, dec = d.get("ch_mult", cls.ch_mult), d.get("decoder_ch_mult") or ()
        if dec and len(dec) != len(enc):
            raise ValueError(f"model.decoder_ch_mult={list(dec)} has {len(dec)} levels but model.ch_mult={list(enc)} "
                             f"has {len(enc)}: the decoder must upsample by the encoder's factor")
        return cls(**d)

    def setup(self):
        common = dict(ch=self.ch, num_res_blocks=self.num_res_blocks, dropout=self.dropout, dtype=self.dtype,
                      remat=self.remat)
        self.encoder = LlamaGenEncoder(ch_mult=tuple(self.ch_mult), z_channels=self.z_channels, **common)
        self.decoder = LlamaGenDecoder(ch_mult=tuple(self.decoder_ch_mult or self.ch_mult), out_ch=self.out_ch,
                                       **common)
        self.quant_conv = Conv(self.embed_dim, (1, 1))
        self.post_quant_conv = Conv(self.z_channels, (1, 1))
        self.quantize = quantizers.build(dict(self.quantizer), self.embed_dim)

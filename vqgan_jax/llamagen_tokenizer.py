"""LlamaGen's VQ tokenizer (``tokenizer/tokenizer_image/vq_model.py``) as a stage-one architecture, NHWC.

``model.arch = "llamagen"``. The building blocks are taming's (:mod:`vqgan_jax.layers`: GroupNorm(32), swish,
ResnetBlock, single-head AttnBlock, padded stride-2 Downsample, nearest Upsample) in the shared
:class:`vqgan_jax.model.Encoder` / ``Decoder``; what differs from the taming VQGAN is where they sit and their names:
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

from common_jax.layers import Conv
from vqgan_jax import quantizers
from vqgan_jax.model import Decoder, Encoder, Names, StageOneMethods, fields_from_config

# conv_blocks_{k} in loop order: the encoder's from full resolution down, the decoder's from the lowest up.
LLAMAGEN_MIDDLE = ("mid_0", "mid_1", "mid_2")
LLAMAGEN_ENCODER = Names("conv_blocks_{k}_res_{j}", "conv_blocks_{k}_attn_{j}", "conv_blocks_{k}_downsample",
                         LLAMAGEN_MIDDLE)
LLAMAGEN_DECODER = LLAMAGEN_ENCODER._replace(resample="conv_blocks_{k}_upsample")



def llamagen_quantizer(n_embed: int = 16384, beta: float = 0.25, l2_normalize: bool = True,
                       entropy_weight: float = 0.0) -> dict[str, Any]:
    """LlamaGen's ``VectorQuantizer`` as this project's ``vq`` options (the defaults are its ModelArgs defaults,
    which the released c2i tokenizers use): beta on the commitment term (``legacy=False``), the entropy loss
    with LlamaGen's temperature and epsilon."""
    return quantizers.default_options("vq", n_embed=n_embed, beta=beta, legacy=False, l2_normalize=l2_normalize,
                                      codebook_dim=0, entropy_weight=entropy_weight, entropy_temperature=0.01,
                                      entropy_eps=1e-5)


DEFAULT_QUANTIZER = tuple(sorted(llamagen_quantizer().items()))


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
        lowest = len(self.ch_mult) - 1     # the only level with attention, whatever the image size
        trunk = dict(ch=self.ch, num_res_blocks=self.num_res_blocks, attn_levels=(lowest,), dropout=self.dropout,
                     dtype=self.dtype, remat=self.remat)
        self.encoder = Encoder(ch_mult=tuple(self.ch_mult), out_channels=self.z_channels, names=LLAMAGEN_ENCODER,
                               **trunk)
        self.decoder = Decoder(ch_mult=tuple(self.decoder_ch_mult or self.ch_mult), out_channels=self.out_ch,
                               names=LLAMAGEN_DECODER, **trunk)
        self.quant_conv = Conv(self.embed_dim, (1, 1))
        self.post_quant_conv = Conv(self.z_channels, (1, 1))
        self.quantize = quantizers.build(dict(self.quantizer), self.embed_dim)

"""taming's VQSegmentationModel: a VQGAN over one-hot label maps, trained with BCE (the cond stage of S-FLCKR).

The autoencoder is the ordinary :class:`vqgan_jax.model.VQGAN` with ``in_channels = out_ch = n_labels``; only
the input encoding, the loss (taming's ``BCELossWithQuant``) and the train step differ. No discriminator.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common_jax.training import accumulate_gradients, specs_from_boxed_init
from vqgan_jax.label_maps import label_palette, one_hot_segmentation
from vqgan_jax import architectures
from vqgan_jax.train import MODEL_SHAPE_KEYS, upgrade_saved_model_config


def bce_with_quant_loss(logits: jax.Array, target: jax.Array, codebook_loss: jax.Array,
                        codebook_weight: float = 1.0) -> tuple[jax.Array, dict]:
    """taming's BCELossWithQuant: mean binary cross-entropy with logits + codebook_weight * codebook loss."""
    logits = logits.astype(jnp.float32)
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))
    total = bce + codebook_weight * codebook_loss
    return total, {"total_loss": total, "bce_loss": bce, "quant_loss": codebook_loss}


@struct.dataclass
class SegState:
    step: jax.Array
    params: Any
    opt_state: Any


class SegmentationVQTask:
    """Train step for the segmentation VQ model (batches hold ``segmentation``: (B, H, W) int labels)."""

    shape_keys = MODEL_SHAPE_KEYS  # the stage-one model's; this task has no discriminator
    upgrade_saved_config = staticmethod(upgrade_saved_model_config)

    def __init__(self, config: Any):
        self.model = architectures.from_config(config.model)
        self.n_labels = int(config.model.in_channels)
        if int(config.model.out_ch) != self.n_labels:
            raise ValueError(f"segmentation model: out_ch ({config.model.out_ch}) must equal in_channels "
                             f"(n_labels = {self.n_labels})")
        # This task keeps no EMA codebook state and no usage statistics: refuse what it would ignore.
        if self.model.quantizer_def().keeps_state or float(config.loss.get("dead_code_threshold", 0.0) or 0.0) > 0:
            raise ValueError("segmentation task: model.quantizer.use_ema and loss.dead_code_threshold are not "
                             "supported here (stage-one images only); set them to False / 0")
        self.codebook_weight = float(config.loss.get("codebook_weight", 1.0))
        self.grad_accum = int(config.optim.get("grad_accum_steps", 1) or 1)
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum_steps must be >= 1, got {self.grad_accum}")
        lr = float(config.optim.base_learning_rate) * int(config.data.global_batch_size) * self.grad_accum
        self.tx = optax.adam(lr, b1=config.optim.b1, b2=config.optim.b2)
        self.res = int(config.model.resolution)

    def _init_boxed(self, rng: jax.Array) -> SegState:
        params = self.model.init(rng, jnp.zeros((1, self.res, self.res, self.n_labels)))["params"]
        return SegState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def init_state(self, rng: jax.Array) -> SegState:
        return nn.unbox(self._init_boxed(rng))

    def state_logical_specs(self, abstract_state: SegState) -> Any:
        return specs_from_boxed_init(self._init_boxed, jax.random.key(0))

    def _forward(self, params: Any, seg: jax.Array, train: bool, rng: jax.Array | None = None):
        x = one_hot_segmentation(seg, self.n_labels)
        rngs = {"dropout": rng} if rng is not None else {}
        logits, enc = self.model.apply({"params": params}, x, train=train, rngs=rngs)
        return logits, enc, x

    def _loss(self, params: Any, seg: jax.Array, rng: jax.Array | None = None):
        logits, enc, x = self._forward(params, seg, True, rng)
        loss, metrics = bce_with_quant_loss(logits, x, enc.loss, self.codebook_weight)
        acc = jnp.mean(jnp.argmax(logits, -1) == seg)
        return loss, dict(metrics, pixel_accuracy=acc, perplexity=enc.perplexity)

    def train_step(self, state: SegState, batch: Mapping[str, jax.Array], rng: jax.Array):
        seg = batch["segmentation"]
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if self.grad_accum == 1:
            (loss, metrics), grads = grad_fn(state.params, seg, rng)
        else:
            # Every term is a mean over equal micro-batches, so the mean of their gradients is the
            # whole batch's (the model has no batch-dependent state).
            (loss, metrics), grads = accumulate_gradients(
                lambda p, micro, key: grad_fn(p, micro["segmentation"], key), state.params,
                {"segmentation": seg}, self.grad_accum, rng)
        upd, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, upd)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))  # checked for divergence by the loop
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(self, state: SegState, batch: Mapping[str, jax.Array]) -> dict:
        """Sums over real examples (``mask``, 1 when absent): BCE and pixel accuracy per example."""
        seg = batch["segmentation"]
        mask = jnp.asarray(batch.get("mask", jnp.ones(seg.shape[:1])), jnp.float32)
        logits, _, x = self._forward(state.params, seg, False)
        bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), x), axis=(1, 2, 3))
        acc = jnp.mean((jnp.argmax(logits, -1) == seg).astype(jnp.float32), axis=(1, 2))
        return {"bce_loss": jnp.sum(bce * mask), "pixel_accuracy": jnp.sum(acc * mask),
                "count": jnp.sum(mask)}

    def summaries(self, state: SegState, batch: Mapping[str, jax.Array]) -> dict:
        """Label maps and their reconstructions (argmax) interleaved, 8 pairs, as palette colours (uint8)."""
        seg = jnp.asarray(batch["segmentation"], jnp.int32)[:8]
        logits, _ = self.model.apply({"params": state.params}, one_hot_segmentation(seg, self.n_labels))
        pairs = jnp.stack([seg, jnp.argmax(logits, -1)], axis=1).reshape(-1, *seg.shape[1:])
        return {"reconstructions": label_palette(self.n_labels)[pairs]}

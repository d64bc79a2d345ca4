"""Stage-one objective: taming's VQLPIPSWithDiscriminator as pure functions.

Generator: ``nll = pixelloss_weight * mean|x - xrec| + perceptual_weight * mean(LPIPS(x, xrec))``,
``g_loss = -mean(D(xrec))``, adaptive ``d_weight`` from the gradients of nll and g_loss w.r.t. the
decoder's output conv kernel, ``total = nll + d_weight * disc_factor * g_loss + codebook_weight * codebook``.
Discriminator: hinge or vanilla loss on D(x) and D(xrec), times disc_factor.

The adaptive weight costs one extra backward through D and LPIPS, not through the decoder: with
``xrec = conv_out(h)``, dL/dW is the weight gradient of that one conv at the cotangent dL/dxrec, and
those cotangents are reused as the gradient of the total w.r.t. xrec (see :func:`generator_loss`).

Differences from taming (documented, deliberate): ``pixelloss_weight`` scales the L1 term (taming stores
it but never uses it; equal at the default 1.0); the ``rec_loss`` metric is the pixel L1 alone (taming
logs a copy of nll_loss under that name).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax.layers import Conv
from vqgan_jax.discriminator import NLayerDiscriminator

Array = jax.Array
DiscApply = Callable[[Any, Array], Array]
LpipsFn = Callable[[Array, Array], Array]

LOSS_FIELDS = ("disc_start", "codebook_weight", "pixelloss_weight", "disc_num_layers", "disc_in_channels",
               "disc_factor", "disc_weight", "perceptual_weight", "use_actnorm", "disc_ndf", "disc_loss")
DISC_LOSSES = ("hinge", "vanilla")


def _field(cfg: Any, name: str) -> Any:
    try:
        return cfg[name]
    except (KeyError, AttributeError) as e:
        raise ValueError(f"loss config lacks field {name!r} (needs {LOSS_FIELDS})") from e


def check_loss_config(cfg: Any) -> None:
    """Raise one ValueError naming every missing or invalid field of a loss config."""
    keys = set(cfg.keys()) if hasattr(cfg, "keys") else set()
    problems = [f"missing field {k!r}" for k in LOSS_FIELDS if k not in keys]
    if "disc_loss" in keys and cfg["disc_loss"] not in DISC_LOSSES:
        problems.append(f"disc_loss must be one of {DISC_LOSSES}, got {cfg['disc_loss']!r}")
    if "disc_conditional" in keys and cfg["disc_conditional"]:
        problems.append("disc_conditional=True is not supported")
    if "disc_in_channels" in keys and int(cfg["disc_in_channels"]) != 3:
        problems.append(f"disc_in_channels must be 3 (RGB reconstructions), got {cfg['disc_in_channels']}")
    if problems:
        raise ValueError("loss config: " + "; ".join(problems))


def build_discriminator(cfg: Any, dtype: Any = None) -> NLayerDiscriminator:
    """The PatchGAN a loss config describes (disc_ndf, disc_num_layers, use_actnorm)."""
    check_loss_config(cfg)
    return NLayerDiscriminator(ndf=int(cfg["disc_ndf"]), n_layers=int(cfg["disc_num_layers"]),
                               norm="actnorm" if cfg["use_actnorm"] else "batch", dtype=dtype)


def disc_factor_at(step: Any, cfg: Any) -> Array:
    """``disc_factor`` once ``step >= disc_start``, else 0 (taming's adopt_weight); jittable in step."""
    return jnp.where(jnp.asarray(step) >= _field(cfg, "disc_start"),
                     jnp.float32(_field(cfg, "disc_factor")), jnp.float32(0.0))


def adaptive_weight(nll_grad: Array, g_grad: Array, disc_weight: float) -> Array:
    """``clip(||nll_grad|| / (||g_grad|| + 1e-4), 0, 1e4) * disc_weight``, a constant for autodiff."""
    nll_grad, g_grad = jax.lax.stop_gradient((nll_grad, g_grad))
    w = jnp.linalg.norm(nll_grad.astype(jnp.float32)) / (jnp.linalg.norm(g_grad.astype(jnp.float32)) + 1e-4)
    return jnp.clip(w, 0.0, 1e4) * disc_weight


def _conv_out(kernel_shape: tuple[int, ...]) -> Conv:
    kh, kw, _, cout = kernel_shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"conv_out kernel must have odd spatial size, got {tuple(kernel_shape)}")
    return Conv(cout, (kh, kw), padding=((kh // 2, kh // 2), (kw // 2, kw // 2)))


def _check_conv_params(h: Array, params: Mapping[str, Any]) -> dict:
    if not isinstance(params, Mapping) or "kernel" not in params or "bias" not in params:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"conv_out_params must be the decoder's conv_out params {{'kernel', 'bias'}}, "
                         f"got {got}")
    params = nn.unbox(dict(params))
    k = params["kernel"]
    if k.ndim != 4 or h.ndim != 4 or k.shape[2] != h.shape[-1] or params["bias"].shape != (k.shape[3],):
        raise ValueError(f"conv_out kernel {tuple(k.shape)} (HWIO) / bias {tuple(params['bias'].shape)} do "
                         f"not fit the decoder activation h {tuple(h.shape)} (NHWC)")
    return params


def reconstruct(h: Array, conv_out_params: Mapping[str, Any]) -> Array:
    """``xrec = conv_out(h)`` (float32), the decoder's last conv applied to its pre-output activation."""
    params = _check_conv_params(h, conv_out_params)
    return _conv_out(params["kernel"].shape).apply({"params": params}, h).astype(jnp.float32)


def conv_out_kernel_grads(h: Array, conv_out_params: Mapping[str, Any], *cotangents: Array) -> list[Array]:
    """dL/dW of ``xrec = conv_out(h)`` for each given cotangent dL/dxrec (one small conv each)."""
    params = jax.lax.stop_gradient(_check_conv_params(h, conv_out_params))
    conv = _conv_out(params["kernel"].shape)
    h = jax.lax.stop_gradient(h)
    out, vjp = jax.vjp(lambda p: conv.apply({"params": p}, h), params)
    return [vjp(jax.lax.stop_gradient(ct).astype(out.dtype))[0]["kernel"] for ct in cotangents]


def _nll(x: Array, xrec: Array, cfg: Any, lpips_fn: LpipsFn | None) -> tuple[Array, tuple[Array, Array]]:
    rec = jnp.mean(jnp.abs(x - xrec))
    pw = float(_field(cfg, "perceptual_weight"))
    if pw > 0 and lpips_fn is not None:
        p = jnp.mean(lpips_fn(x, xrec).astype(jnp.float32))
    else:
        p = jnp.float32(0.0)
    # taming: mean(|x - xrec| + pw * p[b]) over (B, C, H, W) == mean|x - xrec| + pw * mean_b p[b]
    return float(_field(cfg, "pixelloss_weight")) * rec + pw * p, (rec, p)


def generator_loss(x: Array, h: Array, conv_out_params: Mapping[str, Any], codebook_loss: Array,
                   disc_apply: DiscApply, disc_vars: Any, step: Any, cfg: Any,
                   lpips_fn: LpipsFn | None = None) -> tuple[Array, dict[str, Array]]:
    """Total generator (autoencoder) loss and taming's log metrics.

    ``x``: images NHWC in [-1, 1]; ``h``: decoder activation entering conv_out (``decode_pre_out``);
    ``conv_out_params``: ``params['decoder']['conv_out']``; ``disc_apply(disc_vars, images) -> logits``
    (for BatchNorm in train mode, a closure that discards the stats update); ``lpips_fn(x0, x1) -> (B,)``,
    used only when perceptual_weight > 0.

    The value is exact. Its gradient w.r.t. h, conv_out_params and codebook_loss is that of the total
    with d_weight held constant (as taming); no gradient flows to disc_vars, x or the LPIPS network
    (taming's generator step only updates the autoencoder). D and LPIPS are differentiated once: the
    cotangents dnll/dxrec and dg/dxrec give both the adaptive weight and the gradient of the total.
    """
    if x.shape[:-1] != h.shape[:-1]:
        raise ValueError(f"generator_loss: images x {tuple(x.shape)} and decoder activation h "
                         f"{tuple(h.shape)} must share batch and spatial dims (NHWC)")
    xrec = reconstruct(h, conv_out_params)
    if xrec.shape != x.shape:
        raise ValueError(f"generator_loss: reconstruction {tuple(xrec.shape)} does not match x {tuple(x.shape)}")
    x = jax.lax.stop_gradient(x.astype(jnp.float32))
    xr = jax.lax.stop_gradient(xrec)

    (nll, (rec, p)), gx_nll = _vjp_with_aux(lambda r: _nll(x, r, cfg, lpips_fn), xr)

    def g_fn(r):
        logits = disc_apply(disc_vars, r)
        return -jnp.mean(logits.astype(jnp.float32)), logits
    (g_loss, logits_fake), gx_g = _vjp_with_aux(g_fn, xr)

    w_nll, w_g = conv_out_kernel_grads(h, conv_out_params, gx_nll, gx_g)
    d_weight = adaptive_weight(w_nll, w_g, float(_field(cfg, "disc_weight")))
    disc_factor = disc_factor_at(step, cfg)
    gan_scale = d_weight * disc_factor
    quant = jnp.mean(codebook_loss)
    value = jax.lax.stop_gradient(nll + gan_scale * g_loss)
    # Value-zero term whose gradient w.r.t. xrec is exactly d(total)/d(xrec) = gx_nll + gan_scale * gx_g.
    lin = jnp.sum(xrec * jax.lax.stop_gradient(gx_nll + gan_scale * gx_g))
    loss = value + float(_field(cfg, "codebook_weight")) * quant + (lin - jax.lax.stop_gradient(lin))
    sg = jax.lax.stop_gradient
    metrics = {
        "total_loss": sg(loss), "quant_loss": sg(quant), "nll_loss": nll, "rec_loss": rec, "p_loss": p,
        "d_weight": d_weight, "disc_factor": disc_factor, "g_loss": g_loss,
        "nll_grad_norm": jnp.linalg.norm(w_nll), "g_grad_norm": jnp.linalg.norm(w_g),
        "logits_fake": jnp.mean(sg(logits_fake).astype(jnp.float32)),
    }
    return loss, metrics


def _vjp_with_aux(fn: Callable[[Array], tuple[Array, Any]], r: Array) -> tuple[tuple[Array, Any], Array]:
    """((value, aux), d value / d r) of a scalar function, everything stop-gradiented."""
    value, vjp, aux = jax.vjp(fn, r, has_aux=True)
    (grad,) = vjp(jnp.ones_like(value))
    return jax.lax.stop_gradient((value, aux)), jax.lax.stop_gradient(grad)


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def discriminator_loss(logits_real: Array, logits_fake: Array, step: Any,
                       cfg: Any) -> tuple[Array, dict[str, Array]]:
    """``disc_factor * {hinge|vanilla}(D(x), D(sg(xrec)))`` and metrics disc_loss, logits_real/fake.

    As taming, D(x) and D(xrec) should come from two separate discriminator calls (in train mode each
    normalises with its own batch statistics).
    """
    kind = _field(cfg, "disc_loss")
    if kind not in DISC_LOSSES:
        raise ValueError(f"loss config: disc_loss must be one of {DISC_LOSSES}, got {kind!r}")
    lr, lf = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
    d = hinge_d_loss(lr, lf) if kind == "hinge" else vanilla_d_loss(lr, lf)
    loss = disc_factor_at(step, cfg) * d
    sg = jax.lax.stop_gradient
    return loss, {"disc_loss": sg(loss), "logits_real": sg(jnp.mean(lr)), "logits_fake": sg(jnp.mean(lf))}

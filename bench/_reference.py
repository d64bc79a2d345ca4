"""Build taming-transformers' PyTorch models offline, for side-by-side benchmarks.

Only importable where the reference is installed (``pip install -e ".[reference]"``); every import of
torch/taming happens inside the functions. Nothing here downloads: LPIPS's VGG16 is built with random
weights (``pretrained=False``, the shipped ``vgg.pth`` load switched off) - the compute is LPIPS's, the
values are not.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Callable

REFERENCE_HINT = 'install the PyTorch reference with: pip install -e ".[reference]"'


def import_reference() -> tuple[Any, Any] | None:
    """(torch, taming) when both import, else None (the reason is printed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
            import taming
            import taming.models.vqgan  # noqa: F401 - fails early if pytorch_lightning pins are off
    except Exception as e:  # noqa: BLE001 - any import failure means "no reference here"
        print(f"[reference] torch/taming not importable ({type(e).__name__}: {e}); {REFERENCE_HINT}")
        return None
    return torch, taming


@contextlib.contextmanager
def offline_lpips(random_vgg: bool):
    """While active, taming's ``LPIPS()`` downloads nothing.

    ``random_vgg=True``: a real VGG16 backbone with random weights (LPIPS's compute, not its values).
    ``random_vgg=False``: a parameter-free stand-in, for losses built with ``perceptual_weight=0`` where
    LPIPS is constructed but never called (building a random VGG16 costs seconds and 0.5 GB).
    """
    import torch
    from taming.modules.losses import lpips as tlpips
    from taming.modules.losses import vqperceptual

    class _Unused(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("LPIPS stand-in called: build the loss with random_vgg=True to time LPIPS")

    saved = (vqperceptual.LPIPS, tlpips.LPIPS.load_from_pretrained, tlpips.vgg16.__init__)
    orig_vgg_init = tlpips.vgg16.__init__

    def vgg_init(self, requires_grad=False, pretrained=True):
        orig_vgg_init(self, requires_grad=requires_grad, pretrained=False)
    try:
        if random_vgg:
            tlpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
            tlpips.vgg16.__init__ = vgg_init
        else:
            vqperceptual.LPIPS = _Unused
        yield
    finally:
        vqperceptual.LPIPS, tlpips.LPIPS.load_from_pretrained, tlpips.vgg16.__init__ = saved


def build_vqgan(model_cfg: dict, loss_cfg: dict, lr: float, b1: float = 0.5, b2: float = 0.9) -> Any:
    """taming ``VQModel`` with ``VQLPIPSWithDiscriminator``, in train mode, with ``learning_rate`` set.

    ``model_cfg``: ddconfig fields plus ``embed_dim`` and the VQ quantizer's ``quantizer.n_embed`` (or a flat
    ``n_embed``, the previous layout); ``loss_cfg``: the loss's
    constructor arguments (disc_start, disc_num_layers, disc_ndf, perceptual_weight, ...).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from taming.models.vqgan import VQModel
    m = dict(model_cfg)
    quantizer = dict(m.pop("quantizer", None) or {})
    n_embed, embed_dim = int(m.pop("n_embed", None) or quantizer["n_embed"]), int(m.pop("embed_dim"))
    ddconfig = {k: m[k] for k in ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch",
                                  "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")}
    ddconfig["ch_mult"] = list(ddconfig["ch_mult"])
    ddconfig["attn_resolutions"] = list(ddconfig["attn_resolutions"])
    lossconfig = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                  "params": dict(loss_cfg)}
    with offline_lpips(random_vgg=float(loss_cfg.get("perceptual_weight", 1.0)) > 0), \
            open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        model = VQModel(ddconfig, lossconfig, n_embed=n_embed, embed_dim=embed_dim)
    model.learning_rate = lr
    model.train()
    return model


def make_train_step(model: Any, x_nchw: Any, step: int = 0, reuse_forward: bool = False
                    ) -> Callable[[], tuple[float, float]]:
    """One taming stage-one training step as pytorch-lightning 1.8 runs it, as a closure.

    Generator: ``training_step(optimizer_idx=0)`` (forward, loss with the adaptive weight from two
    ``autograd.grad`` calls, backward, Adam step) with the discriminator's parameters frozen
    (lightning's ``toggle_optimizer``); then discriminator: ``training_step(optimizer_idx=1)`` with the
    autoencoder frozen - taming runs the autoencoder forward again there. ``reuse_forward=True`` instead
    feeds the discriminator the generator step's (detached) reconstruction, i.e. the work JAX's fused step
    does. Returns (generator loss, discriminator loss).
    """
    import torch
    opt_g, opt_d = model.configure_optimizers()[0]
    disc = model.loss.discriminator
    gen_params = [p for g in opt_g.param_groups for p in g["params"]]
    disc_params = list(disc.parameters())

    def toggle(train_gen: bool) -> None:
        for p in gen_params:
            p.requires_grad_(train_gen)
        for p in disc_params:
            p.requires_grad_(not train_gen)

    def run() -> tuple[float, float]:
        toggle(True)
        xrec, qloss = model(x_nchw)
        aeloss, _ = model.loss(qloss, x_nchw, xrec, 0, step, last_layer=model.get_last_layer(), split="train")
        opt_g.zero_grad(set_to_none=True)
        aeloss.backward()
        opt_g.step()
        toggle(False)
        if reuse_forward:
            xrec2, qloss2 = xrec.detach(), qloss.detach()
        else:
            xrec2, qloss2 = model(x_nchw)
        dloss, _ = model.loss(qloss2, x_nchw, xrec2, 1, step, last_layer=model.get_last_layer(), split="train")
        opt_d.zero_grad(set_to_none=True)
        dloss.backward()
        opt_d.step()
        return float(aeloss.detach()), float(dloss.detach())
    return run


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` as torch's FlopCounterMode counts them (convs, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())

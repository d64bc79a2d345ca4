"""Writes tests/taming_files/: tiny taming models saved as the official releases were, and taming's own outputs.

Run in the reference environment (PyTorch + taming-transformers-rom1504 0.0.6 + pytorch-lightning), never in CI:

    /work/.venv-ref/bin/python tests/make_taming_files.py tests/taming_files

What it writes:
- ``<name>.ckpt`` (zip serialisation, torch >= 1.6) and ``<name>_legacy.ckpt`` (the pre-1.6 single pickle
  stream) of each model, as PyTorch Lightning 1.0 wrote taming's checkpoints: ``epoch``, ``global_step``,
  ``pytorch-lightning_version`` 1.0.8, ``callbacks`` keyed by the ModelCheckpoint *class*, ``optimizer_states``,
  ``lr_schedulers`` and ``state_dict``. Packed into ``checkpoints.tar.xz``: the models share their weights
  where shapes allow (the first stage inside each Net2NetTransformer is the VQModel fixture; the others copy
  its same-shaped tensors), so LZMA stores each tensor's bytes about once. Each file is exactly what
  ``torch.save`` wrote.
- ``<name>.yaml``: the model section as taming's configs write it (``model: target/params``).
- ``expected.npz``: taming's outputs on fixed inputs (``<name>/...`` keys), see ``main``.

Models (16 px, f=2, 8x8 codes, 32 channels: GroupNorm in taming needs multiples of 32):
- ``vqgan``: VQModel with the ``loss.*`` keys of a released VQGAN kept in part (LPIPS scaling and lin layers
  and the first VGG conv, the PatchGAN discriminator; the rest of the VGG16 trunk is dropped to stay small);
- ``gumbel``: GumbelVQ; ``segmentation``: VQSegmentationModel (5 labels);
- ``cin``: class-conditional Net2NetTransformer (Labelator, 4 classes sharing the 32-code vocabulary, as
  cIN's 1000 classes share its 16384 codes), first stage = ``vqgan``;
- ``uncond``: unconditional Net2NetTransformer (``__is_unconditional__``, SOS token), FacesHQ-style;
- ``sflckr``: spatially conditioned Net2NetTransformer, cond stage = ``segmentation``, S-FLCKR-style.

Downloads are switched off: LPIPS's ``load_from_pretrained`` is a no-op and VGG16 is built untrained (the
fixture's values need not be LPIPS's; their keys and shapes are).
"""
from __future__ import annotations

import io
import os
import sys
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
import yaml

import taming.modules.losses.lpips as taming_lpips

taming_lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
_vgg16 = taming_lpips.models.vgg16
taming_lpips.models.vgg16 = lambda pretrained=False, **kw: _vgg16(weights=None)

from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint  # noqa: E402
from taming.main import instantiate_from_config  # noqa: E402

RES, N_EMBED, EMBED_DIM, N_LABELS, N_CLASSES = 16, 32, 8, 5, 4
DDCONFIG = dict(double_z=False, z_channels=8, resolution=RES, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
LOSS = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
        "params": dict(disc_conditional=False, disc_in_channels=3, disc_start=250001, disc_weight=0.8,
                       codebook_weight=1.0, disc_num_layers=2, disc_ndf=8)}
DUMMY_LOSS = {"target": "taming.modules.losses.vqperceptual.DummyLoss"}
# Of LPIPS's VGG16 trunk only the first conv stays (the rest is 14.7M values); scaling and lin layers stay whole.
KEEP_LPIPS = ("loss.perceptual_loss.scaling_layer.", "loss.perceptual_loss.lin",
              "loss.perceptual_loss.net.slice1.0.")


def vq_config(target: str, loss: dict, **extra) -> dict:
    dd = dict(DDCONFIG)
    if target.endswith("VQSegmentationModel"):
        dd.update(in_channels=N_LABELS, out_ch=N_LABELS)
        extra = dict(extra, n_labels=N_LABELS)
    params = dict(embed_dim=EMBED_DIM, n_embed=N_EMBED, ddconfig=dd, lossconfig=loss, **extra)
    if target.endswith("GumbelVQ"):
        params.update(kl_weight=1e-8, temperature_scheduler_config={
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": dict(warm_up_steps=0, max_decay_steps=1000001, lr_start=0.9, lr_max=0.9, lr_min=1e-6)})
    return {"base_learning_rate": 4.5e-6, "target": target, "params": params}


def n2n_config(cond_stage, vocab, block, **extra) -> dict:
    gpt = dict(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32)
    params = dict(transformer_config={"target": "taming.modules.transformer.mingpt.GPT", "params": gpt},
                  first_stage_config=vq_config("taming.models.vqgan.VQModel", DUMMY_LOSS),
                  cond_stage_config=cond_stage,
                  permuter_config={"target": "taming.modules.transformer.permuter.Identity"}, **extra)
    return {"base_learning_rate": 4.5e-6, "target": "taming.models.cond_transformer.Net2NetTransformer",
            "params": params}


def lightning_file(model: torch.nn.Module, state_dict: dict, n_optimizers: int) -> dict:
    """The dict PyTorch Lightning 1.0.8 saved for a taming run (optimizer states of unstepped Adams)."""
    opts = [torch.optim.Adam(model.parameters(), lr=4.5e-6, betas=(0.5, 0.9)).state_dict()
            for _ in range(n_optimizers)]
    return {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
            "callbacks": {ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.25),
                                            "best_model_path": "logs/run/checkpoints/last.ckpt"}},
            "optimizer_states": opts, "lr_schedulers": [], "state_dict": state_dict}


def share_weights(model: torch.nn.Module, donor: dict) -> None:
    """Copy the donor's same-named, same-shaped tensors into ``model`` (fixture size only; see the docstring)."""
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in donor.items() if k in own and own[k].shape == v.shape}, strict=False)


def spread_codebook(model, x: torch.Tensor, seed: int) -> None:
    """Codebook rows drawn from the encoder's outputs on ``x``: fresh init gives one index everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        rows = h[torch.randperm(len(h), generator=g)[:N_EMBED]]
        model.quantize.embedding.weight.copy_(rows + 0.05 * rows.std() * torch.randn(rows.shape, generator=g))


def vq_margin(model, x) -> float:
    """Smallest gap between the nearest and second-nearest code distance (ties would make indices fragile)."""
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        d = torch.cdist(h, model.quantize.embedding.weight) ** 2
        two = torch.topk(d, 2, largest=False).values
    return float((two[:, 1] - two[:, 0]).min())


def scale_gpt(gpt: torch.nn.Module, seed: int) -> None:
    """Larger random weights than minGPT's init (std 0.02), which decodes one token over and over."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if p.ndim >= 2 or name == "pos_emb":
                p.copy_(0.35 * torch.randn(p.shape, generator=g))


def greedy(n2n, c: torch.Tensor, steps: int) -> tuple[np.ndarray, float]:
    """taming's own greedy decode (Net2NetTransformer.sample, sample=False) and the smallest top-2 logit gap."""
    x = n2n.sample(torch.zeros((len(c), 0), dtype=torch.long), c, steps, sample=False)
    with torch.no_grad():   # logit gaps along the greedy path (one forward over the whole sequence)
        logits, _ = n2n.transformer(torch.cat([c, x], 1)[:, :-1])
        two = torch.topk(logits[:, c.shape[1] - 1:], 2, dim=-1).values
    return x.numpy().astype(np.int32), float((two[..., 0] - two[..., 1]).min())


def save_both(folder: str, name: str, obj: dict, files: dict) -> None:
    for suffix, zip_format in (("", True), ("_legacy", False)):
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
        files[f"{name}{suffix}.ckpt"] = buf.getvalue()


def main(folder: str) -> None:
    torch.manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    images = torch.rand((3, 3, RES, RES), generator=g) * 2 - 1            # NCHW in [-1, 1]
    warm = torch.rand((16, 3, RES, RES), generator=g) * 2 - 1
    seg_maps = torch.randint(0, N_LABELS, (2, RES, RES), generator=g)
    seg_maps[:, :RES // 2] = torch.randint(0, N_LABELS, (2, 1, 1), generator=g)   # some structure
    seg_onehot = F.one_hot(seg_maps, N_LABELS).permute(0, 3, 1, 2).float()
    files, yamls, out = {}, {}, {}

    # -- VQModel -------------------------------------------------------------------------------------
    cfg = vq_config("taming.models.vqgan.VQModel", LOSS)
    vq = instantiate_from_config(cfg).eval()
    spread_codebook(vq, warm, 2)
    full = vq.state_dict()
    sd = {k: v for k, v in full.items() if not k.startswith("loss.perceptual_loss.") or k.startswith(KEEP_LPIPS)}
    assert any(k.startswith("loss.discriminator.") for k in sd) and any(".lin" in k for k in sd)
    save_both(folder, "vqgan", lightning_file(vq, sd, 2), files)
    yamls["vqgan"] = cfg
    with torch.no_grad():
        quant, _, (_, _, ind) = vq.encode(images)
        out["vqgan/images"] = images.permute(0, 2, 3, 1).numpy()
        out["vqgan/indices"] = ind.reshape(len(images), RES // 2, RES // 2).numpy().astype(np.int32)
        out["vqgan/decoded"] = vq.decode(quant).permute(0, 2, 3, 1).numpy()
    out["vqgan/index_margin"] = np.float32(vq_margin(vq, images))
    vq_sd = {k: v for k, v in full.items() if not k.startswith("loss.")}

    # -- GumbelVQ (taming adds Gumbel noise even in eval: its deterministic part, the argmax of the logits) --
    cfg = vq_config("taming.models.vqgan.GumbelVQ", LOSS)
    gq = instantiate_from_config(cfg).eval()
    share_weights(gq, vq_sd)
    save_both(folder, "gumbel", lightning_file(gq, {k: v for k, v in gq.state_dict().items()
                                                     if not k.startswith("loss.")}, 2), files)
    yamls["gumbel"] = cfg
    with torch.no_grad():
        logits = gq.quantize.proj(gq.encode_to_prequant(images))
        ind = logits.argmax(1)
        z_q = gq.quantize.embed(ind).permute(0, 3, 1, 2)
        out["gumbel/indices"] = ind.numpy().astype(np.int32)
        out["gumbel/decoded"] = gq.decode(z_q).permute(0, 2, 3, 1).numpy()
        two = torch.topk(logits, 2, dim=1).values
        out["gumbel/index_margin"] = np.float32((two[:, 0] - two[:, 1]).min())

    # -- VQSegmentationModel -------------------------------------------------------------------------------
    cfg = vq_config("taming.models.vqgan.VQSegmentationModel", DUMMY_LOSS)
    seg = instantiate_from_config(cfg).eval()
    share_weights(seg, vq_sd)
    spread_codebook(seg, F.one_hot(torch.randint(0, N_LABELS, (16, RES, RES), generator=g), N_LABELS)
                    .permute(0, 3, 1, 2).float(), 3)
    seg_sd = seg.state_dict()     # holds colorize (its random visualisation projection), as released
    save_both(folder, "segmentation", lightning_file(seg, seg_sd, 1), files)
    yamls["segmentation"] = cfg
    with torch.no_grad():
        quant, _, (_, _, ind) = seg.encode(seg_onehot)
        out["segmentation/maps"] = seg_maps.numpy().astype(np.int32)
        out["segmentation/indices"] = ind.reshape(2, RES // 2, RES // 2).numpy().astype(np.int32)
        out["segmentation/decoded"] = seg.decode(quant).permute(0, 2, 3, 1).numpy()
    out["segmentation/index_margin"] = np.float32(vq_margin(seg, seg_onehot))

    # -- Net2NetTransformers: class-conditional, unconditional, spatial -------------------------------
    steps = (RES // 2) ** 2
    cases = {
        "cin": (n2n_config({"target": "taming.modules.util.Labelator", "params": {"n_classes": N_CLASSES}},
                           N_EMBED, steps, first_stage_key="image", cond_stage_key="class_label"),
                torch.arange(N_CLASSES)[:, None]),
        "uncond": (n2n_config("__is_unconditional__", N_EMBED, steps, sos_token=0),
                   torch.zeros((1, 1), dtype=torch.long)),
        "sflckr": (n2n_config(vq_config("taming.models.vqgan.VQSegmentationModel", DUMMY_LOSS), N_EMBED,
                              2 * steps - 1, first_stage_key="image", cond_stage_key="segmentation"), None),
    }
    for i, (name, (cfg, c)) in enumerate(cases.items()):
        n2n = instantiate_from_config(cfg).eval()
        n2n.first_stage_model.load_state_dict(vq_sd)
        if name == "sflckr":
            n2n.cond_stage_model.load_state_dict(seg_sd)
            with torch.no_grad():
                _, c = n2n.encode_to_c(seg_onehot)
            c = c.reshape(len(seg_onehot), -1)     # taming's encode_to_c leaves the quantizer's flat indices
            out[f"{name}/cond_codes"] = c.reshape(2, RES // 2, RES // 2).numpy().astype(np.int32)
        scale_gpt(n2n.transformer, 10 + i)
        codes, margin = greedy(n2n, c, steps)
        assert len({tuple(r) for r in codes}) == len(codes) and len(set(codes.ravel())) > 8, (name, codes)
        out[f"{name}/greedy_codes"] = codes.reshape(len(c), RES // 2, RES // 2)
        out[f"{name}/logit_margin"] = np.float32(margin)
        with torch.no_grad():
            out[f"{name}/greedy_images"] = n2n.decode_to_img(
                torch.as_tensor(codes).long(), (len(c), EMBED_DIM, RES // 2, RES // 2)).permute(0, 2, 3, 1).numpy()
        save_both(folder, name, lightning_file(n2n.transformer, n2n.state_dict(), 1), files)
        yamls[name] = cfg
        print(name, "greedy codes", codes[:, :12].tolist(), "min logit margin", margin)

    for name, cfg in yamls.items():
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            yaml.safe_dump({"model": cfg}, f, sort_keys=False)
    np.savez_compressed(os.path.join(folder, "expected.npz"), **out)
    with tarfile.open(os.path.join(folder, "checkpoints.tar.xz"), "w:xz", preset=9) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    for k, v in out.items():
        if "margin" in k:
            print(k, float(v))
    print("raw checkpoint bytes:", sum(len(b) for b in files.values()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "taming_files"))

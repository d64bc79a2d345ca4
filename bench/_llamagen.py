"""What the LlamaGen benchmarks share: LlamaGen's own model from a checkout of its repository, the same weights
in this project's LLaMA-block GPT, the sizes by name, and the machine's copy bandwidth."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --size -> LlamaGen ModelArgs fields and the code grid side (GPT-B..: ImageNet 256 px on VQ-16, 16x16 codes).
TINY = dict(n_layer=2, n_head=4, dim=64, multiple_of=32, vocab_size=1024, grid=8)


def size_args(size: str) -> dict[str, Any]:
    from transformer_jax.convert import LLAMAGEN_GPT_SIZES
    if size == "tiny":
        return dict(TINY)
    name = size if size.startswith("GPT-") else f"GPT-{size}"
    if name not in LLAMAGEN_GPT_SIZES:
        raise SystemExit(f"--size must be tiny or one of {', '.join(LLAMAGEN_GPT_SIZES)}, got {size!r}")
    return dict(LLAMAGEN_GPT_SIZES[name], vocab_size=16384, grid=16)


def parse_args(p: argparse.ArgumentParser, default_batch: int) -> argparse.Namespace:
    """The options both LlamaGen benches take (repository, size, batch, repeats, torch threads and site-packages)
    added to ``p``, parsed, and torch made importable."""
    p.add_argument("--llamagen_repo", required=True, help="a checkout of github FoundationVision/LlamaGen")
    p.add_argument("--size", default="B", help="tiny, or a LlamaGen size: B, L, XL, XXL, ... (default B)")
    p.add_argument("--batch", type=int, default=default_batch)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    p.add_argument("--torch_site_packages", default="", help="site-packages holding torch, if not this env's")
    a = p.parse_args()
    add_torch(a.torch_site_packages)
    return a


def add_torch(site_packages: str) -> None:
    """Make torch importable from another environment's site-packages, after this one's (its numpy, jax win)."""
    if site_packages:
        sys.path.append(site_packages)


def llamagen_model(repo: str, args: dict[str, Any], seed: int = 0, dropout: float = 0.0):
    """(torch module, LlamaGen generate, state dict as numpy, ModelArgs fields): LlamaGen's c2i Transformer at
    ``args`` with random weights (std 0.02 on every matrix, so the head is not LlamaGen's zero init and the logits
    are not all equal), in eval mode; ``dropout`` on tokens, residuals and the FFN (class dropout stays 0.1)."""
    import torch
    if not os.path.isfile(os.path.join(repo, "autoregressive", "models", "gpt.py")):
        raise SystemExit(f"--llamagen_repo={repo} is not a checkout of github FoundationVision/LlamaGen")
    sys.path.insert(0, repo)
    # generate.py enters torch.backends.cuda.sdp_kernel(...), deprecated in torch 2.x; on CPU a no-op context.
    torch.backends.cuda.sdp_kernel = lambda *a, **k: contextlib.nullcontext()
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import ModelArgs, Transformer
    fields = {k: v for k, v in args.items() if k != "grid"}
    fields.update(block_size=args["grid"] ** 2, num_classes=1000, cls_token_num=1, model_type="c2i",
                  token_dropout_p=dropout, resid_dropout_p=dropout, ffn_dropout_p=dropout, attn_dropout_p=0.0,
                  class_dropout_prob=0.1)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**fields))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.eval()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k != "freqs_cis"}
    return model, generate, sd, fields


def copy_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """This machine's copy bandwidth in GB/s as STREAM counts it (bytes read + bytes written per second), the
    best of ``repeats`` copies of ``nbytes``."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9

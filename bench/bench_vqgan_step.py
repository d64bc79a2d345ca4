"""Stage-one training step (VQGAN generator + PatchGAN discriminator) against taming's PyTorch code.

    python bench/bench_vqgan_step.py                          # small and mid configs, JAX vs PyTorch
    python bench/bench_vqgan_step.py --configs small --repeats 9
    python bench/bench_vqgan_step.py --perceptual             # LPIPS (random VGG16) in both
    python bench/bench_vqgan_step.py --device_mfu --peak_tflops 989 --batch 16   # GPU/TPU, f16 config, bf16

JAX: ``VQGANTask.train_step`` jitted as the training loop jits it (state donated): generator and
discriminator updated in one program. PyTorch (when torch and taming-transformers import): taming's
``VQModel`` + ``VQLPIPSWithDiscriminator`` on the same config and batch, its two optimizer steps as
pytorch-lightning runs them (generator: optimizer_idx 0, backward, Adam; discriminator: optimizer_idx 1,
which runs the autoencoder forward again, backward, Adam). ``disc_start=0`` so the GAN terms and the
adaptive weight are live in both; ``perceptual_weight=0`` unless ``--perceptual`` (then LPIPS with random
VGG16 weights in both: LPIPS's compute, not its values). The two alternate in one process; medians after
warm-up. FLOPs: XLA's cost analysis of the compiled JAX step and torch's FlopCounterMode of one
reference step (which counts the discriminator step's second autoencoder forward).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common_jax.host_memory import keep_freed_host_memory  # noqa: E402

# The train entry points' malloc setting, for both frameworks; first, before any library starts threads.
keep_freed_host_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _timing import alternate, machine, matmul_flops, xla_flops  # noqa: E402
from common_jax.layers import POLICIES, conv_grad_policy  # noqa: E402
from configs.vqgan_base import base_config, vqgan_model  # noqa: E402
from vqgan_jax.train import VQGANTask  # noqa: E402

# name -> (model overrides, loss overrides, batch). Discriminator: taming's defaults (ndf 64) with
# n_layers 2 at 32 px (3 at 64 px would leave a 2x2 map before the last two 4x4 convs).
SMALL_AE = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32, resolution=32,
                embed_dim=32, n_embed=128)
CONFIGS: dict[str, tuple[dict, dict, int]] = {
    "small": (SMALL_AE, dict(disc_num_layers=2, disc_ndf=64), 16),
    # The project's tiny demo config (configs/vqgan_tiny.py): same autoencoder, 16-wide discriminator.
    "tiny": (SMALL_AE, dict(disc_num_layers=2, disc_ndf=16), 16),
    "mid": (dict(ch=64, ch_mult=(1, 1, 2, 4), num_res_blocks=1, attn_resolutions=(8,), z_channels=64,
                 resolution=64, embed_dim=64, n_embed=512),
            dict(disc_num_layers=3, disc_ndf=64), 8),
}
BASE_LR = 4.5e-6


def make_config(model: dict, loss: dict, batch: int, perceptual: bool, dtype: str = "") -> Any:
    c = base_config(vqgan_model(**model, dtype=dtype), disc_start=0, disc_weight=0.8,
                    perceptual_weight=1.0 if perceptual else 0.0, **loss)
    c.data.global_batch_size = batch
    c.data.image_size = int(model["resolution"])
    c.optim.base_learning_rate = BASE_LR
    return c


def random_lpips(dtype: Any = None) -> tuple[Any, Any]:
    """LPIPS(vgg) with random weights (timing only: no pretrained weights are available here)."""
    from common_jax.lpips import LPIPS
    model = LPIPS(dtype=dtype)
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    import flax.linen as nn
    return model, nn.unbox(model.init(jax.random.key(1), x, x))


class JaxStep:
    """The jitted, state-donating train step of ``VQGANTask`` and its compiled FLOP count."""

    def __init__(self, config: Any, images: np.ndarray, perceptual: bool, lpips_dtype: Any = None,
                 conv_grad: str = "auto"):
        self.task = VQGANTask(config, random_lpips(lpips_dtype) if perceptual else None)
        self.state = jax.jit(self.task.init_state)(jax.random.key(0))
        self.batch = {"image": jnp.asarray(images)}
        self.rng = jax.random.key(1)
        jitted = jax.jit(self.task.train_step, donate_argnums=(0,))
        t = time.perf_counter()
        with conv_grad_policy(conv_grad):   # read while tracing
            self.compiled = jitted.lower(self.state, self.batch, self.rng).compile()
            self.compile_s = time.perf_counter() - t
            # XLA's count misses cuDNN/cuBLAS calls on GPUs; the traced count is backend-independent.
            self.matmul_flops = matmul_flops(self.task.train_step, self.state, self.batch, self.rng)
        self.flops = xla_flops(self.compiled)

    def __call__(self) -> float:
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        return float(jax.block_until_ready(metrics["total_loss"]))


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run_cpu(args: argparse.Namespace) -> None:
    from _reference import build_vqgan, count_flops, import_reference, make_train_step
    ref = None if args.no_reference else import_reference()
    if ref is not None:
        torch = ref[0]
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
    print(f"machine: {machine()}" + (f", torch {ref[0].__version__} ({args.threads} threads)" if ref else ""))
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; conv gradients: {args.conv_grad}")
    print(f"load average at start: {load()}")
    rows = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"--configs: unknown config {name!r}; known: {sorted(CONFIGS)}")
        model, loss, batch = CONFIGS[name]
        batch = args.batch or batch
        res = int(model["resolution"])
        images = np.random.default_rng(0).uniform(-1, 1, (batch, res, res, 3)).astype(np.float32)
        config = make_config(model, loss, batch, args.perceptual)
        js = JaxStep(config, images, args.perceptual, conv_grad=args.conv_grad)
        fns: dict[str, Callable[[], Any]] = {"jax": js}
        ref_flops = float("nan")
        if ref is not None:
            tm = build_vqgan(dict(config.model), {k: config.loss[k] for k in (
                "disc_start", "codebook_weight", "pixelloss_weight", "disc_num_layers", "disc_in_channels",
                "disc_factor", "disc_weight", "perceptual_weight", "use_actnorm", "disc_ndf", "disc_loss")},
                lr=BASE_LR * batch)
            x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
            fns["torch"] = make_train_step(tm, x)
            ref_flops = count_flops(fns["torch"])
            if args.reuse_forward:
                fns["torch_reuse"] = make_train_step(tm, x, reuse_forward=True)
        times, cpu = alternate(fns, args.warmup, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        rows.append((name, batch, js, med, ref_flops, med_cpu))
        print(f"[{name}] compile {js.compile_s:.1f} s; per-repeat s: "
              + "; ".join(f"{k}: " + " ".join(f"{t:.3f}" for t in v) for k, v in times.items()), flush=True)
    print(f"load average at end: {load()}")
    print()
    print("| config | batch | JAX s/step | PyTorch s/step | JAX/PyTorch | JAX GFLOP/step | JAX GFLOP/s "
          "| PyTorch GFLOP/step | PyTorch GFLOP/s | CPU s/step JAX / PyTorch |"
          + (" PyTorch (one forward) s/step |" if args.reuse_forward else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.reuse_forward else ""))
    for name, batch, js, med, ref_flops, med_cpu in rows:
        tj, tt = med["jax"], med.get("torch", float("nan"))
        line = (f"| {name} | {batch} | {tj:.3f} | {tt:.3f} | {tj / tt:.2f} | {js.flops / 1e9:.1f} | "
                f"{js.flops / tj / 1e9:.0f} | {ref_flops / 1e9:.1f} | {ref_flops / tt / 1e9:.0f} | "
                f"{med_cpu['jax']:.2f} / {med_cpu.get('torch', float('nan')):.2f} |")
        if args.reuse_forward:
            line += f" {med['torch_reuse']:.3f} |"
        print(line)


def run_device_mfu(args: argparse.Namespace) -> None:
    """The ImageNet f16 config's step in bfloat16 on the default accelerator; MFU against --peak_tflops."""
    from configs.vqgan_imagenet_f16_1024 import get_config
    if args.peak_tflops <= 0:
        raise SystemExit("--device_mfu needs --peak_tflops (the accelerator's dense bf16 peak, TFLOP/s)")
    c = get_config()
    c.model.dtype = "bfloat16"
    c.loss.disc_start = 0
    c.loss.perceptual_weight = 1.0 if args.perceptual else 0.0
    batch = args.batch or 16
    c.data.global_batch_size = batch
    if args.resolution:
        c.model.resolution = c.data.image_size = args.resolution
    res = int(c.model.resolution)
    print(f"machine: {machine()}; devices: {jax.devices()}")
    images = np.random.default_rng(0).uniform(-1, 1, (batch, res, res, 3)).astype(np.float32)
    js = JaxStep(c, images, args.perceptual, lpips_dtype=jnp.bfloat16, conv_grad=args.conv_grad)
    times = alternate({"jax": js}, args.warmup, args.repeats)[0]["jax"]
    t = statistics.median(times)
    tflops = js.matmul_flops / t / 1e12
    print(f"f16 ImageNet config, bf16 compute, batch {batch} x {res} px, LPIPS "
          f"{'on (random VGG16 weights)' if args.perceptual else 'off'}, compile {js.compile_s:.1f} s")
    print(f"step {t * 1e3:.1f} ms (median of {len(times)}; all: {' '.join(f'{x * 1e3:.1f}' for x in times)})")
    print(f"{js.matmul_flops / 1e12:.3f} TFLOP/step (convolutions and matmuls of the traced step; XLA's "
          f"count: {js.flops / 1e12:.3f}), {tflops:.1f} TFLOP/s, "
          f"MFU {100 * tflops / args.peak_tflops:.1f}% of {args.peak_tflops:g} TFLOP/s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="small,mid", help=f"comma-separated, from {sorted(CONFIGS)}")
    p.add_argument("--batch", type=int, default=0, help="override the config's batch size")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--perceptual", action="store_true", help="LPIPS (random VGG16 weights) in both")
    p.add_argument("--no_reference", action="store_true", help="JAX numbers only")
    p.add_argument("--reuse_forward", action="store_true",
                   help="also time PyTorch with the discriminator step reusing the generator's forward")
    p.add_argument("--device_mfu", action="store_true", help="f16 ImageNet config in bf16 on an accelerator")
    p.add_argument("--resolution", type=int, default=0,
                   help="--device_mfu: override the image size (default the config's 256; small for a smoke test)")
    p.add_argument("--conv_grad", default="auto", choices=POLICIES,
                   help="conv gradient formulation: auto (per-layer rule), lax (XLA's), patch (all patch matmuls)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="accelerator peak for MFU (--device_mfu)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    if args.device_mfu:
        run_device_mfu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()

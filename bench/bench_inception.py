"""InceptionV3 feature extraction (FID's pool3 features): JAX vs pytorch-fid's PyTorch InceptionV3.

    python bench/bench_inception.py                    # 8 images at 299x299 and 16 at 64x64
    python bench/bench_inception.py --repeats 9 --threads 2
    python bench/bench_inception.py --cases 299:32 --dtype bfloat16   # accelerator, bf16 convs

Both sides get the same weights: the seeded ones of the golden set ``inception_fid_small`` (plus a seeded
1008-class fc layer, so pytorch-fid's strict ``load_state_dict`` accepts them) - no download anywhere:
``pytorch_fid.inception.load_state_dict_from_url`` is patched to hand over that state dict. Inputs are
uint8 NHWC for JAX and the float NCHW ``x / 255`` pytorch-fid's loader gives for PyTorch; both resize to
299 inside the model. JAX: ``model.apply`` jitted, compiled before timing, BatchNorm folded at conversion.
The two alternate in one process; medians of ``--repeats`` after ``--warmup`` calls. The PyTorch side is
skipped (with the reason) when torch / pytorch_fid do not import: ``pip install -e ".[reference]"``
(and ``pip install pytorch-fid==0.3.0``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _timing import alternate, machine  # noqa: E402
from common_jax.inception import from_pytorch_fid, to_torchvision_names  # noqa: E402
from seeded_weights import golden, seeded_array  # noqa: E402


def seeded_state_dict() -> dict[str, np.ndarray]:
    """The golden set's seeded InceptionV3 weights (torchvision names) plus a seeded fc layer."""
    sd, manifest, _ = golden("inception_fid_small")
    sd = to_torchvision_names(sd)
    sd["fc.weight"] = seeded_array("fc.weight", (1008, 2048), "linear", int(manifest["seed"]))
    sd["fc.bias"] = seeded_array("fc.bias", (1008,), "bias", int(manifest["seed"]))
    return sd


def build_reference(sd: dict[str, np.ndarray], threads: int) -> tuple[Any, Any] | None:
    """(torch, pytorch-fid InceptionV3 in eval mode holding ``sd``), or None when not importable."""
    try:
        import torch
        import pytorch_fid.inception as pfi
    except Exception as e:  # noqa: BLE001 - any import failure means "no reference here"
        print(f"[reference] torch / pytorch_fid not importable ({type(e).__name__}: {e}); "
              'install with: pip install -e ".[reference]" pytorch-fid==0.3.0')
        return None
    torch.set_num_threads(threads)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    saved = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: tensors  # no download: our seeded weights
    try:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                normalize_input=True, requires_grad=False, use_fid_inception=True)
    finally:
        pfi.load_state_dict_from_url = saved
    return torch, model.eval()


def parse_cases(spec: str) -> list[tuple[int, int]]:
    cases = []
    for item in spec.split(","):
        try:
            size, batch = (int(v) for v in item.split(":"))
        except ValueError:
            raise SystemExit(f"--cases: expected SIZE:BATCH[,SIZE:BATCH...], got {item!r}") from None
        cases.append((size, batch))
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="299:8,64:16", help="image size:batch pairs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="JAX conv compute dtype")
    p.add_argument("--no_reference", action="store_true", help="time JAX only")
    args = p.parse_args()

    sd = seeded_state_dict()
    model, variables = from_pytorch_fid(sd, dtype=None if args.dtype == "float32" else jnp.bfloat16)
    ref = None if args.no_reference else build_reference(sd, args.threads)
    print(f"machine: {machine()}" + (f", torch {ref[0].__version__} ({args.threads} threads)" if ref else ""))
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    rows = []
    for size, batch in parse_cases(args.cases):
        images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        x = jax.device_put(images)
        t = time.perf_counter()
        compiled = jax.jit(model.apply).lower(variables, x).compile()
        compile_s = time.perf_counter() - t
        fns: dict[str, Callable[[], Any]] = {"jax": lambda: jax.block_until_ready(compiled(variables, x))}
        diff = float("nan")
        if ref is not None:
            torch, tmodel = ref
            xt = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).contiguous()

            def run_torch() -> Any:
                with torch.no_grad():
                    return tmodel(xt)[0]
            fns["torch"] = run_torch
            ours = np.asarray(compiled(variables, x))
            diff = float(np.abs(ours - run_torch().reshape(batch, -1).numpy()).max())
        times, _ = alternate(fns, args.warmup, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((f"{batch}x{size}x{size}", compile_s, med.get("jax"), med.get("torch"), diff))

    print(f"\nmedian of {args.repeats} after {args.warmup} warm-up; load average now: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; JAX dtype {args.dtype}")
    print(f"{'batch':>14} {'compile s':>10} {'jax ms':>9} {'img/s':>8} {'torch ms':>9} {'img/s':>8} "
          f"{'jax/torch':>9} {'max|diff|':>10}")
    for name, compile_s, tj, tt, diff in rows:
        n = int(name.split("x")[0])
        torch_cols = (f"{tt * 1e3:9.1f} {n / tt:8.1f} {tj / tt:9.2f} {diff:10.2e}" if tt is not None
                      else f"{'-':>9} {'-':>8} {'-':>9} {'-':>10}")
        print(f"{name:>14} {compile_s:10.1f} {tj * 1e3:9.1f} {n / tj:8.1f} {torch_cols}")


if __name__ == "__main__":
    main()

"""Stage-two GPT benchmarks: KV-cached sampling, the 24-layer GPT's weight-read bandwidth,
sliding-window sampling and a training step.

    python bench/bench_sampling.py                 # all cases
    python bench/bench_sampling.py --cases a,c --repeats 5 --bf16
    python bench/bench_sampling.py --cases a --no-reference --plain threads

``--plain NAMES`` (repeatable; NAMES a comma list of transformer_jax.cpu_backend.STRATEGIES, or ``all``) times
JAX once more per case with those CPU strategies turned off, alternating with the default: the A/B that keeps
or removes each CPU-only path (bench/README.md, "CPU strategies, measured again").

If torch and taming-transformers are importable (``pip install -e ".[reference]"``), the reference
(taming.modules.transformer.mingpt: GPT, sample_with_past, sample; a plain crop loop for the sliding window;
a torch AdamW step) runs on the same config and weights in the same process, alternating with JAX; medians
and ratios are printed. Otherwise only the JAX numbers are printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common_jax.host_memory import keep_freed_host_memory  # noqa: E402


def _train_step_only(argv: list[str]) -> bool:
    """``--cases d`` alone: how case d is run, in a process of its own (see main)."""
    return any(a == "--cases=d" or (a == "--cases" and argv[i + 1:i + 2] == ["d"]) for i, a in enumerate(argv))


if __name__ == "__main__" and _train_step_only(sys.argv[1:]):
    # The train entry points' malloc setting, for both frameworks; first, before any library starts threads.
    keep_freed_host_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.linen import meta  # noqa: E402

from _timing import alternate, machine  # noqa: E402
from bench_gpt_device import compile_train_step  # noqa: E402
from transformer_jax.convert import to_mingpt  # noqa: E402
from transformer_jax import cpu_backend  # noqa: E402
from transformer_jax.decode_kernels import prepare_decode_variables  # noqa: E402
from transformer_jax.decode_threads import decode_threads  # noqa: E402
from transformer_jax.gpt import GPT  # noqa: E402
from transformer_jax.sampling import sample  # noqa: E402
from transformer_jax.sliding_window import sample_sliding_window, window_offset  # noqa: E402

SMALL = dict(vocab_size=1024, block_size=257, n_layer=4, n_head=4, n_embd=256)
LARGE = dict(vocab_size=1024, block_size=257, n_layer=24, n_head=16, n_embd=1536)
COPY_GBPS = 22.0  # measured memory-copy bandwidth of the reference machine, for comparison only


def _reference():
    """(torch, taming mingpt module) or None."""
    try:
        import torch
        from taming.modules.transformer import mingpt
    except Exception as e:  # noqa: BLE001 - any import failure means "no reference here"
        print(f"[reference] torch/taming not importable ({type(e).__name__}: {e}); JAX numbers only")
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch, mingpt


def _alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Warm every function once, then alternate them ``repeats`` times; medians in seconds (every run printed)."""
    wall, cpu = alternate(fns, 1, repeats)
    for k, v in wall.items():
        print(f"  runs of {k}: {' '.join(f'{t * 1e3:.0f}' for t in v)} ms wall, "
              f"median {statistics.median(cpu[k]) * 1e3:.0f} ms process CPU")
    return {k: statistics.median(v) for k, v in wall.items()}


def _report(title: str, med: dict[str, float], extra: dict[str, str] | None = None) -> None:
    print(f"\n== {title}")
    jax_t = med["jax"]
    for k, t in med.items():
        ratio = "" if k == "jax" else f"   ({t / jax_t:.2f}x the JAX time)"
        print(f"  {k:>24s}: {t * 1e3:10.2f} ms{ratio}")
    for k, v in (extra or {}).items():
        print(f"  {k:>24s}: {v}")


def _plain(fn: Callable[[], Any], names: str) -> Callable[[], Any]:
    """``fn`` run (and so traced) with the CPU strategies ``names`` turned off."""
    def run():
        with cpu_backend.plain(*names.split(",")):
            return fn()
    return run


def _init(cfg: dict, dtype: Any) -> tuple[GPT, Any]:
    model = GPT(**cfg, dtype=dtype)
    v = meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return model, v


def _torch_model(ref, cfg: dict, variables: Any):
    torch, mingpt = ref
    m = mingpt.GPT(**cfg)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in to_mingpt(variables).items()}
    m.load_state_dict(sd, strict=True)
    return m.eval()


def _weight_bytes(params: Any) -> int:
    skip = {"tok_emb", "pos_emb"}  # only B rows of these are read per step
    return sum(x.size * x.dtype.itemsize for k, sub in params.items() if k not in skip
               for x in jax.tree_util.tree_leaves(sub))


def case_sampling(cfg: dict, steps: int, batch: int, repeats: int, ref, bf16: bool, label: str,
                  plain: tuple[str, ...] = ()) -> None:
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    model, v = _init(cfg, dtype)
    if bf16:  # bf16 weights in memory: halves the bytes read per step
        v = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), v)
    ref_v = v = jax.block_until_ready(v)  # the init above runs asynchronously: not part of the preparation
    # Prepared once, as the Sampler does (on CPU, bf16 kernels copied to (out, in); otherwise unchanged).
    t0 = time.perf_counter()
    v = jax.block_until_ready(prepare_decode_variables(model, v))
    prepare_s = time.perf_counter() - t0
    prefix = jnp.zeros((batch, 1), jnp.int32)
    keys = iter(jax.random.split(jax.random.key(1), 10 * repeats + 10))
    fns = {"jax": lambda: sample(model, v, prefix, steps, next(keys), top_k=100).block_until_ready()}
    for names in plain:  # the unprepared variables: sample prepares them as the plain path does
        fns[f"jax plain({names})"] = _plain(
            lambda: sample(model, ref_v, prefix, steps, next(keys), top_k=100).block_until_ready(), names)
    if ref is not None:
        torch, mingpt = ref
        tm = _torch_model(ref, cfg, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), ref_v))
        x0 = torch.zeros((batch, 1), dtype=torch.long)
        fns["taming sample_with_past"] = lambda: mingpt.sample_with_past(x0, tm, steps, top_k=100, top_p=1.0)
        if steps <= 64 or cfg["n_layer"] <= 4:
            fns["taming sample"] = lambda: mingpt.sample(tm, x0, steps, sample=True, top_k=100)
    t0 = time.perf_counter()
    sample(model, v, prefix, steps, jax.random.key(0), top_k=100).block_until_ready()
    compile_s = time.perf_counter() - t0
    med = _alternate(fns, repeats)
    chunks = decode_threads(model, batch)  # each concurrently decoded row chunk reads all the weights
    wb = _weight_bytes(ref_v["params"]) * chunks
    extra = {"prepare_decode_variables": f"{prepare_s:.2f} s (once per model)",
             "first call (compile+run)": f"{compile_s:.2f} s",
             "per token step": f"{med['jax'] / steps * 1e3:.3f} ms",
             "row chunks on threads": f"{chunks} (transformer_jax.sampling.decode_threads)",
             "weights read per step": f"{wb / 1e9:.3f} GB ({'bf16' if bf16 else 'f32'}, all chunks)",
             "achieved weight GB/s": f"{wb * steps / med['jax'] / 1e9:.1f} (copy bandwidth ~{COPY_GBPS} GB/s)"}
    for names in plain:
        with cpu_backend.plain(*names.split(",")):
            extra[f"plain({names}) row chunks"] = str(decode_threads(model, batch))
    _report(f"({label}) {steps}-token sampling, batch {batch}, GPT {cfg['n_layer']}L x {cfg['n_embd']} "
            f"x {cfg['n_head']}h, vocab {cfg['vocab_size']}, top_k 100", med, extra)


def _torch_sliding(ref, tm, shape, window, batch, top_k):
    """taming's scripts/sample_conditional.py loop with an SOS prefix instead of spatial conditioning."""
    torch, mingpt = ref
    h, w = shape
    idx = torch.zeros((batch, h, w), dtype=torch.long)
    sos = torch.zeros((batch, 1), dtype=torch.long)
    with torch.no_grad():
        for i in range(h):
            li = window_offset(i, h, window)
            for j in range(w):
                lj = window_offset(j, w, window)
                patch = idx[:, i - li:i - li + window, j - lj:j - lj + window].reshape(batch, -1)
                logits, _ = tm(torch.cat((sos, patch), 1)[:, :-1])
                logits = logits[:, -window * window:].reshape(batch, window, window, -1)[:, li, lj]
                logits = mingpt.top_k_logits(logits, top_k)
                idx[:, i, j] = torch.multinomial(torch.softmax(logits, -1), 1)[:, 0]
    return idx


def case_sliding(repeats: int, ref, bf16: bool, plain: tuple[str, ...] = ()) -> None:
    shape, window, batch = (16, 32), 16, 4
    model, v = _init(SMALL, jnp.bfloat16 if bf16 else jnp.float32)
    prefix = jnp.zeros((batch, 1), jnp.int32)
    keys = iter(jax.random.split(jax.random.key(1), 10 * repeats + 10))
    fns = {}
    variants = (("jax", dict(method="cached")), ("jax prefix, exact rows", dict(method="prefix", buckets=None)),
                ("jax prefix, 4 buckets", dict(method="prefix", buckets=4)))
    for name, opts in variants:
        fns[name] = (lambda o: lambda: sample_sliding_window(
            model, v, shape, window, next(keys), prefix=prefix, top_k=100, **o).block_until_ready())(opts)
    for names in plain:
        fns[f"jax plain({names})"] = _plain(lambda: sample_sliding_window(
            model, v, shape, window, next(keys), prefix=prefix, top_k=100, method="cached").block_until_ready(), names)
    t0 = time.perf_counter()
    fns["jax"]()
    compile_s = time.perf_counter() - t0
    if ref is not None:
        tm = _torch_model(ref, SMALL, v)
        fns["taming crop loop"] = lambda: _torch_sliding(ref, tm, shape, window, batch, 100)
    # Each run is hundreds of forwards: two repeats, unless an A/B asks for the repeats given.
    med = _alternate(fns, repeats if plain else max(1, min(repeats, 2)))
    n = shape[0] * shape[1]
    _report(f"(c) sliding-window sampling, grid {shape}, window {window}, batch {batch}, small GPT (jax: cached)", med,
            {"first call (compile+run)": f"{compile_s:.2f} s",
             "per position": f"{med['jax'] / n * 1e3:.3f} ms"})


def case_train(repeats: int, ref, bf16: bool, plain: tuple[str, ...] = ()) -> None:
    batch, t = 16, 256
    opt = optax.adamw(3e-4, weight_decay=0.01)
    rng = np.random.default_rng(0)
    data = jnp.asarray(rng.integers(0, SMALL["vocab_size"], (batch, t + 1)), jnp.int32)

    def jax_step(dtype):
        model, v = _init(SMALL, dtype)
        compiled, flops = compile_train_step(model, opt, v["params"], data)
        state = {"p": v["params"], "o": opt.init(v["params"])}

        def run():
            state["p"], state["o"], loss = compiled(state["p"], state["o"], data)
            loss.block_until_ready()
        return run, flops, v

    run_jax, flops, v = jax_step(jnp.bfloat16 if bf16 else jnp.float32)
    fns = {"jax": run_jax}
    for names in plain:  # traced (compiled) with those strategies off
        with cpu_backend.plain(*names.split(",")):
            fns[f"jax plain({names})"] = jax_step(jnp.bfloat16 if bf16 else jnp.float32)[0]
    if bf16:  # the float32 step beside it: what bf16 compute gains within JAX
        fns["jax float32"] = jax_step(jnp.float32)[0]
    if ref is not None:
        torch, _ = ref
        tm = _torch_model(ref, SMALL, v).train()
        topt = torch.optim.AdamW(tm.parameters(), lr=3e-4, weight_decay=0.01)
        tx = torch.from_numpy(np.asarray(data)).long()
        tin, tgt = tx[:, :-1].contiguous(), tx[:, 1:].contiguous()  # minGPT views the targets

        def torch_step(autocast: bool) -> Callable[[], None]:
            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    logits, loss = tm(tin, targets=tgt)
                topt.zero_grad(set_to_none=True)
                loss.backward()
                topt.step()
            return run
        fns["torch AdamW step"] = torch_step(False)
        if bf16:  # torch's own mixed precision on CPU (oneDNN bf16), the like-for-like reference
            fns["torch bf16 autocast"] = torch_step(True)
    med = _alternate(fns, repeats)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(v["params"]))
    analytic = 6 * n_params * batch * t + 12 * SMALL["n_layer"] * batch * t * t * SMALL["n_embd"]
    _report(f"(d) GPT train step (AdamW), batch {batch} x {t} tokens, small GPT ({n_params / 1e6:.1f} M params)"
            f"{', bf16 compute' if bf16 else ''}",
            med, {"XLA flops / step": f"{flops / 1e9:.2f} GFLOP -> {flops / med['jax'] / 1e9:.1f} GFLOP/s",
                  "6N*tokens + attn": f"{analytic / 1e9:.2f} GFLOP -> {analytic / med['jax'] / 1e9:.1f} GFLOP/s"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="a,b,c,d", help="comma list of a (small sampling), b (24-layer "
                    "sampling), c (sliding window), d (train step)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="bf16 compute (and bf16 weights for sampling)")
    ap.add_argument("--no-reference", action="store_true", help="skip torch/taming even if importable")
    ap.add_argument("--plain", action="append", default=[], metavar="NAMES",
                    help="also time JAX with these CPU strategies off (comma list of "
                    f"{', '.join(cpu_backend.STRATEGIES)}, or all), alternating with the default; repeatable")
    args = ap.parse_args()
    plain = tuple(args.plain)
    for names in plain:
        cpu_backend._parse(names)  # an unknown name fails before any case runs
    cases = set(args.cases.split(","))
    # The train step runs with the train entry points' malloc setting, which is process-wide and slowed the
    # decode loops (~8%): with other cases it gets a process of its own, started after them.
    train_apart = "d" in cases and len(cases) > 1
    ref = None if args.no_reference else _reference()
    print(f"machine: {machine()}")
    if "a" in cases:
        case_sampling(SMALL, 256, 4, args.repeats, ref, args.bf16, "a", plain)
    if "b" in cases:
        case_sampling(LARGE, 64, 4, args.repeats, ref, args.bf16, "b", plain)
    if "c" in cases:
        case_sliding(args.repeats, ref, args.bf16, plain)
    if "d" in cases and not train_apart:
        case_train(args.repeats, ref, args.bf16, plain)
    if train_apart:
        sys.stdout.flush()
        flags = ["--bf16"] * args.bf16 + ["--no-reference"] * args.no_reference + [f"--plain={n}" for n in plain]
        subprocess.run([sys.executable, os.path.abspath(__file__), "--cases", "d", "--repeats", str(args.repeats),
                        *flags], check=True)


if __name__ == "__main__":
    main()

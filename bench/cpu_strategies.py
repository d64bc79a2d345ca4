"""Every CPU-only strategy against the plain path, side by side: one table of medians and ratios.

    python bench/cpu_strategies.py                  # every strategy (about 6-8 min on an idle 2-core host)
    python bench/cpu_strategies.py --quick          # smoke run: tiny models, 2 rounds (about 1 min)
    python bench/cpu_strategies.py --only decode_f32,train_malloc --rounds 9 --markdown

Issue 25 keeps a CPU-only path only where a bench case shows it at least 1.2x faster than the plain path. Each
group below runs in a fresh process of its own (so no group inherits another's heap, compiled programs or
threads); inside it, the variants are compiled once each, warmed once, then timed in turn ``--rounds`` times
(alternating, so a change in machine load does not favour one side), and the medians are compared.
Ratio = plain / with the strategy: above 1 the strategy is faster. The strategies (transformer_jax.cpu_backend,
switched off with ``cpu_backend.plain`` while a variant is traced, as ``TAMING_JAX_CPU_PLAIN`` does):

- ``decode_f32`` (case a: float32 4-layer GPT, 256 tokens, batch 4): ``threads`` (row chunks decoded
  concurrently on host threads).
- ``decode_bf16`` (a bf16 12-layer x 1024 GPT, 32 tokens, batch 4: its 300 MB of weights stream from memory
  as case b's 24-layer GPT does, at a fifth of its time; ``--large-decode`` runs case b itself):
  ``decode_kernels`` ((out, in) bf16 kernel copies), and ``mixed_dense`` in decode (both sides without the copies).
- ``train_bf16`` (case d, AdamW step, batch 16 x 256, 4-layer GPT, in bf16): ``mixed_dense`` (dense products).
- ``train_malloc``: the glibc malloc setting (``common_jax.host_memory``) is process-wide and read at start, so
  case d (float32) runs in separate processes, kept and opted out (``TAMING_JAX_KEEP_HOST_MEMORY=0``) in turn,
  ``--malloc-rounds`` pairs; one persistent compilation cache serves them all, so a process loads its program
  instead of compiling it. Each process's median of ``--malloc-steps`` steps counts once.

The train-step groups apply the train entry points' malloc setting and the decode groups do not, as the entry
points that run them do. The load average before and after each group is printed beside it: on a host with other
jobs the ratios of strategies that use the second core say nothing (bench/README.md, "CPU strategies, measured
again").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

TRAIN_GROUPS = ("train_bf16", "train_malloc")
GROUPS = ("decode_f32", "decode_bf16", "train_bf16", "train_malloc")


def _child_group(argv: list[str]) -> str | None:
    return argv[argv.index("--child") + 1] if "--child" in argv[:-1] else None


if __name__ == "__main__" and _child_group(sys.argv) in TRAIN_GROUPS:
    # As the train entry points do: first, before any library starts threads (opted out by the environment).
    from common_jax.host_memory import keep_freed_host_memory
    keep_freed_host_memory()

# ----------------------------------------------------------------------------------------------------------
# Cases (sizes; --quick shrinks every one of them to a smoke test).

CASE_A = dict(vocab_size=1024, block_size=257, n_layer=4, n_head=4, n_embd=256)
CASE_B_MID = dict(vocab_size=1024, block_size=257, n_layer=12, n_head=16, n_embd=1024)
CASE_B_LARGE = dict(vocab_size=1024, block_size=257, n_layer=24, n_head=16, n_embd=1536)
QUICK_GPT = dict(vocab_size=128, block_size=33, n_layer=1, n_head=2, n_embd=64)


def _sizes(quick: bool, large_decode: bool) -> dict[str, Any]:
    if quick:
        return dict(a=(QUICK_GPT, 16, 4), b=(QUICK_GPT, 8, 4), d=(QUICK_GPT, 4, 32))
    return dict(a=(CASE_A, 256, 4), b=(CASE_B_LARGE if large_decode else CASE_B_MID, 64 if large_decode else 32, 4),
                d=(CASE_A, 16, 256))


# ----------------------------------------------------------------------------------------------------------
# Child: one group's variants, timed in turn; rows written as JSON.

def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _timed(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, Any]]:
    from _timing import alternate
    wall, cpu = alternate(fns, 1, rounds)
    return {k: {"ms": statistics.median(wall[k]) * 1e3, "cpu_ms": statistics.median(cpu[k]) * 1e3,
                "runs_ms": [round(t * 1e3) for t in wall[k]]} for k in fns}


def _gpt(cfg: dict, dtype: Any) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp
    from flax.linen import meta
    from transformer_jax.gpt import GPT
    model = GPT(**cfg, dtype=dtype)
    v = meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return model, jax.block_until_ready(v)


def _sampling(model: Any, variables: Any, batch: int, steps: int, plain: tuple[str, ...]) -> Callable[[], Any]:
    """One sampling call per run, traced (and so compiled) with the ``plain`` strategies off."""
    import jax
    import jax.numpy as jnp
    from transformer_jax import cpu_backend
    from transformer_jax.sampling import sample
    prefix = jnp.zeros((batch, 1), jnp.int32)
    keys = iter(jax.random.split(jax.random.key(1), 10_000))

    def run():
        with cpu_backend.plain(*plain) if plain else _nothing():
            return sample(model, variables, prefix, steps, next(keys), top_k=100).block_until_ready()
    return run


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _train_step(cfg: dict, dtype: Any, batch: int, t: int, plain: tuple[str, ...] = ()) -> Callable[[], None]:
    """One AdamW step per run (bench_gpt_device.compile_train_step), compiled with the ``plain`` strategies off."""
    import jax.numpy as jnp
    import numpy as np
    import optax
    from bench_gpt_device import compile_train_step
    from transformer_jax import cpu_backend
    model, v = _gpt(dict(cfg, block_size=max(cfg["block_size"], t + 1)), dtype)
    opt = optax.adamw(3e-4, weight_decay=0.01)
    data = jnp.asarray(np.random.default_rng(0).integers(0, cfg["vocab_size"], (batch, t + 1)), jnp.int32)
    with cpu_backend.plain(*plain) if plain else _nothing():
        compiled, _ = compile_train_step(model, opt, v["params"], data)
    state = {"p": v["params"], "o": opt.init(v["params"])}

    def run():
        state["p"], state["o"], loss = compiled(state["p"], state["o"], data)
        loss.block_until_ready()
    return run


def _rows(group: str, case: str, timed: dict[str, dict[str, Any]], pairs: list[tuple[str, str, str]],
          extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (strategy, variant with it, variant without it)."""
    out = []
    for strategy, on, off in pairs:
        a, b = timed[on], timed[off]
        out.append(dict(group=group, strategy=strategy, case=case, on=on, off=off, on_ms=a["ms"], off_ms=b["ms"],
                        ratio=b["ms"] / a["ms"], cpu_ratio=b["cpu_ms"] / a["cpu_ms"], on_cpu_ms=a["cpu_ms"],
                        off_cpu_ms=b["cpu_ms"], on_runs=a["runs_ms"], off_runs=b["runs_ms"], **extra))
    return out


def run_group(group: str, rounds: int, quick: bool, large_decode: bool) -> list[dict[str, Any]]:
    import jax.numpy as jnp
    sizes = _sizes(quick, large_decode)
    if group == "decode_f32":
        cfg, steps, batch = sizes["a"]
        model, v = _gpt(cfg, jnp.float32)
        variants = {"default": (), "no threads": ("threads",)}
        fns = {k: _sampling(model, v, batch, steps, p) for k, p in variants.items()}
        case = f"(a) f32 sampling, {steps} tokens, batch {batch}, {cfg['n_layer']}L x {cfg['n_embd']}"
        return _rows(group, case, _timed(fns, rounds),
                     [("threads", "default", "no threads")], {})
    if group == "decode_bf16":
        import jax
        from transformer_jax.decode_kernels import prepare_decode_variables
        cfg, steps, batch = sizes["b"]
        model, v = _gpt(cfg, jnp.bfloat16)
        v = jax.block_until_ready(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), v))
        prepared = jax.block_until_ready(prepare_decode_variables(model, v))   # once per model, as the Sampler does
        fns = {"default": _sampling(model, prepared, batch, steps, ()),
               "no decode_kernels": _sampling(model, v, batch, steps, ("decode_kernels",)),
               "no decode_kernels, no mixed_dense": _sampling(model, v, batch, steps,
                                                              ("decode_kernels", "mixed_dense"))}
        case = f"(b) bf16 sampling, {steps} tokens, batch {batch}, {cfg['n_layer']}L x {cfg['n_embd']}"
        return _rows(group, case, _timed(fns, rounds),
                     [("decode_kernels", "default", "no decode_kernels"),
                      ("mixed_dense (decode)", "no decode_kernels", "no decode_kernels, no mixed_dense")], {})
    if group == "train_bf16":
        cfg, batch, t = sizes["d"]
        fns = {"default": _train_step(cfg, jnp.bfloat16, batch, t),
               "no mixed_dense": _train_step(cfg, jnp.bfloat16, batch, t, ("mixed_dense",))}
        case = f"(d) bf16 AdamW step, batch {batch} x {t}, {cfg['n_layer']}L x {cfg['n_embd']}"
        return _rows(group, case, _timed(fns, rounds), [("mixed_dense (train)", "default", "no mixed_dense")], {})
    raise ValueError(f"unknown group {group!r}; choices: {', '.join(GROUPS)}")


def run_malloc_process(steps: int, quick: bool) -> dict[str, Any]:
    """Case d (float32) in this process, under whatever malloc setting it started with."""
    import jax.numpy as jnp
    from common_jax.host_memory import host_memory_kept
    cfg, batch, t = _sizes(quick, False)["d"]
    run = _train_step(cfg, jnp.float32, batch, t)
    timed = _timed({"step": run}, steps)["step"]
    return dict(kept=host_memory_kept(), **timed)


# ----------------------------------------------------------------------------------------------------------
# Parent: each group in a fresh process, then one table.

def _rounds(args: argparse.Namespace, group: str) -> int:
    """Timed runs of each variant: ``--rounds``, else 7 for the decode groups and 5 for the (slower) train steps."""
    return args.rounds or (2 if args.quick else 7 if group.startswith("decode") else 5)


def _child(args: argparse.Namespace, group: str, env: dict[str, str] | None = None) -> Any:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", group, "--out", out.name,
               "--rounds", str(_rounds(args, group)), "--malloc-steps", str(args.malloc_steps)]
        cmd += ["--quick"] * args.quick + ["--large-decode"] * args.large_decode
        # The defaults of the strategies, whatever this shell has set (the groups switch them themselves).
        env = {k: v for k, v in (os.environ if env is None else env).items()
               if k not in ("TAMING_JAX_CPU_PLAIN", "TAMING_JAX_DECODE_THREADS")}
        subprocess.run(cmd, check=True, env=env)
        return json.load(open(out.name))


def _malloc_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Pairs of processes, kept and opted out in turn, sharing one compilation cache (the first compiles)."""
    kept, out = [], []
    with tempfile.TemporaryDirectory() as cache:
        base = {k: v for k, v in os.environ.items() if k != "TAMING_JAX_KEEP_HOST_MEMORY"}
        base.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        if not args.quick:
            _child(args, "train_malloc", base)     # fills the cache; not timed
        for _ in range(args.malloc_rounds):
            kept.append(_child(args, "train_malloc", base))
            out.append(_child(args, "train_malloc", dict(base, TAMING_JAX_KEEP_HOST_MEMORY="0")))
    if not all(r["kept"] for r in kept) or any(r["kept"] for r in out):
        print(f"warning: the malloc setting did not take effect as asked (kept: {[r['kept'] for r in kept]}, "
              f"opted out: {[r['kept'] for r in out]})")
    on = statistics.median(r["ms"] for r in kept)
    off = statistics.median(r["ms"] for r in out)
    on_cpu = statistics.median(r["cpu_ms"] for r in kept)
    off_cpu = statistics.median(r["cpu_ms"] for r in out)
    cfg, batch, t = _sizes(args.quick, False)["d"]
    return [dict(group="train_malloc", strategy="malloc setting (host_memory)",
                 case=f"(d) f32 AdamW step, batch {batch} x {t}, {cfg['n_layer']}L x {cfg['n_embd']}, one process each",
                 on="kept", off="opted out", on_ms=on, off_ms=off, ratio=off / on, cpu_ratio=off_cpu / on_cpu,
                 on_cpu_ms=on_cpu, off_cpu_ms=off_cpu, on_runs=[round(r["ms"]) for r in kept],
                 off_runs=[round(r["ms"]) for r in out])]


def _table(rows: list[dict[str, Any]], markdown: bool, quick: bool) -> str:
    head = ["strategy", "case", "with (ms)", "plain (ms)", "ratio", "CPU ratio", "runs", "load", "verdict"]
    lines = []
    for r in rows:
        verdict = "none (quick)" if quick else "keeps (>= 1.2x)" if r["ratio"] >= 1.2 else "below 1.2x"
        lines.append([r["strategy"], r["case"], f"{r['on_ms']:.0f}", f"{r['off_ms']:.0f}", f"{r['ratio']:.2f}",
                      f"{r['cpu_ratio']:.2f}", str(len(r["on_runs"])), f"{r['load'][0]}-{r['load'][1]}", verdict])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(ln) + " |" for ln in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda ln: "  ".join(x.ljust(w) for x, w in zip(ln, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(ln) for ln in lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma list of groups: {', '.join(GROUPS)}")
    ap.add_argument("--rounds", type=int, default=None, help="timed runs of each variant (default 7 for the decode "
                    "groups, 5 for the train steps; quick 2)")
    ap.add_argument("--malloc-rounds", type=int, default=None, help="process pairs for the malloc setting "
                    "(default 3; quick 1)")
    ap.add_argument("--malloc-steps", type=int, default=None, help="timed steps per malloc process (default 4; "
                    "quick 2)")
    ap.add_argument("--quick", action="store_true", help="tiny models and 2 rounds: checks the script, measures "
                    "nothing")
    ap.add_argument("--large-decode", action="store_true", help="decode_bf16 on case b's 24-layer x 1536 GPT, "
                    "64 tokens (about 5x its default time)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown (bench/README.md)")
    ap.add_argument("--json", default="", help="also write every row (with each run's time) to this file")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.malloc_rounds = args.malloc_rounds or (1 if args.quick else 3)
    args.malloc_steps = args.malloc_steps or (2 if args.quick else 4)

    if args.child:
        args.rounds = _rounds(args, args.child)
        load = _load()
        if args.child == "train_malloc":
            result: Any = run_malloc_process(args.malloc_steps, args.quick)
        else:
            result = [dict(r, load=[load, _load()]) for r in run_group(args.child, args.rounds, args.quick,
                                                                        args.large_decode)]
        with open(args.out, "w") as f:
            json.dump(result, f)
        return

    groups = [g for g in args.only.split(",") if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise SystemExit(f"--only: unknown groups {unknown}; choices: {', '.join(GROUPS)}")
    import jax  # noqa: F401  (the machine line only; each group runs in its own process)
    from _timing import machine
    print(f"machine: {machine()}")
    print(f"{'quick: tiny models, the numbers mean nothing; ' if args.quick else ''}"
          f"1-minute load average now {_load()}")
    if _load() > 0.5 and not args.quick:
        print("warning: the load average is above 0.5: other jobs share the cores, and strategies that use the "
              "second core cannot show their gain (measure on an idle host)")
    rows, t0 = [], time.perf_counter()
    for g in groups:
        t = time.perf_counter()
        if g == "train_malloc":
            load = _load()
            rows += [dict(r, load=[load, _load()]) for r in _malloc_rows(args)]
        else:
            rows += _child(args, g)
        print(f"[{g}: {time.perf_counter() - t:.0f} s]", flush=True)
    print(f"\nRatio = plain / with the strategy (above 1: the strategy is faster); CPU ratio: the same of process CPU "
          f"time. {time.perf_counter() - t0:.0f} s in all.\n")
    print(_table(rows, args.markdown, args.quick))
    for r in rows:
        print(f"  {r['strategy']}: runs with {r['on_runs']} ms, plain {r['off_runs']} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

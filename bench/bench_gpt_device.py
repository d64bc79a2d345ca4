"""Stage-two GPT on an accelerator: MFU of the AdamW train step and KV-cached sampling throughput.

    python bench/bench_gpt_device.py --peak_tflops 989                  # H100 SXM dense bf16 peak
    python bench/bench_gpt_device.py --peak_tflops 989 --batch 32 --remat
    python bench/bench_gpt_device.py --layers 2 --embd 128 --heads 2 --vocab 512 --batch 2 --sample_batch 2 \
        --peak_tflops 1                                                 # CPU smoke test of the script

``--block llama`` times LlamaGen's LLaMA block instead (``--layers 24 --embd 1024 --heads 16`` is GPT-L; position 0
holds a class id of its 1000-class table, 2-D RoPE over the sqrt(tokens) x sqrt(tokens) code grid).

Default sizes are the paper's cIN transformer (configs/transformer_imagenet_cin.py: 24 layers x 1536 wide,
16 heads, 16384-code vocabulary, 256 tokens). Train step: float32 parameters and AdamW state, ``--dtype``
compute (bfloat16 by default), parameters and batch donated as the training loop does; random tokens
(never zeros). FLOPs per step: ``6 * (params - embeddings) * tokens + 12 * layers * batch * T^2 * width`` (matmuls forward
and backward plus attention scores and values, the causal half not discounted), printed beside the
count of every matmul in the traced step (``_timing.matmul_flops``). Sampling: ``transformer_jax.sampling.sample`` (prefill + one compiled decode loop), top-k 100,
tokens per second over the whole batch. Medians of ``--repeats`` timed calls after a warm-up call, each
synchronised with ``block_until_ready``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.linen import meta  # noqa: E402

from _timing import alternate, machine, matmul_flops, xla_flops  # noqa: E402
from transformer_jax.gpt import GPT  # noqa: E402
from transformer_jax.sampling import sample  # noqa: E402


PREFIX = [0]  # leading positions that hold class ids of the block's own table (1 for --block llama)


def class_ids(model: GPT, batch: int) -> jax.Array:
    """Class ids for the leading positions the block embeds from its class table (none for minGPT)."""
    return jax.random.randint(jax.random.key(5), (batch, PREFIX[0]), 0, 1000, jnp.int32)


def lm_loss(model: GPT) -> Any:
    """``loss(params, tokens)``: next-token cross-entropy, as minGPT's forward computes it."""
    def loss_fn(p, x):
        logits = model.apply({"params": p}, x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
    return loss_fn


def compile_train_step(model: GPT, opt: optax.GradientTransformation, params: Any, data: jax.Array
                       ) -> tuple[Any, float]:
    """(compiled ``step(params, opt_state, tokens) -> (params, opt_state, loss)`` with parameters and optimizer
    state donated, XLA's FLOP count of it)."""
    loss_fn = lm_loss(model)

    def step(p, o, x):
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        updates, o = opt.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt.init(params), data).compile()
    return compiled, xla_flops(compiled)


def train_step_mfu(model: GPT, batch: int, repeats: int, peak_tflops: float) -> dict[str, float]:
    params = meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    opt = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.01)
    t = model.block_size
    data = jax.random.randint(jax.random.key(1), (batch, t + 1), 0, model.vocab_size, jnp.int32)
    data = data.at[:, :PREFIX[0]].set(class_ids(model, batch))

    t0 = time.perf_counter()
    compiled, _ = compile_train_step(model, opt, params, data)
    compile_s = time.perf_counter() - t0
    state = {"p": params, "o": opt.init(params)}
    # XLA's own count misses the cuBLAS/cuDNN calls on GPUs; the jaxpr count is backend-independent.
    traced_flops = matmul_flops(jax.value_and_grad(lm_loss(model)), params, data)

    def run() -> None:
        state["p"], state["o"], loss = compiled(state["p"], state["o"], data)
        if not bool(jnp.isfinite(loss)):
            raise SystemExit(f"train step produced a non-finite loss {loss}")

    sec = statistics.median(alternate({"step": run}, 1, repeats)[0]["step"])
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    # Embedding lookups are gathers, not matmuls: they are left out of the 6 * params term.
    n_matmul = n_params - sum(params[k].size for k in ("tok_emb", "pos_emb", "cls_emb") if k in params)
    flops = 6 * n_matmul * batch * t + 12 * model.n_layer * batch * t * t * model.n_embd
    return dict(params_m=n_params / 1e6, compile_s=compile_s, step_ms=sec * 1e3, flops_t=flops / 1e12,
                jaxpr_flops_t=traced_flops / 1e12, tflops=flops / sec / 1e12,
                mfu=100 * flops / sec / 1e12 / peak_tflops)


def sampling_throughput(model: GPT, batch: int, steps: int, repeats: int) -> dict[str, float]:
    variables = meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    prefix = jax.random.randint(jax.random.key(2), (batch, 1), 0, model.vocab_size, jnp.int32)
    prefix = prefix.at[:, :PREFIX[0]].set(class_ids(model, batch))
    keys = iter(jax.random.split(jax.random.key(3), repeats + 2))
    t0 = time.perf_counter()
    sample(model, variables, prefix, steps, jax.random.key(4), top_k=100).block_until_ready()
    compile_s = time.perf_counter() - t0
    def run() -> None:
        sample(model, variables, prefix, steps, next(keys), top_k=100).block_until_ready()

    sec = statistics.median(alternate({"sample": run}, 1, repeats)[0]["sample"])
    return dict(compile_s=compile_s, total_ms=sec * 1e3, ms_per_step=sec / steps * 1e3,
                tokens_per_s=batch * steps / sec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--embd", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=256, help="sequence length (block_size)")
    ap.add_argument("--batch", type=int, default=16, help="train-step batch (sequences)")
    ap.add_argument("--sample_batch", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--remat", action="store_true", help="rematerialise each block in the backward pass")
    ap.add_argument("--attention_impl", default="", choices=["", "xla", "cudnn", "explicit"],
                    help="GPT.attention_impl for the train step ('' = jax's default)")
    ap.add_argument("--block", default="mingpt", choices=["mingpt", "llama"],
                    help="the GPT block: taming's minGPT or LlamaGen's LLaMA block (class table of 1000 + null)")
    ap.add_argument("--no_sample", action="store_true", help="time the train step only")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--peak_tflops", type=float, required=True,
                    help="the accelerator's dense peak for --dtype, TFLOP/s (e.g. 989 for bf16 on an H100 SXM)")
    args = ap.parse_args()
    if args.peak_tflops <= 0:
        raise SystemExit(f"--peak_tflops must be positive, got {args.peak_tflops}")
    block_options = ()
    if args.block == "llama":
        grid = int(round(args.tokens ** 0.5))  # input: the class token and all codes but the last
        if grid * grid != args.tokens:
            raise SystemExit(f"--block llama: --tokens must be a square (the code grid), got {args.tokens}")
        block_options = tuple(sorted(dict(grid_size=grid, num_classes=1000, cls_token_num=1).items()))
        PREFIX[0] = 1
    model = GPT(vocab_size=args.vocab, block_size=args.tokens, n_layer=args.layers, n_head=args.heads,
                n_embd=args.embd, dtype=jnp.dtype(args.dtype), remat=args.remat,
                attention_impl=args.attention_impl, block=args.block, block_options=block_options)
    print(f"machine: {machine()}")
    print(f"GPT ({args.block} block) {args.layers}L x {args.embd} x {args.heads}h, vocab {args.vocab}, "
          f"{args.tokens} tokens, {args.dtype} compute{', remat' if args.remat else ''}, attention {args.attention_impl or 'default'}")
    tr = train_step_mfu(model, args.batch, args.repeats, args.peak_tflops)
    sa = None if args.no_sample else sampling_throughput(model, args.sample_batch, args.tokens,
                                                         max(3, args.repeats // 3))
    print("\n| work | compile s | time | TFLOP | TFLOP/s | MFU | throughput |")
    print("|---|---|---|---|---|---|---|")
    print(f"| train step, batch {args.batch} x {args.tokens} ({tr['params_m']:.0f} M params) | "
          f"{tr['compile_s']:.1f} | {tr['step_ms']:.1f} ms | {tr['flops_t']:.3f} (jaxpr: {tr['jaxpr_flops_t']:.3f}) | "
          f"{tr['tflops']:.1f} | {tr['mfu']:.1f}% of {args.peak_tflops:g} | "
          f"{args.batch * args.tokens / tr['step_ms'] * 1e3:.0f} tokens/s |")
    if sa is None:
        return
    print(f"| sampling, batch {args.sample_batch}, {args.tokens} tokens, top-k 100 | {sa['compile_s']:.1f} | "
          f"{sa['total_ms']:.1f} ms ({sa['ms_per_step']:.2f} ms/step) | | | | "
          f"{sa['tokens_per_s']:.0f} tokens/s |")


if __name__ == "__main__":
    main()

"""The LLaMA-block GPT's train step: this project's stage-two step against LlamaGen's, on CPU, same weights, one
process, alternating.

    python bench/llamagen_train_step.py --llamagen_repo=/path/to/LlamaGen                  # GPT-B, batch 8 x 256 codes
    python bench/llamagen_train_step.py --llamagen_repo=/path/to/LlamaGen --size tiny --repeats 1   # check the script

JAX: ``transformer_jax.train.TransformerTask.train_step`` of configs/transformer_llamagen_imagenet.py's settings at
that size (class dropout 0.1, dropout 0.1 on tokens, residuals and FFN, AdamW 0.9/0.95 with decay 0.05 on every
matrix, clip 1.0), jitted. LlamaGen: the step of its ``autoregressive/train/train_c2i.py`` (forward with targets,
backward, ``clip_grad_norm_(1.0)``, AdamW with the same decay groups, ``zero_grad``), its model in train mode.
``--bf16``: bf16 compute on both (gpt.dtype, torch.autocast on CPU; float32 weights). Prints the median step
times and their ratio (the target: JAX at most 1.1x LlamaGen's time).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _llamagen import llamagen_model, parse_args, size_args  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bf16", action="store_true", help="bf16 compute on both sides")
    a = parse_args(p, default_batch=8)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from _timing import alternate, machine
    from configs.transformer_llamagen_imagenet import llamagen_config
    from transformer_jax.convert import from_llamagen
    from transformer_jax.train import TransformerTask

    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    args = size_args(a.size)
    grid = args["grid"]
    tmodel, _, sd, fields = llamagen_model(a.llamagen_repo, args, dropout=0.1)   # LlamaGen's training dropouts
    tmodel.train()

    config = llamagen_config(fields, grid)
    config.gpt.dtype = "bfloat16" if a.bf16 else ""
    config.data.global_batch_size = a.batch
    task = TransformerTask(config)
    state = task.init_state(jax.random.key(0))
    params = from_llamagen(sd, fields)[1]["params"]
    state = state.replace(params=params, opt_state=task.tx.init(params))
    step = jax.jit(task.train_step, donate_argnums=(0,))
    rng = np.random.default_rng(0)
    codes = rng.integers(0, fields["vocab_size"], (a.batch, grid, grid)).astype(np.int32)
    labels = rng.integers(0, 1000, (a.batch,)).astype(np.int32)
    batch = {"codes": jnp.asarray(codes), "label": jnp.asarray(labels)}
    box = {"state": state, "i": 0}

    def run_jax():
        box["state"], metrics = step(box["state"], batch, jax.random.key(box["i"]))
        box["i"] += 1
        metrics["loss"].block_until_ready()

    decay = [p for p in tmodel.parameters() if p.dim() >= 2]
    no_decay = [p for p in tmodel.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))
    z = torch.from_numpy(codes.reshape(a.batch, -1).astype(np.int64))
    c = torch.from_numpy(labels.astype(np.int64))

    def run_llamagen():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            _, loss = tmodel(cond_idx=c, idx=z[:, :-1], targets=z)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(machine())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LlamaGen GPT-{a.size} "
          f"({n_params / 1e6:.1f} M parameters): batch {a.batch} x {grid * grid} codes, "
          f"{'bf16' if a.bf16 else 'float32'} compute")
    wall, cpu = alternate({"jax": run_jax, "llamagen step": run_llamagen}, 1, a.repeats)
    med = {k: statistics.median(v) for k, v in wall.items()}
    for k, v in wall.items():
        print(f"  {k:>14s}: median {med[k]:8.3f} s   runs {' '.join(f'{t:.3f}' for t in v)} s, "
              f"process CPU median {statistics.median(cpu[k]):.3f} s")
    tokens = a.batch * grid * grid
    print(f"  jax / LlamaGen time: {med['jax'] / med['llamagen step']:.2f}x (target <= 1.1); "
          f"6 N tokens = {6 * n_params * tokens / 1e9:.1f} GFLOP -> jax {6 * n_params * tokens / med['jax'] / 1e9:.1f}"
          f" GFLOP/s, LlamaGen {6 * n_params * tokens / med['llamagen step'] / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()

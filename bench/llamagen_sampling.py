"""Class-conditional sampling with guidance: this project's KV-cached sampler against LlamaGen's ``generate``, on
CPU, same weights, one process, alternating.

    python bench/llamagen_sampling.py --llamagen_repo=/path/to/LlamaGen                 # GPT-B, 256 tokens, batch 4, cfg 4
    python bench/llamagen_sampling.py --llamagen_repo=/path/to/LlamaGen --size tiny --repeats 1   # check the script

LlamaGen's model (its ``autoregressive/models/gpt.py``, weights drawn at random) is converted by
``transformer_jax.convert.from_llamagen``; both draw ``--tokens`` codes for ``--batch`` labels with guidance
``--cfg`` (LlamaGen doubles the batch with the null class; so does this sampler) and top-k ``--top_k``. Prints the
median times, their ratio, the weights one token step reads and the achieved weight-read GB/s against this
machine's copy bandwidth measured here (STREAM's count: read + written bytes per second). torch comes from this
environment or ``--torch_site_packages`` (another environment's site-packages, appended after this one's).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _llamagen import copy_gbps, llamagen_model, parse_args, size_args  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=0, help="codes to draw (default: the size's grid, 256 for B)")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--top_k", type=int, default=2000)
    a = parse_args(p, default_batch=4)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from _timing import alternate, machine
    from transformer_jax.convert import from_llamagen
    from transformer_jax.decode_kernels import prepare_decode_variables
    from transformer_jax.decode_threads import decode_threads
    from transformer_jax.gpt import decode_weight_bytes
    from transformer_jax.sampling import sample

    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    args = size_args(a.size)
    tokens = a.tokens or args["grid"] ** 2
    tmodel, generate, sd, fields = llamagen_model(a.llamagen_repo, args)
    model, variables = from_llamagen(sd, fields)
    variables = jax.block_until_ready(prepare_decode_variables(model, variables))   # once, as the Sampler does
    labels = np.arange(a.batch, dtype=np.int32) * 7 % 1000
    prefix = jnp.asarray(labels[:, None])
    uncond = jnp.full_like(prefix, 1000)
    keys = iter(jax.random.split(jax.random.key(0), 10 * a.repeats + 10))
    tlabels = torch.from_numpy(labels.astype(np.int64))

    def run_jax():
        sample(model, variables, prefix, tokens, next(keys), top_k=a.top_k, guidance_scale=a.cfg,
               uncond_prefix=uncond).block_until_ready()

    def run_llamagen():
        generate(tmodel, tlabels, tokens, cfg_scale=a.cfg, cfg_interval=-1, temperature=1.0, top_k=a.top_k,
                 top_p=1.0, sample_logits=True)

    # The same model on both sides: greedy tokens (top-k 1) under guidance agree (up to float near-ties).
    ours = np.asarray(sample(model, variables, prefix, tokens, jax.random.key(0), top_k=1, guidance_scale=a.cfg,
                             uncond_prefix=uncond))
    theirs = generate(tmodel, tlabels, tokens, cfg_scale=a.cfg, top_k=1, sample_logits=True).numpy()
    print(machine())
    print(f"greedy tokens with guidance {a.cfg}: {np.mean(ours == theirs):.1%} equal to LlamaGen's "
          f"(first difference at step {int(np.argmax(np.any(ours != theirs, 0))) if np.any(ours != theirs) else '-'})")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LlamaGen GPT-{a.size}: "
          f"{fields['n_layer']} layers x {fields['dim']}, {fields['n_head']} heads, vocab {fields['vocab_size']}; "
          f"{tokens} tokens, batch {a.batch} (x2 with guidance {a.cfg}), top_k {a.top_k}")
    copy = copy_gbps()
    wall, cpu = alternate({"jax": run_jax, "llamagen generate": run_llamagen}, 1, a.repeats)
    med = {k: statistics.median(v) for k, v in wall.items()}
    for k, v in wall.items():
        print(f"  {k:>18s}: median {med[k]:8.3f} s   runs {' '.join(f'{t:.3f}' for t in v)} s, "
              f"process CPU median {statistics.median(cpu[k]):.3f} s")
    chunks = decode_threads(model, 2 * a.batch)     # each concurrently decoded row chunk reads every weight
    step_bytes = decode_weight_bytes(model)
    gbps = step_bytes * chunks * tokens / med["jax"] / 1e9
    print(f"  LlamaGen / jax time: {med['llamagen generate'] / med['jax']:.2f}x (target >= 1)")
    print(f"  weights read per token step: {step_bytes / 1e9:.3f} GB (every matmul kernel, "
          f"{jnp.dtype(model.dtype).name}) x {chunks} row chunk(s)")
    print(f"  achieved weight reads: {gbps:.1f} GB/s = {gbps / copy:.0%} of the measured copy bandwidth "
          f"{copy:.1f} GB/s (target >= 60%); LlamaGen: "
          f"{step_bytes * tokens / med['llamagen generate'] / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()

"""Resumable, multi-host feature statistics for FID runs: work is done in numbered chunks, and after each
chunk the running float64 sums of every stream are saved atomically, so a killed evaluation continues at
the next chunk with exactly the statistics an uninterrupted run would have.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

from common_jax.fid import FeatureStats
from common_jax.metrics import Progress


def _allreduce_stats(stats: FeatureStats) -> FeatureStats:
    """Sum a process-local FeatureStats over all processes (identity on one process)."""
    if jax.process_count() == 1:
        return stats
    from jax.experimental import multihost_utils
    parts = multihost_utils.process_allgather(
        {"count": np.asarray([stats.count], np.float64), "sum": stats.sum, "outer": stats.outer})
    out = FeatureStats(stats.dim)
    out.count = int(np.sum(parts["count"]))
    out.sum = np.sum(parts["sum"], axis=0)
    out.outer = np.sum(parts["outer"], axis=0)
    return out


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {saved.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


class ChunkedStats:
    """Named FeatureStats streams (e.g. 'real', 'fake') persisted to ``path`` after every chunk.

    ``signature``: what decides the chunks' contents (model, options, seed, chunk size, process count...). It is
    saved with the sums, and resuming under another one is an error: the statistics would mix two evaluations.
    """

    def __init__(self, path: str, names: tuple[str, ...], dim: int = 2048,
                 signature: Mapping[str, Any] | None = None):
        self.path, self.names, self.dim = path, tuple(names), dim
        self.signature = json.loads(json.dumps(dict(signature or {})))  # as it reads back (tuples -> lists)
        self.stats = {n: FeatureStats(dim) for n in self.names}
        self.chunks_done = 0
        if os.path.isfile(path):
            with np.load(path, allow_pickle=False) as z:
                saved = json.loads(str(z["meta"]))
                if tuple(saved["names"]) != self.names:
                    raise ValueError(f"{path}: saved streams {saved['names']} differ from {list(self.names)}; "
                                     "use a fresh workdir for a different evaluation")
                # Files written before signatures existed carry none and resume as they did.
                changed = _differences(saved.get("signature", self.signature), self.signature)
                if changed:
                    raise ValueError(f"{path} holds {saved['chunks_done']} chunks of another evaluation "
                                     f"({'; '.join(changed)}); use a fresh workdir, or the same options to resume")
                self.chunks_done = int(saved["chunks_done"])
                for n in self.names:
                    s = self.stats[n]
                    s.count, s.sum, s.outer = int(z[f"{n}/count"]), z[f"{n}/sum"], z[f"{n}/outer"]

    def save(self) -> None:
        if jax.process_index() != 0:
            return
        arrays = {"meta": json.dumps({"names": list(self.names), "chunks_done": self.chunks_done,
                                      "signature": self.signature})}
        for n, s in self.stats.items():
            arrays.update({f"{n}/count": np.asarray(s.count), f"{n}/sum": s.sum, f"{n}/outer": s.outer})
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, self.path)      # atomic: a kill mid-write leaves the previous chunk's file


def chunk_items(n: int, chunk_size: int, chunk: int, process: int, process_count: int) -> np.ndarray:
    """Indices of the items of chunk ``chunk`` (of an evaluation of ``n``) that process ``process`` handles: the
    chunk's items dealt round-robin over the processes."""
    return np.arange(chunk * chunk_size, min(n, (chunk + 1) * chunk_size))[process::process_count]


def chunk_file(chunk_dir: str, chunk: int, process: int) -> str:
    """Where process ``process`` keeps its per-image outputs of chunk ``chunk`` (Inception logits, images)."""
    return os.path.join(chunk_dir, f"chunk_{chunk:05d}_p{process}.npz")


def chunk_files(chunk_dir: str, n: int, chunk_size: int, process_count: int) -> list[str]:
    """Every process's :func:`chunk_file` of an evaluation of ``n`` items, chunk by chunk, processes in order: one
    per process with :func:`chunk_items` in the chunk.

    A missing file is an error naming it: what is read back from the files (the Inception Score, saved images)
    would otherwise cover some of the images only, e.g. with a workdir that is not one shared path on every host.
    """
    paths = [chunk_file(chunk_dir, k, p) for k in range(-(-n // chunk_size)) for p in range(process_count)
             if len(chunk_items(n, chunk_size, k, p, process_count))]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} chunk files are missing from {chunk_dir} ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): every process writes its own, so the workdir must be one "
            "shared path on all hosts, and the files must stay; evaluate into a fresh --workdir")
    return paths


def run_chunks(state: ChunkedStats, num_chunks: int, compute: Callable[[int], Mapping[str, np.ndarray]],
               on_chunk: Callable[[int, Any], None] | None = None, desc: str = "chunk") -> dict[str, FeatureStats]:
    """Call ``compute(k) -> {stream: this process's features (N, D)}`` for the chunks not done yet, adding them
    to the global statistics (summed over processes) and saving after each chunk."""
    prog = Progress(num_chunks, start=state.chunks_done, desc=desc)
    for k in range(state.chunks_done, num_chunks):
        feats = compute(k)
        for n in state.names:
            local = FeatureStats(state.dim)
            if len(feats[n]):
                local.update(np.asarray(feats[n]))
            state.stats[n].merge(_allreduce_stats(local))
        state.chunks_done = k + 1
        if on_chunk is not None:
            on_chunk(k, feats)
        state.save()
        prog.update(k + 1)
        if jax.process_index() == 0:
            print(prog.line(k + 1), flush=True)
    return state.stats

"""High-level sampling: GPT + frozen VQGAN -> images, in batches, with progress and rejection sampling."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from common_jax.metrics import Progress, to_uint8
from transformer_jax import conditions
from transformer_jax.conditions.class_label import class_ids
from transformer_jax.decode_kernels import prepare_decode_variables
from transformer_jax.sampling import sample
from transformer_jax.sliding_window import sample_sliding_window

# (images uint8 NHWC, labels or None) -> probability of accepting each image, in [0, 1]
Classifier = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def sampling_options(top_k: int, top_p: float, temperature: float, guidance: float, cfg_interval: int = -1) -> dict:
    """Command-line style options (0 / 1.0 / -1 mean off) -> keyword arguments of :meth:`Sampler.sample`.

    ``cfg_interval`` (LlamaGen's): guidance for the tokens up to that step only (-1: every token); it is passed on
    only when set, so samplers without guidance (the sliding window) take the options unchanged."""
    if top_k < 0 or not 0 < top_p <= 1 or temperature <= 0 or guidance < 0 or cfg_interval < -1:
        raise ValueError(f"bad sampling options: top_k={top_k} (>= 0), top_p={top_p} (in (0, 1]), "
                         f"temperature={temperature} (> 0), guidance_scale={guidance} (>= 0), "
                         f"cfg_interval={cfg_interval} (>= -1)")
    if cfg_interval != -1 and not guidance:
        raise ValueError(f"cfg_interval={cfg_interval} limits classifier-free guidance: give a guidance_scale too")
    return dict(top_k=top_k or None, top_p=None if top_p >= 1.0 else top_p, temperature=temperature,
                guidance_scale=guidance or None, **({"cfg_interval": cfg_interval} if cfg_interval != -1 else {}))


def _acceptance(p: Any, batch: int) -> np.ndarray:
    """A classifier's output as (batch,) probabilities: one per image, or one for all; an error otherwise (a NaN
    would reject every image and end in a misleading 'raise max_batches')."""
    p = np.asarray(p, np.float64).reshape(-1)
    if p.size not in (1, batch):
        raise ValueError(f"classifier must return one acceptance probability per image ({batch}) or one for "
                         f"all, got {p.size} values")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"classifier must return probabilities in [0, 1], got {p[~((p >= 0) & (p <= 1))][:5]}")
    return np.broadcast_to(p, (batch,))


class Sampler:
    """Draws code grids with the KV-cached sampler (or the sliding window) and decodes them to images."""

    def __init__(self, gpt: Any, gpt_vars: Any, vqgan: Any, vq_vars: Any, cond: Any,
                 code_grid: tuple[int, int], cond_stage: tuple[Any, Any, int] | None = None):
        """``cond_stage``: (segmentation VQ model, its variables, number of labels) of a spatially
        conditioned model, for :meth:`encode_condition`."""
        self.gpt, self.gpt_vars, self.vqgan, self.vq_vars = gpt, gpt_vars, vqgan, vq_vars
        self.cond, self.grid = cond, tuple(int(g) for g in code_grid)
        self.conditioning = conditions.for_model(cond, gpt)
        if vqgan.codebook_size > gpt.vocab_size:
            raise ValueError(f"the first-stage codebook ({vqgan.codebook_size} codes) exceeds the GPT's vocab_size "
                             f"{gpt.vocab_size}")
        # Image positions draw codes only: ids past the codebook (class or null tokens) decode to nothing.
        self.n_codes = int(vqgan.codebook_size)
        self._decode = jax.jit(lambda v, c: vqgan.apply(v, c, method="decode_code"))
        self.cond_stage = cond_stage
        # The cond stage's code grid at the training size (None: unknown, no cond stage given).
        self.cond_grid = None if cond_stage is None else tuple(
            g * vqgan.downsample_factor // cond_stage[0].downsample_factor for g in self.grid)
        self._encode_cond: Callable[[np.ndarray], jax.Array] | None = None
        self._decode_vars: Any = None
        self.last_accept_rate: float | None = None

    @classmethod
    def from_workdirs(cls, transformer_workdir: str, first_stage_workdir: str = "",
                      cond_stage_workdir: str = "") -> "Sampler":
        """From a stage-two workdir; the stage-one (and cond-stage) models are the ones its config names
        unless overridden."""
        from common_jax.pretrained import check_stage, load_workdir
        from transformer_jax.code_encoder import stage_one_fingerprint
        from transformer_jax.gpt import gpt_from_config
        from vqgan_jax.pretrained import load_vqgan
        config, state, _ = load_workdir(transformer_workdir)
        check_stage(config, transformer_workdir, "stage-two (transformer)")

        def stage(role: str, override: str) -> tuple[Any, Any, Any]:
            src = dict(workdir=override, taming_ckpt="", taming_yaml="") if override else dict(config[role])
            return load_vqgan(**src, role=role)

        vq, vq_vars, _ = stage("first_stage", first_stage_workdir)
        cond_stage = None
        if conditions.from_config(config.cond).uses_cond_stage:
            cvq, cvars, ccfg = stage("cond_stage", cond_stage_workdir)
            cond_stage = (cvq, cvars, int(ccfg.in_channels))
        # Other stage-one weights than the GPT was trained on decode its codes to wrong images, without an error.
        fingerprint = stage_one_fingerprint(vq_vars, *([] if cond_stage is None else [cond_stage[1]]))
        if config.get("stage_one_fingerprint") not in (None, fingerprint):
            raise ValueError(f"the stage-one weights loaded for {transformer_workdir} differ from those its GPT was "
                             "trained on (the stage-one run went on since, or another one is named): pass the "
                             "first_stage_workdir (and cond_stage_workdir) of the checkpoint stage two used")
        gpt_vars = {"params": jax.tree.map(jnp.asarray, state["params"])}
        return cls(gpt_from_config(config.gpt), gpt_vars, vq, vq_vars, config.cond, tuple(config.data.code_grid),
                   cond_stage)

    def encode_condition(self, segmentation: np.ndarray) -> jax.Array:
        """(n, H, W) integer label maps -> (n, H/f, W/f) cond codes of the cond-stage model (any size)."""
        if self.cond_stage is None:
            raise ValueError("encode_condition needs the cond-stage (segmentation) model: this Sampler was "
                             "built without one (a spatially conditioned workdir provides it)")
        from transformer_jax.code_encoder import make_encoder
        model, variables, n_labels = self.cond_stage
        seg = np.asarray(segmentation)
        if seg.ndim != 3 or not np.issubdtype(seg.dtype, np.integer):
            raise ValueError(f"segmentation must be (n, H, W) integer label maps, got {seg.dtype} {seg.shape}")
        if seg.size and (seg.min() < 0 or seg.max() >= n_labels):
            raise ValueError(f"segmentation labels must be in [0, {n_labels}), got [{seg.min()}, {seg.max()}]")
        if self._encode_cond is None:        # built once: each new encoder would compile again
            self._encode_cond = make_encoder(model, variables, n_labels)
        return self._encode_cond(seg)

    # -- prefixes ------------------------------------------------------------------------------------
    def _prefix(self, n: int, labels: np.ndarray | None, cond_codes: np.ndarray | None) -> jax.Array:
        return self.conditioning.sampling_prefix(n, dict(labels=labels, cond_codes=cond_codes), self.cond_grid)

    def check_guidance(self, guidance_scale: float | None) -> None:
        """Raise unless this model supports classifier-free guidance (or ``guidance_scale`` is None)."""
        self.conditioning.check_guidance(guidance_scale)

    def weights_fingerprint(self) -> str:
        """Identity of every weight this sampler uses (GPT, first stage, cond stage), e.g. to check that the
        processes of a job loaded the same ones."""
        from common_jax.pretrained import params_fingerprint
        from transformer_jax.code_encoder import stage_one_fingerprint
        stages = [self.vq_vars] + ([] if self.cond_stage is None else [self.cond_stage[1]])
        return params_fingerprint(self.gpt_vars) + stage_one_fingerprint(*stages)

    # -- codes -----------------------------------------------------------------------------------
    def decode_variables(self) -> Any:
        """The GPT's variables as the samplers read them (``decode_kernels.prepare_decode_variables``),
        prepared on first use and kept, so each batch does not copy the kernels again."""
        if self._decode_vars is None:
            self._decode_vars = prepare_decode_variables(self.gpt, self.gpt_vars)
        return self._decode_vars

    def sample_codes(self, rng: jax.Array, n: int, labels: np.ndarray | None = None,
                     cond_codes: np.ndarray | None = None, top_k: int | None = None,
                     top_p: float | None = None, temperature: float = 1.0,
                     guidance_scale: float | None = None, cfg_interval: int = -1) -> jax.Array:
        """(n, h, w) int32 codes of one batch; ``cfg_interval``: LlamaGen's limit on the guided tokens
        (:func:`transformer_jax.sampling.sample`)."""
        prefix = self._prefix(n, labels, cond_codes)
        self.check_guidance(guidance_scale)
        uncond = None
        if guidance_scale is not None:
            uncond = self.conditioning.null_prefix(prefix)
        steps = self.grid[0] * self.grid[1]
        codes = sample(self.gpt, self.decode_variables(), prefix, steps, rng, top_k=top_k, top_p=top_p,
                       temperature=temperature, guidance_scale=guidance_scale, uncond_prefix=uncond,
                       vocab_limit=self.n_codes, cfg_interval=cfg_interval)
        return codes.reshape(n, *self.grid)

    def decode(self, codes: jax.Array) -> np.ndarray:
        """(n, h, w) first-stage codes -> uint8 NHWC images."""
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise ValueError(f"codes must be in [0, {self.n_codes}) (the first-stage codebook), found range "
                             f"[{codes.min()}, {codes.max()}]")
        images = self._decode(self.vq_vars, jnp.asarray(codes, jnp.int32))
        return to_uint8(images, name="the first-stage decoder's output")

    # -- images ----------------------------------------------------------------------------------
    def sample(self, rng: jax.Array, n: int, labels: np.ndarray | None = None, *, batch_size: int = 16,
               cond_codes: np.ndarray | None = None, classifier: Classifier | None = None,
               max_batches: int | None = None, progress: bool = True, **sampling_kwargs: Any) -> np.ndarray:
        """``n`` images (uint8 NHWC) in batches of ``batch_size``; deterministic given ``rng``.

        ``labels`` (n,) for class-conditional models, ``cond_codes`` (n, h, w) for spatially conditioned
        ones (:meth:`encode_condition` of label maps).

        With ``classifier``, each drawn image is accepted with the probability it returns (one in [0, 1] per
        image, or one for the batch; rejection sampling, as the paper's classifier-based selection); drawing
        continues until ``n`` are accepted or ``max_batches`` (default 10x the batches needed) is reached.
        ``last_accept_rate`` tells the fraction accepted.

        ``progress``: show the images done, their rate and the ETA at most every 10 s and at the end (on stderr,
        or as absl INFO lines under the launch scripts; :meth:`common_jax.metrics.Progress.log`).
        """
        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1, got {n}, {batch_size}")
        labels = None if labels is None else class_ids(labels)
        if labels is not None and len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for {n} samples")
        if cond_codes is not None:
            cond_codes = np.asarray(cond_codes)  # its dtype is checked with its shape, per batch (not cast here)
            if len(cond_codes) != n:
                raise ValueError(f"got {len(cond_codes)} cond_codes for {n} samples")
        need = -(-n // batch_size)
        if classifier is None and max_batches is not None and max_batches < need:
            raise ValueError(f"max_batches={max_batches} cannot hold n={n} images at batch_size={batch_size} "
                             f"({need} batches); max_batches limits rejection sampling (with a classifier)")
        max_batches = max_batches or (need if classifier is None else 10 * need)
        prog = Progress(n, desc="image") if progress else None
        result: list[np.ndarray | None] = [None] * n
        pending = list(range(n))            # wanted samples not filled yet, in order
        drawn = accepted = b = 0
        while pending and b < max_batches:
            idx = np.resize(np.asarray(pending), batch_size)   # pad the last batch by repeating
            lab = None if labels is None else labels[idx]
            cc = None if cond_codes is None else cond_codes[idx]
            key = jax.random.fold_in(rng, b)
            imgs = self.decode(self.sample_codes(key, batch_size, lab, cc, **sampling_kwargs))
            keep = np.ones(batch_size, bool)
            if classifier is not None:
                p = _acceptance(classifier(imgs, lab), batch_size)
                u = np.asarray(jax.random.uniform(jax.random.fold_in(key, 1), (batch_size,)))
                keep = u < p
                drawn += batch_size
                accepted += int(keep.sum())
            for j in np.flatnonzero(keep):
                if result[idx[j]] is None:
                    result[idx[j]] = imgs[j]
                    pending.remove(idx[j])
            b += 1
            if prog is not None:
                prog.log(n - len(pending))
        if classifier is not None:
            self.last_accept_rate = accepted / max(drawn, 1)
        if pending:
            raise RuntimeError(f"rejection sampling filled only {n - len(pending)} of {n} images in {b} "
                               f"batches (accept rate {self.last_accept_rate:.3f}); raise max_batches")
        return np.stack(result)

    def sample_large(self, rng: jax.Array, code_shape: tuple[int, int], labels: np.ndarray | None = None,
                     cond_codes: np.ndarray | None = None, n: int = 1, top_k: int | None = None,
                     top_p: float | None = None, temperature: float = 1.0) -> np.ndarray:
        """Images larger than the training window via sliding-window sampling; ``code_shape`` in codes."""
        h, w = code_shape
        if self.grid[0] != self.grid[1]:
            raise ValueError(f"sliding-window sampling needs a square training window, got {self.grid}")
        prefix, cond_grid = self.conditioning.window_condition(n, dict(labels=labels, cond_codes=cond_codes),
                                                               self.cond_grid)
        codes = sample_sliding_window(self.gpt, self.decode_variables(), (h, w), self.grid[0], rng,
                                      prefix=prefix, cond_grid=cond_grid, top_k=top_k, top_p=top_p,
                                      temperature=temperature, vocab_limit=self.n_codes)
        return self.decode(codes)

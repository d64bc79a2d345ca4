"""Stage two: the GPT over code indices as a :class:`common_jax.training.Task`.

The task sees integer batches only (``codes`` (B, h, w), plus ``label`` or ``cond_codes``): images are
encoded by the frozen stage-one model either once up front (a codes dataset) or on the fly by
:class:`EncodingLoader`, outside the train step, so the step holds no VQGAN and no model math lives in
the loop.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from common_jax import checkpoint as ckpt
from common_jax import data as data_lib
from common_jax import dataset_resolution, multihost, training
from common_jax.training import accumulate_gradients, specs_from_boxed_init
from transformer_jax import codes as codes_lib
from transformer_jax import conditions
from transformer_jax.code_encoder import make_encoder, stage_one_fingerprint
from transformer_jax.gpt import GPT, gpt_from_config, is_kernel_path
from transformer_jax.objective import corrupt_tokens, token_nll
from vqgan_jax.quantizers import codebook_size

LN2 = math.log(2.0)


@struct.dataclass
class GPTState:
    step: jax.Array
    params: Any
    opt_state: Any


def learning_rate(config: Any) -> optax.Schedule:
    """Linear warmup then cosine decay; the peak is base_lr (x global batch x accumulation if scaled)."""
    o = config.optim
    peak = o.base_learning_rate
    if o.get("scale_lr_by_batch", True):
        peak *= config.data.global_batch_size * o.grad_accum_steps
    warmup = int(o.warmup_steps)
    total = max(int(config.total_steps), warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=peak * o.min_lr_ratio)


# Which parameters ``optim.weight_decay`` applies to (``optim.weight_decay_on``): the matmul kernels (taming: no
# decay on biases, norms, embeddings), or every parameter of two or more dimensions, embeddings included (LlamaGen).
DECAY_RULES: dict[str, Callable[[tuple, Any], bool]] = {
    "kernels": lambda path, x: is_kernel_path(path),
    "matrices": lambda path, x: len(x.shape) >= 2,
}


def make_optimizer(config: Any) -> optax.GradientTransformation:
    o = config.optim
    rule = o.weight_decay_on
    if rule not in DECAY_RULES:
        raise ValueError(f"optim.weight_decay_on must be one of {sorted(DECAY_RULES)}, got {rule!r}")
    mask = lambda params: jax.tree_util.tree_map_with_path(DECAY_RULES[rule], params)
    parts = []
    if o.get("grad_clip", 0.0):
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts.append(optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                             mask=mask))
    return optax.chain(*parts)


class TransformerTask:
    """Next-token training of ``[cond | image codes]`` with pkeep corruption and CFG condition dropout."""

    # What a resume may not change: the GPT's shapes and architecture, and the token layout of the condition
    # prefix (which tokens the weights learnt). Any other gpt/cond key (remat, dtype, attention_impl, dropout
    # rates, pkeep, cfg_dropout) may change and is logged.
    shape_keys = tuple(f"gpt.{k}" for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                                            "n_unmasked", "block", "block_options")) + conditions.shape_keys()

    @staticmethod
    def upgrade_saved_config(saved: dict) -> dict:
        """A checkpoint's config in today's layout: runs from before the block selector used minGPT's block."""
        if "gpt" not in saved:
            return saved
        return {**saved, "gpt": {"block": "mingpt", "block_options": {}, **saved["gpt"]}}

    def __init__(self, config: Any, cond_grid: tuple[int, int] | None = None):
        self.config = config
        self.model = gpt_from_config(config.gpt)
        self.cond = config.cond
        self.conditioning = conditions.for_model(self.cond, self.model)
        self.n_cond = self.conditioning.prefix_length(cond_grid)
        self.grid = tuple(config.data.code_grid)
        need = self.n_cond + self.grid[0] * self.grid[1] - 1
        if need > self.model.block_size:
            raise ValueError(f"gpt.block_size={self.model.block_size} is too small: {self.n_cond} cond tokens + "
                             f"{self.grid[0]}x{self.grid[1]} codes need {need}")
        self.tx = make_optimizer(config)
        self.grad_accum = int(config.optim.grad_accum_steps)

    # -- state -----------------------------------------------------------------------------------
    def _init_boxed(self, rng: jax.Array) -> GPTState:
        params = self.model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        return GPTState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def init_state(self, rng: jax.Array) -> GPTState:
        return nn.unbox(self._init_boxed(rng))

    def state_logical_specs(self, abstract_state: GPTState) -> Any:
        return specs_from_boxed_init(self._init_boxed, jax.random.key(0))

    # -- steps -----------------------------------------------------------------------------------
    def _sequence(self, batch: Mapping[str, jax.Array], rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        codes = jnp.asarray(batch["codes"], jnp.int32)
        b = codes.shape[0]
        z = codes.reshape(b, -1)
        if rng is not None:
            k_cfg, k_keep = jax.random.split(rng)
            c = self.conditioning.training_prefix(batch, b, k_cfg)
            a = corrupt_tokens(k_keep, z, self.cond.pkeep, self.model.vocab_size)
        else:
            c, a = self.conditioning.prefix(batch, b), z
        return jnp.concatenate([c, a], axis=1)[:, :-1], z

    def _nll(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Per-token NLL (B, T_img) in nats and the argmax accuracy mask."""
        if rng is not None:
            k_seq, k_drop = jax.random.split(rng)
        else:
            k_seq = k_drop = None
        inp, z = self._sequence(batch, k_seq)
        rngs = {"dropout": k_drop} if k_drop is not None else {}
        logits = self.model.apply({"params": params}, inp, deterministic=rng is None, rngs=rngs)
        logits = logits[:, self.n_cond - 1:]
        return token_nll(logits, z), (jnp.argmax(logits, -1) == z)

    def train_step(self, state: GPTState, batch: Mapping[str, jax.Array], rng: jax.Array
                   ) -> tuple[GPTState, dict]:
        def loss_and_grad(params, micro, key):
            def loss_fn(p):
                nll, correct = self._nll(p, micro, key)
                return nll.mean(), {"accuracy": correct.mean()}
            return jax.value_and_grad(loss_fn, has_aux=True)(params)

        (loss, aux), grads = accumulate_gradients(loss_and_grad, state.params, batch, self.grad_accum, rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "bits_per_token": loss / LN2, "accuracy": aux["accuracy"],
                   "grad_norm": optax.global_norm(grads), "lr": learning_rate(self.config)(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(self, state: GPTState, batch: Mapping[str, jax.Array]) -> dict:
        """Sums over real examples; the loop divides by ``count`` (tokens) -> bits per token."""
        nll, correct = self._nll(state.params, batch, None)
        mask = jnp.asarray(batch.get("mask", jnp.ones(nll.shape[:1])), jnp.float32)[:, None]
        return {"nll_bits_per_token": jnp.sum(nll * mask) / LN2,
                "accuracy": jnp.sum(correct * mask),
                "count": jnp.sum(mask * jnp.ones_like(nll))}


class EncodingLoader:
    """Wraps an image loader: frozen (jitted) encoders replace batch inputs by codes, e.g. ``image`` ->
    ``codes`` and, for spatial conditioning, ``segmentation`` -> ``cond_codes``.

    Iterator state passes through, so resume stays exact.
    """

    def __init__(self, loader: Iterator, encoders: Callable[[np.ndarray], np.ndarray] | codes_lib.Encoders):
        self.loader = loader
        self.encoders = dict(encoders) if isinstance(encoders, Mapping) else {"codes": ("image", encoders)}

    def __iter__(self) -> "EncodingLoader":
        return self

    def __next__(self) -> dict:
        batch = dict(next(self.loader))
        for out, (src, fn) in self.encoders.items():
            batch[out] = np.asarray(fn(batch.pop(src)), np.int32)
        return batch

    def get_state(self) -> Any:
        return self.loader.get_state()

    def set_state(self, state: Any) -> None:
        self.loader.set_state(state)


def stage_one_grid(config: Any, vq_model_cfg: Any, role: str = "first_stage") -> tuple[int, int]:
    """The code grid a stage-one model gives for ``data.image_size``; its codebook must fit the GPT's
    vocabulary, and the first stage's grid must be ``data.code_grid``."""
    f = 2 ** (len(vq_model_cfg.ch_mult) - 1)
    grid = (config.data.image_size // f,) * 2
    if role == "first_stage" and tuple(config.data.code_grid) != grid:
        raise ValueError(f"data.code_grid={tuple(config.data.code_grid)} but the stage-one model (f={f}) gives "
                         f"{grid} codes for data.image_size={config.data.image_size}")
    n_codes = codebook_size(vq_model_cfg)
    if config.gpt.vocab_size < n_codes:
        raise ValueError(f"gpt.vocab_size={config.gpt.vocab_size} is smaller than the {role} model's codebook "
                         f"({n_codes} codes)")
    return grid


def check_stage_one_unchanged(workdir: str, stage_one_id: str) -> None:
    """Refuse to resume a stage-two run on other stage-one weights (e.g. the VQGAN run went on since): the codes
    would change under the GPT, silently when encoding on the fly."""
    saved = (ckpt.latest_meta(workdir) or {}).get("config", {}).get("stage_one_fingerprint")
    if saved is not None and saved != stage_one_id:
        raise ValueError(f"{workdir} was trained on other stage-one weights than first_stage (and cond_stage) give "
                         "now (the stage-one run went on, or another one is named): resume with the weights it "
                         "was trained on, or start a new workdir")


def train(config, workdir: str) -> training.RunResult:
    from vqgan_jax.pretrained import load_vqgan

    vq, vq_vars, vq_cfg = load_vqgan(**config.first_stage)
    stage_one_grid(config, vq_cfg)
    encoders: dict = {"codes": ("image", make_encoder(vq, vq_vars))}
    stage_vars = [vq_vars]
    conditioning = conditions.from_config(config.cond)
    cond_grid = None
    features, code_features = ("image", conditioning.example_feature), ("codes", conditioning.batch_key)
    if conditioning.uses_cond_stage:
        # The cond stage (taming's VQSegmentationModel) encodes the dataset's label maps to the prefix.
        cvq, cvars, ccfg = load_vqgan(**config.cond_stage, role="cond_stage")
        cond_grid = stage_one_grid(config, ccfg, "cond_stage")
        encoders[conditioning.batch_key] = (conditioning.example_feature,
                                            make_encoder(cvq, cvars, int(ccfg.in_channels)))
        stage_vars.append(cvars)
    stage_one_id = stage_one_fingerprint(*stage_vars)
    multihost.check_same_on_all_processes(
        stage_one_id, "the stage-one weights (first_stage, cond_stage)",
        "give every host the same checkpoint, e.g. one shared first_stage.workdir")
    check_stage_one_unchanged(workdir, stage_one_id)
    with config.unlocked():
        config.stage_one_fingerprint = stage_one_id     # saved with every checkpoint's config
    task = TransformerTask(config, cond_grid)
    d = config.data
    data_dir, image_name = dataset_resolution.resolve_dataset(d, workdir)
    dataset_resolution.cap_eval_steps(config)
    if d.pre_encoded:
        name = codes_lib.prepare_codes(data_dir, image_name, int(d.image_size), encoders, stage_one_id,
                                       int(d.eval_batch_size))
        dataset_resolution.check_dataset_on_all_processes(data_dir, name)     # every process's shard is there
        codes_lib.warn_if_collapsed(data_dir, name, codebook_size(vq_cfg), float(d.get("min_codebook_usage", 0.01)))
        train_loader = data_lib.make_loader(data_dir, name, "train", int(d.global_batch_size), train=True,
                                            image_size=None, seed=int(config.seed), features=code_features)
        eval_loader = lambda: data_lib.make_loader(data_dir, name, "validation", int(d.eval_batch_size),
                                                   train=False, image_size=None, seed=0, num_epochs=1,
                                                   features=code_features)
    else:
        train_images, eval_images, _, _ = dataset_resolution.image_loaders(config, workdir, features)
        train_loader = EncodingLoader(train_images, encoders)
        eval_loader = lambda: EncodingLoader(eval_images(), encoders)
    logging.info("stage two (%s conditioning) on %s codes (%s), global batch %d", config.cond.kind, image_name,
                 "pre-encoded" if d.pre_encoded else "on the fly", d.global_batch_size)
    return training.run(config, workdir, task, train_loader, eval_loader)

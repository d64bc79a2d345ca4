"""Stage one: VQGAN + PatchGAN training as a :class:`common_jax.training.Task`.

One jitted step updates both networks (taming alternates two optimizers on the same batch; here the
generator step and the discriminator step run back to back inside one program, D seeing the
reconstruction of the same forward pass). The loss math lives in :mod:`vqgan_jax.losses`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import struct

from common_jax import dataset_resolution, training
from common_jax.training import accumulate_gradients, specs_from_boxed_init
from vqgan_jax import architectures, losses
from vqgan_jax import quantizers

LpipsFn = Callable[[jax.Array, jax.Array], jax.Array]


@struct.dataclass
class VQGANState:
    step: jax.Array
    params: Any                 # generator (autoencoder + codebook)
    opt_g: Any
    disc_params: Any
    disc_stats: Any             # BatchNorm running statistics
    opt_d: Any
    code_usage: jax.Array       # EMA of per-step code counts: codebook health, dead-code restart
    # Optional parts are empty dicts (no leaves) when off, so every state has the same tree shape.
    ema_params: Any = struct.field(default_factory=dict)    # generator weight EMA (loss.generator_ema > 0)
    codebook_ema: Any = struct.field(default_factory=dict)  # quantizer state (the VQ's EMA codebook statistics)
    lpips: Any = struct.field(default_factory=dict)         # frozen LPIPS variables; never optimised


def model_from_config(config: Any) -> Any:
    """The stage-one model of ``config.model.arch`` (taming's VQGAN when absent)."""
    return architectures.from_config(config.model)


def learning_rate(config: Any) -> float:
    """taming's rule: base_lr x global batch size x gradient-accumulation steps."""
    o = config.optim
    return float(o.base_learning_rate) * int(config.data.global_batch_size) * int(o.grad_accum_steps)


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = jnp.mean((jnp.clip(y, -1, 1) - x) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


# The config keys that define the autoencoder's and codebook's parameter shapes: a resume refuses a change of
# one of them and logs a change of any other model key (dropout, dtype, remat, beta, ...). The segmentation
# task trains the same model and declares the same keys. Each architecture declares its own (model.arch among them).
MODEL_SHAPE_KEYS = architectures.shape_keys() + quantizers.shape_keys()


def upgrade_saved_model_config(saved: dict) -> dict:
    """``saved`` (a checkpoint's config) with its model section in today's layout (quantizer options of the
    earlier flat layout moved under ``model.quantizer``), so a workdir written before resumes."""
    if "model" not in saved:
        return saved
    return {**saved, "model": quantizers.migrate_model_config(saved["model"])}


class VQGANTask:
    """Generator: L1 (+LPIPS) + adaptive-weight hinge GAN + codebook terms; discriminator: hinge/vanilla."""

    # ... and the discriminator's.
    shape_keys = MODEL_SHAPE_KEYS + ("loss.disc_in_channels", "loss.disc_num_layers", "loss.disc_ndf",
                                     "loss.use_actnorm")

    upgrade_saved_config = staticmethod(upgrade_saved_model_config)

    def __init__(self, config: Any, lpips: tuple[Any, Any] | None = None):
        self.config = config
        self.loss_cfg = config.loss
        losses.check_loss_config(self.loss_cfg)
        if self.loss_cfg.use_actnorm:
            raise ValueError("loss.use_actnorm=True: ActNorm's data-dependent init is not supported in "
                             "training; use BatchNorm (use_actnorm=False)")
        self.model = model_from_config(config)
        quantizers.check_training(config)
        self.quantizer = self.model.quantizer_def()
        self.disc = losses.build_discriminator(self.loss_cfg)
        if float(self.loss_cfg.perceptual_weight) > 0 and lpips is None:
            raise ValueError("loss.perceptual_weight > 0 needs LPIPS weights: pass "
                             "--config.lpips_weights=/path/lpips_vgg.npz (made by python -m launch.convert_lpips) "
                             "or set --config.loss.perceptual_weight=0")
        self.lpips_model, self._lpips_vars = lpips if lpips is not None else (None, None)
        lr = learning_rate(config)
        self.tx_g = optax.adam(lr, b1=config.optim.b1, b2=config.optim.b2)
        self.tx_d = optax.adam(lr, b1=config.optim.b1, b2=config.optim.b2)
        self.grad_accum = int(config.optim.grad_accum_steps)
        self.res = int(config.model.resolution)

    # -- state -----------------------------------------------------------------------------------
    def _init_boxed(self, rng: jax.Array) -> VQGANState:
        k_g, k_d = jax.random.split(rng)
        x = jnp.zeros((1, self.res, self.res, int(self.config.model.in_channels)))
        gvars = self.model.init({"params": k_g, "gumbel": k_g}, x)
        params = gvars["params"]
        dvars = self.disc.init(k_d, x)
        ema_gen = float(self.loss_cfg.get("generator_ema", 0.0) or 0.0)
        return VQGANState(
            step=jnp.zeros((), jnp.int32), params=params, opt_g=self.tx_g.init(params),
            disc_params=dvars["params"], disc_stats=dvars.get("batch_stats", {}),
            opt_d=self.tx_d.init(dvars["params"]),
            code_usage=jnp.ones((self.quantizer.codebook_size,), jnp.float32),
            ema_params=params if ema_gen > 0 else {},
            codebook_ema=gvars.get("codebook_ema", {}),
            lpips=self._lpips_vars if self._lpips_vars is not None else {})

    def init_state(self, rng: jax.Array) -> VQGANState:
        return nn.unbox(self._init_boxed(rng))

    def state_logical_specs(self, abstract_state: VQGANState) -> Any:
        return specs_from_boxed_init(self._init_boxed, jax.random.key(0))

    # -- pieces ----------------------------------------------------------------------------------
    def _temperature(self, step: jax.Array) -> Any:
        """Gumbel temperature: taming's LambdaWarmUpCosineScheduler when configured, else the model's."""
        sched = self.config.get("temperature_schedule")
        if not self.quantizer.uses_temperature or not sched:
            return None
        warm, total = float(sched.warm_up_steps), float(sched.max_decay_steps)
        t = jnp.clip((step - warm) / max(total - warm, 1.0), 0.0, 1.0)
        cosine = sched.lr_min + 0.5 * (sched.lr_max - sched.lr_min) * (1 + jnp.cos(t * jnp.pi))
        ramp = sched.lr_start + (sched.lr_max - sched.lr_start) * step / max(warm, 1.0)
        return jnp.where(step < warm, ramp, cosine)

    def _lpips_fn(self, lpips_vars: Any) -> LpipsFn | None:
        if self.lpips_model is None:
            return None
        frozen = jax.lax.stop_gradient(lpips_vars)
        return lambda a, b: self.lpips_model.apply(frozen, a, b)

    def _disc_train(self, dvars: Any, images: jax.Array) -> tuple[jax.Array, Any]:
        logits, mut = self.disc.apply(dvars, images, train=True, mutable=["batch_stats"])
        return logits, mut.get("batch_stats", {})

    def _generator(self, params: Any, state: VQGANState, x: jax.Array, rng: jax.Array):
        k_gumbel, k_drop = jax.random.split(rng)
        variables = {"params": params}
        mutable = []
        if state.codebook_ema:
            variables["codebook_ema"] = state.codebook_ema
            mutable = ["codebook_ema", "ema_batch"]

        temperature = self._temperature(state.step)

        def fwd(m, x):
            enc = m.encode(x, train=True, temperature=temperature)
            return enc, m.decode_pre_out(enc.z_q, train=True)

        (enc, h), mut = self.model.apply(variables, x, method=fwd, mutable=mutable,
                                         rngs={"gumbel": k_gumbel, "dropout": k_drop})
        dvars = {"params": state.disc_params, "batch_stats": state.disc_stats}
        loss, metrics = losses.generator_loss(
            x, h, params["decoder"]["conv_out"], enc.loss,
            lambda dv, img: self._disc_train(dv, img)[0], dvars, state.step, self.loss_cfg,
            self._lpips_fn(state.lpips))
        xrec = jax.lax.stop_gradient(losses.reconstruct(h, params["decoder"]["conv_out"]))
        aux = {"metrics": metrics, "xrec": xrec, "usage": enc.usage, "perplexity": enc.perplexity,
               "z": jax.lax.stop_gradient(enc.z), "codebook_ema": mut.get("codebook_ema"),
               "ema_batch": mut["ema_batch"]["quantize"]["stats"] if "ema_batch" in mut else None}
        return loss, aux

    # -- the step --------------------------------------------------------------------------------
    def train_step(self, state: VQGANState, batch: Mapping[str, jax.Array], rng: jax.Array
                   ) -> tuple[VQGANState, dict]:
        x = jnp.asarray(batch["image"], jnp.float32)
        k_gen, k_restart = jax.random.split(rng)

        def gen_loss_and_grad(params, micro, key):
            return jax.value_and_grad(self._generator, has_aux=True)(params, state, micro["image"], key)

        if self.grad_accum == 1:
            (g_loss, aux), g_grads = gen_loss_and_grad(state.params, {"image": x}, k_gen)
        else:
            # Accumulate only the generator; D runs once on the full batch's reconstructions. The EMA
            # codebook's batch statistics are sums, so the micro-batches' add up to the whole batch's (the
            # mean that accumulate_gradients returns is scaled back) and one EMA update is applied below.
            n = self.grad_accum

            def lg(params, micro, key):
                (l, a), g = gen_loss_and_grad(params, micro, key)
                kept = {"metrics": a["metrics"], "usage": a["usage"], "perplexity": a["perplexity"]}
                if a["ema_batch"] is not None:
                    kept["ema_batch"] = jax.tree.map(lambda v: v * n, a["ema_batch"])
                return (l, kept), g
            (g_loss, aux), g_grads = accumulate_gradients(lg, state.params, {"image": x}, n, k_gen)
            # The restart's candidates come from this full-batch forward (same parameters as every
            # micro-batch): the encoder outputs of the whole batch, as in the one-step path.
            full_vars = {"params": state.params}
            if state.codebook_ema:
                full_vars["codebook_ema"] = state.codebook_ema
            xrec, enc = self.model.apply(full_vars, x)
            codebook_ema = None
            if state.codebook_ema:
                codebook_ema = {"quantize": self.quantizer.ema_step(state.codebook_ema["quantize"],
                                                                    aux["ema_batch"])}
            aux = dict(aux, xrec=jax.lax.stop_gradient(xrec), z=jax.lax.stop_gradient(enc.z),
                       codebook_ema=codebook_ema)
        upd, opt_g = self.tx_g.update(g_grads, state.opt_g, state.params)
        params = optax.apply_updates(state.params, upd)

        def d_loss_fn(dparams):
            lr_, stats = self._disc_train({"params": dparams, "batch_stats": state.disc_stats}, x)
            lf_, stats = self._disc_train({"params": dparams, "batch_stats": stats}, aux["xrec"])
            loss, m = losses.discriminator_loss(lr_, lf_, state.step, self.loss_cfg)
            return loss, (m, stats)

        (d_loss, (d_metrics, disc_stats)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
            state.disc_params)
        upd, opt_d = self.tx_d.update(d_grads, state.opt_d, state.disc_params)
        disc_params = optax.apply_updates(state.disc_params, upd)

        usage = aux["usage"] * (self.quantizer.codebook_size / jnp.maximum(aux["usage"].sum(), 1.0))
        code_usage = 0.99 * state.code_usage + 0.01 * usage   # in units of "uniform share" per code
        codebook_ema = state.codebook_ema
        if codebook_ema and aux["codebook_ema"]:
            codebook_ema = aux["codebook_ema"]
        # The quantizer's own rules: its EMA codebook into the parameters, dead-code restart.
        thr = float(self.loss_cfg.get("dead_code_threshold", 0.0) or 0.0)
        z_flat = aux["z"].reshape(-1, aux["z"].shape[-1])
        q_params, code_usage, restarted = self.quantizer.after_step(
            params.get("quantize", {}), codebook_ema.get("quantize", {}) if codebook_ema else {}, code_usage,
            z_flat, k_restart, thr)
        if q_params:
            params = {**params, "quantize": q_params}
        ema_params = state.ema_params
        if ema_params:
            decay = float(self.loss_cfg.generator_ema)
            ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)

        metrics = dict(aux["metrics"])
        metrics.update(d_metrics)
        metrics.update({
            "perplexity": aux["perplexity"],
            "codebook_usage": jnp.mean((aux["usage"] > 0).astype(jnp.float32)),
            "codebook_alive": jnp.mean((code_usage > 0.01).astype(jnp.float32)),
            "codes_restarted": restarted,
            # checked for divergence by the loop
            "grad_norm": optax.global_norm(g_grads), "disc_grad_norm": optax.global_norm(d_grads),
        })
        new = state.replace(step=state.step + 1, params=params, opt_g=opt_g, disc_params=disc_params,
                            disc_stats=disc_stats, opt_d=opt_d, code_usage=code_usage,
                            ema_params=ema_params, codebook_ema=codebook_ema)
        return new, metrics

    # -- eval and images -------------------------------------------------------------------------
    def _eval_params(self, state: VQGANState) -> Any:
        return state.ema_params if state.ema_params else state.params

    def eval_step(self, state: VQGANState, batch: Mapping[str, jax.Array]) -> dict:
        """Sums over real examples (``mask``): L1, PSNR, LPIPS when weights are loaded, batch code usage."""
        x = jnp.asarray(batch["image"], jnp.float32)
        mask = jnp.asarray(batch.get("mask", jnp.ones(x.shape[:1])), jnp.float32)
        xrec, enc = self.model.apply({"params": self._eval_params(state)}, x)
        l1 = jnp.mean(jnp.abs(x - xrec), axis=(1, 2, 3))
        out = {"l1": jnp.sum(l1 * mask), "psnr": jnp.sum(psnr(x, xrec) * mask), "count": jnp.sum(mask)}
        if self.lpips_model is not None:
            out["lpips"] = jnp.sum(self.lpips_model.apply(state.lpips, x, xrec) * mask)
        used = jnp.zeros((self.quantizer.codebook_size,)).at[enc.indices.reshape(x.shape[0], -1)].max(
            jnp.broadcast_to(mask[:, None], enc.indices.reshape(x.shape[0], -1).shape))
        out["batch_codebook_usage"] = jnp.mean(used) * jnp.sum(mask)
        return out

    def summaries(self, state: VQGANState, batch: Mapping[str, jax.Array]) -> dict:
        """Inputs and reconstructions interleaved (uint8 NHWC), 8 pairs."""
        x = jnp.asarray(batch["image"], jnp.float32)[:8]
        xrec, _ = self.model.apply({"params": self._eval_params(state)}, x)
        pairs = jnp.stack([x, jnp.clip(xrec, -1, 1)], axis=1).reshape(-1, *x.shape[1:])
        return {"reconstructions": jnp.round((pairs + 1) * 127.5).astype(jnp.uint8)}


TASKS = ("vqgan", "segmentation")


def train(config, workdir: str) -> training.RunResult:
    """Build data, LPIPS and the task from ``config`` and run the shared loop in ``workdir``.

    ``config.task``: ``vqgan`` (images, default) or ``segmentation`` (taming's VQSegmentationModel on the
    label maps of a paired dataset, ``common_jax.datasets.build_paired_folder``).
    """
    kind = config.get("task", "vqgan")
    if kind not in TASKS:
        raise ValueError(f"config.task must be one of {TASKS}, got {kind!r}")
    if kind == "segmentation":
        from vqgan_jax.segmentation import SegmentationVQTask
        task, features = SegmentationVQTask(config), ("segmentation",)
    else:
        lpips = None
        if float(config.loss.perceptual_weight) > 0 and config.lpips_weights:
            from common_jax.lpips import load_lpips
            lpips = load_lpips(config.lpips_weights)
        # validates the config before any data work; images only (paired datasets have no label)
        task, features = VQGANTask(config, lpips), ("image",)
    train_loader, eval_loader, _, name = dataset_resolution.image_loaders(config, workdir, features)
    dataset_resolution.cap_eval_steps(config)
    logging.info("stage one (%s) on %s, global batch %d", kind, name, config.data.global_batch_size)
    return training.run(config, workdir, task, train_loader, eval_loader)

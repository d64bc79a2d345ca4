"""LlamaGen's VQ tokenizer as the ``llamagen`` stage-one architecture: its golden outputs through
``from_llamagen_vq`` (indices equal, decodes within the tolerance policy), the converter's one-line refusals, the
quantizer options that make the ``vq`` kind compute LlamaGen's VectorQuantizer, the configs by name, and a few
steps of the tiny tokenizer through the stage-one loop with resume."""
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common_jax.config_utils import config_to_dict, flatten
from seeded_weights import EPS32, POLICY_ULPS
from vqgan_jax import architectures, convert, quantizers
from vqgan_jax.llamagen_tokenizer import LlamaGenVQ
from vqgan_jax.model import VQGAN

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "llamagen"


@pytest.fixture(scope="module")
def golden():
    manifest = json.loads((GOLDEN / "llamagen_vq_small.json").read_text())
    with np.load(GOLDEN / "llamagen_vq_small.npz", allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    sd = {k[len("state_dict/"):]: v for k, v in data.items() if k.startswith("state_dict/")}
    assert sorted(sd) == sorted(manifest["state_dict_keys"])
    return sd, manifest, data


@pytest.fixture(scope="module")
def converted(golden):
    sd, manifest, data = golden
    model, variables = convert.from_llamagen_vq(sd, manifest["config"])
    x = jnp.asarray(data["input/x"].transpose(0, 2, 3, 1))
    enc = model.apply(variables, x, method="encode")
    out = {"indices": np.asarray(enc.indices), "z_q": np.asarray(enc.z_q),
           "xrec": np.asarray(model.apply(variables, enc.z_q, method="decode")),
           "xrec_from_indices": np.asarray(model.apply(variables, jnp.asarray(data["output/indices"]),
                                                       method="decode_code"))}
    return model, variables, out


def _atol(manifest, ref, name):
    """The golden's suggested atol, raised to the policy's floor of a few float32 ulps of max|ref|
    (tests/README.md "Tolerance policy"; this manifest keeps the suggestions in one dict)."""
    return max(float(manifest["suggested_atol"][name]), POLICY_ULPS * EPS32 * float(np.abs(ref).max()))


# ------------------------------------------------------------------------------------------- golden
def test_indices_equal_llamagen(golden, converted):
    _, _, data = golden
    model, _, out = converted
    assert isinstance(model, LlamaGenVQ) and model.downsample_factor == 4 and model.codebook_size == 256
    want = data["output/indices"]
    assert len(np.unique(want)) > 20      # the codes vary: equality is not a constant's
    np.testing.assert_array_equal(out["indices"], want)


@pytest.mark.parametrize("name", ["z_q", "xrec", "xrec_from_indices"])
def test_decodes_within_tolerance(golden, converted, name):
    _, manifest, data = golden
    want = data[f"output/{name}"]
    got = converted[2][name].transpose(0, 3, 1, 2)     # NHWC -> the reference's NCHW
    atol = _atol(manifest, want, f"output/{name}")
    err = float(np.abs(got - want).max())
    print(f"{name}: max |err| {err:.2e}, atol {atol:.2e}, max|ref| {np.abs(want).max():.2f}")
    assert err <= atol


def test_codebook_vectors_are_unit_norm_and_indices_pick_them(converted):
    model, variables, out = converted
    codes = np.asarray(model.apply(variables, jnp.asarray(out["indices"]), method="embed_code"))
    np.testing.assert_allclose(np.linalg.norm(codes, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out["z_q"], codes, atol=1e-6)        # forward value of the straight-through


# ------------------------------------------------------------------------------------- refusals
def _refusal(sd, args):
    with pytest.raises(ValueError) as e:
        convert.from_llamagen_vq(sd, args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_converter_refuses_missing_unexpected_and_misshaped_keys_in_one_line(golden):
    sd, manifest, _ = golden
    args = manifest["config"]
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_blocks.0.attn.1.q.weight"}
    assert "missing key 'decoder.conv_blocks.0.attn.1.q.weight': expected shape (64, 64, 1, 1)" in \
        _refusal(missing, args)
    extra = dict(sd, **{"decoder.conv_blocks.1.attn.0.q.weight": np.zeros((64, 64, 1, 1), np.float32)})
    assert "unexpected key 'decoder.conv_blocks.1.attn.0.q.weight' (shape (64, 64, 1, 1))" in _refusal(extra, args)
    bad = dict(sd, **{"quantize.embedding.weight": np.zeros((256, 16), np.float32)})
    assert "key 'quantize.embedding.weight': expected shape (256, 8), found (256, 16)" in _refusal(bad, args)
    # a wholly different model (other ch_mult): many problems, still one line
    assert "problems" in _refusal(sd, dict(args, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2]))
    assert _refusal(sd, dict(args, codebook_dim=8)) == \
        "LlamaGen VQ model_args: unknown field 'codebook_dim' (known: " + str(sorted(convert.LLAMAGEN_VQ_ARGS)) + ")"


def test_codebook_usage_buffer_is_optional(golden, converted):
    sd, manifest, data = golden
    assert "quantize.codebook_used" in sd
    without = {k: v for k, v in sd.items() if k != "quantize.codebook_used"}
    model, variables = convert.from_llamagen_vq(without, manifest["config"])
    x = jnp.asarray(data["input/x"].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(model.apply(variables, x, method="encode").indices, converted[2]["indices"])


def test_model_config_refusals():
    cfg = convert.llamagen_vq_config({"encoder_ch_mult": [1, 2, 2], "decoder_ch_mult": [1, 2]})
    with pytest.raises(ValueError, match=r"^model.decoder_ch_mult=\[1, 2\] has 2 levels but model.ch_mult=\[1, 2, "
                                         r"2\] has 3: the decoder must upsample by the encoder's factor$"):
        architectures.from_config(cfg)
    with pytest.raises(ValueError, match=r"^model.arch must be one of \['llamagen', 'taming'\], got 'maskgit'$"):
        architectures.from_config(dict(cfg, arch="maskgit"))
    with pytest.raises(ValueError, match=r"^model.arch='llamagen' is not built by VQGAN \(model.arch='taming'\)"):
        VQGAN.from_config(convert.llamagen_vq_config({}))
    with pytest.raises(ValueError, match=r"^LlamaGenVQ config: unknown keys \['attn_resolutions'\]"):
        architectures.from_config(dict(convert.llamagen_vq_config({}), attn_resolutions=(16,)))


# ------------------------------------------------------------------------------ the quantizer
def _llamagen_vq_numpy(z, e, beta, entropy_ratio, temperature=0.01):
    """LlamaGen's VectorQuantizer in training mode (l2_norm=True), float64: (indices, z_q, summed loss)."""
    z = z.reshape(-1, z.shape[-1]).astype(np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    e = e.astype(np.float64) / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    d = (z ** 2).sum(1, keepdims=True) + (e ** 2).sum(1) - 2 * z @ e.T
    idx = d.argmin(1)
    zq = e[idx]
    vq, commit = np.mean((zq - z) ** 2), beta * np.mean((zq - z) ** 2)
    a = -d / temperature
    a -= a.max(1, keepdims=True)
    p = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    sample_h = -np.mean(np.sum(p * np.log(np.maximum(p, 1e-300)), 1))
    avg = p.mean(0)
    batch_h = -np.sum(avg * np.log(avg + 1e-5))
    return idx, zq, vq + commit + entropy_ratio * (sample_h - batch_h)


def test_vq_kind_with_llamagen_options_computes_llamagen_quantizer():
    """l2_normalize + legacy=False + entropy_eps=1e-5: LlamaGen's VectorQuantizer (its three losses summed, as its
    VQLoss adds them), from the config llamagen_vq_config writes."""
    q_cfg = convert.llamagen_vq_config({"codebook_size": 64, "entropy_loss_ratio": 0.5})["quantizer"]
    q = quantizers.build(q_cfg, 8, parent=None)
    z = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
    variables = q.init(jax.random.key(0), z)
    e = np.asarray(nn.unbox(variables)["params"]["embedding"])
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-6)   # stored unit-norm, as LlamaGen's
    variables = {"params": {"embedding": jax.random.normal(jax.random.key(2), (64, 8))}}
    out = q.apply(variables, z, train=True)
    idx, zq, loss = _llamagen_vq_numpy(np.asarray(z), np.asarray(variables["params"]["embedding"]), 0.25, 0.5)
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), idx)
    np.testing.assert_allclose(np.asarray(out.z_q).reshape(zq.shape), zq, atol=1e-6)
    # The affinities are squared distances / 0.01 in float32 (terms up to ~4): their rounding, ~1e-5 nats, enters
    # the entropies. LlamaGen's 1e-5 inside the batch entropy's log moves the loss by ~3e-4 here (the project's
    # default 1e-10 would fail this).
    np.testing.assert_allclose(float(out.loss), loss, rtol=0, atol=5e-5)


def test_codebook_gradient_is_llamagen_codebook_term():
    """LlamaGen weighs the codebook term by 1 and the commitment term by beta (taming's legacy default swaps
    them: the same value, a quarter of the codebook's gradient). Gradient of the loss wrt the stored codebook:
    2 (e_k - z_n) / numel summed over the latents assigned to code k, through the codes' l2 normalisation."""
    q = quantizers.build(convert.llamagen_vq_config({"codebook_size": 16})["quantizer"], 8, parent=None)
    z = jax.random.normal(jax.random.key(1), (1, 4, 4, 8))
    emb = jax.random.normal(jax.random.key(2), (16, 8))
    grad = np.asarray(jax.grad(lambda e: q.apply({"params": {"embedding": e}}, z, train=True).loss)(emb), np.float64)
    idx, zq, _ = _llamagen_vq_numpy(np.asarray(z), np.asarray(emb), 0.25, 0.0)
    zn = np.asarray(z, np.float64).reshape(-1, 8)
    zn /= np.linalg.norm(zn, axis=-1, keepdims=True)
    g_unit = np.zeros((16, 8))
    np.add.at(g_unit, idx, 2 * (zq - zn) / zn.size)
    e = np.asarray(emb, np.float64)
    norm = np.linalg.norm(e, axis=-1, keepdims=True)
    unit = e / norm
    want = (g_unit - np.sum(unit * g_unit, -1, keepdims=True) * unit) / norm    # through e / |e|
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(grad, want, rtol=0, atol=1e-6 * np.abs(want).max() + 1e-9)


# ------------------------------------------------------------------------------- configs by name
@pytest.mark.parametrize("name,f,n_params", [("vqgan_llamagen_ds16", 16, 71_883_403),
                                             ("vqgan_llamagen_ds8", 8, 70_109_835)])
def test_named_configs_are_llamagen_released_tokenizers(name, f, n_params):
    """VQ-16 / VQ-8 at LlamaGen's sizes (its README: 72 M and 70 M parameters)."""
    import importlib
    cfg = importlib.import_module(f"configs.{name}").get_config()
    vq_model = {16: "VQ-16", 8: "VQ-8"}[f]
    assert config_to_dict(cfg.model) == config_to_dict(
        __import__("ml_collections").ConfigDict(convert.llamagen_vq_config(convert.LLAMAGEN_VQ_MODELS[vq_model])))
    model = architectures.from_config(cfg.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    assert model.downsample_factor == f and model.codebook_size == 16384 and model.embed_dim == 8
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(nn.unbox(shapes))) == n_params
    from configs import transformer_tiny
    from transformer_jax.train import stage_one_grid
    c = transformer_tiny.get_config()
    c.data.image_size, c.data.code_grid, c.gpt.vocab_size = 256, (256 // f,) * 2, 16384
    assert stage_one_grid(c, cfg.model) == (256 // f,) * 2   # stage two reads the grid and vocabulary


def _init_shapes(model_cfg):
    model = architectures.from_config(model_cfg)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_params_carry_logical_axis_names_and_shape_keys_cover_the_architecture():
    from configs import vqgan_llamagen_tiny
    from vqgan_jax.train import VQGANTask
    cfg = vqgan_llamagen_tiny.get_config().model
    boxed = _init_shapes(cfg)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    # every architecture key that is not declared leaves the weights' shapes alone (the quantizer's keys are the
    # vq kind's, which test_config_compat covers)
    want = [(jax.tree_util.keystr(p), x.shape) for p, x in jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]]
    changed = {"dropout": 0.1, "dtype": "bfloat16", "remat": True}
    for key in flatten(config_to_dict(cfg)):
        if f"model.{key}" in VQGANTask.shape_keys or key.startswith("quantizer."):
            continue
        assert key in changed, f"model.{key} is neither a shape key nor perturbed here"
        c = config_to_dict(cfg)
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = changed[key]
        got = [(jax.tree_util.keystr(p), x.shape) for p, x in
               jax.tree_util.tree_flatten_with_path(nn.unbox(_init_shapes(c)["params"]))[0]]
        assert got == want, key
    assert {"model.arch", "model.decoder_ch_mult"} <= set(VQGANTask.shape_keys)


# --------------------------------------------------------------------------- the stage-one loop
def _tiny_run(workdir, data_dir, total_steps):
    """configs/vqgan_llamagen_tiny at two levels (f=2, the same kinds of blocks: attention at the lowest level,
    both resampling convs), batch 8, the GAN terms from the second step."""
    from configs import vqgan_llamagen_tiny
    from vqgan_jax.train import train
    c = vqgan_llamagen_tiny.get_config()
    c.model.update(dict(ch_mult=(1, 2), decoder_ch_mult=(1, 2)))
    c.data.update(dict(data_dir=str(data_dir), builtin_crops_per_photo=8, global_batch_size=8, eval_batch_size=8,
                       eval_examples=8))
    c.loss.disc_start = 1
    c.total_steps, c.log_every, c.eval_every, c.image_every = total_steps, 1, 0, 0
    c.tensorboard = False
    c.checkpoint.update(dict(every=2, keep=2, async_save=False))
    return train(c, str(workdir))


def test_tiny_llamagen_tokenizer_trains_logs_usage_and_resumes(tmp_path, caplog):
    """Two steps, then a resume to three (the second run's programs come from the compilation cache); a
    stage-one workdir of this architecture then loads for stage two (code encoder, Sampler) as any other."""
    import logging
    first = _tiny_run(tmp_path / "run", tmp_path / "data", 2)
    assert first.step == 2
    with caplog.at_level(logging.INFO, logger="absl"):
        resumed = _tiny_run(tmp_path / "run", tmp_path / "data", 3)
    assert "resumed from step 2 of" in caplog.text and resumed.step == 3
    for m in (first.train_metrics, resumed.train_metrics):
        print({k: round(float(v), 4) for k, v in m.items()})
        for key in ("codebook_usage", "perplexity", "g_loss", "disc_loss", "quant_loss", "rec_loss"):
            assert np.isfinite(float(m[key])), (key, m)
        assert 0 < float(m["codebook_usage"]) <= 1 and float(m["perplexity"]) > 1
    assert float(resumed.train_metrics["disc_factor"]) == 1.0          # the GAN terms ran
    assert np.isfinite(resumed.eval_metrics["l1"]) and resumed.eval_metrics["batch_codebook_usage"] > 0
    from vqgan_jax.pretrained import load_vqgan
    model, variables, model_cfg = load_vqgan(str(tmp_path / "run"), use_ema=False)
    assert isinstance(model, LlamaGenVQ) and model_cfg.arch == "llamagen"
    codes = model.apply(variables, jnp.zeros((1, 32, 32, 3)), method="encode").indices
    assert codes.shape == (1, 16, 16)
    assert model.apply(variables, codes, method="decode_code").shape == (1, 32, 32, 3)

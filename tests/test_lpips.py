"""LPIPS(vgg): goldens (seeded and shipped lin weights), converters, loading errors, frozen gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common_jax import lpips as lp
from common_jax.layers import CONV_KERNEL_AXES
from seeded_weights import golden, suggested_atol
from torch_files_writer import write_legacy_state_dict


def _nhwc(a):
    return a.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def small():
    sd, manifest, data = golden("lpips_vgg_small")
    model, variables = lp.from_lpips(sd)
    return sd, manifest, data, model, variables


@pytest.fixture(scope="module")
def apply_fns():
    model = lp.LPIPS()
    dist = jax.jit(lambda v, a, b: model.apply(v, a, b))
    per_layer = jax.jit(lambda v, a, b: model.apply(v, a, b, per_layer=True))
    return dist, per_layer


def _check_golden(name, variables, data, manifest, apply_fns):
    dist, per_layer = apply_fns
    x0, x1 = _nhwc(data["input/x0"]), _nhwc(data["input/x1"])
    d = np.asarray(dist(variables, x0, x1))
    pl = np.asarray(per_layer(variables, x0, x1))
    assert d.shape == (3,) and pl.shape == (5, 3)
    np.testing.assert_allclose(d, data["output/distance"].reshape(3), rtol=0,
                               atol=suggested_atol(manifest, "distance"), err_msg=name)
    np.testing.assert_allclose(pl, data["output/distance_per_layer"].reshape(5, 3), rtol=0,
                               atol=suggested_atol(manifest, "distance_per_layer"), err_msg=name)


def test_golden_seeded_lins(small, apply_fns):
    _, manifest, data, _, variables = small
    _check_golden("lpips_vgg_small", variables, data, manifest, apply_fns)


def _write_published_files(sd, folder):
    """The two files users convert, in the format they are published in (torch's legacy serialisation),
    written without PyTorch: torchvision's vgg16-397923af.pth (2017, torch 0.1: each tensor is
    ``torch.FloatTensor()`` plus a BUILD of its storage, offset, size and stride, as torch's tracebacks on
    loading torchvision's VGG files show; no _metadata) and lpips' vgg.pth (Python 2 / torch 0.4 layout)."""
    vgg = {}
    for k, convs in enumerate(lp.VGG16_SLICES):
        for idx, _ in convs:
            for p in ("weight", "bias"):
                vgg[f"features.{idx}.{p}"] = sd[f"net.slice{k + 1}.{idx}.{p}"]
    for idx in (0, 3, 6):  # the converter ignores the classifier; stand-ins far smaller than 4096 x 25088
        vgg[f"classifier.{idx}.weight"] = np.full((2, 2), idx, np.float32)
        vgg[f"classifier.{idx}.bias"] = np.zeros(2, np.float32)
    write_legacy_state_dict(str(folder / "vgg16-397923af.pth"), vgg, python2=True, tensors="class_state")
    return str(folder / "vgg16-397923af.pth"), _write_lin_file(sd, folder)


def _write_lin_file(sd, folder):
    lin = {f"lin{k}.model.1.weight": sd[f"lin{k}.model.1.weight"] for k in range(5)}
    meta = {name: {"version": 1} for k in range(5) for name in (f"lin{k}", f"lin{k}.model", f"lin{k}.model.0",
                                                                 f"lin{k}.model.1")}
    write_legacy_state_dict(str(folder / "vgg.pth"), lin, python2=True, location="cuda:0",
                            metadata={"": {"version": 1}, **meta})
    return str(folder / "vgg.pth")


def test_convert_published_files_end_to_end(tmp_path, apply_fns):
    # The route users take, with no PyTorch: both published .pth files -> convert_lpips -> npz -> load_lpips.
    from launch import convert_lpips
    sd, manifest, data = golden("lpips_vgg_shipped_lin")
    vgg_path, lin_path = _write_published_files(sd, tmp_path)
    path = tmp_path / "lpips_vgg.npz"
    converted = convert_lpips.convert(vgg_path, lin_path, str(path))
    # The arrays come through the files bit for bit; the converter's constants are the reference buffers.
    assert sorted(converted) == sorted(k for k in sd if not k.startswith("lins."))
    for k, v in converted.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    _, variables = lp.load_lpips(path)
    _check_golden("lpips_vgg_shipped_lin", variables, data, manifest, apply_fns)


def test_lins_alias_only_and_identity(small, apply_fns):
    sd, _, data, _, variables = small
    only_alias = {k: v for k, v in sd.items() if not (k.startswith("lin") and k[3].isdigit())}
    assert any(k.startswith("lins.") for k in only_alias)
    _, v2 = lp.from_lpips(only_alias)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(v2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x0 = _nhwc(data["input/x0"])
    # Identical images: zero up to the conv's batch-position rounding (distances here are ~1e-2).
    assert np.abs(np.asarray(apply_fns[0](variables, x0, x0))).max() < 1e-12


def test_params_carry_logical_axes(small):
    _, _, _, model, variables = small
    boxed = variables["params"]["features_0"]["kernel"]
    assert boxed.names == CONV_KERNEL_AXES
    assert variables["params"]["shift"].names == ("norm",)


def test_frozen_network_gradients_flow_to_inputs_only(small):
    _, _, data, model, variables = small
    x0, x1 = _nhwc(data["input/x0"]), _nhwc(data["input/x1"])

    def loss(v, a):
        return jnp.sum(lp.make_lpips_fn(model, v)(a, x1))
    g_vars, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x0)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(g_vars))
    g_x = np.asarray(g_x)
    assert np.all(np.isfinite(g_x)) and np.abs(g_x).max() > 0


def test_unit_normalize_finite_gradient_at_zero():
    f = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 0.0, 4.0, 0.0]))
    out = lp._unit_normalize(f)
    np.testing.assert_allclose(np.asarray(out[0, 0, 0]), [0.6, 0.0, 0.8, 0.0], rtol=1e-6)
    g = jax.grad(lambda f: jnp.sum(lp._unit_normalize(f) * 1.5))(f)
    assert np.all(np.isfinite(np.asarray(g)))


def test_missing_and_unexpected_keys_listed(small):
    sd = dict(small[0])
    del sd["net.slice3.12.bias"]
    sd["net.slice9.0.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=r"missing keys \['net.slice3.12.bias'\].*'net.slice9.0.weight'"):
        lp.from_lpips(sd)


def test_wrong_shape_named(small):
    sd = dict(small[0])
    sd["net.slice1.0.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"net.slice1.0.weight: expected \(64, 3, 3, 3\), got \(64, 3, 5, 5\)"):
        lp.from_lpips(sd)


def test_disagreeing_lin_alias_rejected(small):
    sd = dict(small[0])
    sd["lins.2.model.1.weight"] = sd["lins.2.model.1.weight"] + 1.0
    with pytest.raises(ValueError, match="lins.2.model.1.weight and lin2.model.1.weight"):
        lp.from_lpips(sd)


def test_missing_weights_file_names_file_and_command(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError) as e:
        lp.load_lpips(path)
    assert str(path) in str(e.value) and "python -m launch.convert_lpips" in str(e.value)


def test_bad_npz_names_file(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, foo=np.zeros(1))
    with pytest.raises(ValueError, match="bad.npz.*missing keys"):
        lp.load_lpips(path)


def test_torchvision_converter_missing_keys():
    with pytest.raises(ValueError, match="features.0.weight"):
        lp.state_dict_from_torchvision({}, {})


def test_wrong_image_shapes_rejected(small):
    _, _, _, model, variables = small
    with pytest.raises(ValueError, match="same shape"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)), jnp.zeros((2, 32, 32, 3)))


def test_convert_bad_files_one_error_nothing_written(tmp_path, small):
    from launch import convert_lpips
    lin_path = _write_lin_file(small[0], tmp_path)
    out = tmp_path / "o.npz"
    (tmp_path / "a.pth").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"a.pth is not a PyTorch file"):
        convert_lpips.convert(str(tmp_path / "a.pth"), lin_path, str(out))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert_lpips.convert(str(tmp_path / "missing.pth"), lin_path, str(out))
    with pytest.raises(ValueError, match=r"VGG16 state dict lacks \['features.0.weight'"):
        convert_lpips.convert(lin_path, lin_path, str(out))  # the lin file given as the VGG16 one
    assert not out.exists()

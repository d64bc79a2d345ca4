"""Paired (image, segmentation label map) datasets: building, aligned loading, resume, bad input."""
import io
import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from batch_checks import assert_same_batches, take
from common_jax import data, datasets
from paired_folder import NOISE, label_colours, make_paired_folder

N_LABELS = 5
ONE = dict(process_index=0, process_count=1)


def _read(path):
    return np.asarray(Image.open(path))


def _u8(img):
    return np.round((img + 1) * 127.5).astype(np.int16)


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """40 pairs of 32x32, 5 labels; returns (data_dir, image_dir, segmentation_dir, summary)."""
    root = tmp_path_factory.mktemp("square")
    image_dir, seg_dir = make_paired_folder(root / "src", n=40, size=32, n_labels=N_LABELS, seed=0)
    summary = datasets.build_paired_folder(image_dir, seg_dir, root / "data", name="pairs", seed=0)
    return str(root / "data"), image_dir, seg_dir, summary


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """24 pairs stored 48 high x 64 wide: loading at 32 px resizes, crops and flips."""
    root = tmp_path_factory.mktemp("wide")
    image_dir, seg_dir = make_paired_folder(root / "src", n=24, size=48, width=64, n_labels=N_LABELS, seed=1)
    datasets.build_paired_folder(image_dir, seg_dir, root / "data", name="wide", heldout_fraction=0.0)
    return str(root / "data"), image_dir, seg_dir


def _name(b):
    return b.decode() if isinstance(b, bytes) else str(b)


# ---------------------------------------------------------------------------------------------- building

def test_build_summary_and_features(square):
    data_dir, _, _, summary = square
    assert summary.splits == {"train": 38, "validation": 2} and summary.skipped == [] and not summary.reused
    assert summary.class_names is None
    src = datasets.open_split(data_dir, "pairs", "train")
    assert set(src.features) == {"image", "segmentation", "file_name"}
    assert src.label_map_features == ("segmentation",)
    assert set(src.image_features) == {"image", "segmentation"}
    again = datasets.build_paired_folder(square[1], square[2], data_dir, name="pairs")
    assert again.reused and again.splits == summary.splits


# ---------------------------------------------------------------------------------------------- loading

def test_eval_at_stored_size_is_exact(square):
    data_dir, image_dir, seg_dir, _ = square
    loader = data.make_loader(data_dir, "pairs", "train", 8, train=False, image_size=32, seed=0,
                              features=("image", "segmentation", "file_name"), **ONE)
    batches = list(loader)
    assert len(batches) == 5                       # 38 examples padded to 40
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.tolist() == [True] * 38 + [False] * 2
    seen = set()
    for b in batches:
        assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["segmentation"].shape == (8, 32, 32) and b["segmentation"].dtype == np.int32
        for img, seg, name in zip(b["image"], b["segmentation"], b["file_name"]):
            name = _name(name)
            seen.add(name)
            np.testing.assert_array_equal(seg, _read(seg_dir / name), err_msg=name)
            np.testing.assert_array_equal(_u8(img), _read(image_dir / name), err_msg=name)
    assert len(seen) == 38


def _check_aligned(images, segs):
    """Inside each label region (pixels whose 5x5 neighbourhood, within the crop, has one label: bicubic
    resizing blends colours across edges) the image has that label's colour. Fails for a map cropped or
    flipped differently from its image."""
    colours = label_colours(N_LABELS).astype(np.int16)
    checked = 0
    for img, seg in zip(_u8(images), segs):
        pad = np.pad(seg, 2, constant_values=-1)  # beyond the crop: unknown, so border pixels are not interior
        interior = np.ones(seg.shape, bool)
        for dy in range(5):
            for dx in range(5):
                interior &= pad[dy:dy + seg.shape[0], dx:dx + seg.shape[1]] == seg
        err = np.abs(img - colours[seg]).max(-1)
        assert np.all(err[interior] <= NOISE + 4), err[interior].max()
        checked += int(interior.sum())
    assert checked > 0.25 * segs.size


def test_train_crop_flip_keep_map_aligned(wide):
    data_dir, _, _ = wide
    loader = data.make_loader(data_dir, "wide", "train", 8, train=True, image_size=32, seed=3,
                              features=("image", "segmentation"), **ONE)
    for b in take(loader, 6):  # two epochs
        assert b["image"].shape == (8, 32, 32, 3) and b["segmentation"].shape == (8, 32, 32)
        assert b["segmentation"].dtype == np.int32
        assert 0 <= b["segmentation"].min() and b["segmentation"].max() < N_LABELS
        _check_aligned(b["image"], b["segmentation"])


def test_label_maps_resized_nearest(wide):
    """Resizing 48 -> 32 px never invents ids: each map holds only ids of its stored map."""
    data_dir, _, seg_dir = wide
    loader = data.make_loader(data_dir, "wide", "train", 8, train=True, image_size=32, seed=0,
                              features=("segmentation", "file_name"), **ONE)
    for b in take(loader, 3):
        for seg, name in zip(b["segmentation"], b["file_name"]):
            assert set(np.unique(seg)) <= set(np.unique(_read(seg_dir / _name(name))))


def test_paired_preprocessing_is_one_window(wide):
    """At image_size = stored height no resize happens: image and map are the same window, same flip."""
    _, image_dir, seg_dir = wide
    img_bytes, seg_bytes = (image_dir / "003.png").read_bytes(), (seg_dir / "003.png").read_bytes()
    img, seg = _read(image_dir / "003.png"), _read(seg_dir / "003.png")
    windows = set()
    for s in range(16):
        out = data.preprocess_paired({"image": img_bytes}, {"segmentation": seg_bytes}, 48,
                                     np.random.default_rng(s))
        hits = [(x, f) for x in range(17) for f in (0, 1)
                if np.array_equal(out["segmentation"], seg[:, x:x + 48][:, ::-1] if f else seg[:, x:x + 48])
                and np.array_equal(_u8(out["image"]), img[:, x:x + 48][:, ::-1] if f else img[:, x:x + 48])]
        assert hits, f"seed {s}: image and map are not one window of the pair"
        windows.add(hits[0])
        # image alone with the same rng draws gives the same image (existing image path unchanged)
        alone = data.preprocess_train(img_bytes, 48, np.random.default_rng(s))
        np.testing.assert_array_equal(alone, out["image"])
    assert len({f for _, f in windows}) == 2 and len({x for x, _ in windows}) > 3
    ev = data.preprocess_paired({"image": img_bytes}, {"segmentation": seg_bytes}, 48)
    np.testing.assert_array_equal(ev["segmentation"], seg[:, 8:56])
    np.testing.assert_array_equal(ev["image"], data.preprocess_eval(img_bytes, 48))


def test_paired_jpeg_draft_and_size_mismatch():
    """A large JPEG decodes at reduced scale (draft) yet lands on the map's grid; sizes must agree."""
    labels = np.zeros((300, 400), np.uint8)
    labels[:, 200:] = 1
    rgb = label_colours(2)[labels]
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).save(jpg, format="JPEG", quality=95)
    Image.fromarray(labels, "L").save(png, format="PNG")
    out = data.preprocess_paired({"image": jpg.getvalue()}, {"segmentation": png.getvalue()}, 30)
    assert out["image"].shape == (30, 30, 3) and out["segmentation"].shape == (30, 30)
    expected = np.zeros((30, 40), np.int32)
    expected[:, 20:] = 1
    np.testing.assert_array_equal(out["segmentation"], expected[:, 5:35])
    _check_aligned(out["image"][None], out["segmentation"][None])
    small = io.BytesIO()
    Image.fromarray(labels[:, :399], "L").save(small, format="PNG")
    with pytest.raises(ValueError, match="'image' is 400x300 but 'segmentation' is 399x300"):
        data.preprocess_paired({"image": jpg.getvalue()}, {"segmentation": small.getvalue()}, 30)


def test_segmentation_only_matches_paired(wide):
    """features=('segmentation',) takes the same crop/flip draws as the paired stream."""
    data_dir, _, _ = wide
    kw = dict(train=True, image_size=32, seed=7, **ONE)
    both = take(data.make_loader(data_dir, "wide", "train", 8, features=("image", "segmentation"), **kw), 3)
    alone = take(data.make_loader(data_dir, "wide", "train", 8, features=("segmentation",), **kw), 3)
    for a, b in zip(alone, both):
        assert set(a) == {"segmentation"}
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])


def test_default_features_without_label(square):
    data_dir = square[0]
    b = next(data.make_loader(data_dir, "pairs", "validation", 2, train=False, image_size=16, seed=0, **ONE))
    assert set(b) == {"image", "mask"} and b["image"].shape == (2, 16, 16, 3)


# ---------------------------------------------------------------------------------------------- resume, sharding

def test_resume_and_process_halves(wide):
    data_dir, _, _ = wide
    kw = dict(train=True, image_size=32, seed=5, features=("image", "segmentation"))
    ref = take(data.make_loader(data_dir, "wide", "train", 8, **kw, **ONE), 5)   # crosses an epoch (3/epoch)
    first = data.make_loader(data_dir, "wide", "train", 8, **kw, **ONE)
    take(first, 2)
    state = json.loads(json.dumps(first.get_state()))
    resumed = data.make_loader(data_dir, "wide", "train", 8, **kw, **ONE)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), ref[2:])
    halves = [data.make_loader(data_dir, "wide", "train", 8, process_index=p, process_count=2, **kw)
              for p in range(2)]
    for h in halves:
        h.set_state(state)
    h0, h1 = next(halves[0]), next(halves[1])
    for k in ("image", "segmentation"):
        np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), ref[2][k])


def test_transforms_pickle():
    t = data._TrainTransform(("image",), 32, True, ("segmentation",))
    u = pickle.loads(pickle.dumps(t))
    assert (u.image_keys, u.label_map_keys, u.image_size) == (("image",), ("segmentation",), 32)
    e = pickle.loads(pickle.dumps(data._EvalTransform(("image",), 32, ("segmentation",))))
    assert e.label_map_keys == ("segmentation",)


def test_worker_processes_give_same_batches(wide):
    data_dir, _, _ = wide
    kw = dict(train=True, image_size=32, seed=4, features=("image", "segmentation"), **ONE)
    ref = take(data.make_loader(data_dir, "wide", "train", 8, **kw), 2)
    with data.make_loader(data_dir, "wide", "train", 8, worker_count=2, **kw) as mp:
        assert_same_batches(take(mp, 2), ref)


# ---------------------------------------------------------------------------------------------- bad input

def _save(arr, path, mode=None):
    Image.fromarray(arr, mode).save(path)


def test_bad_pairs_skipped_and_reported(tmp_path, caplog):
    image_dir, seg_dir = make_paired_folder(tmp_path / "src", n=6, size=16, n_labels=N_LABELS, seed=2)
    _save(np.zeros((16, 12), np.uint8), seg_dir / "001.png", "L")                   # wrong size
    _save(np.zeros((16, 16, 3), np.uint8), seg_dir / "002.png", "RGB")              # RGB map
    (seg_dir / "003.png").unlink()                                                  # missing map
    (seg_dir / "004.png").write_bytes(b"not a png")                                 # unreadable map
    _save(np.zeros((16, 16), np.uint8), seg_dir / "orphan.png", "L")                # map without image
    # palette map: indices are the labels, whatever the palette colours
    pal = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) % 3, (16, 1)), "P")
    pal.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200] + [0] * (253 * 3))
    pal.save(seg_dir / "005.png")
    with caplog.at_level(logging.WARNING, logger="common_jax.datasets"):
        summary = datasets.build_paired_folder(image_dir, seg_dir, tmp_path / "data", name="bad",
                                               heldout_fraction=0.0)
    reasons = dict(summary.skipped)
    assert sorted(reasons) == [str(image_dir / f"00{i}.png") for i in (1, 2, 3, 4)]
    assert "12x16 but the image is 16x16" in reasons[str(image_dir / "001.png")]
    assert "mode RGB" in reasons[str(image_dir / "002.png")]
    assert "no segmentation map" in reasons[str(image_dir / "003.png")]
    assert str(seg_dir / "004.png") in reasons[str(image_dir / "004.png")]
    assert summary.splits == {"train": 2}
    log = caplog.text
    for i in (1, 2, 3, 4):
        assert f"00{i}.png" in log
    assert "12x16" in log and "orphan.png" in log
    src = datasets.open_split(tmp_path / "data", "bad", "train")
    stored = {src.source[i]["file_name"].decode(): src.source[i]["segmentation"] for i in range(len(src.source))}
    assert sorted(stored) == ["000.png", "005.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored["005.png"]))), np.asarray(pal))
    b = next(data.make_loader(tmp_path / "data", "bad", "train", 2, train=False, image_size=16, seed=0,
                              features=("segmentation", "file_name"), **ONE))
    got = {_name(n): s for n, s in zip(b["file_name"], b["segmentation"])}
    np.testing.assert_array_equal(got["005.png"], np.asarray(pal).astype(np.int32))


def test_errors(tmp_path):
    image_dir, seg_dir = make_paired_folder(tmp_path / "src", n=3, size=8, seed=0)
    with pytest.raises(FileNotFoundError, match=f"segmentation folder '{tmp_path / 'nope'}' does not exist"):
        datasets.build_paired_folder(image_dir, tmp_path / "nope", tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="image folder .*nope.* does not exist"):
        datasets.build_paired_folder(tmp_path / "nope", seg_dir, tmp_path / "data")
    for p in seg_dir.iterdir():
        _save(np.zeros((8, 8, 3), np.uint8), p, "RGB")
    with pytest.raises(ValueError, match=f"no valid .* pair in image folder '{image_dir}'"):
        datasets.build_paired_folder(image_dir, seg_dir, tmp_path / "data")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"image folder '{empty}' contains no image files"):
        datasets.build_paired_folder(empty, seg_dir, tmp_path / "data")
    with pytest.raises(ValueError, match="must differ"):
        datasets.build_paired_folder(image_dir, image_dir, tmp_path / "data")

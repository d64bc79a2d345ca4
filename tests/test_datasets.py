"""Dataset preparation: image folders (with bad files), built-in photos, ImageNet errors, other formats."""
import dataclasses
import io
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from common_jax import builtin_photos, datasets


def _png_bytes(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _decode(data):
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """cats/: 3 good RGB JPEGs, a grey PNG, a truncated JPEG; dogs/: 2 RGB PNGs, RGBA, palette, CMYK JPEG,
    a text file named .png; plus a stray top-level image and a non-image file (ignored)."""
    root = tmp_path_factory.mktemp("folder") / "pets"
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(root / "cats" / f"c{i}.jpg")
    Image.fromarray(np.full((10, 12), 77, np.uint8), "L").save(root / "cats" / "grey.png")
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, format="JPEG")
    (root / "cats" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "dogs" / f"d{i}.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :3] = (10, 200, 30)
    rgba[:4, :, 3] = 255          # top half opaque green, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "dogs" / "nested" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).convert("P").save(root / "dogs" / "pal.png")
    Image.new("CMYK", (7, 5), (0, 255, 255, 0)).save(root / "dogs" / "cmyk.jpg")
    (root / "dogs" / "text.png").write_text("this is not an image\n")
    (root / "dogs" / "notes.txt").write_text("ignored: not an image extension\n")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "stray.png")
    return root


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    return datasets.build_image_folder(folder, data_dir, name="pets", heldout_fraction=0.25, seed=0), data_dir


def test_image_folder_counts_and_reports(built, folder, caplog):
    summary, _ = built
    assert summary.class_names == ["cats", "dogs"]
    assert not summary.reused
    skipped = {p: r for p, r in summary.skipped}
    assert set(skipped) == {str(folder / "cats" / "truncated.jpg"), str(folder / "dogs" / "text.png"),
                            str(folder / "stray.png")}
    assert "top level" in skipped[str(folder / "stray.png")]
    converted = dict(summary.converted)
    assert converted == {str(folder / "cats" / "grey.png"): "L", str(folder / "dogs" / "nested" / "rgba.png"): "RGBA",
                         str(folder / "dogs" / "pal.png"): "P", str(folder / "dogs" / "cmyk.jpg"): "CMYK"}
    # 5 cat files + 6 dog files, one unreadable in each -> 9 stored
    assert sum(summary.splits.values()) == 9
    assert set(summary.splits) == {"train", "validation"} and summary.splits["validation"] >= 1


def test_image_folder_logs_skipped(folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="common_jax.datasets"):
        datasets.build_image_folder(folder, tmp_path, name="pets", heldout_fraction=0.0)
    assert "truncated.jpg" in caplog.text and "text.png" in caplog.text and "skipped" in caplog.text


def test_image_folder_contents_are_rgb(built, folder):
    _, data_dir = built
    records = {}
    for split in ("train", "validation"):
        src = datasets.open_split(data_dir, "pets", split)
        assert src.image_features == ("image",)
        for i in range(len(src.source)):
            r = src.source[i]
            records[r["file_name"].decode() if isinstance(r["file_name"], bytes) else r["file_name"]] = r
    assert len(records) == 9
    for name, r in records.items():
        img = _decode(r["image"])
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8, (name, img.shape)
        assert int(r["label"]) == (0 if name.startswith("cats") else 1)
    grey = _decode(records["cats/grey.png"]["image"])
    assert (grey == 77).all()
    rgba = _decode(records["dogs/nested/rgba.png"]["image"])
    assert (rgba[:4] == (10, 200, 30)).all() and (rgba[4:] == 255).all()  # transparent -> white
    # original RGB JPEGs are stored byte-for-byte
    assert records["cats/c0.jpg"]["image"] == (folder / "cats" / "c0.jpg").read_bytes()
    cmyk = _decode(records["dogs/cmyk.jpg"]["image"])
    assert cmyk.shape == (5, 7, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 50  # red


def test_image_folder_reused(built, folder):
    summary, data_dir = built
    again = datasets.build_image_folder(folder, data_dir, name="pets", heldout_fraction=0.25, seed=0)
    assert again.reused and again.splits == summary.splits and again.class_names == summary.class_names


def test_single_class_folder(tmp_path):
    src = tmp_path / "flowers"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((6, 5, 3), i * 40, np.uint8)).save(src / f"f{i}.png")
    s = datasets.build_image_folder(src, tmp_path / "data", name="flowers", heldout_fraction=0.3)
    assert s.class_names == ["flowers"] and s.splits == {"train": 2, "validation": 1}
    assert not s.skipped and not s.converted
    s2 = datasets.build_image_folder(src, tmp_path / "data", name="flowers", heldout_fraction=0.0, overwrite=True)
    assert not s2.reused and s2.splits == {"train": 3}
    assert datasets.build_image_folder(src, tmp_path / "data", name="flowers", heldout_fraction=0.0).reused
    # Reusing the prepared dataset for other input would train on stale or foreign data: each case is named.
    at = tmp_path / "data" / "flowers" / "1.0.0"
    with pytest.raises(ValueError, match=f"dataset 'flowers' at {at} was prepared from other input "
                                         r"\(heldout_fraction: 0.0 then, 0.3 now\); pass overwrite=True"):
        datasets.build_image_folder(src, tmp_path / "data", name="flowers", heldout_fraction=0.3)
    other = tmp_path / "other" / "flowers"
    shutil.copytree(src, other)
    with pytest.raises(ValueError, match=f"folders: \\['{src}'\\] then, \\['{other}'\\] now"):
        datasets.build_image_folder(other, tmp_path / "data", name="flowers", heldout_fraction=0.0)
    Image.fromarray(np.full((6, 5, 3), 250, np.uint8)).save(src / "f0.png")          # same size, new pixels
    os.utime(src / "f0.png", ns=(1, 1))
    with pytest.raises(ValueError, match=r"\(the files' sizes or modification times\)"):
        datasets.build_image_folder(src, tmp_path / "data", name="flowers", heldout_fraction=0.0)
    Image.fromarray(np.full((6, 5, 3), 9, np.uint8)).save(src / "f3.png")
    with pytest.raises(ValueError, match=r"\(files: 3 then, 4 now\)"):
        datasets.build_image_folder(src, tmp_path / "data", name="flowers", heldout_fraction=0.0)
    from transformer_jax.codes import codes_dataset_name
    before = codes_dataset_name(str(tmp_path / "data"), "flowers", 32, "vq")
    assert codes_dataset_name(str(tmp_path / "data"), "flowers", 32, "vq") == before
    s3 = datasets.build_image_folder(src, tmp_path / "data", name="flowers", heldout_fraction=0.0, overwrite=True)
    assert not s3.reused and s3.splits == {"train": 4}
    # Codes pre-encoded from the old build are not taken for the rebuilt dataset of the same name.
    assert codes_dataset_name(str(tmp_path / "data"), "flowers", 32, "vq") != before


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"'{empty}' contains no image files"):
        datasets.build_image_folder(empty, tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.build_image_folder(tmp_path / "missing", tmp_path / "d")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not a png")
    with pytest.raises(ValueError, match="no readable training image.*a.png"):
        datasets.build_image_folder(bad, tmp_path / "d", name="bad")
    with pytest.raises(ValueError, match="lower_snake_case"):
        datasets.build_image_folder(bad, tmp_path / "d", name="Bad-Name")
    with pytest.raises(ValueError, match="heldout_fraction"):
        datasets.build_image_folder(bad, tmp_path / "d", heldout_fraction=1.0)


def test_not_prepared_error(tmp_path):
    with pytest.raises(datasets.DatasetNotPreparedError, match=r"'nothing_here'.*not prepared.*build_image_folder"):
        datasets.open_split(tmp_path, "nothing_here", "train")
    with pytest.raises(datasets.DatasetNotPreparedError, match="does not exist"):
        datasets.open_split(tmp_path / "nope", "imagenet2012", "train")
    with pytest.raises(datasets.DatasetNotPreparedError, match="prepare_imagenet2012"):
        datasets.open_split(tmp_path, "imagenet2012", "train")


def test_unknown_split(built):
    _, data_dir = built
    with pytest.raises(KeyError, match=r"no split 'test'.*'train'"):
        datasets.open_split(data_dir, "pets", "test")


def test_imagenet_manual_dir_error(tmp_path):
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks ILSVRC2012_img_train.tar;.*ILSVRC2012_img_val.tar"):
        datasets.prepare_imagenet2012(tmp_path / "data", tmp_path)


# ---------------------------------------------------------------------------------------------- built-in photos

def test_builtin_photos_all_load_offline():
    for name in builtin_photos.PHOTO_NAMES:
        img = builtin_photos.load_photo(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 256
    assert len(builtin_photos.PHOTO_NAMES) == 10
    with pytest.raises(KeyError, match="unknown built-in photo 'lena'"):
        builtin_photos.load_photo("lena")


def test_crop_regions_are_disjoint_and_crops_stay_inside():
    rng = np.random.default_rng(0)
    w, h, crop = 300, 120, 16
    xs = np.arange(w)
    img = np.stack(np.broadcast_arrays(xs[None, :] % 256, xs[None, :] // 256, np.zeros((h, 1), int)), -1)
    img = img.astype(np.uint8)
    train, held = builtin_photos.crop_regions(w, 0.25, crop)
    assert train[1] + crop // 2 <= held[0] and held[1] == w and held[1] - held[0] == 75
    for cols in (train, held):
        crops = builtin_photos.random_crops(img, cols, 50, crop, (1.0,), rng)  # scale 1: no resampling
        got = np.concatenate([c[..., 0].astype(int) + 256 * c[..., 1].astype(int) for c in crops]).ravel()
        assert got.min() >= cols[0] and got.max() < cols[1]
    with pytest.raises(ValueError, match="smaller than crop_size"):
        builtin_photos.random_crops(img, (0, 10), 1, crop, (1.0,), rng)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("photos")
    return datasets.prepare_builtin_photos(data_dir, crop_size=16, crops_per_photo=4, seed=0), data_dir


def test_builtin_photos_dataset(photos):
    info, data_dir = photos
    assert info.class_names == list(builtin_photos.PHOTO_NAMES)
    assert info.splits == {"train": 40, "validation": 10}
    assert info.name == datasets.builtin_photos_name(16, 4, 0)
    for split, n in info.splits.items():
        src = datasets.open_split(data_dir, info.name, split)
        labels = [int(src.source[i]["label"]) for i in range(n)]
        assert sorted(set(labels)) == list(range(10))
        img = _decode(src.source[0]["image"])
        assert img.shape == (16, 16, 3)


def test_builtin_photos_idempotent(photos):
    info, data_dir = photos
    again = datasets.prepare_builtin_photos(data_dir, crop_size=16, crops_per_photo=4, seed=0)
    assert again.reused and again.splits == info.splits and again.path == info.path
    assert datasets.describe_dataset(data_dir, "builtin_photos").path == info.path  # single config: short name


def test_builtin_photos_bad_args(tmp_path):
    with pytest.raises(ValueError, match="crop_size"):
        datasets.prepare_builtin_photos(tmp_path, crop_size=2)
    with pytest.raises(ValueError, match="heldout_fraction"):
        datasets.prepare_builtin_photos(tmp_path, heldout_fraction=0.7)
    with pytest.raises(ValueError, match=r"built-in photo .astronaut.*validation region.*smaller than crop_size=200"):
        datasets.prepare_builtin_photos(tmp_path, crop_size=200, crops_per_photo=1)


def test_registered_format(tmp_path, monkeypatch):
    """A layout other than TFDS, registered by the module that writes it, is found, opened and described through
    the same calls (how stage two's codes are read), and named in the hint of a missing dataset."""
    monkeypatch.setattr(datasets, "_FORMATS", dict(datasets._FORMATS))     # the registration ends with the test
    rows = [{"x": np.int32(i)} for i in range(3)]
    fmt = datasets.DatasetFormat(
        "rows", lambda p: (p / "rows.txt").is_file(),
        lambda data_dir, name, split: datasets.SplitSource(rows, "rows", ("x",), (), None, str(data_dir / name),
                                                           default_features=("x",)),
        lambda p: {"train": 3}, "write_rows(data_dir, name)")
    with pytest.raises(ValueError, match="'tfds' is built in"):
        datasets.register_format(dataclasses.replace(fmt, kind="tfds"))
    datasets.register_format(fmt)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "rows.txt").write_text("")
    assert datasets.dataset_path(tmp_path, "r") == ("rows", tmp_path / "r")
    src = datasets.open_split(tmp_path, "r", "train")
    assert src.kind == "rows" and src.source[2] == {"x": 2} and src.default_features == ("x",)
    assert datasets.describe_dataset(tmp_path, "r").splits == {"train": 3}
    with pytest.raises(datasets.DatasetNotPreparedError, match=r"'absent' is not prepared.*write_rows\(data_dir"):
        datasets.open_split(tmp_path, "absent", "train")

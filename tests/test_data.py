"""grain loader: batch layout, preprocessing, process sharding, exact resume, eval padding, errors."""
import json

import numpy as np
import pytest
from PIL import Image

from batch_checks import assert_same_batches, take
from common_jax import data, datasets
from transformer_jax import codes_dataset


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Built-in photos: 10 classes x 8 train crops of 16px, 10 x 2 validation crops."""
    data_dir = tmp_path_factory.mktemp("photos")
    info = datasets.prepare_builtin_photos(data_dir, crop_size=16, crops_per_photo=8, seed=0)
    return str(data_dir), info.name


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    """Codes dataset whose example i has codes == i (identifies examples): 20 train, 11 validation."""
    data_dir = tmp_path_factory.mktemp("ids")
    for split, n in (("train", 20), ("validation", 11)):
        codes_dataset.write_codes_dataset(data_dir, "ids", split,
                                          ({"codes": np.full((2, 2), i), "label": i % 4} for i in range(n)))
    return str(data_dir)


def _ids(batch):
    return batch["codes"][:, 0, 0].tolist()


# ---------------------------------------------------------------------------------------------- preprocessing

def test_resize_shorter_side_and_crops():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))  # h=20, w=40
    assert data.resize_shorter_side(img, 10).size == (20, 10)
    assert data.resize_shorter_side(img, 20) is img
    # eval at the stored shorter side: center crop only
    arr = np.asarray(img)
    out = data.preprocess_eval(arr, 20)
    np.testing.assert_array_equal(out, arr[:, 10:30].astype(np.float32) / 127.5 - 1)
    assert data.preprocess_eval(arr, None).shape == (20, 40, 3)
    # train at the stored shorter side: some horizontal window of the image, maybe flipped
    seen_flip = set()
    for s in range(12):
        out = data.preprocess_train(arr, 20, np.random.default_rng(s))
        u8 = np.round((out + 1) * 127.5).astype(np.uint8)
        hits = [(x, f) for x in range(21) for f in (0, 1)
                if np.array_equal(u8, arr[:, x:x + 20][:, ::-1] if f else arr[:, x:x + 20])]
        assert hits, "train crop is not a window of the image"
        seen_flip.add(hits[0][1])
        assert out.dtype == np.float32 and out.shape == (20, 20, 3)
    assert seen_flip == {0, 1}
    flat = data.preprocess_train(arr, 20, np.random.default_rng(0), random_flip=False)
    assert any(np.array_equal(np.round((flat + 1) * 127.5), arr[:, x:x + 20]) for x in range(21))


def test_to_float_range_and_jpeg_draft():
    np.testing.assert_array_equal(data.to_float(np.array([0, 255], np.uint8)), [-1.0, 1.0])
    import io
    buf = io.BytesIO()
    Image.fromarray(np.full((400, 300, 3), 200, np.uint8)).save(buf, format="JPEG")
    out = data.preprocess_eval(buf.getvalue(), 32)  # decoded at reduced scale, still >= 32 on each side
    assert out.shape == (32, 32, 3) and abs(out.mean() - (200 / 127.5 - 1)) < 0.02


# ---------------------------------------------------------------------------------------------- image batches

def test_train_batches(photos):
    data_dir, name = photos
    loader = data.make_loader(data_dir, name, "train", 8, train=True, image_size=12, seed=0,
                              process_index=0, process_count=1)
    assert loader.num_batches is None and loader.class_names[0] == "astronaut" and loader.num_examples == 80
    batches = take(loader, 3)
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (8, 12, 12, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (8,) and b["label"].dtype == np.int32
        assert b["image"].min() >= -1 and b["image"].max() <= 1 and b["image"].std() > 0.05
        assert 0 <= b["label"].min() and b["label"].max() < 10
    assert len({tuple(b["label"]) for b in batches}) > 1
    with pytest.raises(TypeError, match="infinite"):
        len(loader)


def test_process_halves_cover_global_batch(photos):
    data_dir, name = photos
    kw = dict(train=True, image_size=12, seed=3)
    full = take(data.make_loader(data_dir, name, "train", 8, process_index=0, process_count=1, **kw), 2)
    halves = [take(data.make_loader(data_dir, name, "train", 8, process_index=p, process_count=2, **kw), 2)
              for p in range(2)]
    for b, (h0, h1) in enumerate(zip(*halves)):
        assert h0["image"].shape == (4, 12, 12, 3)
        for k in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), full[b][k])


def test_process_sharding_disjoint_ids(ids):
    kw = dict(train=True, image_size=None, seed=1)
    full = take(data.make_loader(ids, "ids", "train", 4, process_index=0, process_count=1, **kw), 5)
    parts = [take(data.make_loader(ids, "ids", "train", 4, process_index=p, process_count=2, **kw), 5)
             for p in range(2)]
    for b in range(5):
        a, c = _ids(parts[0][b]), _ids(parts[1][b])
        assert not set(a) & set(c)
        assert a + c == _ids(full[b])


def test_epochs_are_permutations_reshuffled(ids):
    loader = data.make_loader(ids, "ids", "train", 4, train=True, image_size=None, seed=0, process_count=1,
                              process_index=0)
    stream = sum((_ids(b) for b in take(loader, 15)), [])  # 3 epochs of 20
    epochs = [stream[i * 20:(i + 1) * 20] for i in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(20))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != list(range(20))
    other = data.make_loader(ids, "ids", "train", 4, train=True, image_size=None, seed=1, process_count=1,
                             process_index=0)
    assert sum((_ids(b) for b in take(other, 5)), []) != epochs[0]


def test_finite_train_drops_remainder(ids):
    loader = data.make_loader(ids, "ids", "train", 8, train=True, image_size=None, seed=0, num_epochs=1,
                              process_count=1, process_index=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2  # 20 // 8
    assert len(set(sum((_ids(b) for b in batches), []))) == 16
    with pytest.raises(StopIteration):
        next(loader)


# ---------------------------------------------------------------------------------------------- resume

def test_exact_resume_images(photos):
    data_dir, name = photos
    kw = dict(train=True, image_size=12, seed=5, process_index=0, process_count=1)
    ref = take(data.make_loader(data_dir, name, "train", 8, **kw), 14)  # crosses the epoch boundary (10/epoch)
    first = data.make_loader(data_dir, name, "train", 8, **kw)
    take(first, 9)
    state = json.loads(json.dumps(first.get_state()))
    assert state["next_batch"] == 9
    resumed = data.make_loader(data_dir, name, "train", 8, **kw)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), ref[9:])
    assert_same_batches(take(first, 5), ref[9:])  # the original keeps going too


def test_resume_with_other_process_count(ids):
    kw = dict(train=True, image_size=None, seed=2)
    one = data.make_loader(ids, "ids", "train", 4, process_index=0, process_count=1, **kw)
    take(one, 3)
    state = one.get_state()
    nxt = _ids(next(one))
    halves = []
    for p in range(2):
        ld = data.make_loader(ids, "ids", "train", 4, process_index=p, process_count=2, **kw)
        ld.set_state(state)
        halves += _ids(next(ld))
    assert halves == nxt


def test_set_state_errors(ids):
    loader = data.make_loader(ids, "ids", "train", 4, train=True, image_size=None, seed=0, process_count=1,
                              process_index=0)
    other = data.make_loader(ids, "ids", "train", 4, train=True, image_size=None, seed=1, process_count=1,
                             process_index=0)
    with pytest.raises(ValueError, match=r"different stream.*seed: 1 vs 0"):
        loader.set_state(other.get_state())
    with pytest.raises(ValueError, match="next_batch"):
        loader.set_state({"step": 3})
    ev = data.make_loader(ids, "ids", "validation", 4, train=False, image_size=None, seed=0, process_count=1,
                          process_index=0)
    bad = dict(ev.get_state(), next_batch=99)
    with pytest.raises(ValueError, match=r"next_batch=99 is outside \[0, 3\]"):
        ev.set_state(bad)


# ---------------------------------------------------------------------------------------------- eval

def test_eval_padding_mask_and_determinism(ids):
    kw = dict(train=False, image_size=None, seed=0)
    loader = data.make_loader(ids, "ids", "validation", 4, process_index=0, process_count=1, **kw)
    batches = list(loader)
    assert len(batches) == 3 == len(loader)
    got = sum((_ids(b) for b in batches), [])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.dtype == np.bool_ and mask.tolist() == [True] * 11 + [False]
    assert got[:11] == list(range(11))  # every example once, stored order
    assert_same_batches(list(data.make_loader(ids, "ids", "validation", 4, process_index=0, process_count=1, **kw)),
                 batches)
    per_proc = [list(data.make_loader(ids, "ids", "validation", 4, process_index=p, process_count=2, **kw))
                for p in range(2)]
    assert [len(x) for x in per_proc] == [3, 3]
    for b in range(3):
        np.testing.assert_array_equal(np.concatenate([per_proc[0][b]["mask"], per_proc[1][b]["mask"]]),
                                      batches[b]["mask"])


def test_eval_images_center_crop(photos):
    data_dir, name = photos
    kw = dict(train=False, image_size=12, seed=0, process_index=0, process_count=1)
    a = list(data.make_loader(data_dir, name, "validation", 8, **kw))
    assert_same_batches(a, list(data.make_loader(data_dir, name, "validation", 8, **kw)))
    assert len(a) == 3 and sum(int(b["mask"].sum()) for b in a) == 20
    assert a[0]["image"].shape == (8, 12, 12, 3)
    src = datasets.open_split(data_dir, name, "validation")
    np.testing.assert_array_equal(a[0]["image"][0], data.preprocess_eval(src.source[0]["image"], 12))


def test_codes_loader_features(ids):
    ld = data.make_loader(ids, "ids", "train", 4, train=True, image_size=None, seed=0, process_count=1,
                          process_index=0)
    b = next(ld)
    assert set(b) == {"codes", "label"} and b["codes"].dtype == np.int32 and b["codes"].shape == (4, 2, 2)
    np.testing.assert_array_equal(b["label"], b["codes"][:, 0, 0] % 4)


def test_worker_processes_give_same_batches(photos):
    data_dir, name = photos
    kw = dict(train=True, image_size=12, seed=4, process_index=0, process_count=1)
    ref = take(data.make_loader(data_dir, name, "train", 8, **kw), 3)
    with data.make_loader(data_dir, name, "train", 8, worker_count=2, **kw) as mp:
        assert_same_batches(take(mp, 2), ref[:2])
        assert mp.get_state()["next_batch"] == 2
        mp.close()
        assert_same_batches(take(mp, 1), ref[2:])  # restarts where it stopped


# ---------------------------------------------------------------------------------------------- errors

def test_loader_errors(photos, ids, tmp_path):
    data_dir, name = photos
    with pytest.raises(datasets.DatasetNotPreparedError,
                       match=rf"dataset 'imagenet2012' is not prepared in data_dir '{tmp_path}'.*prepare_imagenet2012"):
        data.make_loader(tmp_path, "imagenet2012", "train", 8, train=True, image_size=16, seed=0)
    with pytest.raises(ValueError, match="global_batch_size=6 must be a positive multiple of process_count=4"):
        data.make_loader(data_dir, name, "train", 6, train=True, image_size=16, seed=0, process_index=0,
                         process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        data.make_loader(data_dir, name, "train", 8, train=True, image_size=16, seed=0, process_index=2,
                         process_count=2)
    with pytest.raises(KeyError, match=r"no feature\(s\) \['codes'\]; it has \['image', 'label'\]"):
        data.make_loader(data_dir, name, "train", 8, train=True, image_size=16, seed=0, features=("codes",),
                         process_index=0, process_count=1)
    with pytest.raises(ValueError, match="codes dataset; image_size must be None"):
        data.make_loader(ids, "ids", "train", 4, train=True, image_size=16, seed=0, process_index=0,
                         process_count=1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.make_loader(ids, "ids", "train", 32, train=True, image_size=None, seed=0, num_epochs=1,
                         process_index=0, process_count=1)
    with pytest.raises(KeyError, match="no split 'test'"):
        data.make_loader(data_dir, name, "test", 8, train=False, image_size=16, seed=0, process_index=0,
                         process_count=1)


def test_unequal_sizes_need_image_size(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    for i, shape in enumerate([(8, 8, 3), (8, 10, 3)]):
        Image.fromarray(np.full(shape, 100, np.uint8)).save(src / f"{i}.png")
    datasets.build_image_folder(src, tmp_path / "d", name="mixed", heldout_fraction=0.0)
    ld = data.make_loader(tmp_path / "d", "mixed", "train", 2, train=False, image_size=None, seed=0,
                          process_index=0, process_count=1)
    with pytest.raises(ValueError, match="differ in shape.*pass image_size"):
        next(ld)
    ld = data.make_loader(tmp_path / "d", "mixed", "train", 2, train=False, image_size=6, seed=0,
                          process_index=0, process_count=1)
    assert next(ld)["image"].shape == (2, 6, 6, 3)

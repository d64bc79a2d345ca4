"""launch.sample's class-conditional path: --classes parsing, the labels handed to the sampler, and which
samples land in which class grid.

A stand-in sampler paints each image with its label and its index in the request, so every tile of every
written PNG says which class and which sample it is. The real models behind this path are checked against
taming's greedy images in test_convert_taming.py (launch.sample's writers on converted workdirs).
"""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from launch.sample import parse_classes, write_class_grids
from transformer_jax import conditions

H = 4
PAD = 2   # common_jax.metrics.image_grid's border


class PaintingSampler:
    def __init__(self, kind="class", n_classes=10):
        self.cond = SimpleNamespace(kind=kind, n_classes=n_classes)
        self.conditioning = conditions.from_config(self.cond)  # as transformer_jax.sampler.Sampler holds it
        self.calls = []

    def sample(self, rng, n, labels=None, *, batch_size=16, **opts):
        self.calls.append(dict(n=n, labels=None if labels is None else np.asarray(labels).tolist(),
                               batch_size=batch_size, opts=opts))
        img = np.zeros((n, H, H, 3), np.uint8)
        img[..., 0] = 200 if labels is None else np.asarray(labels)[:, None, None] * 20
        img[..., 1] = np.arange(n)[:, None, None]
        return img


def tiles(path):
    """The images of a one-row grid PNG, in order."""
    grid = np.asarray(Image.open(path))
    n = (grid.shape[1] - PAD) // (H + PAD)
    assert grid.shape == (H + 2 * PAD, n * (H + PAD) + PAD, 3)
    return [grid[PAD:PAD + H, PAD + i * (H + PAD):PAD + i * (H + PAD) + H] for i in range(n)]


def test_requested_classes_are_sampled_and_written_to_their_grids(tmp_path):
    sampler = PaintingSampler()
    classes = parse_classes(sampler, ["7", "2"])
    assert classes == [7, 2]
    opts = dict(top_k=5, top_p=None, temperature=0.9, guidance_scale=2.0)
    paths = write_class_grids(sampler, str(tmp_path), 3, classes, opts, 0, 4)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["class_0007.png", "class_0002.png"]
    # one request for all samples, per_class of each class in the requested order, options passed through
    assert sampler.calls == [dict(n=6, labels=[7, 7, 7, 2, 2, 2], batch_size=4, opts=opts)]
    for k, (c, path) in enumerate(zip(classes, paths)):
        got = tiles(path)
        assert len(got) == 3
        for j, t in enumerate(got):
            assert (t[..., 0] == 20 * c).all(), f"{path} tile {j} has label {t[0, 0, 0] // 20}"
            assert (t[..., 1] == 3 * k + j).all()


def test_no_classes_means_every_class(tmp_path):
    sampler = PaintingSampler(n_classes=4)
    paths = write_class_grids(sampler, str(tmp_path), 1, parse_classes(sampler, []), {}, 0, 16)
    assert sampler.calls[0]["labels"] == [0, 1, 2, 3]
    assert [int(tiles(p)[0][0, 0, 0]) for p in paths] == [0, 20, 40, 60]


def test_unconditional_model_writes_one_grid_without_labels(tmp_path):
    sampler = PaintingSampler(kind="unconditional")
    paths = write_class_grids(sampler, str(tmp_path), 2, [], {}, 0, 16)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["samples.png"]
    assert sampler.calls[0]["labels"] is None and sampler.calls[0]["n"] == 2


@pytest.mark.parametrize("kind,classes,message", [
    ("class", ["3", "10"], r"^--classes \[10\] outside \[0, 10\) \(the model's cond.n_classes\)$"),
    ("class", ["-1"], r"^--classes \[-1\] outside \[0, 10\)"),
    ("class", ["a"], r"^--classes must be integer class ids, got a$"),
    ("unconditional", ["1"], r"^--classes is for class-conditional models; this one is unconditional$"),
])
def test_bad_classes_are_one_clear_error(kind, classes, message):
    with pytest.raises(ValueError, match=message):
        parse_classes(PaintingSampler(kind=kind), classes)

"""Loader checks shared by the data tests."""
import numpy as np


def take(loader, k: int) -> list:
    return [next(loader) for _ in range(k)]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)

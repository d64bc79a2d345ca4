"""FID / IS / precision-recall / streaming statistics / statistics files (no Inception network here)."""
import os

import jax
import numpy as np
import pytest
import scipy.linalg

from common_jax.fid import (FeatureStats, batch_partial_sums, frechet_distance, frechet_distance_from_features,
                            inception_score, precision_recall)
from common_jax.fid_stats import check_stats_file, compute_stats, iter_npz_array, load_stats, save_stats
from common_jax.mesh import make_mesh, shard_batch


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _well_conditioned(rng, d):
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.5 * np.eye(d)


def test_frechet_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    for d in (8, 64):
        mu1, s1 = _well_conditioned(rng, d)
        mu2, s2 = _well_conditioned(rng, d)
        ref = _scipy_fid(mu1, s1, mu2, s2)
        assert abs(frechet_distance(mu1, s1, mu2, s2) - ref) < 1e-6
        assert abs(frechet_distance(mu1, s1, mu2, s2, method="sqrtm") - ref) < 1e-6
        assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6  # identical statistics


def test_frechet_singular_covariances_finite_and_exact():
    rng = np.random.default_rng(1)
    f1 = rng.normal(size=(10, 64)) + 1.0
    f2 = 0.7 * rng.normal(size=(12, 64))
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)  # ranks 9 and 11 in 64 dims
    val = frechet_distance(f1.mean(0), s1, f2.mean(0), s2)
    assert np.isfinite(val)
    # the SVD-of-features path is exact for rank-deficient sets; the eigen path must agree with it
    np.testing.assert_allclose(val, frechet_distance_from_features(f1, f2), rtol=1e-10)
    assert np.isfinite(frechet_distance(f1.mean(0), s1, f2.mean(0), s2, method="sqrtm"))
    assert abs(frechet_distance(f1.mean(0), s1, f1.mean(0), s1)) < 1e-9 * np.trace(s1)
    zero = np.zeros((64, 64))
    np.testing.assert_allclose(frechet_distance(f1.mean(0), zero, f2.mean(0), s2),
                               np.sum((f1.mean(0) - f2.mean(0)) ** 2) + np.trace(s2), rtol=1e-12)


def test_frechet_from_features_large_n_uses_covariances():
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(50, 6)), rng.normal(size=(40, 6)) + 0.3
    ref = _scipy_fid(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert abs(frechet_distance_from_features(f1, f2) - ref) < 1e-9


def test_frechet_bad_arguments():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match=r"sigma2 has shape \(3, 3\), expected \(4, 4\)"):
        frechet_distance(mu, s, mu, np.eye(3))
    with pytest.raises(ValueError, match=r"mu2 has shape \(5,\)"):
        frechet_distance(mu, s, np.zeros(5), s)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(mu, s * np.nan, mu, s)
    with pytest.raises(ValueError, match="method must be"):
        frechet_distance(mu, s, mu, s, method="svd")
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance_from_features(np.zeros((3, 4)), np.zeros((3, 5)))


def test_streaming_stats_equal_batch_numpy():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(103, 7)) * 3 + 5
    a, b = FeatureStats(), FeatureStats(7)
    for chunk in np.array_split(f[:60], 4):
        a.update(chunk)
    for chunk in np.array_split(f[60:], 3):
        b.update(chunk)
    mu, sigma = a.merge(b).mean_cov()
    assert a.count == 103
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-12)


def test_feature_stats_errors():
    s = FeatureStats(4)
    with pytest.raises(ValueError, match="dimension 5, expected 4"):
        s.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        s.update(np.zeros(4))
    s.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2 samples, have 1"):
        s.mean_cov()
    with pytest.raises(ValueError, match="missing key 'outer'"):
        s.add_partial_sums({"count": 1, "sum": np.zeros(4)})


def test_in_graph_partial_sums_over_sharded_batch():
    rng = np.random.default_rng(4)
    feats = (rng.normal(size=(32, 16)) + 20.0).astype(np.float32)  # large mean: the shift matters
    mask = np.arange(32) < 27  # last rows are padding
    mesh = make_mesh(data=8)
    fn = jax.jit(batch_partial_sums)
    shift = feats[:8].mean(0)
    stats = FeatureStats()
    for lo in (0, 16):
        part = fn(*shard_batch((feats[lo:lo + 16], mask[lo:lo + 16]), mesh), shift)
        stats.add_partial_sums(part, shift=shift)
    mu, sigma = stats.mean_cov()
    ref = feats[:27].astype(np.float64)
    assert stats.count == 27
    np.testing.assert_allclose(mu, ref.mean(0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=0, atol=1e-4)
    unshifted = FeatureStats().add_partial_sums(fn(feats[:27]))
    np.testing.assert_allclose(unshifted.mean_cov()[0], ref.mean(0), rtol=0, atol=1e-5)


def test_inception_score_constructed_cases():
    n, c = 40, 8
    uniform = np.zeros((n, c))
    mean, std = inception_score(uniform, splits=4)
    assert abs(mean - 1.0) < 1e-12 and std < 1e-12
    confident = np.full((n, c), -50.0)
    confident[np.arange(n), np.arange(n) % c] = 50.0  # every split sees each class equally often
    mean, std = inception_score(confident, splits=5)
    assert abs(mean - c) < 1e-6 and std < 1e-6
    one_class = np.full((n, c), -50.0)
    one_class[:, 0] = 50.0
    assert abs(inception_score(one_class, splits=2)[0] - 1.0) < 1e-6
    with pytest.raises(ValueError, match="splits=50"):
        inception_score(uniform, splits=50)
    with pytest.raises(ValueError, match=r"\(N, classes\)"):
        inception_score(np.zeros(5))


def test_precision_recall_constructed_cases():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(30, 8))
    b = rng.normal(size=(30, 8)) + 100.0
    real = np.concatenate([a, b])
    assert precision_recall(real, real, block=16) == (1.0, 1.0)
    assert precision_recall(a, b) == (0.0, 0.0)
    # fake = copies of half of the real set: every fake is a real point; half the real set is covered
    p, r = precision_recall(real, a, block=7)
    assert p == 1.0 and abs(r - 0.5) < 1e-7
    with pytest.raises(ValueError, match="equal D"):
        precision_recall(real, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(real[:3], real[:3])


def test_stats_file_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.normal(size=5), np.eye(5) * 2
    path = tmp_path / "sub" / "stats.npz"
    save_stats(path, mu, sigma)
    got_mu, got_sigma = load_stats(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_stats(tmp_path / "nothere.npz")
    np.savez(tmp_path / "bad_keys.npz", mean=mu)
    with pytest.raises(KeyError, match=r"'mu' and 'sigma'.*found \['mean'\]"):
        load_stats(tmp_path / "bad_keys.npz")
    np.savez(tmp_path / "bad_shape.npz", mu=mu, sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"'sigma' must have shape \(5, 5\).*found \(4, 4\)"):
        load_stats(tmp_path / "bad_shape.npz")
    with pytest.raises(ValueError, match="'mu' must have shape"):
        save_stats(tmp_path / "x.npz", sigma, sigma)
    with pytest.raises(ValueError, match="source must be"):
        load_stats(path, source="cache")


def test_stats_file_checks_name_the_file_and_never_suggest_unpickling(tmp_path):
    import pickle
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(6), sigma=np.eye(6))
    assert check_stats_file(stats, 6) == "stats"
    with pytest.raises(ValueError, match=r"--ref_stats .*stats.npz: 'mu' has shape \(6,\), expected \(8,\)"):
        check_stats_file(stats, 8, "--ref_stats")
    np.savez(tmp_path / "sigma.npz", mu=np.zeros(6), sigma=np.eye(5))
    with pytest.raises(ValueError, match=r"'sigma' has shape \(5, 5\), expected \(6, 6\)"):
        check_stats_file(tmp_path / "sigma.npz", 6)
    np.savez(tmp_path / "nan.npz", mu=np.full(6, np.nan), sigma=np.eye(6))
    with pytest.raises(ValueError, match="nan.npz: 'mu'/'sigma' contain non-finite values"):
        check_stats_file(tmp_path / "nan.npz", 6)
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((4, 5, 7, 3), np.uint8))
    assert check_stats_file(tmp_path / "images.npz", 6) == "images"    # any image size: embedded by the network
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 5, 7, 3), np.uint8))
    with pytest.raises(ValueError, match=r"at least 2 uint8 images \(N, H, W, 3\), found uint8 of shape \(1, 5, 7, 3\)"):
        check_stats_file(tmp_path / "one.npz", 6)
    np.savez(tmp_path / "keys.npz", mean=np.zeros(6))
    with pytest.raises(KeyError, match=r"keys.npz: needs 'mu' and 'sigma' or an 'arr_0' image batch, found \['mean'\]"):
        check_stats_file(tmp_path / "keys.npz", 6)
    with pytest.raises(FileNotFoundError, match="none.npz not found"):
        check_stats_file(tmp_path / "none.npz", 6)
    # Files that are not .npz archives: one message naming the file, never numpy's hint to load pickles.
    (tmp_path / "stats.pkl").write_bytes(pickle.dumps({"mu": np.zeros(6)}))
    np.save(tmp_path / "mu.npy", np.zeros(6))
    (tmp_path / "truncated.npz").write_bytes(stats.read_bytes()[:100])
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "text.npz").write_text("mu sigma")
    np.savez(tmp_path / "objects.npz", mu=np.array([{}], dtype=object), sigma=np.eye(6))
    for bad, why in (("stats.pkl", "it holds pickled Python objects"), ("mu.npy", "holds a single .npy array"),
                     ("truncated.npz", "a damaged or truncated zip archive"), ("empty.npz", "it is empty"),
                     ("text.npz", "it is not a zip archive"), ("objects.npz", "'mu' cannot be read")):
        for read in (lambda p: check_stats_file(p, 6), load_stats):
            with pytest.raises(ValueError) as e:
                read(tmp_path / bad)
            assert str(tmp_path / bad) in str(e.value) and why in str(e.value), e.value
            assert "allow_pickle" not in str(e.value) and "\n" not in str(e.value)


def _toy_features(images):
    x = np.asarray(images, np.float64) / 255.0
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


def test_adm_image_batch_stats(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(23, 6, 5, 3), dtype=np.uint8)
    ref = _toy_features(images)
    path = tmp_path / "ref_batch.npz"
    np.savez_compressed(path, arr_0=images, mu=np.zeros(6), sigma=np.eye(6))
    chunks = list(iter_npz_array(path, "arr_0", batch_size=10))
    assert [len(c) for c in chunks] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(chunks), images)
    # auto prefers the stored statistics; images recomputes them with the given feature function
    np.testing.assert_array_equal(load_stats(path)[0], np.zeros(6))
    mu, sigma = load_stats(path, _toy_features, source="images", batch_size=4)
    np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(compute_stats(_toy_features, [images[:5], images[5:]])[1], sigma, rtol=1e-9)

    only_images = tmp_path / "only_images.npz"
    np.savez(only_images, arr_0=images)
    np.testing.assert_allclose(load_stats(only_images, _toy_features)[0], ref.mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match="needs a feature_fn"):
        load_stats(only_images)
    with pytest.raises(KeyError, match="needs keys 'mu' and 'sigma'"):
        load_stats(only_images, source="stats")
    floats = tmp_path / "float_images.npz"
    np.savez(floats, arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8 images"):
        load_stats(floats, _toy_features)
    with pytest.raises(KeyError, match="no array 'arr_1'"):
        next(iter_npz_array(path, "arr_1"))


def test_chunked_stats_resume_only_the_same_evaluation(tmp_path):
    from common_jax.fid_eval import ChunkedStats, run_chunks
    rng = np.random.default_rng(8)
    feats = [rng.normal(size=(5, 3)) for _ in range(3)]
    path = str(tmp_path / "state.npz")
    sig = {"top_k": 10, "grid": (8, 8), "processes": 1}
    first = ChunkedStats(path, ("fake",), dim=3, signature=sig)
    run_chunks(first, 2, lambda k: {"fake": feats[k]})          # stopped after 2 of 3 chunks
    # The same evaluation resumes at chunk 2 (the tuple reads back as a list and still matches) and ends with the
    # statistics of all three chunks.
    resumed = ChunkedStats(path, ("fake",), dim=3, signature=dict(sig))
    assert resumed.chunks_done == 2
    stats = run_chunks(resumed, 3, lambda k: {"fake": feats[k]})["fake"]
    full = FeatureStats(3)
    full.update(np.concatenate(feats))
    np.testing.assert_allclose(stats.mean_cov()[1], full.mean_cov()[1], rtol=1e-12)
    # Another evaluation in the same workdir is refused, naming what differs, and the saved sums stay as they were.
    saved = open(path, "rb").read()
    with pytest.raises(ValueError, match=r"state.npz holds 3 chunks of another evaluation \(top_k: 10 -> 20\); "
                                         r"use a fresh workdir"):
        ChunkedStats(path, ("fake",), dim=3, signature=dict(sig, top_k=20))
    with pytest.raises(ValueError, match=r"processes: 1 -> 2"):
        ChunkedStats(path, ("fake",), dim=3, signature=dict(sig, processes=2))
    assert open(path, "rb").read() == saved
    # A state written before signatures were saved resumes as it did.
    with np.load(path) as z:
        arrays = dict(z)
    arrays["meta"] = np.asarray('{"names": ["fake"], "chunks_done": 3}')
    np.savez(tmp_path / "old.npz", **arrays)
    assert ChunkedStats(str(tmp_path / "old.npz"), ("fake",), dim=3, signature=sig).chunks_done == 3


def test_chunk_files_are_every_process_share_and_a_missing_one_is_named(tmp_path):
    from common_jax.fid_eval import chunk_file, chunk_files
    # 7 images in chunks of 3 on 2 processes: chunks of 3, 3 and 1 images, the last one dealt to process 0 only.
    expected = [chunk_file(str(tmp_path), k, p) for k, p in ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0))]
    for f in expected:
        np.savez(f, logits=np.zeros((1, 2)))
    assert chunk_files(str(tmp_path), 7, 3, 2) == expected
    # What one host of a workdir that is not shared sees: the Inception Score read from it would cover part of the
    # images only.
    os.remove(expected[3])
    with pytest.raises(FileNotFoundError, match=r"1 of the 5 chunk files are missing from .* \(chunk_00001_p1.npz\): "
                                                r"every process writes its own, so the workdir must be one shared"):
        chunk_files(str(tmp_path), 7, 3, 2)

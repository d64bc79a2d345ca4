import pytest

from seeded_weights import golden, weights_sha256

SETS = ["vqgan_small", "patchgan_small", "vq_losses_small", "gpt_small", "inception_fid_small",
        "lpips_vgg_small", "lpips_vgg_shipped_lin"]


@pytest.mark.parametrize("name", SETS)
def test_regenerated_weights_match_manifest_hash(name):
    sd, manifest, _ = golden(name)
    assert weights_sha256(sd, manifest) == manifest["weights_sha256"]

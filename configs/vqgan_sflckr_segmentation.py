"""taming's S-FLCKR cond stage (configs/sflckr_cond_stage.yaml): a VQSegmentationModel over 182 COCO-Stuff
labels at 256 px, f=16, 1024 codes, BCE + codebook loss, no discriminator. Data: a paired dataset
(common_jax.datasets.build_paired_folder) named by data.name / data.data_dir."""
import ml_collections

from configs.vqgan_base import base_config, vqgan_model


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    n_labels = 182
    model = vqgan_model(in_channels=n_labels, out_ch=n_labels)   # otherwise the ImageNet f16 autoencoder
    c = base_config(model, codebook_weight=1.0)
    c.task = "segmentation"
    c.data.update(dict(name="sflckr", image_size=256))
    return c

"""Tiny CPU segmentation VQ model (taming's VQSegmentationModel at 32 px, f=4): tests and demos of the
spatially conditioned stage two. Set data.name / data.data_dir to a paired dataset
(common_jax.datasets.build_paired_folder) and model.in_channels = model.out_ch = its number of labels."""
import ml_collections

from configs.vqgan_base import base_config, vqgan_model


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    n_labels = 8
    model = vqgan_model(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=16,
                        resolution=32, in_channels=n_labels, out_ch=n_labels, embed_dim=16, n_embed=64)
    c = base_config(model, codebook_weight=1.0)
    c.task = "segmentation"
    c.optim.base_learning_rate = 1e-3 / 16
    c.data.update(dict(name="paired_folder", image_size=32, global_batch_size=16, eval_batch_size=16,
                       eval_examples=64))
    c.total_steps, c.log_every, c.eval_every, c.image_every = 200, 20, 100, 100
    c.checkpoint.update(dict(every=100, keep=2))
    return c

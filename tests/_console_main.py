"""A miniature entry point for tests/test_console.py: it imports the ``launch`` package first, as every
``python -m launch.<entry>`` does, then runs under absl.app what makes library noise in a demo run: it
prepares a tiny built-in dataset (TFDS, TensorFlow) and writes and reads a checkpoint (orbax).

    python tests/_console_main.py WORKDIR [--verbosity=1]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import launch  # noqa: E402,F401  (the console rules, before anything else is imported)

from absl import app, logging  # noqa: E402


def main(argv):
    workdir = argv[1]
    import jax
    import numpy as np

    from common_jax import checkpoint as ckpt
    from common_jax import datasets
    ds = datasets.prepare_builtin_photos(os.path.join(workdir, "data"), crop_size=8, crops_per_photo=2)
    logging.info("project line: prepared %s", ds.name)
    manager = ckpt.make_manager(workdir, keep=1)
    state = {"w": np.arange(8, dtype=np.float32)}
    ckpt.save(manager, 1, state, {"config": {}}, None, force=True)
    manager.wait_until_finished()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    for _ in range(2):
        restored, _, _ = ckpt.restore(manager, 1, abstract, sharding)
    manager.close()
    logging.info("project line: read back %s", restored["w"].tolist())


if __name__ == "__main__":
    app.run(main)

"""Which dataset a run reads and where: the built-in photos prepared on first use, the same files on every
process, and the train / eval loaders of an image dataset."""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Sequence

import jax

from common_jax import data as data_lib
from common_jax import datasets, multihost

BUILTIN = "builtin_photos"


def resolve_dataset(data_cfg: Any, workdir: str) -> tuple[str, str]:
    """(data_dir, dataset name); the built-in photos are prepared on first use (process 0, others wait)."""
    data_dir = os.path.expanduser(data_cfg.data_dir) if data_cfg.data_dir else os.path.join(workdir, "data")
    name = data_cfg.name
    if name == BUILTIN:
        kwargs = dict(crop_size=int(data_cfg.image_size),
                      crops_per_photo=int(data_cfg.get("builtin_crops_per_photo", 64)))
        if jax.process_index() == 0:
            datasets.prepare_builtin_photos(data_dir, **kwargs)
        multihost.barrier("prepare_builtin_photos")
        name = datasets.builtin_photos_name(**kwargs)
    check_dataset_on_all_processes(data_dir, name)
    return data_dir, name


def check_dataset_on_all_processes(data_dir: str, name: str, attempts: int = 4, wait_s: float = 2.0) -> None:
    """Raise on every process unless all processes see the same files of dataset ``name`` (names, sizes,
    modification times: :func:`common_jax.datasets.dataset_fingerprint`). Each process reads its slice of every
    global batch by index, so host copies that differ would give batches from two datasets, an eval loop of
    another length on some hosts (a hang at the next collective), or pre-encoded data under another name.

    Files that other hosts have just written (the built-in photos, pre-encoded shards) may reach a network file
    system's attribute cache late, so a difference is looked at again ``attempts`` times, ``wait_s`` apart.
    """
    if jax.process_count() == 1:
        return
    for attempt in range(attempts):
        try:
            value, missing = datasets.dataset_fingerprint(data_dir, name), None
        except datasets.DatasetNotPreparedError as e:
            value, missing = "missing", e        # every process still takes part in the comparison
        differ = multihost.processes_differing_from_0(value)
        if not differ:
            break
        if attempt + 1 < attempts:
            time.sleep(wait_s)
    else:
        raise ValueError(f"the files of dataset '{name}' in data_dir {data_dir} differ between processes: "
                         f"{multihost.process_list(differ)} see{'' if len(differ) > 1 else 's'} other ones than "
                         "process 0; "
                         "data_dir must be one shared path on all hosts (NFS, Lustre, a gcsfuse mount); copies made "
                         "at other times differ at least in modification times")
    if missing is not None:
        raise missing


def image_loaders(config: Any, workdir: str, features: Sequence[str] | None = None
                  ) -> tuple[data_lib.Loader, Callable[[], data_lib.Loader], str, str]:
    """(infinite train loader, eval loader factory, data_dir, name) of an image dataset; ``features`` as
    ``data.make_loader`` takes them (default image and label)."""
    d = config.data
    data_dir, name = resolve_dataset(d, workdir)
    train = data_lib.make_loader(data_dir, name, "train", int(d.global_batch_size), train=True,
                                 image_size=int(d.image_size), seed=int(config.seed),
                                 worker_count=int(d.worker_count), features=features)

    def eval_loader() -> data_lib.Loader:
        return data_lib.make_loader(data_dir, name, d.get("eval_split", "validation"), int(d.eval_batch_size),
                                    train=False, image_size=int(d.image_size), seed=int(config.seed),
                                    num_epochs=1, features=features)
    return train, eval_loader, data_dir, name


def cap_eval_steps(config: Any) -> None:
    """``eval_steps`` from ``data.eval_examples`` when it is left at 0."""
    if not int(config.get("eval_steps", 0) or 0) and int(config.data.get("eval_examples", 0) or 0):
        config.eval_steps = math.ceil(int(config.data.eval_examples) / int(config.data.eval_batch_size))

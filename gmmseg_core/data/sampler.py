"""Class-balanced image sampling, the stand-in for a uniform class prior used by the official GMMSeg code.

An index ``class -> images containing it`` is computed once from the labels and cached as JSON in a cache folder,
keyed by the dataset's ``cache_key``. Sampling draws a class uniformly among those present, then an image that
contains it, so rare classes are seen about as often as frequent ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
from torch.utils.data import Sampler

from gmmseg_core._checks import check_int, is_int

from .base import IGNORE_INDEX


def default_cache_dir() -> Path:
    """``$GMMSEG_CACHE`` or ``~/.cache/gmmseg``."""
    return Path(os.environ.get("GMMSEG_CACHE", Path.home() / ".cache" / "gmmseg"))


def class_image_index(dataset, num_classes: int | None = None, ignore_index: int = IGNORE_INDEX,
                      cache_dir=None, progress: bool = False) -> dict[int, list[int]]:
    """Map each class id to the sorted list of image indices whose label map contains it.

    Parameters
    ----------
    dataset : SegmentationDataset
        Needs ``load_label(i)`` (falls back to ``dataset[i][1]``), ``len`` and ideally ``cache_key``.
    num_classes : int, optional
        Classes ``>= num_classes`` (and ``ignore_index``) are left out; default ``dataset.num_classes``.
    cache_dir : str or Path or False, optional
        Folder for the JSON cache (default :func:`default_cache_dir`); ``False`` disables caching.

    Returns
    -------
    dict
        ``{class_id: [image indices]}`` for every class present in at least one image.
    """
    num_classes = getattr(dataset, "num_classes", None) if num_classes is None else num_classes
    key = getattr(dataset, "cache_key", None)
    path = None
    if cache_dir is not False and key is not None:
        digest = hashlib.sha1(f"{key}-{len(dataset)}-{num_classes}-{ignore_index}".encode()).hexdigest()[:12]
        path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"class_index-{digest}.json"
        if path.exists():
            with open(path) as f:
                data = json.load(f)
            if data.get("key") == key and data.get("length") == len(dataset):
                return dict(sorted((int(c), v) for c, v in data["index"].items()))
    from gmmseg_core._files import progress_bar

    index: dict[int, list[int]] = {}
    load = getattr(dataset, "load_label", None) or (lambda i: np.asarray(dataset[i][1]))
    for i in progress_bar(range(len(dataset)), desc="class index", disable=not progress):
        present = np.unique(np.asarray(load(i)))
        for c in present.tolist():
            if c == ignore_index or c < 0 or (num_classes is not None and c >= num_classes):
                continue
            index.setdefault(int(c), []).append(i)
    index = dict(sorted(index.items()))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"key": key, "length": len(dataset), "index": {str(c): v for c, v in index.items()}}, f)
        os.replace(tmp, path)
    return index


class ClassBalancedSampler(Sampler):
    """Draw a class uniformly, then an image containing it (with replacement).

    Parameters
    ----------
    dataset : SegmentationDataset
        Source of the labels (see :func:`class_image_index`).
    num_samples : int, optional
        Indices per epoch over all ranks (default ``len(dataset)``); each rank yields
        ``ceil(num_samples / world_size)``.
    seed : int
        Same seed and epoch -> same indices on every run and rank.
    rank, world_size : int, optional
        Sharding as ``DistributedSampler``: rank ``r`` takes items ``r, r + world_size, ...`` of the epoch's
        global sequence. Default: from ``torch.distributed`` when a process group is initialised, else 0 and 1.
    index : dict, optional
        A precomputed ``{class: [images]}``; otherwise computed (and cached) by :func:`class_image_index`.
    cache_dir, num_classes, ignore_index
        Passed to :func:`class_image_index`.
    """

    def __init__(self, dataset, num_samples: int | None = None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, index: dict | None = None, cache_dir=None,
                 num_classes: int | None = None, ignore_index: int = IGNORE_INDEX):
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        world_size = check_int("world_size", world_size)
        if not (is_int(rank) and 0 <= rank < world_size):
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        self.num_samples = len(dataset) if num_samples is None else check_int("num_samples", num_samples)
        if self.num_samples < 1:
            raise ValueError("the dataset is empty: num_samples defaults to len(dataset), which is 0")
        if index is None:
            index = class_image_index(dataset, num_classes, ignore_index, cache_dir)
        self.index = {int(c): np.asarray(v, dtype=np.int64) for c, v in index.items() if len(v)}
        if not self.index:
            raise ValueError("the dataset has no labelled pixels: no class to balance")
        self.classes = np.array(sorted(self.index), dtype=np.int64)
        self.seed, self.rank, self.world_size, self.epoch = check_int("seed", seed, minimum=0), int(rank), world_size, 0
        self.per_rank = math.ceil(self.num_samples / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Use a new permutation for ``epoch`` (call before iterating, like ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def global_indices(self) -> np.ndarray:
        """The epoch's sequence over all ranks, (per_rank * world_size,) int64."""
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.per_rank * self.world_size
        cls = self.classes[rng.integers(0, len(self.classes), total)]
        out = np.empty(total, dtype=np.int64)
        for c in np.unique(cls):
            where = np.flatnonzero(cls == c)
            pool = self.index[int(c)]
            out[where] = pool[rng.integers(0, len(pool), len(where))]
        return out

    def __iter__(self):
        return iter(self.global_indices()[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank


def class_balanced_sampler(dataset, **kw) -> ClassBalancedSampler:
    """Shortcut for :class:`ClassBalancedSampler` (``dataset, num_samples, seed, rank, world_size, ...``)."""
    return ClassBalancedSampler(dataset, **kw)

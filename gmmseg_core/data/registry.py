"""The dataset registry: names list themselves, ``build_dataset`` looks them up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset. ``needs_root``: it cannot be built without a data root. ``reads_root``: a root
    given changes what it loads (every dataset that needs one, and those that only look for files there)."""

    name: str
    factory: Callable
    splits: tuple[str, ...]
    description: str
    needs_root: bool
    reads_root: bool = True


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, splits, description: str = "", needs_root: bool = False, reads_root: bool = True):
    """Decorator registering ``factory(split, root=None, **kw) -> SegmentationDataset`` under ``name``.

    ``reads_root=False`` declares that the factory ignores ``root`` (generated or bundled data), so trained-model
    caches need not tell runs apart by their data root.
    """
    if needs_root and not reads_root:
        raise ValueError(f"dataset {name!r}: a dataset that needs a root reads it (needs_root=True, reads_root=False)")

    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"dataset name {name!r} is already registered")
        _REGISTRY[name] = DatasetEntry(name, factory, tuple(splits), description, needs_root, reads_root)
        return factory

    return wrap


def available_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def dataset_info(name: str) -> DatasetEntry:
    """Registry entry of ``name`` (its splits, description, whether it needs a data root)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available datasets: {', '.join(available_datasets())}")
    return _REGISTRY[name]


def dataset_splits(name: str) -> tuple[str, ...]:
    """The splits dataset ``name`` provides."""
    return dataset_info(name).splits


def build_dataset(name: str, split: str, root=None, **kw):
    """Build dataset ``name`` for ``split``.

    Parameters
    ----------
    name : str
        One of :func:`available_datasets`.
    split : str
        One of :func:`dataset_splits` (``name``).
    root : str or Path, optional
        Data root for datasets read from files (default: the ``GMMSEG_DATA`` environment variable, then each
        dataset's usual location); ignored by the generated ``scenes`` dataset.
    **kw
        Dataset options (``image_size``, ``num_images``, ``seed``, ``transform``, ...).

    Returns
    -------
    SegmentationDataset
        Items ``(image float32 (3, H, W), label int64 (H, W))``.
    """
    entry = dataset_info(name)
    if split not in entry.splits:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; valid splits: {', '.join(entry.splits)}")
    return entry.factory(split, root=root, **kw)

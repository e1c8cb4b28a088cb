"""The dataset registry: names list themselves, ``build_dataset`` looks them up."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset. ``needs_root``: it cannot be built without a data root. ``reads_root``: a root
    given changes what it loads (every dataset that needs one, and those that only look for files there).
    ``options``: the keyword arguments its factory takes besides ``split`` and ``root`` (None: read from the
    factory's signature, see :func:`dataset_options`). ``root_key``: ``root_key(root) -> str or None``, what a
    given root (or None, no root: the environment's default, such as ``$GMMSEG_DATA``) makes the dataset read,
    for trained-model cache keys (None: what it reads with neither; no ``root_key``: the root itself)."""

    name: str
    factory: Callable
    splits: tuple[str, ...]
    description: str
    needs_root: bool
    reads_root: bool = True
    options: tuple[str, ...] | None = None
    root_key: Callable | None = None


_REGISTRY: dict[str, DatasetEntry] = {}


def keyword_names(target: Callable, skip=()) -> tuple[str, ...]:
    """Names of the parameters of ``target`` that can be passed by keyword, less those in ``skip``."""
    params = inspect.signature(target).parameters.values()
    return tuple(p.name for p in params
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip)


def register_dataset(name: str, splits, description: str = "", needs_root: bool = False, reads_root: bool = True,
                     options=None, root_key=None):
    """Decorator registering ``factory(split, root=None, **kw) -> SegmentationDataset`` under ``name``.

    ``reads_root=False`` declares that the factory ignores ``root`` (generated or bundled data), so trained-model
    caches need not tell runs apart by their data root. ``options`` names the keyword arguments a factory taking
    ``**kw`` passes on (e.g. ``keyword_names(MyDataset, skip=("split",))``), so that unknown ones are refused
    by name before anything is built; without it such a factory's keywords are not checked. ``root_key(root)``
    says what a given root makes the factory read, as a string, or None when that is what it reads with neither
    a root nor an environment setting (a root that holds none of its files); it is also called with
    ``root=None``, for what the environment (``$GMMSEG_DATA``) makes it read. Trained-model caches then tell
    runs apart by what they read rather than by where the root is.
    """
    if needs_root and not reads_root:
        raise ValueError(f"dataset {name!r}: a dataset that needs a root reads it (needs_root=True, reads_root=False)")

    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"dataset name {name!r} is already registered")
        _REGISTRY[name] = DatasetEntry(name, factory, tuple(splits), description, needs_root, reads_root,
                                       None if options is None else tuple(options), root_key)
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


def dataset_options(name: str) -> tuple[str, ...] | None:
    """The keyword arguments ``build_dataset(name, split, root, **kw)`` accepts in ``kw``: the registered
    ``options``, else those of the factory's signature; None (unknown) for a factory taking ``**kw`` registered
    without ``options``."""
    entry = dataset_info(name)
    if entry.options is not None:
        return entry.options
    params = list(inspect.signature(entry.factory).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return keyword_names(entry.factory, skip=(params[0].name, "root"))  # the split, then the root


def check_dataset_arguments(name: str, kwargs: dict, what: str = "dataset_kwargs") -> None:
    """Raise ``ValueError`` for an unknown dataset ``name`` and for keys of ``kwargs`` that
    ``build_dataset(name, ...)`` would reject (listing the accepted ones), without building anything."""
    accepted = dataset_options(name)
    if accepted is None:
        return
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{what} {unknown} are not arguments of dataset {name!r}; it takes {list(accepted)}")


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
    check_dataset_arguments(name, kw, "dataset options")
    return entry.factory(split, root=root, **kw)

"""The dataset base class every ``build_dataset`` result derives from.

A dataset produces *raw* items, an ``uint8`` image (H, W, 3) and an integer label map (H, W), through
:meth:`SegmentationDataset.load`; ``__getitem__`` applies the optional training transform to the raw arrays and
then normalises the image with the dataset's ``mean``/``std`` (ImageNet statistics on the 0..1 scale) into a
``float32`` tensor (3, H, W), with the label as an ``int64`` tensor (H, W).
"""

from __future__ import annotations

import colorsys
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gmmseg_core._checks import is_int

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ANOMALY_CLASSES = ["known", "anomaly"]
ANOMALY_PALETTE = np.array([[60, 60, 60], [255, 80, 0]], dtype=np.uint8)


def make_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """Distinct colours for ``num_classes`` classes.

    Returns
    -------
    numpy.ndarray
        (num_classes, 3) uint8, hues spread by the golden ratio so neighbouring ids differ.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((num_classes, 3), dtype=np.uint8)
    for c in range(num_classes):
        h = (c * 0.618033988749895) % 1.0
        s = 0.55 + 0.4 * rng.random()
        v = 0.6 + 0.4 * rng.random()
        out[c] = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
    return out


def check_size_pair(name: str, value) -> tuple[int, int]:
    """(height, width) from a positive int (a square) or a pair of positive ints (list, tuple or 1-d array);
    ``ValueError`` naming ``name`` and the value for anything else (floats, strings, other lengths)."""
    sequence = isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)
    pair = tuple(value) if sequence else (value, value)
    if len(pair) == 2 and all(is_int(v) and v > 0 for v in pair):
        return int(pair[0]), int(pair[1])
    raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, got {value!r}")


def check_transform(transform) -> None:
    """``ValueError`` unless ``transform`` is None or callable (see :class:`SegmentationDataset`)."""
    if transform is not None and not callable(transform):
        raise ValueError(f"transform must be None or a callable transform(image, label, rng) -> (image, label), "
                         f"got {transform!r}")


def evenly_spaced(items, count: int) -> list:
    """``count`` of ``items`` (a sequence) spread evenly over it, in order: item ``floor(i * len(items) / count)`` for
    ``i = 0 .. count - 1`` (all of them when ``count >= len(items)``).

    The real data sets are sorted by file path, that is by city or scene for some of them: the first 200 of
    Cityscapes' 500 validation images all come from Frankfurt, 200 spread evenly cover its three cities. The
    subsets are nested when one count is a multiple of the other (``i * len / c == (k i) * len / (k c)``), so
    ``num_images=200`` of a training split lies within ``num_images=2000`` of it.
    """
    n = len(items)
    if count >= n:
        return list(items)
    return [items[i * n // count] for i in range(count)]


def numpy_rng_from_torch() -> np.random.Generator:
    """A numpy generator seeded from torch's global generator.

    DataLoader workers seed torch from the loader's base seed, so augmentations drawn from this generator are
    reproducible under ``torch.manual_seed`` whatever the number of workers.
    """
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


class SegmentationDataset(Dataset):
    """Base class: raw items from :meth:`load`, transform, normalisation, plotting helpers.

    Subclasses set ``name``, ``split``, ``classes`` and ``palette`` and implement ``__len__`` and :meth:`load`
    (and may override :meth:`load_label` when the label alone is cheaper to read, as the sampler index uses it).

    Attributes
    ----------
    classes : list of str
        Class names; for anomaly splits ``["known", "anomaly"]``.
    num_classes : int
        ``len(classes)``.
    ignore_index : int
        255, the void / ignore label.
    palette : numpy.ndarray
        (num_classes, 3) uint8 colours for label maps (see :meth:`colorize`).
    mean, std : tuple of float
        Per-channel normalisation statistics on the 0..1 scale.
    transform : callable or None
        ``transform(image, label, rng) -> (image, label)`` on numpy arrays: image (H, W, 3) float32 in 0..255,
        label (H, W) int64; applied before normalisation (see :mod:`gmmseg_core.data.transforms`).
    """

    name = "dataset"
    ignore_index = IGNORE_INDEX
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, split: str, transform=None):
        check_transform(transform)
        self.split = split
        self.transform = transform
        self.classes: list[str] = []
        self.palette = np.zeros((0, 3), dtype=np.uint8)

    # -- to implement -------------------------------------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """Raw item ``index``: image (H, W, 3) uint8 and label (H, W) integer array."""
        raise NotImplementedError

    def load_label(self, index: int) -> np.ndarray:
        """Label map (H, W) of item ``index`` without the transform."""
        return self.load(index)[1]

    @property
    def cache_key(self) -> str:
        """A string identifying the dataset's content (used to key on-disk caches such as the sampler index)."""
        return f"{self.name}-{self.split}-{len(self)}"

    # -- common -------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_anomaly_split(self) -> bool:
        """True when labels are 0 = known, 1 = anomaly, 255 = void."""
        return self.classes == ANOMALY_CLASSES

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index must be in [-{n}, {n}), got {index}")
        return index % n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._check_index(int(index))
        image, label = self.load(index)
        if self.transform is not None:
            image, label = self.transform(image.astype(np.float32), label.astype(np.int64),
                                          numpy_rng_from_torch())
        return self.normalize(image), torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))

    def normalize(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) array in 0..255 (uint8 or float) -> normalised float32 tensor (3, H, W).

        One conversion pass into the channel-first layout, then two in-place passes: the same float32
        arithmetic as ``(image - mean) / std`` in numpy, bit for bit, and about 5x faster at 256x512
        (``benchmarks/RESULTS.md``, bench_data), which matters when the main process feeds a GPU.
        """
        mean = torch.tensor(self.mean, dtype=torch.float32).mul_(255.0).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).mul_(255.0).view(3, 1, 1)
        # ascontiguousarray: a no-op for stored images; flipped (negative-stride) views need one copy
        array = np.ascontiguousarray(image)
        with warnings.catch_warnings():
            # arrays of PIL images are read-only; torch warns about sharing them, but they are only read here
            warnings.simplefilter("ignore", UserWarning)
            source = torch.from_numpy(array)
        out = source.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        return out.sub_(mean).div_(std)

    def denormalize(self, image: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation for plotting.

        Parameters
        ----------
        image : torch.Tensor or numpy.ndarray
            (3, H, W) or (B, 3, H, W) normalised image, on any device.

        Returns
        -------
        torch.Tensor
            Same shape, float in [0, 1], on the input's device.
        """
        image = torch.as_tensor(image)
        if image.dim() not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"image must have shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=image.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=image.device).view(shape)
        return (image.float() * std + mean).clamp(0.0, 1.0)

    def colorize(self, label) -> np.ndarray:
        """Label map (H, W) -> RGB (H, W, 3) uint8 using ``palette``; ignore pixels are black."""
        label = np.asarray(torch.as_tensor(label).cpu())
        out = np.zeros(label.shape + (3,), dtype=np.uint8)
        valid = (label >= 0) & (label < len(self.palette))
        out[valid] = self.palette[label[valid]]
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, len={len(self)}, "
                f"num_classes={self.num_classes})")


class GeneratedDataset(SegmentationDataset):
    """A dataset whose items are generated (deterministically) by :meth:`generate`, with caches.

    Items are ``(image (H, W, 3) uint8, label (H, W) uint8, semantic (H, W) uint8)``; ``semantic`` is the
    closed-set label map (255 under anomalies), equal to ``label`` on closed-set splits. Generated items are kept
    in memory (``cache=True``) and, with ``cache_dir``, stored as ``<cache_dir>/<cache_key>/<index>.npz`` and
    read back by later instances (written atomically, so DataLoader workers may share the folder).
    """

    def __init__(self, split: str, transform=None, cache: bool = True, cache_dir=None):
        super().__init__(split, transform)
        self._memory: dict | None = {} if cache else None
        self._cache_root = None if cache_dir is None else Path(cache_dir)

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    @property
    def cache_dir(self) -> Path | None:
        """Folder of this dataset's ``.npz`` items, or None."""
        return None if self._cache_root is None else self._cache_root / self.cache_key

    def _item(self, index: int):
        if self._memory is not None and index in self._memory:
            return self._memory[index]
        folder = self.cache_dir
        path = None if folder is None else folder / f"{index:06d}.npz"
        if path is not None and path.exists():
            with np.load(path) as z:
                item = (z["image"], z["label"], z["semantic"])
        else:
            item = self.generate(index)
            if path is not None:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
                np.savez(tmp, image=item[0], label=item[1], semantic=item[2])
                os.replace(tmp, path)
        if self._memory is not None:
            self._memory[index] = item
        return item

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label, _ = self._item(self._check_index(index))
        return image, label

    def semantic_label(self, index: int) -> np.ndarray:
        """Closed-set labels (H, W) uint8 of item ``index`` (255 on anomaly objects in anomaly splits)."""
        return self._item(self._check_index(index))[2]

    def preload(self, progress: bool = False):
        """Generate (or read from ``cache_dir``) every item now; returns self."""
        from gmmseg_core._files import progress_bar

        for i in progress_bar(range(len(self)), desc=f"{self.name}/{self.split}", disable=not progress):
            self._item(i)
        return self

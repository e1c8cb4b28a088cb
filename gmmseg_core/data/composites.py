"""``fashion`` and ``digits``: scenes composed of real images (Fashion-MNIST garments, scikit-learn's digits).

Each scene pastes a few greyscale sprites, tinted with a random colour, at random scales and positions onto a
procedurally textured, randomly coloured background. The pixel label of a sprite comes from its silhouette
(grey intensity above a threshold); later sprites occlude earlier ones.

``fashion``: closed set = background + 8 garments; "Bag" and "Ankle boot" are held out and appear only in the
``anomaly`` split. ``train`` scenes use Fashion-MNIST's training images, ``val`` and ``anomaly`` its test images.
IDX files (optionally gzipped) are looked up in ``root``, then ``$GMMSEG_DATA`` (and its ``fashion-mnist``
subfolder), then ``/usr/share/datasets/fashion-mnist`` (Debian / Ubuntu package ``dataset-fashion-mnist``).

``digits``: the same from ``sklearn.datasets.load_digits`` (8 x 8, bundled with scikit-learn, upsampled);
closed set = background + digits 0-7, digits 8 and 9 held out. The 1797 digit images are split into disjoint
halves by a fixed permutation: ``train`` uses one half, ``val`` and ``anomaly`` the other.

Anomaly labels: 0 = known (background and closed-set sprites), 1 = held-out sprite, 255 = void band just outside
each held-out sprite's silhouette.
"""

from __future__ import annotations

import colorsys
import gzip
import hashlib
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from gmmseg_core._checks import check_int

from . import textures as tx
from .base import (
    ANOMALY_CLASSES,
    ANOMALY_PALETTE,
    IGNORE_INDEX,
    GeneratedDataset,
    is_int,
    make_palette,
)
from .scenes import anomaly_label, image_hw

SPLITS = ("train", "val", "anomaly")
DEFAULT_NUM_IMAGES = {"train": 1000, "val": 200, "anomaly": 200}
DEFAULT_IMAGE_SIZE = (64, 64)
_SPLIT_CODE = {"train": 101, "val": 103, "anomaly": 107}

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_HELD_OUT = ("Bag", "Ankle boot")
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DIGIT_HELD_OUT = ("8", "9")


@dataclass
class SpriteSource:
    """Greyscale sprites ``images`` (N, h, w) uint8 with class ids ``labels`` (N,) and ``names`` per class id."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]
    threshold: float  # grey level (0..255) above which a sprite pixel belongs to the object
    flip: bool = True  # mirror sprites at random (not for digits)

    @cached_property
    def fingerprint(self) -> str:
        """16 hex digits of a hash of the sprites and their labels: which files were read (two folders may hold
        same-named IDX files of equal length, e.g. MNIST and Fashion-MNIST) enters the items' cache key."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------------------
def read_idx(path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a uint8 array of its stated shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4]!r})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {body.size}")
    return body.reshape(dims)


def fashion_search_dirs(root=None) -> list[Path]:
    """Folders searched for the Fashion-MNIST IDX files, in order."""
    dirs = []
    for base in ([root] if root is not None else []) + ([os.environ["GMMSEG_DATA"]] if os.environ.get(
            "GMMSEG_DATA") else []):
        base = Path(base).expanduser()
        dirs += [base, base / "fashion-mnist", base / "fashion_mnist", base / "FashionMNIST" / "raw"]
    dirs += [Path(d) for d in FASHION_DIRS]      # last: a data root with other datasets only still finds them
    return dirs


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _first_pair(dirs, part: str) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files of ``part`` in the first of ``dirs`` holding both, or None."""
    img_stem, lab_stem = FASHION_FILES[part]
    for d in dirs:
        img, lab = _find(d, img_stem), _find(d, lab_stem)
        if img is not None and lab is not None:
            return img, lab
    return None


def find_fashion_files(root=None, part: str = "train") -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of Fashion-MNIST ``part`` ("train" or "test")."""
    dirs = fashion_search_dirs(root)
    found = _first_pair(dirs, part)
    if found is not None:
        return found
    img_stem, lab_stem = FASHION_FILES[part]
    raise FileNotFoundError(
        f"Fashion-MNIST files {img_stem}[.gz] and {lab_stem}[.gz] not found; tried: {', '.join(map(str, dirs))}. "
        "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, into "
        "/usr/share/datasets/fashion-mnist), or download the four *-ubyte.gz files from "
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a folder and pass it as root= "
        "or set GMMSEG_DATA.")


@lru_cache(maxsize=4)
def _fashion_source(img_path: str, lab_path: str) -> SpriteSource:
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape} and {labels.shape} in {img_path}")
    return SpriteSource(images, labels.astype(np.int64), FASHION_CLASSES, threshold=20.0)


def fashion_source(root=None, part: str = "train") -> SpriteSource:
    """Fashion-MNIST ``part`` ("train" 60000 or "test" 10000 images) as a sprite source."""
    img, lab = find_fashion_files(root, part)
    return _fashion_source(str(img), str(lab))


def fashion_root_key(root) -> str | None:
    """What ``fashion`` reads given ``root``, for trained-model cache keys: None when it is what it reads with
    neither a root nor ``$GMMSEG_DATA`` (the system copy: the same files, or files of the same content), else
    the fingerprints of its training and test sprites; ``root`` itself when they are not found.

    ``root=None`` keys what ``$GMMSEG_DATA`` makes it read, searched before the system copy. Training reads
    both parts: the training images for the ``train`` split, the test images for ``val``.
    """
    parts = ("train", "test")
    try:
        found = [find_fashion_files(root, part) for part in parts]
    except FileNotFoundError:          # training will fail and say where it looked
        return None if root is None else str(root)
    system = [_first_pair([Path(d) for d in FASHION_DIRS], part) for part in parts]
    default = None if None in system else system
    if default is not None and all(a.samefile(b) for pair in zip(found, default) for a, b in zip(*pair)):
        return None                    # the very same files: nothing to read
    fingerprints = [_fashion_source(str(img), str(lab)).fingerprint for img, lab in found]
    if default is not None and fingerprints == [_fashion_source(str(img), str(lab)).fingerprint
                                                for img, lab in default]:
        return None
    return "fashion-mnist " + " ".join(fingerprints)


@lru_cache(maxsize=2)
def digits_source(part: str = "train") -> SpriteSource:
    """scikit-learn's 1797 8x8 digits, half of them ("train" or "test"; disjoint, fixed permutation)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    half = order[: len(order) // 2] if part == "train" else order[len(order) // 2:]
    images = np.clip(data.images[half] * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return SpriteSource(images, data.target[half].astype(np.int64), [str(d) for d in range(10)], threshold=90.0,
                        flip=False)


# --------------------------------------------------------------------------------------------------------------
# scene composition
# --------------------------------------------------------------------------------------------------------------
def _random_colour(rng: np.random.Generator, sat=(0.35, 0.95), val=(0.45, 1.0)) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val)), dtype=np.float32)


def background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Two random colours mixed by blob noise, with fine grain: (H, W, 3) float in 0..1."""
    a, b = _random_colour(rng, (0.1, 0.7), (0.2, 0.9)), _random_colour(rng, (0.1, 0.7), (0.2, 0.9))
    mix = tx.noise("blobs", h, w, rng, 0.5)[..., None]
    grain = tx.noise("fine", h, w, rng)[..., None]
    return (a * mix + b * (1 - mix)) * (0.8 + 0.4 * grain)


def compose(h: int, w: int, rng: np.random.Generator, source: SpriteSource, ids: np.ndarray,
            size_range=(0.35, 0.7), max_tries: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Paste sprites ``ids`` (indices into ``source``) onto a background, in order.

    Returns
    -------
    image : numpy.ndarray
        (H, W, 3) uint8.
    owner : numpy.ndarray
        (H, W) int64: -1 on background, else the position in ``ids`` of the sprite visible there.
    """
    img = background(h, w, rng)
    owner = np.full((h, w), -1, dtype=np.int64)
    for k, idx in enumerate(ids):
        sprite = source.images[idx].astype(np.float32)
        size = max(int(min(h, w) * rng.uniform(*size_range)), 6)
        # cubic for the tiny 8x8 digits (smooth strokes), bilinear for larger sprites
        order = 3 if sprite.shape[0] < 16 else 1
        zoomed = ndimage.zoom(sprite, (size / sprite.shape[0], size / sprite.shape[1]), order=order)
        if source.flip and rng.random() < 0.5:
            zoomed = zoomed[:, ::-1]
        sh, sw = zoomed.shape
        best = None
        for _ in range(max_tries):  # keep the placement that hides the least of what is already there
            r0, c0 = rng.integers(-sh // 4, h - 3 * sh // 4 + 1), rng.integers(-sw // 4, w - 3 * sw // 4 + 1)
            rs, cs = slice(max(r0, 0), min(r0 + sh, h)), slice(max(c0, 0), min(c0 + sw, w))
            local = zoomed[rs.start - r0:rs.stop - r0, cs.start - c0:cs.stop - c0]
            mask = local > source.threshold
            overlap = float((owner[rs, cs][mask] >= 0).mean()) if mask.any() else 1.0
            if best is None or overlap < best[0]:
                best = (overlap, rs, cs, local, mask)
            if overlap < 0.15:
                break
        _, rs, cs, local, mask = best
        tint = _random_colour(rng)
        shade = (0.25 + 0.75 * local / 255.0)[..., None]
        np.copyto(img[rs, cs], tint * shade, where=mask[..., None])
        owner[rs, cs][mask] = k
    gain = rng.uniform(0.8, 1.15) * (1 + rng.uniform(-0.06, 0.06, 3))
    img = img * gain.astype(np.float32) + rng.uniform(0.005, 0.025) * tx.crop(tx.gaussian_bank(), h, w, rng)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), owner


class CompositeDataset(GeneratedDataset):
    """Sprites from a :class:`SpriteSource` composed into scenes (see the module docstring).

    Parameters
    ----------
    split : {"train", "val", "anomaly"}
    source : SpriteSource
        Training sprites for ``train``, test sprites otherwise.
    held_out : sequence of str
        Source class names that only appear (as anomalies) in the ``anomaly`` split.
    image_size : int or (int, int), optional
        Default (64, 64); ``height`` / ``width`` override one side.
    num_images : int, optional
        Default 1000 for ``train``, 200 otherwise.
    objects : (int, int)
        Number of sprites per scene, inclusive range (default (2, 4)).
    seed : int
    void_width : int, optional
        Void band width around anomalies (default ``max(1, height // 32)``).
    cache : bool
        Keep generated items in memory (default True).
    cache_dir : str or Path, optional
        Also store items as ``.npz`` files there (see :class:`GeneratedDataset`).
    transform : callable, optional
    """

    def __init__(self, split: str, source: SpriteSource, held_out, name: str = "composite", image_size=None,
                 num_images: int | None = None, objects=(2, 4), seed: int = 0, void_width: int | None = None,
                 height: int | None = None, width: int | None = None, cache: bool = True, cache_dir=None,
                 transform=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)} for dataset {name!r}, got {split!r}")
        super().__init__(split, transform, cache, cache_dir)
        self.name = name
        self.height, self.width = image_hw(image_size, height, width, DEFAULT_IMAGE_SIZE)
        self.num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else check_int("num_images", num_images)
        lo, hi = objects if isinstance(objects, (list, tuple)) and len(objects) == 2 else (None, None)
        if not (is_int(lo) and is_int(hi) and 1 <= lo <= hi):
            raise ValueError(f"objects must be a (min, max) pair with 1 <= min <= max, got {objects}")
        self.objects = (int(lo), int(hi))
        self.seed = check_int("seed", seed, 0)
        self.void_width = max(1, self.height // 32) if void_width is None else check_int("void_width", void_width, 0)
        self.source = source
        unknown = [c for c in held_out if c not in source.names]
        if unknown:
            raise ValueError(f"held_out must name classes of {source.names}, got unknown {unknown}")
        self.held_out = tuple(held_out)
        held_ids = [source.names.index(c) for c in held_out]
        self.known_ids = [i for i in range(len(source.names)) if i not in held_ids]
        self.semantic_classes = ["background"] + [source.names[i] for i in self.known_ids]
        self.semantic_palette = np.concatenate([[[90, 90, 90]], make_palette(len(self.known_ids))]).astype(np.uint8)
        self._lut = np.full(len(source.names), IGNORE_INDEX, dtype=np.int64)  # source id -> closed-set label
        self._lut[self.known_ids] = np.arange(1, len(self.known_ids) + 1)
        self._pool_known = np.flatnonzero(np.isin(source.labels, self.known_ids))
        self._pool_held = np.flatnonzero(np.isin(source.labels, held_ids))
        if not len(self._pool_known):
            raise ValueError(f"held_out {list(held_out)} leaves no known class to draw")
        if split.startswith("anomaly") and not len(self._pool_held):
            raise ValueError(f"the {split!r} split draws its anomalies from the held-out classes; held_out "
                             f"{list(held_out)} names none with sprites in this source")
        if split.startswith("anomaly"):
            self.classes, self.palette = list(ANOMALY_CLASSES), ANOMALY_PALETTE.copy()
        else:
            self.classes, self.palette = list(self.semantic_classes), self.semantic_palette.copy()

    def __len__(self) -> int:
        return self.num_images

    @property
    def cache_key(self) -> str:
        held = "-".join(self.held_out).replace("/", "_").replace(" ", "_")
        return (f"{self.name}-{self.split}-{self.height}x{self.width}-s{self.seed}-o{self.objects[0]}_"
                f"{self.objects[1]}-v{self.void_width}-{len(self.source.labels)}-{held}-{self.source.fingerprint}")

    def generate(self, index: int):
        """Compose item ``index``: (image uint8 (H, W, 3), label uint8 (H, W), semantic uint8 (H, W))."""
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index, len(self.source.labels)])
        n = int(rng.integers(self.objects[0], self.objects[1] + 1))
        ids = rng.choice(self._pool_known, size=n)
        if self.split == "anomaly":  # 1-2 held-out sprites among the known ones, in random paint order
            k = int(rng.integers(1, 3))
            ids = rng.permutation(np.concatenate([ids, rng.choice(self._pool_held, size=k)]))
        image, owner = compose(self.height, self.width, rng, self.source, ids)
        src = np.where(owner >= 0, self.source.labels[ids][np.maximum(owner, 0)], -1)
        semantic = np.where(src >= 0, self._lut[np.maximum(src, 0)], 0).astype(np.uint8)
        if self.split == "anomaly":
            label = anomaly_label(semantic == IGNORE_INDEX, self.void_width)
        else:
            label = semantic
        return image, label, semantic


def fashion_dataset(split: str, root=None, held_out=FASHION_HELD_OUT, **kw) -> CompositeDataset:
    """Fashion-MNIST composites; ``train`` from the training images, ``val`` / ``anomaly`` from the test images."""
    source = fashion_source(root, "train" if split == "train" else "test")
    return CompositeDataset(split, source, held_out, name="fashion", **kw)


def digits_dataset(split: str, root=None, held_out=DIGIT_HELD_OUT, **kw) -> CompositeDataset:
    """scikit-learn digits composites; ``train`` from one half of the digits, ``val`` / ``anomaly`` the other."""
    source = digits_source("train" if split == "train" else "test")
    return CompositeDataset(split, source, held_out, name="digits", **kw)

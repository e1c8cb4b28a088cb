"""Readers for the public benchmarks, each in the directory layout of its official (or usual public) release.

``root`` is the folder given to ``build_dataset`` (default ``$GMMSEG_DATA``, else ``./data``); each reader also
accepts the dataset's own folder inside it (for example ``root/cityscapes`` or ``root/ADEChallengeData2016``).
A missing or wrong root raises ``FileNotFoundError`` showing the expected layout.

==================  ============================================================================================
cityscapes          ``leftImg8bit/{train,val}/{city}/*_leftImg8bit.png`` and
                    ``gtFine/{split}/{city}/*_gtFine_labelTrainIds.png`` (or ``*_gtFine_labelIds.png``, mapped)
ade20k              ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and ``annotations/{...}/*.png``;
                    reduce_zero_label: 0 -> 255, x -> x - 1 (150 classes)
cocostuff           10k: ``images/*.jpg``, ``annotations/*.mat`` (field ``S``: 0 unlabeled, 1..182) or
                    ``annotations/*_labelTrainIds.png``, ``imageLists/{train,test}.txt``;
                    164k: ``images/{train2017,val2017}/*.jpg``, ``annotations/{train2017,val2017}/*_labelTrainIds.png``
                    (or the raw ``*.png`` with ids 0..181). 171 classes (mmseg); raw ids are mapped, the 11 unused
                    thing ids become 255
fishyscapes_lf      ``fishyscapes/LostAndFound/original/*.png`` and ``fishyscapes/LostAndFound/labels/*.png``
fishyscapes_static  ``fishyscapes/Static/original/*.png`` and ``fishyscapes/Static/labels/*.png``
                    (labels with the image's file stem; 0 in-distribution, 1 anomaly, 255 void)
road_anomaly        ``RoadAnomaly/frame_list.json``, ``RoadAnomaly/frames/{name}.jpg`` and
                    ``RoadAnomaly/frames/{stem}.labels/labels_semantic.png`` (2 = anomaly -> 1, else 0)
smiyc_anomaly       ``dataset_AnomalyTrack/images/validation*.{jpg,png,webp}`` and
                    ``dataset_AnomalyTrack/labels_masks/{stem}_labels_semantic.png`` (0 / 1 / 255)
smiyc_obstacle      the same under ``dataset_ObstacleTrack``
==================  ============================================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from gmmseg_core._checks import check_int

from .base import (
    ANOMALY_CLASSES,
    ANOMALY_PALETTE,
    IGNORE_INDEX,
    SegmentationDataset,
    check_size_pair,
    evenly_spaced,
    make_palette,
)
from .classnames import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    COCO_STUFF_CLASSES,
    coco_stuff_raw_lut,
    lut,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def default_root() -> Path:
    """``$GMMSEG_DATA`` or ``./data``."""
    return Path(os.environ.get("GMMSEG_DATA", "data")).expanduser()


def reader_root_key(root) -> str:
    """The folder a reader reads, for trained-model cache keys: ``root``, or without one ``$GMMSEG_DATA`` (else
    ``./data``), as an absolute path (two data roots are two data sets, ``./data`` depends on the working
    directory)."""
    return str((Path(root).expanduser() if root is not None else default_root()).resolve())


def _resolve(root, subdirs, marker: str, layout: str, name: str) -> Path:
    """First of ``root`` / ``root/<subdir>`` containing ``marker``; else FileNotFoundError showing ``layout``."""
    base = Path(root).expanduser() if root is not None else default_root()
    tried = []
    for cand in [base] + [base / s for s in subdirs]:
        tried.append(str(cand))
        if (cand / marker).exists():
            return cand
    raise FileNotFoundError(
        f"{name}: no '{marker}' found under root {str(base)!r} (tried {', '.join(tried)}). Expected layout:\n"
        f"{layout}\nPass root= (or set GMMSEG_DATA) to the folder that holds it.")


def _load_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8; converted only when the file is not RGB already (a conversion copies the image)."""
    with Image.open(path) as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


def _load_label(path: Path) -> np.ndarray:
    """(H, W) raw label values in the file's integer type (uint8 for 8-bit PNGs; int64 otherwise)."""
    if path.suffix == ".mat":
        from scipy.io import loadmat

        return np.asarray(loadmat(str(path))["S"], dtype=np.int64)
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:  # colour-saved masks: the value is in every channel
        arr = arr[..., 0]
    # 1-bit (bool) and float images become ints, to index a lookup table by value
    return arr if arr.dtype.kind in "iu" else arr.astype(np.int64)


class FileSegmentationDataset(SegmentationDataset):
    """Image / label file pairs with a label map (lookup table or function).

    Parameters
    ----------
    pairs : list of (Path, Path)
        (image file, label file), in a fixed (sorted) order.
    split, name : str
    classes : list of str
    palette : numpy.ndarray
        (C, 3) uint8.
    label_map : numpy.ndarray or callable, optional
        Raw label values -> dataset labels (a (256,) or larger lookup table, or a function on arrays).
    image_size : int or (int, int), optional
        Resize every item to (h, w) (image bilinear, label nearest); default: native size.
    num_images : int, optional
        Use only ``num_images`` pairs, spread evenly over the sorted list (see
        :func:`~gmmseg_core.data.base.evenly_spaced`); all of them when there are no more.
    transform : callable, optional
    """

    def __init__(self, pairs, split: str, name: str, classes, palette, label_map=None, image_size=None,
                 num_images: int | None = None, transform=None, root=None):
        super().__init__(split, transform)
        self.name = name
        self.pairs = list(pairs)
        if num_images is not None:
            self.pairs = evenly_spaced(self.pairs, check_int("num_images", num_images))
        self.classes, self.palette = list(classes), np.asarray(palette, dtype=np.uint8)
        self.label_map = label_map
        self.image_size = None if image_size is None else check_size_pair("image_size", image_size)
        # absolute: the cache key (the sampler's class index) must not confuse two ./data trees
        self.root = None if root is None else str(Path(root).expanduser().resolve())
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def cache_key(self) -> str:
        """Name, split, size, root and a fingerprint of the files (paths, sizes, modification times), so that
        regenerated annotations under the same root do not reuse a stale class index."""
        if self._fingerprint is None:
            digest = hashlib.sha1()
            for pair in self.pairs:
                for path in pair:
                    st = Path(path).stat()
                    digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            self._fingerprint = digest.hexdigest()[:12]
        return f"{self.name}-{self.split}-{len(self)}-{self.image_size}-{self.root}-{self._fingerprint}"

    def _map(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values (H, W), any integer type -> dataset labels (H, W) uint8 (a new, writable array)."""
        if self.label_map is None:
            return raw.astype(np.uint8)
        if callable(self.label_map):         # written for int64 values (``raw - 1`` must not wrap around)
            return np.asarray(self.label_map(raw.astype(np.int64))).astype(np.uint8)
        # the table cast to uint8 gives, value for value, the int64 lookup cast to uint8; an 8-bit label indexes
        # a table of 256 entries or more directly, without a clipped int64 copy (3 x 16 MB at 1024 x 2048)
        table = np.asarray(self.label_map).astype(np.uint8)
        if raw.dtype == np.uint8 and len(table) >= 256:
            return table[raw]
        return table[np.clip(raw, 0, len(table) - 1)]

    def _native_label(self, index: int) -> np.ndarray:
        return self._map(_load_label(self.pairs[index][1]))

    def _resized_label(self, label: np.ndarray) -> np.ndarray:
        if self.image_size is not None and label.shape != self.image_size:
            from .transforms import resize_label

            label = resize_label(label, self.image_size)
        return label

    def load_label(self, index: int) -> np.ndarray:
        return self._resized_label(self._native_label(self._check_index(index)))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._check_index(index)
        image = _load_image(self.pairs[index][0])
        label = self._native_label(index)
        # compared before resizing, which would give both the requested size whatever they were
        if image.shape[:2] != label.shape:
            raise ValueError(f"{self.name}: image {self.pairs[index][0]} is {image.shape[:2]} but its label "
                             f"{self.pairs[index][1]} is {label.shape}")
        if self.image_size is not None and image.shape[:2] != self.image_size:
            from .transforms import resize_image

            image = np.clip(resize_image(image.astype(np.float32), self.image_size) + 0.5, 0, 255).astype(np.uint8)
        return image, self._resized_label(label)


def _pairs_or_raise(pairs, name: str, where: Path, layout: str):
    if not pairs:
        raise FileNotFoundError(f"{name}: no image/label pairs found under {str(where)!r}. Expected layout:\n"
                                f"{layout}")
    return pairs


# --------------------------------------------------------------------------------------------------------------
# closed-set benchmarks
# --------------------------------------------------------------------------------------------------------------
CITYSCAPES_LAYOUT = """  <root>/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
  <root>/gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png   (or <name>_gtFine_labelIds.png)"""


def cityscapes(split: str, root=None, **kw) -> FileSegmentationDataset:
    """Cityscapes fine annotations, 19 classes (train ids; 255 ignore)."""
    base = _resolve(root, ["cityscapes", "Cityscapes"], "leftImg8bit", CITYSCAPES_LAYOUT, "cityscapes")
    pairs, raw_ids = [], False
    for img in sorted((base / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
        stem = img.name[: -len("_leftImg8bit.png")]
        gt = base / "gtFine" / split / img.parent.name
        lab = gt / f"{stem}_gtFine_labelTrainIds.png"
        if not lab.exists() and (gt / f"{stem}_gtFine_labelIds.png").exists():
            lab, raw_ids = gt / f"{stem}_gtFine_labelIds.png", True
        if lab.exists():
            pairs.append((img, lab))
    _pairs_or_raise(pairs, "cityscapes", base / "leftImg8bit" / split, CITYSCAPES_LAYOUT)
    table = lut(CITYSCAPES_ID_TO_TRAINID) if raw_ids else None
    if raw_ids and any("labelTrainIds" in p[1].name for p in pairs):
        raise ValueError(f"cityscapes: {base} mixes *_labelTrainIds.png and *_labelIds.png files; generate all "
                         "train ids (cityscapesscripts createTrainIdLabelImgs) or remove them")
    return FileSegmentationDataset(pairs, split, "cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, table,
                                   root=base, **kw)


ADE20K_LAYOUT = """  <root>/ADEChallengeData2016/images/{training,validation}/ADE_<split>_<n>.jpg
  <root>/ADEChallengeData2016/annotations/{training,validation}/ADE_<split>_<n>.png"""


def _reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    out = raw - 1
    out[raw == 0] = IGNORE_INDEX
    out[raw == IGNORE_INDEX] = IGNORE_INDEX
    return out


def ade20k(split: str, root=None, **kw) -> FileSegmentationDataset:
    """ADE20K (SceneParsing, ADEChallengeData2016), 150 classes, reduce_zero_label."""
    base = _resolve(root, ["ADEChallengeData2016", "ade/ADEChallengeData2016", "ade20k/ADEChallengeData2016"],
                    "images", ADE20K_LAYOUT, "ade20k")
    sub = {"train": "training", "val": "validation"}[split]
    pairs = [(img, base / "annotations" / sub / (img.stem + ".png"))
             for img in sorted((base / "images" / sub).glob("*.jpg"))]
    pairs = [p for p in pairs if p[1].exists()]
    _pairs_or_raise(pairs, "ade20k", base / "images" / sub, ADE20K_LAYOUT)
    return FileSegmentationDataset(pairs, split, "ade20k", ADE20K_CLASSES, make_palette(150), _reduce_zero_label,
                                   root=base, **kw)


COCO_STUFF_LAYOUT = """  10k:  <root>/images/<name>.jpg, <root>/annotations/<name>.mat (or <name>_labelTrainIds.png),
        <root>/imageLists/{train,test}.txt (one <name> per line)
  164k: <root>/images/{train2017,val2017}/<name>.jpg,
        <root>/annotations/{train2017,val2017}/<name>_labelTrainIds.png (or the raw <name>.png)"""


def cocostuff(split: str, root=None, **kw) -> FileSegmentationDataset:
    """COCO-Stuff 10k or 164k (detected from the layout), 171 classes (mmseg's train ids)."""
    base = _resolve(root, ["coco_stuff10k", "coco_stuff164k", "cocostuff", "coco_stuff"], "images",
                    COCO_STUFF_LAYOUT, "cocostuff")
    raw_lut = coco_stuff_raw_lut()
    pairs, kinds = [], set()
    if (base / "imageLists").is_dir():  # 10k
        lst = base / "imageLists" / ("train.txt" if split == "train" else "test.txt")
        names = [n.strip() for n in lst.read_text().split() if n.strip()] if lst.exists() else []
        for n in names:
            img = base / "images" / f"{n}.jpg"
            for lab, kind in ((base / "annotations" / f"{n}_labelTrainIds.png", "train"),
                              (base / "annotations" / f"{n}.mat", "mat")):
                if img.exists() and lab.exists():
                    pairs.append((img, lab))
                    kinds.add(kind)
                    break
    else:  # 164k
        sub = "train2017" if split == "train" else "val2017"
        for img in sorted((base / "images" / sub).glob("*.jpg")):
            for lab, kind in ((base / "annotations" / sub / f"{img.stem}_labelTrainIds.png", "train"),
                              (base / "annotations" / sub / f"{img.stem}.png", "raw")):
                if lab.exists():
                    pairs.append((img, lab))
                    kinds.add(kind)
                    break
    _pairs_or_raise(pairs, "cocostuff", base, COCO_STUFF_LAYOUT)
    if len(kinds) > 1:
        raise ValueError(f"cocostuff: {base} mixes label kinds {sorted(kinds)}; convert them all the same way")
    kind = kinds.pop()
    if kind == "train":
        table = None
    elif kind == "raw":
        table = raw_lut
    else:  # .mat: 1-based ids, 0 = unlabeled
        def table(raw):
            return np.where(raw > 0, raw_lut[np.clip(raw - 1, 0, 255)], IGNORE_INDEX)
    return FileSegmentationDataset(pairs, split, "cocostuff", COCO_STUFF_CLASSES, make_palette(171), table,
                                   root=base, **kw)


# --------------------------------------------------------------------------------------------------------------
# anomaly benchmarks (labels 0 known / 1 anomaly / 255 void)
# --------------------------------------------------------------------------------------------------------------
def _anomaly_dataset(pairs, name, label_map=None, **kw):
    return FileSegmentationDataset(pairs, "anomaly", name, ANOMALY_CLASSES, ANOMALY_PALETTE, label_map, **kw)


def _stem_pairs(image_dir: Path, label_for: Callable[[Path], Path], pattern: str = "*"):
    pairs = []
    for img in sorted(image_dir.glob(pattern)):
        if img.suffix.lower() in IMAGE_SUFFIXES:
            lab = label_for(img)
            if lab.exists():
                pairs.append((img, lab))
    return pairs


def _fishyscapes(which: str, name: str, root=None, **kw) -> FileSegmentationDataset:
    layout = f"""  <root>/fishyscapes/{which}/original/<name>.png
  <root>/fishyscapes/{which}/labels/<name>.png   (0 in-distribution, 1 anomaly, 255 void)"""
    base = _resolve(root, [f"fishyscapes/{which}", which, f"Fishyscapes/{which}"], "original", layout, name)
    pairs = _stem_pairs(base / "original", lambda p: base / "labels" / (p.stem + ".png"))
    _pairs_or_raise(pairs, name, base, layout)
    return _anomaly_dataset(pairs, name, root=base, **kw)


def fishyscapes_lf(split: str = "anomaly", root=None, **kw) -> FileSegmentationDataset:
    """Fishyscapes Lost & Found (public validation set, 100 images)."""
    return _fishyscapes("LostAndFound", "fishyscapes_lf", root, **kw)


def fishyscapes_static(split: str = "anomaly", root=None, **kw) -> FileSegmentationDataset:
    """Fishyscapes Static (public validation set, 30 images)."""
    return _fishyscapes("Static", "fishyscapes_static", root, **kw)


ROAD_ANOMALY_LAYOUT = """  <root>/RoadAnomaly/frame_list.json          (JSON list of image file names)
  <root>/RoadAnomaly/frames/<name>.jpg
  <root>/RoadAnomaly/frames/<stem>.labels/labels_semantic.png   (2 = anomaly)"""


def road_anomaly(split: str = "anomaly", root=None, **kw) -> FileSegmentationDataset:
    """Road Anomaly (60 images); label 2 -> 1 (anomaly), everything else -> 0."""
    base = _resolve(root, ["RoadAnomaly", "road_anomaly/RoadAnomaly"], "frame_list.json", ROAD_ANOMALY_LAYOUT,
                    "road_anomaly")
    names = json.loads((base / "frame_list.json").read_text())
    pairs = []
    for n in names:
        img = base / "frames" / n
        lab = base / "frames" / f"{Path(n).stem}.labels" / "labels_semantic.png"
        if img.exists() and lab.exists():
            pairs.append((img, lab))
    _pairs_or_raise(pairs, "road_anomaly", base, ROAD_ANOMALY_LAYOUT)
    return _anomaly_dataset(pairs, "road_anomaly", lambda raw: (raw == 2).astype(np.int64), root=base, **kw)


def _smiyc(track: str, name: str, root=None, **kw) -> FileSegmentationDataset:
    layout = f"""  <root>/dataset_{track}/images/validation<...>.jpg   (or .png / .webp)
  <root>/dataset_{track}/labels_masks/validation<...>_labels_semantic.png   (0 / 1 anomaly / 255 void)"""
    base = _resolve(root, [f"dataset_{track}", f"segment_me/dataset_{track}", f"smiyc/dataset_{track}"],
                    "labels_masks", layout, name)
    pairs = _stem_pairs(base / "images", lambda p: base / "labels_masks" / f"{p.stem}_labels_semantic.png",
                        "validation*")
    _pairs_or_raise(pairs, name, base, layout)
    return _anomaly_dataset(pairs, name, root=base, **kw)


def smiyc_anomaly(split: str = "anomaly", root=None, **kw) -> FileSegmentationDataset:
    """SegmentMeIfYouCan AnomalyTrack, public validation images (labels 0 / 1 / 255)."""
    return _smiyc("AnomalyTrack", "smiyc_anomaly", root, **kw)


def smiyc_obstacle(split: str = "anomaly", root=None, **kw) -> FileSegmentationDataset:
    """SegmentMeIfYouCan ObstacleTrack, public validation images (labels 0 / 1 / 255)."""
    return _smiyc("ObstacleTrack", "smiyc_obstacle", root, **kw)


READERS = {
    "cityscapes": (cityscapes, ("train", "val"), "Cityscapes gtFine, 19 classes"),
    "ade20k": (ade20k, ("train", "val"), "ADE20K SceneParsing, 150 classes"),
    "cocostuff": (cocostuff, ("train", "val"), "COCO-Stuff 10k / 164k, 171 classes"),
    "fishyscapes_lf": (fishyscapes_lf, ("anomaly",), "Fishyscapes Lost & Found validation"),
    "fishyscapes_static": (fishyscapes_static, ("anomaly",), "Fishyscapes Static validation"),
    "road_anomaly": (road_anomaly, ("anomaly",), "Road Anomaly"),
    "smiyc_anomaly": (smiyc_anomaly, ("anomaly",), "SegmentMeIfYouCan AnomalyTrack validation"),
    "smiyc_obstacle": (smiyc_obstacle, ("anomaly",), "SegmentMeIfYouCan ObstacleTrack validation"),
}

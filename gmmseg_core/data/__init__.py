"""Datasets: embedded generated street scenes (default), real-image composites, readers for public benchmarks.

>>> from gmmseg_core.data import build_dataset, available_datasets
>>> ds = build_dataset("scenes", "train", num_images=8)
>>> image, label = ds[0]          # float32 (3, 64, 128) normalised, int64 (64, 128)

Every dataset has ``classes``, ``num_classes``, ``ignore_index`` (255), ``palette`` ((C, 3) uint8), ``mean`` /
``std`` (ImageNet statistics on the 0..1 scale: images are ``(x / 255 - mean) / std``) and
``denormalize(image)``. Anomaly splits have the classes ``["known", "anomaly"]`` and labels 0 / 1 / 255 (void).

=====================  =========================================  ===============================================
name                   splits                                     source
=====================  =========================================  ===============================================
``scenes``             train, val, anomaly, anomaly_near          generated street scenes, 8 classes (default)
``fashion``            train, val, anomaly                        Fashion-MNIST composites, 9 classes (IDX files)
``digits``             train, val, anomaly                        scikit-learn digits composites, 9 classes
``cityscapes``         train, val                                 19 classes
``ade20k``             train, val                                 150 classes
``cocostuff``          train, val                                 171 classes (10k or 164k layout)
``fishyscapes_lf``     anomaly                                    Fishyscapes Lost & Found validation
``fishyscapes_static`` anomaly                                    Fishyscapes Static validation
``road_anomaly``       anomaly                                    Road Anomaly
``smiyc_anomaly``      anomaly                                    SegmentMeIfYouCan AnomalyTrack validation
``smiyc_obstacle``     anomaly                                    SegmentMeIfYouCan ObstacleTrack validation
=====================  =========================================  ===============================================
"""

from . import composites as _composites
from . import readers as _readers
from . import scenes as _scenes
from .base import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, SegmentationDataset
from .composites import CompositeDataset
from .readers import FileSegmentationDataset
from .registry import (
    available_datasets,
    build_dataset,
    check_dataset_arguments,
    dataset_info,
    dataset_options,
    dataset_splits,
    keyword_names,
    register_dataset,
)
from .sampler import ClassBalancedSampler, class_balanced_sampler, class_image_index
from .scenes import SceneDataset
from .transforms import train_transforms

# the keyword options each factory passes on to its dataset class (the rest are filled in by the factory)
_SCENE_OPTIONS = keyword_names(SceneDataset, skip=("split",))
_COMPOSITE_OPTIONS = ("held_out",) + keyword_names(CompositeDataset, skip=("split", "source", "held_out", "name"))
_READER_OPTIONS = keyword_names(FileSegmentationDataset,
                                skip=("pairs", "split", "name", "classes", "palette", "label_map", "root"))


@register_dataset("scenes", _scenes.SPLITS, "generated street scenes (embedded default, no files)", reads_root=False,
                  options=_SCENE_OPTIONS)
def _build_scenes(split, root=None, **kw):
    return _scenes.SceneDataset(split, **kw)


@register_dataset("fashion", _composites.SPLITS, "Fashion-MNIST garments composed into scenes (IDX files)",
                  options=_COMPOSITE_OPTIONS, root_key=_composites.fashion_root_key)
def _build_fashion(split, root=None, **kw):
    return _composites.fashion_dataset(split, root=root, **kw)


@register_dataset("digits", _composites.SPLITS, "scikit-learn digits composed into scenes (bundled)",
                  reads_root=False, options=_COMPOSITE_OPTIONS)
def _build_digits(split, root=None, **kw):
    return _composites.digits_dataset(split, root=root, **kw)


def _register_reader(name, fn, splits, description):
    @register_dataset(name, splits, description, needs_root=True, options=_READER_OPTIONS,
                      root_key=_readers.reader_root_key)
    def _build(split, root=None, **kw):
        return fn(split, root=root, **kw)


for _name, (_fn, _splits, _desc) in _readers.READERS.items():
    _register_reader(_name, _fn, _splits, _desc)


__all__ = [
    "ClassBalancedSampler",
    "CompositeDataset",
    "FileSegmentationDataset",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SceneDataset",
    "SegmentationDataset",
    "available_datasets",
    "build_dataset",
    "check_dataset_arguments",
    "class_balanced_sampler",
    "class_image_index",
    "dataset_info",
    "dataset_options",
    "dataset_splits",
    "register_dataset",
    "train_transforms",
]

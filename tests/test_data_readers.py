"""Each reader on a tiny tree in the exact directory layout and file naming of the real dataset."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gmmseg_core.data import build_dataset

H, W = 12, 16


def _image(path, seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (H, W, 3)).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def _label(path, values):
    """A label PNG whose columns cycle through ``values``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.resize(np.asarray(values, np.uint8), W)[None, :].repeat(H, 0)
    Image.fromarray(arr).save(path)
    return arr


def _check(ds, n, classes):
    assert len(ds) == n and ds.num_classes == classes
    image, label = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert label.shape == (H, W) and label.dtype == torch.int64
    return [np.unique(ds.load_label(i)).tolist() for i in range(n)]


def test_cityscapes_train_ids(tmp_path):
    for city, i in (("aachen", 0), ("bremen", 1)):
        stem = f"{city}_000000_00001{i}"
        _image(tmp_path / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png")
        _label(tmp_path / "gtFine" / "train" / city / f"{stem}_gtFine_labelTrainIds.png", [0, 5, 18, 255])
    ds = build_dataset("cityscapes", "train", root=tmp_path)
    assert _check(ds, 2, 19) == [[0, 5, 18, 255]] * 2
    assert ds.classes[0] == "road" and ds.classes[-1] == "bicycle"


def test_a_relative_root_enters_the_cache_key_as_an_absolute_path(tmp_path, monkeypatch):
    keys = []
    for project in ("a", "b"):                          # two projects, each with its own ./data
        root = tmp_path / project / "data"
        _image(root / "leftImg8bit" / "train" / "aachen" / "x_leftImg8bit.png")
        _label(root / "gtFine" / "train" / "aachen" / "x_gtFine_labelTrainIds.png", [0, 255])
        monkeypatch.chdir(tmp_path / project)
        keys.append(build_dataset("cityscapes", "train", root="data").cache_key)
    assert keys[0] != keys[1] and str(tmp_path / "a" / "data") in keys[0]


def test_rewritten_annotations_change_the_cache_key_and_the_class_index(tmp_path):
    from gmmseg_core.data import class_image_index

    label = tmp_path / "gtFine" / "train" / "aachen" / "x_gtFine_labelTrainIds.png"
    _image(tmp_path / "leftImg8bit" / "train" / "aachen" / "x_leftImg8bit.png")
    _label(label, [0, 255])
    before = build_dataset("cityscapes", "train", root=tmp_path)
    assert class_image_index(before, cache_dir=tmp_path / "cache") == {0: [0]}
    _label(label, [13, 255])
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))   # a later edit
    after = build_dataset("cityscapes", "train", root=tmp_path)
    assert after.cache_key != before.cache_key
    assert class_image_index(after, cache_dir=tmp_path / "cache") == {13: [0]}


def test_cityscapes_label_ids_are_mapped_and_root_may_be_parent(tmp_path):
    base = tmp_path / "cityscapes"
    stem = "frankfurt_000000_000294"
    _image(base / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png")
    _label(base / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", [7, 26, 0, 33])
    ds = build_dataset("cityscapes", "val", root=tmp_path)
    assert _check(ds, 1, 19) == [[0, 13, 18, 255]]


def test_ade20k_reduce_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for i in (1, 2):
        _image(base / "images" / "validation" / f"ADE_val_0000000{i}.jpg")
        _label(base / "annotations" / "validation" / f"ADE_val_0000000{i}.png", [0, 1, 150])
    ds = build_dataset("ade20k", "val", root=tmp_path)
    assert _check(ds, 2, 150) == [[0, 149, 255]] * 2
    assert ds.classes[0] == "wall" and ds.classes[-1] == "flag"


def test_cocostuff_10k_mat(tmp_path):
    from scipy.io import savemat

    annotations = _mkdir(tmp_path / "annotations")
    for name in ("COCO_train2014_000000000077", "COCO_train2014_000000000078"):
        _image(tmp_path / "images" / f"{name}.jpg")
        savemat(annotations / f"{name}.mat", {"S": np.resize(np.array([0, 1, 13, 182], np.uint8), W)[None].repeat(H, 0)})
    _mkdir(tmp_path / "imageLists")
    (tmp_path / "imageLists" / "train.txt").write_text("COCO_train2014_000000000077\nCOCO_train2014_000000000078\n")
    (tmp_path / "imageLists" / "test.txt").write_text("")
    ds = build_dataset("cocostuff", "train", root=tmp_path)
    # 1-based ids: 0 unlabeled -> 255, 1 person -> 0, 13 (stop sign, after the unused id 12) -> 11, 182 wood -> 170
    assert _check(ds, 2, 171) == [[0, 11, 170, 255]] * 2


def _mkdir(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_cocostuff_164k_raw_and_train_ids(tmp_path):
    base = tmp_path / "coco_stuff164k"
    _image(base / "images" / "val2017" / "000000000139.jpg")
    _label(base / "annotations" / "val2017" / "000000000139.png", [0, 12, 181, 255, 11])
    ds = build_dataset("cocostuff", "val", root=tmp_path)
    assert _check(ds, 1, 171) == [[0, 11, 170, 255]]
    (base / "annotations" / "val2017" / "000000000139.png").unlink()
    _label(base / "annotations" / "val2017" / "000000000139_labelTrainIds.png", [0, 11, 170, 255])
    assert _check(build_dataset("cocostuff", "val", root=base), 1, 171) == [[0, 11, 170, 255]]


@pytest.mark.parametrize("name,which", [("fishyscapes_lf", "LostAndFound"), ("fishyscapes_static", "Static")])
def test_fishyscapes(tmp_path, name, which):
    base = tmp_path / "fishyscapes" / which
    for i in range(2):
        _image(base / "original" / f"{i}.png")
        _label(base / "labels" / f"{i}.png", [0, 1, 255])
    ds = build_dataset(name, "anomaly", root=tmp_path)
    assert ds.classes == ["known", "anomaly"]
    assert _check(ds, 2, 2) == [[0, 1, 255]] * 2


def test_road_anomaly(tmp_path):
    base = tmp_path / "RoadAnomaly"
    names = ["animals01_Guardian_dog.jpg", "cones02_road.jpg"]
    for n in names:
        _image(base / "frames" / n)
        _label(base / "frames" / f"{n[:-4]}.labels" / "labels_semantic.png", [0, 1, 2])
    (base / "frame_list.json").write_text(json.dumps(names))
    ds = build_dataset("road_anomaly", "anomaly", root=tmp_path)
    assert _check(ds, 2, 2) == [[0, 1]] * 2
    assert (ds.load_label(0) == 1).sum() == (np.resize([0, 1, 2], W) == 2).sum() * H


@pytest.mark.parametrize("name,track,ext,fmt", [("smiyc_anomaly", "AnomalyTrack", "jpg", None),
                                                ("smiyc_obstacle", "ObstacleTrack", "webp", "WEBP")])
def test_smiyc(tmp_path, name, track, ext, fmt):
    base = tmp_path / f"dataset_{track}"
    for i in range(3):
        _image(base / "images" / f"validation_{i}.{ext}", fmt=fmt)
        _label(base / "labels_masks" / f"validation_{i}_labels_semantic.png", [0, 1, 255])
    _image(base / "images" / "test_0.jpg")  # test images have no public labels and are skipped
    ds = build_dataset(name, "anomaly", root=tmp_path)
    assert _check(ds, 3, 2) == [[0, 1, 255]] * 3


def test_resize_and_num_images(tmp_path):
    base = tmp_path / "fishyscapes" / "Static"
    for i in range(3):
        _image(base / "original" / f"{i}.png")
        _label(base / "labels" / f"{i}.png", [0, 1, 255])
    ds = build_dataset("fishyscapes_static", "anomaly", root=tmp_path, image_size=(6, 8), num_images=2)
    image, label = ds[1]
    assert len(ds) == 2 and image.shape == (3, 6, 8) and label.shape == (6, 8)
    assert set(label.unique().tolist()) <= {0, 1, 255}


def test_a_subset_spreads_evenly_over_the_cities_in_order(tmp_path):
    cities = {"frankfurt": 5, "lindau": 2, "munster": 3}      # sorted by path, as the reader lists them
    for city, count in cities.items():
        for i in range(count):
            stem = f"{city}_000000_{i:06d}"
            _image(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
            _label(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", [0, 255])
    every = build_dataset("cityscapes", "val", root=tmp_path).pairs
    subset = build_dataset("cityscapes", "val", root=tmp_path, num_images=4).pairs
    assert subset == [every[0], every[2], every[5], every[7]]          # item floor(i * 10 / 4)
    assert [image.parent.name for image, _ in subset] == ["frankfurt", "frankfurt", "lindau", "munster"]
    assert build_dataset("cityscapes", "val", root=tmp_path, num_images=10).pairs == every
    assert build_dataset("cityscapes", "val", root=tmp_path, num_images=50).pairs == every
    assert build_dataset("cityscapes", "val", root=tmp_path, num_images=1).pairs == every[:1]
    # nested when one count divides the other: a training subset evaluated within the one trained on
    assert set(build_dataset("cityscapes", "val", root=tmp_path, num_images=2).pairs) <= set(subset)


def test_an_8_bit_label_map_is_read_and_mapped_in_a_few_bytes_per_pixel(tmp_path):
    """A full Cityscapes label is 2 M pixels: int64 copies on the way (8 bytes per pixel each) cost tens of MB."""
    import tracemalloc

    h, w = 256, 512
    raw = np.random.default_rng(0).integers(0, 34, (h, w)).astype(np.uint8)
    Image.fromarray(raw).save(_mkdir(tmp_path / "gtFine" / "val" / "lindau") / "x_gtFine_labelIds.png")
    _image(tmp_path / "leftImg8bit" / "val" / "lindau" / "x_leftImg8bit.png")
    ds = build_dataset("cityscapes", "val", root=tmp_path)
    tracemalloc.start()
    try:
        label = ds.load_label(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert label.shape == (h, w) and label.dtype == np.uint8
    assert label[raw == 7].tolist() == [0] * int((raw == 7).sum()) and set(label[raw < 7].tolist()) == {255}
    assert peak < 4 * h * w, f"{peak / (h * w):.1f} bytes per pixel"


def test_an_image_and_label_of_different_sizes_are_refused_even_when_resized(tmp_path):
    base = tmp_path / "fishyscapes" / "Static"
    _image(base / "original" / "0.png")
    (base / "labels").mkdir(parents=True)
    Image.fromarray(np.zeros((H // 2, W), np.uint8)).save(base / "labels" / "0.png")
    for kw in ({}, {"image_size": (6, 8)}):
        with pytest.raises(ValueError, match=r"is \(12, 16\) but its label .* is \(6, 16\)"):
            build_dataset("fishyscapes_static", "anomaly", root=tmp_path, **kw)[0]


@pytest.mark.parametrize("kw, message", [
    (dict(image_size="32"), r"image_size must be a positive int or a \(height, width\) pair of positive ints, "
                            r"got '32'"),
    (dict(image_size=[6, 8, 3]), r"image_size must be .* got \[6, 8, 3\]"),
    (dict(image_size=-6), "image_size must be .* got -6"),
    (dict(num_images="2"), "num_images must be a positive int, got '2'"),
    (dict(transform="mmseg"), "transform must be None or a callable"),
])
def test_bad_options_are_refused_at_construction(tmp_path, kw, message):
    base = tmp_path / "fishyscapes" / "Static"
    _image(base / "original" / "0.png")
    _label(base / "labels" / "0.png", [0, 1, 255])
    with pytest.raises(ValueError, match=message):
        build_dataset("fishyscapes_static", "anomaly", root=tmp_path, **kw)
    assert build_dataset("fishyscapes_static", "anomaly", root=tmp_path, image_size=[6, 8]).image_size == (6, 8)


@pytest.mark.parametrize("name,split,needle", [
    ("cityscapes", "train", "leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png"),
    ("ade20k", "val", "ADEChallengeData2016/images/{training,validation}"),
    ("cocostuff", "train", "imageLists/{train,test}.txt"),
    ("fishyscapes_lf", "anomaly", "fishyscapes/LostAndFound/original/<name>.png"),
    ("road_anomaly", "anomaly", "RoadAnomaly/frame_list.json"),
    ("smiyc_obstacle", "anomaly", "dataset_ObstacleTrack/labels_masks"),
])
def test_wrong_root_shows_expected_layout(tmp_path, name, split, needle):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(name, split, root=tmp_path)
    assert needle in str(err.value) and str(tmp_path) in str(err.value)


def test_empty_split_folder_is_reported(tmp_path):
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no image/label pairs"):
        build_dataset("cityscapes", "val", root=tmp_path)


def test_a_resized_image_is_rounded_to_the_nearest_grey_level(tmp_path):
    base = tmp_path / "fishyscapes" / "Static"
    (base / "original").mkdir(parents=True)
    checker = (np.indices((H, W)).sum(0) % 2 * 255).astype(np.uint8)      # every 2 x 2 block averages 127.5
    Image.fromarray(np.repeat(checker[..., None], 3, axis=2)).save(base / "original" / "0.png")
    _label(base / "labels" / "0.png", [0, 1, 255])
    image, _ = build_dataset("fishyscapes_static", "anomaly", root=tmp_path, image_size=(H // 2, W // 2)).load(0)
    assert image.dtype == np.uint8 and np.all(image == 128)


def test_label_ids_beyond_the_lookup_table_are_ignored(tmp_path):
    stem = "frankfurt_000000_000294"
    _image(tmp_path / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png")
    path = tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.resize(np.array([7, 300], np.uint16), (H, W))).save(path)     # a 16-bit label file
    assert np.unique(build_dataset("cityscapes", "val", root=tmp_path).load_label(0)).tolist() == [0, 255]


def test_a_label_saved_in_colour_is_read_from_its_first_channel(tmp_path):
    base = tmp_path / "fishyscapes" / "Static"
    _image(base / "original" / "0.png")
    (base / "labels").mkdir(parents=True)
    grey = np.resize(np.array([0, 1, 255], np.uint8), (H, W))
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(base / "labels" / "0.png")     # an RGB mask
    label = build_dataset("fishyscapes_static", "anomaly", root=tmp_path)[0][1]
    assert label.shape == (H, W) and torch.equal(label, torch.from_numpy(grey.astype(np.int64)))

"""The notebooks' real-data branches (``data_root`` given) on a tiny data root in the benchmarks' own layouts.

Cityscapes with raw ``*_labelIds.png`` (mapped to the 19 train ids), ADE20K with reduce_zero_label (150 classes),
COCO-Stuff with its validation images only (so it must be skipped, not crash the notebook), and the anomaly sets
in their label conventions. Notebooks 03 and 04 run on the real data sets alone (``datasets=[]``).
"""

import csv
import json

import nbformat
import numpy as np
import pytest
from PIL import Image

from gmmseg_core.reproduce import reproduce

H, W = 32, 64
REAL_ANOMALY_SPLITS = ["fishyscapes_lf", "fishyscapes_static", "road_anomaly", "smiyc_anomaly"]


def _image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3)).astype(np.uint8)).save(path)


def _label(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def _stripes(values, main):
    """Most of the image ``main``, a band of each of ``values`` at the bottom."""
    arr = np.full((H, W), main, np.uint8)
    for i, v in enumerate(values):
        arr[H - 8:, i * W // len(values):(i + 1) * W // len(values)] = v
    return arr


def _anomaly(anomaly=1, void=255):
    arr = np.zeros((H, W), np.uint8)
    arr[8:20, 20:40] = anomaly
    arr[:4] = void
    return arr


def build_real_data_root(root):
    seed = iter(range(1000))
    # Cityscapes labelIds: road (7) covers most pixels; sidewalk, building, car, bicycle, unlabeled (0) below
    for split, cities in (("train", ["aachen", "bochum"]), ("val", ["frankfurt"])):
        for city in cities:
            for j in range(3):
                stem = f"{city}_{j:06d}_000019"
                _image(root / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", next(seed))
                _label(root / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                       _stripes([8, 11, 26, 33, 0], main=7))
    # ADE20K: raw 3 (sky after reduce_zero_label) covers most pixels; 0 (other) is ignored
    for split, tag in (("training", "train"), ("validation", "val")):
        for j in range(4):
            stem = f"ADE_{tag}_{j + 1:08d}"
            _image(root / "ADEChallengeData2016" / "images" / split / f"{stem}.jpg", next(seed))
            _label(root / "ADEChallengeData2016" / "annotations" / split / f"{stem}.png",
                   _stripes([0, 1, 13, 150], main=3))
    # COCO-Stuff 164k with its validation split only: the notebook must skip it
    for j in range(2):
        _image(root / "coco_stuff164k" / "images" / "val2017" / f"{j:012d}.jpg", next(seed))
        _label(root / "coco_stuff164k" / "annotations" / "val2017" / f"{j:012d}_labelTrainIds.png",
               _stripes([0, 1], main=2))
    for which in ("LostAndFound", "Static"):
        for j in range(3):
            _image(root / "fishyscapes" / which / "original" / f"{j}.png", next(seed))
            _label(root / "fishyscapes" / which / "labels" / f"{j}.png", _anomaly())
    names = [f"animals{j:02d}_frame.jpg" for j in range(3)]
    for n in names:
        _image(root / "RoadAnomaly" / "frames" / n, next(seed))
        _label(root / "RoadAnomaly" / "frames" / f"{n[:-4]}.labels" / "labels_semantic.png", _anomaly(2, 0))
    (root / "RoadAnomaly" / "frame_list.json").write_text(json.dumps(names))
    for j in range(3):
        _image(root / "dataset_AnomalyTrack" / "images" / f"validation{j:04d}.jpg", next(seed))
        _label(root / "dataset_AnomalyTrack" / "labels_masks" / f"validation{j:04d}_labels_semantic.png", _anomaly())
    return root


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    data_root = build_real_data_root(base / "data")
    reproduce("smoke", notebooks=["03_closed_set", "04_anomaly"], data_root=data_root, out_dir=base / "out",
              figures_dir=base / "figures", cache_dir=base / "cache", log=lambda *a, **k: None,
              parameters={"datasets": [], "real_datasets": ["cityscapes", "ade20k", "cocostuff"],
                          "real_anomaly_splits": REAL_ANOMALY_SPLITS, "train_processes": 1})
    return base


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _printed(path):
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.notebooks
@pytest.mark.slow
def test_closed_set_notebook_trains_the_real_data_sets_and_skips_a_half_present_one(real_run):
    printed = _printed(real_run / "out" / "03_closed_set.ipynb")
    assert "datasets used: cityscapes, ade20k\n" in printed
    assert "SKIPPED cocostuff: FileNotFoundError" in printed          # no training images
    # the labels arrive mapped: Cityscapes labelIds 7 -> road, ADE20K raw 3 -> sky
    assert "cityscapes: predicting 'road' everywhere" in printed
    assert "ade20k: predicting 'sky' everywhere" in printed
    rows = _read_csv(real_run / "figures" / "closed_set_table.csv")
    assert [r["dataset"] for r in rows] == ["cityscapes", "ade20k"]
    class_counts = {len(json.loads(p.read_text())["classes"]) for p in (real_run / "cache").glob("*/metrics.json")}
    assert class_counts == {19, 150}
    with Image.open(real_run / "figures" / "03_per_class_iou.png") as im:
        assert im.width > 2000                                       # room for ADE20K's 150 class names


@pytest.mark.notebooks
@pytest.mark.slow
def test_anomaly_notebook_scores_every_real_anomaly_split(real_run):
    printed = _printed(real_run / "out" / "04_anomaly.ipynb")
    assert "SKIPPED" not in printed
    keys_in_order = [f"{name}/anomaly" for name in REAL_ANOMALY_SPLITS]
    keys = set(keys_in_order)
    rows = _read_csv(real_run / "figures" / "anomaly_table.csv")
    assert {r["split"] for r in rows} == keys
    assert {r["arch"] for r in rows} == {"fcn"}
    for r in rows:
        assert 0.0 <= float(r["auroc"]) <= 1.0
    # each benchmark holds 3 images, fewer than the profile's num_val_images (4): the notes count what was pooled
    counts = "the images of each split (" + ", ".join(f"{key}: 3" for key in keys_in_order) + ")"
    notes = (real_run / "figures" / "anomaly_table.md").read_text()
    assert "Skipped" not in notes and f"pooled over {counts}, void excluded" in notes
    ablation = _read_csv(real_run / "figures" / "anomaly_class_norm_ablation.csv")
    assert {r["split"] for r in ablation} == keys                   # trained on cityscapes, no scenes here
    assert f"pooled over {counts};" in (real_run / "figures" / "anomaly_class_norm_ablation.md").read_text()

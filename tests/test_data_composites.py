import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gmmseg_core.data import build_dataset
from gmmseg_core.data.composites import (
    FASHION_CLASSES,
    digits_source,
    find_fashion_files,
    read_idx,
)

SMALL = dict(image_size=32)


def _fashion_available() -> bool:
    try:
        find_fashion_files()
        return True
    except FileNotFoundError:
        return False


needs_fashion = pytest.mark.skipif(not _fashion_available(), reason="Fashion-MNIST IDX files not installed "
                                   "(apt-get install dataset-fashion-mnist, or set GMMSEG_DATA)")


def _write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress, rng):
    arr = rng.integers(0, 256, (5, 4, 3)).astype(np.uint8)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    _write_idx(path, arr, compress)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(path)


def test_fashion_missing_files_error_names_paths_and_remedy(tmp_path, monkeypatch):
    from gmmseg_core.data import composites

    monkeypatch.delenv("GMMSEG_DATA", raising=False)
    monkeypatch.setattr(composites, "FASHION_DIRS", [str(tmp_path / "system")])
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as err:
        build_dataset("fashion", "train", root=tmp_path)
    assert str(tmp_path) in str(err.value) and "train-images-idx3-ubyte" in str(err.value)
    assert str(tmp_path / "system") in str(err.value)            # searched after the root


def test_a_data_root_without_fashion_files_still_finds_the_system_copy(tmp_path, monkeypatch):
    from gmmseg_core.data.composites import FASHION_DIRS

    if not any(Path(d, "train-images-idx3-ubyte.gz").exists() or Path(d, "train-images-idx3-ubyte").exists()
               for d in FASHION_DIRS):
        pytest.skip("no system Fashion-MNIST files")
    monkeypatch.delenv("GMMSEG_DATA", raising=False)
    assert len(build_dataset("fashion", "train", root=tmp_path, num_images=1, **SMALL)) == 1


def test_composite_cache_keys_tell_object_ranges_apart(tmp_path):
    keys = {build_dataset("digits", "train", num_images=1, objects=objects, **SMALL).cache_key
            for objects in ((11, 11), (1, 111))}
    assert len(keys) == 2


def test_held_out_classes_must_leave_known_ones_and_feed_anomaly_splits():
    with pytest.raises(ValueError, match=r"the 'anomaly' split draws its anomalies from the held-out classes; "
                                         r"held_out \[\] names none"):
        build_dataset("digits", "anomaly", num_images=1, held_out=(), **SMALL)


def test_fashion_reads_files_from_root(tmp_path, rng):
    # a tiny Fashion-MNIST look-alike in the real file naming, found through root=
    images = np.zeros((20, 28, 28), np.uint8)
    images[:, 6:22, 8:20] = 200
    labels = np.arange(20) % 10
    for part in ("train", "t10k"):
        _write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", images, True)
        _write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", labels, True)
    ds = build_dataset("fashion", "anomaly", root=tmp_path, num_images=3, **SMALL)
    assert set(np.unique(ds.load_label(0))) <= {0, 1, 255}
    assert 1 in np.concatenate([ds.load_label(i).ravel() for i in range(3)])


def test_fashion_cache_key_tells_apart_files_of_the_same_name_and_length(tmp_path):
    labels = np.arange(20) % 10
    keys = []
    for name, top in (("a", 6), ("b", 10)):           # same names and counts, other sprites
        images = np.zeros((20, 28, 28), np.uint8)
        images[:, top:22, 8:20] = 200
        (tmp_path / name).mkdir()
        for part in ("train", "t10k"):
            _write_idx(tmp_path / name / f"{part}-images-idx3-ubyte.gz", images, True)
            _write_idx(tmp_path / name / f"{part}-labels-idx1-ubyte.gz", labels, True)
        keys.append(build_dataset("fashion", "train", root=tmp_path / name, num_images=2, **SMALL).cache_key)
    assert keys[0] != keys[1]           # items cached from one folder are not served for the other


def test_digits_items_and_classes():
    ds = build_dataset("digits", "train", num_images=3, **SMALL)
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.shape == (32, 32) and label.dtype == torch.int64
    assert ds.classes == ["background"] + [str(d) for d in range(8)] and ds.num_classes == 9
    assert ds.palette.shape == (9, 3)


def test_digits_every_class_occurs_and_held_out_never_in_closed_set():
    for split in ("train", "val"):
        ds = build_dataset("digits", split, num_images=30, **SMALL)
        labels = np.concatenate([ds.load_label(i).ravel() for i in range(len(ds))])
        # held-out digits would show up as 255 (their sprites have no closed-set label)
        assert set(np.unique(labels)) == set(range(9))


def test_digits_halves_are_disjoint():
    train, test = digits_source("train"), digits_source("test")
    assert len(train.labels) + len(test.labels) == 1797
    from sklearn.datasets import load_digits

    full = load_digits().images
    # every digit image of the test half is found in the source at an index not used by the train half
    tr = {np.clip(im * 255 / 16, 0, 255).astype(np.uint8).tobytes() for im in full}
    assert all(im.tobytes() in tr for im in test.images[:20])
    assert len(set(train.images[i].tobytes() for i in range(len(train.labels)))
               & set(test.images[i].tobytes() for i in range(len(test.labels)))) < 20  # only duplicates in sklearn


def test_digits_anomaly_labels():
    ds = build_dataset("digits", "anomaly", num_images=4, **SMALL)
    assert ds.classes == ["known", "anomaly"]
    for i in range(len(ds)):
        label = ds.load_label(i)
        assert set(np.unique(label)) <= {0, 1, 255}
        assert (label == 1).any() and (label == 255).any()
        assert np.all(ds.semantic_label(i)[label == 1] == 255)


def test_digits_deterministic_and_workers():
    a = build_dataset("digits", "val", num_images=4, seed=1, **SMALL)
    b = build_dataset("digits", "val", num_images=4, seed=1, **SMALL)
    for (xa, ya), (xb, yb) in zip(DataLoader(a, batch_size=2), DataLoader(b, batch_size=2, num_workers=2)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@needs_fashion
def test_fashion_classes_and_splits():
    ds = build_dataset("fashion", "train", num_images=20, **SMALL)
    assert ds.classes == ["background"] + [c for c in FASHION_CLASSES if c not in ("Bag", "Ankle boot")]
    assert len(ds.source.labels) == 60000
    labels = np.concatenate([ds.load_label(i).ravel() for i in range(len(ds))])
    assert labels.max() <= 8 and 255 not in labels  # Bag and Ankle boot never in training scenes
    val = build_dataset("fashion", "val", num_images=2, **SMALL)
    assert len(val.source.labels) == 10000


@needs_fashion
def test_fashion_anomaly_has_held_out_garments():
    ds = build_dataset("fashion", "anomaly", num_images=4, **SMALL)
    for i in range(len(ds)):
        assert set(np.unique(ds.load_label(i))) <= {0, 1, 255}
    assert any((ds.load_label(i) == 1).any() for i in range(len(ds)))


def test_digits_disk_cache_is_shared_across_lengths(tmp_path):
    a = build_dataset("digits", "anomaly", num_images=3, cache_dir=tmp_path, **SMALL)
    a.preload()
    assert len(list(a.cache_dir.glob("*.npz"))) == 3
    b = build_dataset("digits", "anomaly", num_images=5, cache_dir=tmp_path, **SMALL)
    assert b.cache_dir == a.cache_dir
    np.testing.assert_array_equal(a.load(2)[0], b.load(2)[0])
    b.load(4)
    assert len(list(a.cache_dir.glob("*.npz"))) == 4


@pytest.mark.parametrize("kw, message", [
    (dict(image_size="32"), r"image_size must be a positive int or a \(height, width\) pair of positive ints, "
                            r"got '32'"),
    (dict(image_size=32.0), r"image_size must be .* got 32.0"),
    (dict(num_images="4"), "num_images must be a positive int, got '4'"),
    (dict(objects=3), r"objects must be a \(min, max\) pair with 1 <= min <= max, got 3"),
    (dict(objects=["a", "b"]), r"objects must be a \(min, max\) pair with 1 <= min <= max, got \['a', 'b'\]"),
    (dict(void_width=-2), "void_width must be an int >= 0, got -2"),
    (dict(transform="mmseg"), "transform must be None or a callable"),
])
def test_digits_bad_options_are_refused_at_construction(kw, message):
    with pytest.raises(ValueError, match=message):
        build_dataset("digits", "val", **kw)


def test_digits_scenes_draw_the_object_range_and_one_or_two_held_out_sprites(monkeypatch):
    from gmmseg_core.data import composites

    counts = {"val": [], "anomaly": []}           # (known, held-out) sprites per scene
    original = composites.compose

    def compose(h, w, rng, source, ids):
        held = int(np.isin(source.labels[ids], [8, 9]).sum())
        counts[split].append((len(ids) - held, held))
        return original(h, w, rng, source, ids)

    monkeypatch.setattr(composites, "compose", compose)
    for split in counts:
        ds = build_dataset("digits", split, num_images=30, cache=False, objects=(2, 4), **SMALL)
        for i in range(len(ds)):
            ds.load(i)
    assert {k for k, _ in counts["val"]} == {2, 3, 4} and {h for _, h in counts["val"]} == {0}
    assert {k for k, _ in counts["anomaly"]} == {2, 3, 4} and {h for _, h in counts["anomaly"]} == {1, 2}


def test_digits_seeds_and_splits_give_different_scenes():
    a = build_dataset("digits", "val", num_images=1, seed=0, **SMALL)
    b = build_dataset("digits", "val", num_images=1, seed=1, **SMALL)
    c = build_dataset("digits", "anomaly", num_images=1, seed=0, **SMALL)
    assert not np.array_equal(a.load(0)[0], b.load(0)[0]) and not np.array_equal(a.load(0)[0], c.load(0)[0])


def test_digits_validation_and_anomaly_scenes_draw_from_the_held_back_half():
    for split in ("val", "anomaly"):
        assert build_dataset("digits", split, num_images=1, **SMALL).source is digits_source("test")
    assert build_dataset("digits", "train", num_images=1, **SMALL).source is digits_source("train")

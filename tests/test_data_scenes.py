import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gmmseg_core.data import build_dataset
from gmmseg_core.data.base import ANOMALY_PALETTE
from gmmseg_core.data.scenes import CLASSES, SceneDataset, anomaly_label

SMALL = dict(image_size=(32, 64))


def test_item_shapes_dtypes_and_ranges():
    ds = build_dataset("scenes", "train", num_images=4, **SMALL)
    image, label = ds[0]
    assert image.shape == (3, 32, 64) and image.dtype == torch.float32
    assert label.shape == (32, 64) and label.dtype == torch.int64
    assert ds.classes == CLASSES and ds.num_classes == 8 and ds.ignore_index == 255
    assert ds.palette.shape == (8, 3) and ds.palette.dtype == np.uint8
    raw, _ = ds.load(0)
    back = ds.denormalize(image)
    assert back.min() >= 0 and back.max() <= 1
    # denormalize undoes the normalisation up to uint8 rounding
    np.testing.assert_allclose(back.permute(1, 2, 0).numpy() * 255, raw.astype(np.float32), atol=0.6)


def test_default_size_and_counts():
    ds = SceneDataset("train")
    assert (ds.height, ds.width) == (64, 128) and len(ds) == 1000
    assert len(SceneDataset("val")) == 200 and len(SceneDataset("anomaly")) == 200
    assert SceneDataset("val", image_size=48).height == 48
    assert (SceneDataset("val", height=40, width=72).height, SceneDataset("val", height=40, width=72).width) == (
        40, 72)


def test_every_class_occurs_and_no_void_in_closed_set():
    ds = build_dataset("scenes", "train", num_images=24, **SMALL)
    labels = np.stack([ds.load_label(i) for i in range(len(ds))])
    assert set(np.unique(labels)) == set(range(len(CLASSES)))


def test_deterministic_across_instances_and_order():
    a = build_dataset("scenes", "val", num_images=6, seed=3, **SMALL)
    b = build_dataset("scenes", "val", num_images=6, seed=3, cache=False, **SMALL)
    for i in (5, 0, 3):
        assert np.array_equal(a.load(i)[0], b.load(i)[0]) and np.array_equal(a.load(i)[1], b.load(i)[1])
    c = build_dataset("scenes", "val", num_images=6, seed=4, **SMALL)
    assert not np.array_equal(a.load(0)[0], c.load(0)[0])
    train = build_dataset("scenes", "train", num_images=6, seed=3, **SMALL)
    assert not np.array_equal(a.load(0)[0], train.load(0)[0])


def test_dataloader_workers_give_identical_items():
    ds = build_dataset("scenes", "train", num_images=6, **SMALL)
    fresh = build_dataset("scenes", "train", num_images=6, **SMALL)
    seq = list(DataLoader(ds, batch_size=3, num_workers=0))
    par = list(DataLoader(fresh, batch_size=3, num_workers=2))
    for (xa, ya), (xb, yb) in zip(seq, par):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("split", ["anomaly", "anomaly_near"])
def test_anomaly_splits_have_all_three_labels(split):
    ds = build_dataset("scenes", split, num_images=4, **SMALL)
    assert ds.classes == ["known", "anomaly"] and ds.num_classes == 2
    np.testing.assert_array_equal(ds.palette, ANOMALY_PALETTE)
    for i in range(len(ds)):
        label = ds.load_label(i)
        assert set(np.unique(label)) == {0, 1, 255}
        semantic = ds.semantic_label(i)
        assert np.all(semantic[label == 1] == 255)  # no closed-set class under an anomaly
        assert set(np.unique(semantic[label == 0])) <= set(range(len(CLASSES)))


def test_anomaly_objects_never_in_closed_set_splits():
    # closed-set images are drawn without any anomaly: every pixel carries one of the 8 classes
    for split in ("train", "val"):
        ds = build_dataset("scenes", split, num_images=8, **SMALL)
        for i in range(len(ds)):
            assert ds.load_label(i).max() < len(CLASSES)


def test_void_band_surrounds_anomaly_border():
    mask = np.zeros((12, 12), dtype=bool)
    mask[4:8, 4:8] = True
    label = anomaly_label(mask, void_width=2)
    assert np.all(label[4:8, 4:8] == 1)
    assert np.all(label[2:10, 2:10][~mask[2:10, 2:10]] == 255)
    assert label[1, 1] == 0 and label[0, 6] == 0 and label[11, 11] == 0


def test_disk_cache_roundtrip(tmp_path):
    a = build_dataset("scenes", "anomaly", num_images=2, cache_dir=tmp_path, **SMALL)
    items = [a.load(i) for i in range(2)]
    assert len(list(tmp_path.rglob("*.npz"))) == 2
    b = build_dataset("scenes", "anomaly", num_images=2, cache_dir=tmp_path, **SMALL)
    for i in range(2):
        assert np.array_equal(items[i][0], b.load(i)[0]) and np.array_equal(items[i][1], b.load(i)[1])


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="unknown split 'test'.*train, val, anomaly, anomaly_near"):
        build_dataset("scenes", "test")
    with pytest.raises(ValueError, match="num_images must be a positive int, got 0"):
        build_dataset("scenes", "train", num_images=0)
    with pytest.raises(ValueError, match="image size must be at least 16"):
        build_dataset("scenes", "train", image_size=8)
    with pytest.raises(IndexError, match="index must be in"):
        build_dataset("scenes", "val", num_images=2, **SMALL)[2]


PAIR = r"a positive int or a \(height, width\) pair of positive ints"


@pytest.mark.parametrize("kw, message", [
    (dict(image_size=32.0), f"image_size must be {PAIR}, got 32.0"),
    (dict(image_size="abc"), f"image_size must be {PAIR}, got 'abc'"),
    (dict(image_size="32"), f"image_size must be {PAIR}, got '32'"),
    (dict(image_size=[32, 32, 3]), rf"image_size must be {PAIR}, got \[32, 32, 3\]"),
    (dict(image_size=[32, -32]), rf"image_size must be {PAIR}, got \[32, -32\]"),
    (dict(image_size=[32.0, 64.0]), rf"image_size must be {PAIR}, got \[32.0, 64.0\]"),
    (dict(image_size=True), f"image_size must be {PAIR}, got True"),
    (dict(image_size=0), f"image_size must be {PAIR}, got 0"),
    (dict(height="40"), "height must be a positive int, got '40'"),
    (dict(width=64.5), "width must be a positive int, got 64.5"),
    (dict(num_images="abc"), "num_images must be a positive int, got 'abc'"),
    (dict(num_images=2.5), "num_images must be a positive int, got 2.5"),
    (dict(void_width=-1), "void_width must be an int >= 0, got -1"),
    (dict(seed="x"), "seed must be an int >= 0, got 'x'"),
    (dict(transform="mmseg"), r"transform must be None or a callable transform\(image, label, rng\) -> "
                              r"\(image, label\), got 'mmseg'"),
])
def test_bad_options_are_refused_at_construction(kw, message):
    with pytest.raises(ValueError, match=message):
        build_dataset("scenes", "train", **kw)


@pytest.mark.parametrize("size", [[32, 48], (32, 48), np.array([32, 48]), [np.int64(32), 48]])
def test_image_size_pairs(size):
    ds = SceneDataset("val", image_size=size, num_images=np.int64(2))
    assert (ds.height, ds.width, len(ds)) == (32, 48, 2)
    assert (SceneDataset("val", image_size=np.int64(32)).height, SceneDataset("val", image_size=40).width) == (32, 40)


def test_novel_textures_only_in_anomaly_splits(monkeypatch):
    from gmmseg_core.data import textures

    assert not set(textures.KNOWN_PHOTOS) & set(textures.NOVEL_PHOTOS)
    used = []
    original = textures.photo
    monkeypatch.setattr(textures, "photo", lambda name, zoom=1.0: used.append(name) or original(name, zoom))
    for split in ("train", "val"):
        ds = build_dataset("scenes", split, num_images=12, cache=False, **SMALL)
        for i in range(len(ds)):
            ds.load(i)
    assert used and set(used) <= set(textures.KNOWN_PHOTOS)
    used.clear()
    ds = build_dataset("scenes", "anomaly", num_images=12, cache=False, **SMALL)
    for i in range(len(ds)):
        ds.load(i)
    assert set(used) & set(textures.NOVEL_PHOTOS)


def test_strided_texture_windows_that_wrap_keep_their_step():
    from gmmseg_core.data import textures

    tex = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)
    for seed in range(60):                      # windows that wrap around the 256-px texture exactly once
        for h, step in ((129, 3.0), (257, 2.0), (64, 1.0)):
            rng = np.random.default_rng(seed)
            r0, c0 = np.random.default_rng(seed).integers(0, 256, 2)
            rows = (r0 + (np.arange(h) * step).astype(np.int64)) % 256
            cols = (c0 + (np.arange(h) * step).astype(np.int64)) % 256
            np.testing.assert_array_equal(textures.crop(tex, h, h, rng, step), tex[np.ix_(rows, cols)])


def test_default_void_band_grows_with_the_height():
    assert build_dataset("scenes", "anomaly", num_images=1, image_size=(64, 128)).void_width == 2
    assert build_dataset("scenes", "anomaly", num_images=1, image_size=(128, 128)).void_width == 4
    assert build_dataset("scenes", "anomaly", num_images=1, image_size=(16, 32)).void_width == 1


@pytest.mark.parametrize("split, near", [("anomaly", False), ("anomaly_near", True)])
def test_near_anomalies_are_novel_vehicles_and_persons_far_ones_other_objects(monkeypatch, split, near):
    from gmmseg_core.data import scenes

    drawn = []

    def recording(name, draw):
        def wrapper(c, x, y, *args, **kw):
            if kw.get("cls", scenes.ANOMALY_CODE if name in scenes.ANOMALY_DRAWERS else None) == scenes.ANOMALY_CODE:
                drawn.append(name)
            return draw(c, x, y, *args, **kw)
        return wrapper

    monkeypatch.setattr(scenes, "draw_vehicle", recording("vehicle", scenes.draw_vehicle))
    monkeypatch.setattr(scenes, "draw_person", recording("person", scenes.draw_person))
    for name, draw in list(scenes.ANOMALY_DRAWERS.items()):
        monkeypatch.setitem(scenes.ANOMALY_DRAWERS, name, recording(name, draw))
    ds = build_dataset("scenes", split, num_images=6, cache=False, **SMALL)
    for i in range(len(ds)):
        ds.load(i)
    assert drawn and (set(drawn) <= {"vehicle", "person"}) == near
    assert not near or "vehicle" in drawn


def test_disk_cache_keeps_void_widths_apart(tmp_path):
    thin = build_dataset("scenes", "anomaly", num_images=1, void_width=1, cache_dir=tmp_path, **SMALL)
    wide = build_dataset("scenes", "anomaly", num_images=1, void_width=3, cache_dir=tmp_path, **SMALL)
    assert (thin.load_label(0) == 255).sum() < (wide.load_label(0) == 255).sum()


def test_texture_banks_are_the_same_in_every_process():
    from gmmseg_core.data import textures

    first = textures.noise_bank("fine")
    textures.noise_bank.cache_clear()               # what a fresh process (a spawned worker, a later run) draws
    assert all(np.array_equal(a, b) for a, b in zip(first, textures.noise_bank("fine")))


def test_photo_textures_are_rescaled_by_their_zoom():
    from gmmseg_core.data import textures

    base = textures.photo("brick")
    assert textures.photo("brick", 0.5).shape == tuple(round(s * 0.5) for s in base.shape)


@pytest.mark.parametrize("side", ["height", "width"])
def test_images_narrower_than_16_pixels_are_refused(side):
    with pytest.raises(ValueError, match="at least 16 x 16"):
        build_dataset("scenes", "val", num_images=1, **{side: 8})

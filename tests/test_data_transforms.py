import numpy as np
import pytest
import torch
from scipy import ndimage

from gmmseg_core.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, train_transforms
from gmmseg_core.data.transforms import (
    Compose,
    Pad,
    PhotoMetricDistortion,
    RandomCrop,
    RandomFlip,
    RandomResize,
    resize_label,
)


def _blocks(rng, h=40, w=56, classes=5):
    """A label of rectangular regions and an image whose red channel encodes the label (40 * class)."""
    label = np.zeros((h, w), np.int64)
    for _ in range(8):
        r, c = rng.integers(0, h - 8), rng.integers(0, w - 8)
        label[r:r + rng.integers(6, 20), c:c + rng.integers(6, 20)] = rng.integers(0, classes)
    image = np.zeros((h, w, 3), np.float32)
    image[..., 0] = label * 40.0
    image[..., 1] = np.arange(w)[None, :] * 2.0  # a horizontal ramp: reveals flips
    return image, label


def test_geometric_pipeline_keeps_image_and_label_aligned(rng):
    t = train_transforms(24, photometric=False)
    for seed in range(12):
        image, label = _blocks(rng)
        out_img, out_lab = t(image, label, np.random.default_rng(seed))
        assert out_img.shape == (24, 24, 3) and out_lab.shape == (24, 24)
        valid = out_lab != 255
        # away from region borders (where bilinear mixes neighbours) the image still encodes the label
        interior = valid & ndimage.binary_erosion(
            ndimage.generic_filter(out_lab, np.ptp, size=3, mode="nearest") == 0, iterations=1, border_value=0)
        derived = np.rint(out_img[..., 0] / 40.0)
        assert interior.sum() > 50
        np.testing.assert_array_equal(derived[interior], out_lab[interior])


def test_pipeline_pads_to_zero_after_normalisation(rng):
    # mmseg normalises, then pads with 0; here padding comes first, with the mean, so it ends at 0 just the same
    image, label = _blocks(rng)
    out_img, out_lab = train_transforms((64, 80), ratio_range=(1.0, 1.0), photometric=False)(
        image, label, np.random.default_rng(0))
    pad = np.zeros(out_lab.shape, bool)
    pad[40:], pad[:, 56:] = True, True
    assert np.all(out_lab[pad] == 255)
    normalised = (out_img[pad] / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(normalised, 0.0, atol=1e-6)


def test_labels_stay_in_the_valid_set(rng):
    t = train_transforms(32)
    for seed in range(8):
        image, label = _blocks(rng)
        label[:3] = 255
        _, out = t(image, label, np.random.default_rng(seed))
        assert set(np.unique(out)) <= set(np.unique(label)) | {255}


def test_resize_label_is_nearest():
    label = np.arange(12).reshape(3, 4)
    big = resize_label(label, (6, 8))
    np.testing.assert_array_equal(big, np.kron(label, np.ones((2, 2), np.int64)))
    np.testing.assert_array_equal(resize_label(big, (3, 4)), label)


def test_random_resize_ratio_range():
    image, label = np.zeros((20, 30, 3), np.float32), np.zeros((20, 30), np.int64)
    sizes = [RandomResize(None, (0.5, 2.0))(image, label, np.random.default_rng(s))[1].shape for s in range(30)]
    assert min(s[0] for s in sizes) >= 10 and max(s[0] for s in sizes) <= 40
    assert len(set(sizes)) > 5
    # mmseg img_scale: fit (long, short) = (60, 40) * ratio; ratio 1 -> 40 x 60 for a 20 x 30 image
    img, lab = RandomResize((60, 40), (1.0, 1.0))(image, label, np.random.default_rng(0))
    assert lab.shape == (40, 60) and img.shape == (40, 60, 3)


def test_cat_max_ratio_avoids_single_class_crops():
    label = np.zeros((64, 64), np.int64)
    label[20:36, 36:52] = 1  # a smaller second class
    image = np.zeros((64, 64, 3), np.float32)

    def ok_fraction(ratio):
        crop = RandomCrop(24, cat_max_ratio=ratio)
        good = 0
        for seed in range(60):
            _, lab = crop(image, label, np.random.default_rng(seed))
            _, counts = np.unique(lab, return_counts=True)
            good += len(counts) > 1 and counts.max() / counts.sum() < 0.75
        return good / 60

    assert ok_fraction(0.75) > ok_fraction(1.0) + 0.3


def test_flip_and_pad():
    image, label = np.zeros((4, 6, 3), np.float32), np.arange(24).reshape(4, 6)
    img, lab = RandomFlip(1.0)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(lab, label[:, ::-1])
    img, lab = Pad((6, 8))(image + 5, label)
    assert lab.shape == (6, 8) and np.all(lab[4:] == 255) and np.all(lab[:, 6:] == 255)
    assert np.all(img[4:] == 0) and np.all(img[:4, :6] == 5)
    img, _ = Pad((6, 8), pad_val=(1.0, 2.0, 3.0))(image + 5, label)              # one value per channel
    assert np.all(img[4:] == [1.0, 2.0, 3.0]) and np.all(img[:4, :6] == 5)


def test_photometric_distortion_changes_colours_only(rng):
    image = rng.uniform(0, 255, (10, 12, 3)).astype(np.float32)
    label = rng.integers(0, 4, (10, 12))
    changed = 0
    for seed in range(10):
        img, lab = PhotoMetricDistortion()(image, label, np.random.default_rng(seed))
        assert lab is label and img.shape == image.shape
        assert img.min() >= 0 and img.max() <= 255
        changed += not np.allclose(img, image)
    assert changed >= 7


def test_dataset_transform_is_reproducible_under_torch_seed():
    ds = build_dataset("scenes", "train", num_images=2, image_size=(32, 64), transform=train_transforms(24))
    torch.manual_seed(5)
    a = ds[0]
    torch.manual_seed(5)
    b = ds[0]
    c = ds[0]
    assert a[0].shape == (3, 24, 24) and a[1].shape == (24, 24)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="crop_size must be a positive int"):
        RandomCrop(0)
    with pytest.raises(ValueError, match="cat_max_ratio must be in"):
        RandomCrop(8, cat_max_ratio=0)
    with pytest.raises(ValueError, match="ratio_range must satisfy"):
        RandomResize(None, (2.0, 1.0))
    assert "RandomCrop" in repr(Compose([RandomCrop(4)]))


@pytest.mark.parametrize("crop_size", ["32", 32.0, [32, 32, 3], 0])
def test_sizes_are_positive_ints_or_pairs(crop_size):
    with pytest.raises(ValueError, match=r"crop_size must be a positive int or a \(height, width\) pair of positive "
                                         r"ints, got"):
        train_transforms(crop_size)


@pytest.mark.parametrize("shape, size", [((5, 7), (3, 4)), ((3, 4), (7, 9)), ((6, 10), (4, 15))])
def test_resize_label_samples_pixel_centres_like_the_image_resize(shape, size):
    label = np.arange(shape[0] * shape[1]).reshape(shape)
    exact = torch.nn.functional.interpolate(torch.from_numpy(label)[None, None].double(), size=size,
                                            mode="nearest-exact")[0, 0].long().numpy()
    np.testing.assert_array_equal(resize_label(label, size), exact)


def test_random_resize_fits_the_scale_keeping_the_aspect_and_rounds():
    image, label = np.zeros((20, 40, 3), np.float32), np.zeros((20, 40), np.int64)
    # long side 40 -> at most 60, short side 20 -> at most 40: the long side binds, factor 1.5
    img, lab = RandomResize((60, 40), (1.0, 1.0))(image, label, np.random.default_rng(0))
    assert lab.shape == (30, 60) and img.shape == (30, 60, 3)
    _, lab = RandomResize(None, (1.3, 1.3))(image[:5, :9], label[:5, :9], np.random.default_rng(0))
    # as mmseg: the target 6.5 x 11.7 is truncated to 6 x 11, the short side binds (factor 1.2), and mmcv rounds
    # 6.0 x 10.8 to the nearest
    assert lab.shape == (6, 11)


def _balanced_among_void(h=64, w=64):
    """Void (255) except every 8th row, which alternates classes 0 and 1: any 24 x 24 crop holds both equally."""
    label = np.full((h, w), 255, np.int64)
    label[::8] = np.arange(w) % 2
    return np.zeros((h, w, 3), np.float32), label


def test_cat_max_ratio_counts_labelled_pixels_only():
    image, label = _balanced_among_void()
    for seed in range(10):                  # balanced at the first try: the first box is kept, void or not
        _, got = RandomCrop(24, cat_max_ratio=0.75)(image, label, np.random.default_rng(seed))
        _, first = RandomCrop(24, cat_max_ratio=1.0)(image, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, first)


def test_train_transforms_pass_on_cat_max_ratio_and_flip_prob():
    image, label = _blocks(np.random.default_rng(0), h=40, w=40)
    label[:] = 0
    label[4:12, 4:12] = 1                  # a small second class: cat_max_ratio rejects most crops
    for ratio in (0.75, 1.0):
        for seed in range(5):
            piped = train_transforms(24, ratio_range=(1.0, 1.0), cat_max_ratio=ratio, flip_prob=0.0,
                                     photometric=False)(image, label, np.random.default_rng(seed))[1]
            rng = np.random.default_rng(seed)
            rng.uniform(1.0, 1.0)                           # the resize's draw
            direct = RandomCrop(24, cat_max_ratio=ratio)(image, label, rng)[1]
            np.testing.assert_array_equal(piped, direct)
    flipped = train_transforms(40, ratio_range=(1.0, 1.0), flip_prob=1.0, photometric=False)(
        image, np.arange(1600).reshape(40, 40), np.random.default_rng(0))[1]
    np.testing.assert_array_equal(flipped, np.arange(1600).reshape(40, 40)[:, ::-1])


def test_photometric_brightness_moves_both_ways_and_hue_wraps_around():
    grey = np.full((4, 4, 3), 128.0, np.float32)
    label = np.zeros((4, 4), np.int64)
    brightness_only = PhotoMetricDistortion(contrast_range=(1.0, 1.0), saturation_range=(1.0, 1.0), hue_delta=0)
    shifts = [brightness_only(grey, label, np.random.default_rng(s))[0].mean() - 128 for s in range(40)]
    assert min(shifts) < -5 and max(shifts) > 5
    red = np.zeros((4, 4, 3), np.float32)
    red[..., 0] = 255.0
    hue_only = PhotoMetricDistortion(brightness_delta=0, contrast_range=(1.0, 1.0), saturation_range=(1.0, 1.0))
    outs = [hue_only(red, label, np.random.default_rng(s))[0][0, 0] for s in range(40)]
    assert any(o[2] > 10 and o[1] < 1 for o in outs)         # red shifted below hue 0 turns towards magenta
    assert any(o[1] > 10 and o[2] < 1 for o in outs)         # ... and above it towards orange


def test_random_crop_draws_every_offset_edges_included():
    image, label = np.zeros((6, 7, 3), np.float32), np.arange(42).reshape(6, 7)
    corners = {int(RandomCrop((4, 4), cat_max_ratio=1.0)(image, label, np.random.default_rng(s))[1][0, 0])
               for s in range(200)}
    assert corners == {r * 7 + c for r in range(3) for c in range(4)}       # offsets 0..2 down, 0..3 across


def _mmcv_rescaled_hw(h, w, img_scale, ratio):
    """(h, w) after mmseg 0.x ``Resize(img_scale, ratio_range)`` with keep_ratio, written from its source:
    ``Resize.random_sample_ratio`` truncates the target, ``scale = int(img_scale[0] * ratio), int(img_scale[1] *
    ratio)`` (``img_scale`` is (w, h); the image's own (w, h) when it is None), then mmcv 1.x ``imrescale``:
    ``rescale_size`` takes ``scale_factor = min(max(scale) / max(h, w), min(scale) / min(h, w))`` and
    ``_scale_size`` rounds each side, ``int(w * scale_factor + 0.5), int(h * scale_factor + 0.5)``."""
    scale = (w, h) if img_scale is None else img_scale
    scale = int(scale[0] * ratio), int(scale[1] * ratio)
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


@pytest.mark.parametrize("shape, img_scale", [((1024, 2048), (2048, 1024)),      # Cityscapes
                                              ((512, 683), (2048, 512)),         # ADE20K, portrait and landscape
                                              ((683, 512), (2048, 512)),
                                              ((375, 500), None), ((97, 131), None)])
def test_random_resize_sizes_match_mmseg_and_mmcv(shape, img_scale):
    ours = RandomResize(None if img_scale is None else img_scale[::-1], (0.5, 2.0))  # ours is (h, w)
    ratios = np.random.default_rng(0).uniform(0.5, 2.0, 2000)
    for ratio in np.concatenate([ratios, np.arange(0.5, 2.0001, 1 / 1024)]):
        assert ours.output_size(shape, float(ratio)) == _mmcv_rescaled_hw(*shape, img_scale, float(ratio)), ratio


def test_random_resize_resizes_to_the_size_of_its_drawn_ratio():
    image, label = np.zeros((37, 50, 3), np.float32), np.zeros((37, 50), np.int64)
    resize = RandomResize((64, 128), (0.5, 2.0))
    sizes = set()
    for seed in range(20):
        ratio = np.random.default_rng(seed).uniform(0.5, 2.0)          # the transform's first draw
        img, lab = resize(image, label, np.random.default_rng(seed))
        assert lab.shape == img.shape[:2] == _mmcv_rescaled_hw(37, 50, (128, 64), ratio)
        sizes.add(lab.shape)
    assert len(sizes) > 10


def test_photometric_hue_shifts_are_mmsegs_integers_from_minus_18_to_17():
    from matplotlib.colors import rgb_to_hsv

    red = np.zeros((1, 1, 3), np.float32)
    red[..., 0] = 255.0                                       # hue 0, fully saturated: the output hue is the shift
    label = np.zeros((1, 1), np.int64)
    hue_only = PhotoMetricDistortion(brightness_delta=0, contrast_range=(1.0, 1.0), saturation_range=(1.0, 1.0))
    shifts = set()
    for seed in range(1500):
        hue = rgb_to_hsv(hue_only(red, label, np.random.default_rng(seed))[0] / 255.0)[0, 0, 0]
        step = hue * 180.0
        assert abs(step - round(step)) < 1e-3                 # whole steps of OpenCV's 180
        shifts.add((round(step) + 90) % 180 - 90)
    assert shifts == set(range(-18, 18))                      # numpy's randint(-18, 18): 18 itself is never drawn


def test_random_crop_keeps_the_eleventh_box_after_ten_rejected_ones_as_mmseg():
    label = np.full((30, 40), 3, np.int64)
    label[::2, ::2] = 255                       # one class besides void, which does not count: every box is rejected
    image = np.zeros((30, 40, 3), np.float32)
    image[..., 0] = np.arange(1200).reshape(30, 40)             # tells the boxes apart
    for seed in range(5):
        got = RandomCrop((8, 8), cat_max_ratio=0.75)(image, label, np.random.default_rng(seed))[0]
        rng = np.random.default_rng(seed)
        for _ in range(11):                                     # mmseg: one box, then up to 10 redraws
            r, c = int(rng.integers(0, 23)), int(rng.integers(0, 33))
        np.testing.assert_array_equal(got, image[r:r + 8, c:c + 8])


def test_train_transforms_are_mmsegs_steps_in_its_order_with_its_cityscapes_settings():
    # mmseg's cityscapes train_pipeline: Resize(img_scale=(2048, 1024), ratio_range=(0.5, 2.0)),
    # RandomCrop(crop_size, cat_max_ratio=0.75), RandomFlip(prob=0.5), PhotoMetricDistortion(), Normalize,
    # Pad(size=crop_size, pad_val=0, seg_pad_val=255)
    steps = train_transforms((512, 1024), scale=(1024, 2048)).transforms
    assert [type(s) for s in steps] == [RandomResize, RandomCrop, RandomFlip, PhotoMetricDistortion, Pad]
    resize, crop, flip, photo, pad = steps
    assert resize.scale == (1024, 2048) and resize.ratio_range == (0.5, 2.0)
    assert (crop.crop_size, crop.cat_max_ratio, crop.ignore_index) == ((512, 1024), 0.75, 255)
    assert flip.prob == 0.5
    assert (photo.brightness_delta, tuple(photo.contrast_range), tuple(photo.saturation_range),
            photo.hue_delta) == (32, (0.5, 1.5), (0.5, 1.5), 18)
    assert pad.size == (512, 1024) and pad.seg_pad_val == 255

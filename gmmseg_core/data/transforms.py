"""Training augmentations with MMSegmentation's defaults, applied identically to image and label.

Every transform is a callable ``t(image, label, rng) -> (image, label)`` on numpy arrays: ``image`` (H, W, 3)
float32 in 0..255 (RGB), ``label`` (H, W) int64; ``rng`` a ``numpy.random.Generator``. The dataset calls its
``transform`` with a generator seeded from torch (reproducible under ``torch.manual_seed`` with any number of
DataLoader workers) and normalises the image afterwards, so a pipeline ends in 0..255 image space.

:func:`train_transforms` builds mmseg's standard pipeline: random resize (ratio 0.5-2.0), random crop with
``cat_max_ratio=0.75``, horizontal flip (p=0.5), photometric distortion, pad (image 0, label 255).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import IGNORE_INDEX, IMAGENET_MEAN, check_size_pair


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (H, W, 3) float32 to ``size`` (h, w) (half-pixel centres, like OpenCV)."""
    if image.shape[:2] == tuple(size):
        return image
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=False)
    return out[0].permute(1, 2, 0).numpy()


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (H, W) labels to ``size`` (h, w); only existing values are produced."""
    h, w = label.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomResize:
    """Rescale by a ratio drawn uniformly from ``ratio_range`` (mmseg ``Resize(img_scale, ratio_range)``).

    With ``scale=(h, w)`` the image is fitted (aspect kept) into ``scale * ratio`` (long side to the long side,
    short to the short, as mmseg does); with ``scale=None`` its own size is multiplied by the ratio. The output
    size follows mmseg 0.x and mmcv 1.x to the pixel (see :meth:`output_size`).
    """

    def __init__(self, scale=None, ratio_range=(0.5, 2.0)):
        self.scale = None if scale is None else check_size_pair("scale", scale)
        lo, hi = ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {ratio_range}")
        self.ratio_range = (float(lo), float(hi))

    def output_size(self, shape, ratio: float) -> tuple[int, int]:
        """The (h, w) an image of ``shape`` (h, w) is rescaled to at ``ratio``.

        As mmseg's ``Resize.random_sample_ratio`` then ``mmcv.imrescale``: the target scale (``scale``, or the
        image's own size) times the ratio is truncated to ints, the image is fitted into it keeping its aspect
        (factor ``min(long target / long side, short target / short side)``), and each side becomes
        ``int(side * factor + 0.5)``.
        """
        h, w = shape
        base = (h, w) if self.scale is None else self.scale
        target = (int(base[0] * ratio), int(base[1] * ratio))
        factor = min(max(target) / max(h, w), min(target) / min(h, w))
        return max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)

    def __call__(self, image, label, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        size = self.output_size(label.shape, rng.uniform(*self.ratio_range))
        return resize_image(image, size), resize_label(label, size)

    def __repr__(self) -> str:
        return f"RandomResize(scale={self.scale}, ratio_range={self.ratio_range})"


class RandomCrop:
    """Random crop of ``crop_size``; retried up to ``max_tries`` times until no class covers more than
    ``cat_max_ratio`` of the crop's valid pixels (mmseg ``RandomCrop``). Images smaller than the crop are
    cropped to their own size on that side (pad afterwards)."""

    def __init__(self, crop_size, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX,
                 max_tries: int = 10):
        self.crop_size = check_size_pair("crop_size", crop_size)
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = ignore_index
        self.max_tries = int(max_tries)

    def _box(self, shape, rng):
        mh, mw = max(shape[0] - self.crop_size[0], 0), max(shape[1] - self.crop_size[1], 0)
        r, c = int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
        return slice(r, r + self.crop_size[0]), slice(c, c + self.crop_size[1])

    def __call__(self, image, label, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        box = self._box(label.shape, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                crop = label[box]
                _, counts = np.unique(crop[crop != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._box(label.shape, rng)
        return image[box], label[box]

    def __repr__(self) -> str:
        return f"RandomCrop(crop_size={self.crop_size}, cat_max_ratio={self.cat_max_ratio})"


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob = float(prob)

    def __call__(self, image, label, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        if rng.random() < self.prob:
            return image[:, ::-1], label[:, ::-1]
        return image, label

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"


def _rgb_to_hsv(rgb):
    from matplotlib.colors import rgb_to_hsv

    return rgb_to_hsv(np.clip(rgb / 255.0, 0, 1))


def _hsv_to_rgb(hsv):
    from matplotlib.colors import hsv_to_rgb

    return hsv_to_rgb(hsv) * 255.0


class PhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion``: each step with probability 0.5, values clipped to 0..255.

    Brightness (add a delta in [-32, 32]); contrast (multiply by [0.5, 1.5]) either first or last (an even
    draw, as mmseg's ``mode``); saturation (multiply S by [0.5, 1.5]); hue (shift by an integer in [-18, 17] of
    180 steps, OpenCV's 8-bit hue: mmseg draws it with numpy's ``randint(-hue_delta, hue_delta)``, whose upper
    bound is exclusive). The label is untouched.

    Deliberate deviation: the steps compute in float32, where mmseg works on uint8 images, truncating to
    integers after every step and converting to HSV and back through OpenCV's 8-bit tables (twice when both
    saturation and hue apply, H in 2-degree steps). The values differ by that rounding, a few grey levels at
    most, not in distribution.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                 hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def __call__(self, image, label, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        img = np.asarray(image, dtype=np.float32)
        if rng.integers(2):
            img = np.clip(img + rng.uniform(-self.brightness_delta, self.brightness_delta), 0, 255)
        contrast_first = rng.integers(2) == 1
        if contrast_first and rng.integers(2):
            img = np.clip(img * rng.uniform(*self.contrast_range), 0, 255)
        sat, hue = rng.integers(2), rng.integers(2)
        if sat or hue:
            hsv = _rgb_to_hsv(img)
            if sat:
                hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*self.saturation_range), 0, 1)
            if hue:
                shift = int(rng.integers(-self.hue_delta, self.hue_delta)) if self.hue_delta else 0
                hsv[..., 0] = (hsv[..., 0] + shift / 180.0) % 1.0
            img = np.clip(_hsv_to_rgb(hsv), 0, 255).astype(np.float32)
        if not contrast_first and rng.integers(2):
            img = np.clip(img * rng.uniform(*self.contrast_range), 0, 255)
        return img, label

    def __repr__(self) -> str:
        return "PhotoMetricDistortion()"


class Pad:
    """Pad bottom / right up to ``size`` with ``pad_val`` (image: one value, or one per channel) and
    ``seg_pad_val`` (label, 255)."""

    def __init__(self, size, pad_val=0.0, seg_pad_val: int = IGNORE_INDEX):
        self.size = check_size_pair("size", size)
        self.pad_val, self.seg_pad_val = pad_val, seg_pad_val

    def __call__(self, image, label, rng=None):
        h, w = label.shape
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph or pw:
            padded = np.empty((h + ph, w + pw) + image.shape[2:], dtype=image.dtype)
            padded[...] = self.pad_val
            padded[:h, :w] = image
            image = padded
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.seg_pad_val)
        return image, label

    def __repr__(self) -> str:
        return f"Pad(size={self.size})"


def train_transforms(crop_size, scale=None, ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75,
                     flip_prob: float = 0.5, photometric: bool = True, ignore_index: int = IGNORE_INDEX) -> Compose:
    """mmseg's default training pipeline (normalisation is done by the dataset afterwards).

    The steps, their order and their parameters are mmseg's (``Resize``, ``RandomCrop``, ``RandomFlip``,
    ``PhotoMetricDistortion``, ``Normalize``, ``Pad``); so are the resized sizes (see
    :meth:`RandomResize.output_size`). Deliberate deviations, none of which changes what is drawn:

    - mmseg normalises before it pads with 0; here the dataset normalises after, so the image is padded with the
      ImageNet mean (0..255), which the normalisation turns into 0 (up to float rounding).
    - The image stays float32 throughout: mmseg rounds the resized image to uint8 and truncates after every
      photometric step (see :class:`PhotoMetricDistortion`).
    - The label's nearest-neighbour resize samples at pixel centres, aligned with the bilinear image resize;
      mmcv's ``nearest`` (OpenCV's ``INTER_NEAREST``) takes source pixel ``floor(i * in / out)``, up to half a
      source pixel off.

    Parameters
    ----------
    crop_size : int or (int, int)
        Output size (h, w); smaller images are padded (label 255).
    scale : (int, int), optional
        mmseg ``img_scale`` (e.g. (2048, 1024) for Cityscapes, (2048, 512) for ADE20K); None rescales relative
        to the image's own size.
    ratio_range, cat_max_ratio, flip_prob, photometric
        As in mmseg's configs.
    """
    steps = [RandomResize(scale, ratio_range), RandomCrop(crop_size, cat_max_ratio, ignore_index),
             RandomFlip(flip_prob)]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps.append(Pad(crop_size, tuple(255.0 * m for m in IMAGENET_MEAN), ignore_index))
    return Compose(steps)

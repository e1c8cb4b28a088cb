"""Texture banks for the generated datasets: scikit-image's bundled photographs and procedural noise.

Every texture is a float32 grey map in [0, 1], contrast-stretched, computed once per process (cached) and cropped
with wrap-around so any output size works. Only photographs that ship inside the scikit-image wheel are used
(no download). The photographs are split into a *known* set, used to draw the closed-set classes, and a *novel*
set used only for anomaly objects, so an anomaly's texture never occurs in a training image.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from scipy import ndimage

# Photographs used for the closed-set classes (train / val) ...
KNOWN_PHOTOS = ("brick", "grass", "gravel")
# ... and those reserved for anomaly objects.
NOVEL_PHOTOS = ("moon", "coins", "cell", "chelsea", "coffee", "immunohistochemistry", "hubble_deep_field",
                "camera")

_NOISE_SIZE = 256
_NOISE_BANK = 6


def _frozen(a: np.ndarray) -> np.ndarray:
    """Cached banks are shared (and crops may be views of them): make them read-only."""
    a = a.astype(np.float32, copy=False)
    a.flags.writeable = False
    return a


@cache
def _photo_base(name: str) -> np.ndarray:
    import skimage.color
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 3:
        img = skimage.color.rgb2gray(img[..., :3])
    img = img.astype(np.float32)
    lo, hi = np.percentile(img, [1, 99])
    return _frozen(np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0))


@cache
def photo(name: str, zoom: float = 1.0) -> np.ndarray:
    """Grey photograph ``name`` from ``skimage.data`` rescaled by ``zoom``, float32 (h, w) in [0, 1]."""
    if name not in KNOWN_PHOTOS + NOVEL_PHOTOS:
        raise ValueError(f"photo name must be one of {KNOWN_PHOTOS + NOVEL_PHOTOS}, got {name!r}")
    base = _photo_base(name)
    if abs(zoom - 1.0) < 1e-3:
        return base
    from skimage.transform import rescale

    out = rescale(base, zoom, anti_aliasing=zoom < 1, order=1, preserve_range=True)
    return _frozen(np.ascontiguousarray(out, dtype=np.float32))


def _fractal(rng: np.random.Generator, size: int, base_cells: int, octaves: int, persistence: float) -> np.ndarray:
    out = np.zeros((size, size), dtype=np.float32)
    amp, cells, total = 1.0, base_cells, 0.0
    for _ in range(octaves):
        grid = rng.random((cells, cells)).astype(np.float32)
        out += amp * ndimage.zoom(grid, size / cells, order=3, mode="grid-wrap", grid_mode=True)
        total += amp
        amp *= persistence
        cells *= 2
    out /= total
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-6)


@cache
def noise_bank(kind: str) -> tuple[np.ndarray, ...]:
    """Tileable procedural noise maps, float32 (256, 256) in [0, 1], fixed seed.

    ``kind``: ``"fine"`` (high-frequency grain), ``"blobs"`` (foliage / clouds), ``"smooth"`` (slow shading).
    """
    params = {"fine": (32, 3, 0.6), "blobs": (8, 4, 0.55), "smooth": (4, 2, 0.5)}
    if kind not in params:
        raise ValueError(f"kind must be one of {sorted(params)}, got {kind!r}")
    rng = np.random.default_rng([7, len(kind), ord(kind[0])])
    return tuple(_frozen(_fractal(rng, _NOISE_SIZE, *params[kind])) for _ in range(_NOISE_BANK))


@cache
def gaussian_bank() -> np.ndarray:
    """Standard normal noise (256, 256, 3) float32, fixed seed: cropped for sensor noise (faster than drawing)."""
    return _frozen(np.random.default_rng(11).standard_normal((_NOISE_SIZE, _NOISE_SIZE, 3)).astype(np.float32))


def crop(tex: np.ndarray, h: int, w: int, rng: np.random.Generator, step: float = 1.0) -> np.ndarray:
    """Random (h, w) window of ``tex`` ((th, tw) or (th, tw, C)) with wrap-around; ``step`` texture pixels per
    output pixel. May be a read-only view: do not modify in place."""
    th, tw = tex.shape[:2]
    r0, c0 = rng.integers(0, th), rng.integers(0, tw)
    rows = (r0 + (np.arange(h) * step).astype(np.int64)) % th
    cols = (c0 + (np.arange(w) * step).astype(np.int64)) % tw
    # a window without stride or wrap-around is a slice (a strided one can wrap to the same span: not a slice)
    if step == 1 and r0 + h <= th and c0 + w <= tw:
        return tex[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return tex.take(rows, axis=0).take(cols, axis=1)


def noise(kind: str, h: int, w: int, rng: np.random.Generator, step: float = 1.0) -> np.ndarray:
    """Random (h, w) crop of a random map of the ``kind`` noise bank."""
    bank = noise_bank(kind)
    return crop(bank[rng.integers(len(bank))], h, w, rng, step)

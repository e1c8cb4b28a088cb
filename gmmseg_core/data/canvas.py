"""The drawing surface of the generated scenes: an image, its label map and the street geometry.

Masks are boolean arrays the size of the current view; fills are colours (3,) or pictures (h, w, 3) in 0..1.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import numpy as np
from skimage.draw import polygon as _polygon

from . import textures as tx
from .base import IGNORE_INDEX


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False  # shared by every canvas of this size
    return yy, xx


class Canvas:
    """An image (H, W, 3) float in 0..1 being painted, its label map (H, W) and the scene geometry.

    ``h`` and ``w`` are always the full image size (objects scale with them); :meth:`local` returns a view of a
    window (``shape``, origin ``oy, ox``) so that small objects are drawn at the cost of their own size. All
    coordinates are full-image coordinates; ``yy`` / ``xx`` hold them for the view's pixels.
    """

    def __init__(self, h: int, w: int, rng: np.random.Generator):
        self.h, self.w, self.rng = h, w, rng
        self.shape, self.oy, self.ox = (h, w), 0, 0
        self.image = np.zeros((h, w, 3), dtype=np.float32)
        self.label = np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
        self.yy, self.xx = _grid(h, w)
        self.styles: dict[int, np.ndarray] = {}
        self.zoom = min(1.0, h / 128.0)  # texture scale: photo textures at about 128 px per image height
        # perspective: horizon row, vanishing point, road and sidewalk edges
        self.horizon = h * rng.uniform(0.36, 0.48)
        self.vx = w * rng.uniform(0.38, 0.62)
        self.road_left = w * rng.uniform(-0.3, 0.12)
        self.road_right = w * rng.uniform(0.88, 1.3)
        self.outer_left = self.horizon + (h - self.horizon) * rng.uniform(0.3, 0.6)
        self.outer_right = self.horizon + (h - self.horizon) * rng.uniform(0.3, 0.6)

    # geometry ------------------------------------------------------------------------------------------------
    def depth(self, y: float) -> float:
        """Perspective scale in (0, 1] of an object standing on row ``y`` (1 at the bottom row)."""
        return float(np.clip((y - self.horizon) / (self.h - self.horizon), 0.02, 1.2))

    def road_edges(self, y: float) -> tuple[float, float]:
        t = (y - self.horizon) / (self.h - self.horizon)
        return self.vx + (self.road_left - self.vx) * t, self.vx + (self.road_right - self.vx) * t

    def ground_top(self) -> np.ndarray:
        """Row (per column, (W,)) above which the ground (sidewalk) ends and facades begin."""
        x = np.arange(self.w, dtype=np.float32)
        left = self.horizon + (self.outer_left - self.horizon) * (self.vx - x) / self.vx
        right = self.horizon + (self.outer_right - self.horizon) * (x - self.vx) / max(self.w - self.vx, 1)
        return np.where(x <= self.vx, left, right)

    def local(self, x0: float, y0: float, x1: float, y1: float) -> Canvas | None:
        """A view of the window [x0, x1) x [y0, y1) (full-image coordinates); None if it is off the image."""
        r0, r1 = max(int(np.floor(y0)), self.oy), min(int(np.ceil(y1)), self.oy + self.shape[0])
        c0, c1 = max(int(np.floor(x0)), self.ox), min(int(np.ceil(x1)), self.ox + self.shape[1])
        if r1 <= r0 or c1 <= c0:
            return None
        sub = copy.copy(self)
        rows, cols = slice(r0 - self.oy, r1 - self.oy), slice(c0 - self.ox, c1 - self.ox)
        sub.image, sub.label = self.image[rows, cols], self.label[rows, cols]
        sub.yy, sub.xx = self.yy[rows, cols], self.xx[rows, cols]
        sub.shape, sub.oy, sub.ox = (r1 - r0, c1 - c0), r0, c0
        return sub

    # painting ------------------------------------------------------------------------------------------------
    def paint(self, mask: np.ndarray, fill, cls: int | None = None, gain=None, box=None) -> np.ndarray:
        """Paint ``fill`` ((3,) colour or (H, W, 3) picture, times ``gain``) where ``mask``.

        The label is set to ``cls`` there unless it is None. ``box`` (a pair of slices) may give a window known
        to contain the mask. Returns ``mask``.
        """
        if box is not None:
            pass
        elif mask.size <= 1024:  # small views: the bounding-box search would cost more than it saves
            box = (slice(None), slice(None))
        else:
            rows = np.flatnonzero(mask.any(axis=1))
            if rows.size == 0:
                return mask
            cols = np.flatnonzero(mask.any(axis=0))
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # work on the bounding box only
        sub = mask[box]
        fill = np.asarray(fill, dtype=np.float32)
        fill = fill if fill.ndim == 1 else fill[box]
        if gain is not None:
            fill = fill * np.asarray(gain, dtype=np.float32)
        np.copyto(self.image[box], fill, where=sub[..., None])
        if cls is not None:
            self.label[box][sub] = cls
        return mask

    def polygon(self, points, convex: bool = True) -> np.ndarray:
        """Boolean mask of the polygon with vertices ``[(x, y), ...]`` (pixel centres at integer coordinates).

        Convex polygons are rasterised as an intersection of half-planes over their bounding box (several times
        faster than a general point-in-polygon test); ``convex=False`` uses scikit-image's general one.
        """
        pts = np.asarray(points, dtype=np.float64)
        mask = np.zeros(self.shape, dtype=bool)
        if not convex:
            rr, cc = _polygon(pts[:, 1] - self.oy, pts[:, 0] - self.ox, shape=self.shape)
            mask[rr, cc] = True
            return mask
        xs, ys = pts[:, 0], pts[:, 1]
        r0, r1 = max(int(np.ceil(ys.min())), self.oy), min(int(np.floor(ys.max())) + 1, self.oy + self.shape[0])
        c0, c1 = max(int(np.ceil(xs.min())), self.ox), min(int(np.floor(xs.max())) + 1, self.ox + self.shape[1])
        if r1 <= r0 or c1 <= c0:
            return mask
        box = (slice(r0 - self.oy, r1 - self.oy), slice(c0 - self.ox, c1 - self.ox))
        yy, xx = self.yy[box], self.xx[box]
        nxt = pts[list(range(1, len(pts))) + [0]]
        sign = 1.0 if np.sum(xs * nxt[:, 1] - nxt[:, 0] * ys) >= 0 else -1.0
        inside = np.ones(yy.shape, dtype=bool)
        for (x0, y0), (x1, y1) in zip(pts.tolist(), nxt.tolist()):
            ex, ey = (x1 - x0) * sign, (y1 - y0) * sign
            if ex or ey:
                inside &= ex * (yy - y0) - ey * (xx - x0) >= -1e-6
        mask[box] = inside
        return mask

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        """Boolean mask of the axis-aligned ellipse (pixel centres strictly inside)."""
        rx, ry = max(rx, 0.6), max(ry, 0.6)
        mask = np.zeros(self.shape, dtype=bool)
        r0, r1 = max(int(np.ceil(cy - ry)), self.oy), min(int(np.floor(cy + ry)) + 1, self.oy + self.shape[0])
        c0, c1 = max(int(np.ceil(cx - rx)), self.ox), min(int(np.floor(cx + rx)) + 1, self.ox + self.shape[1])
        if r1 > r0 and c1 > c0:
            dy = ((np.arange(r0, r1, dtype=np.float32) - cy) / ry) ** 2
            dx = ((np.arange(c0, c1, dtype=np.float32) - cx) / rx) ** 2
            mask[r0 - self.oy:r1 - self.oy, c0 - self.ox:c1 - self.ox] = dy[:, None] + dx[None, :] < 1.0
        return mask

    def rect(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        mask = np.zeros(self.shape, dtype=bool)
        r0, r1 = max(int(np.floor(y0)) - self.oy, 0), max(int(np.ceil(y1)) - self.oy, 0)
        c0, c1 = max(int(np.floor(x0)) - self.ox, 0), max(int(np.ceil(x1)) - self.ox, 0)
        mask[r0:r1, c0:c1] = True
        return mask

    # fills ---------------------------------------------------------------------------------------------------
    def tinted(self, tex: np.ndarray, colour, contrast: float = 0.35) -> np.ndarray:
        """Grey texture (H, W) in [0, 1] -> colour picture (H, W, 3) modulated by the texture."""
        return np.asarray(colour, np.float32) * (1.0 - contrast + 2.0 * contrast * tex)[..., None]

    def photo(self, name: str, step: float = 1.0) -> np.ndarray:
        return tx.crop(tx.photo(name, self.zoom), *self.shape, self.rng, step)

    def noise(self, kind: str, step: float = 1.0) -> np.ndarray:
        return tx.noise(kind, *self.shape, self.rng, step * max(self.zoom, 0.25) * 2)

    def jitter(self, colour, amount: float = 0.06) -> np.ndarray:
        return np.clip(np.asarray(colour, np.float32) * (1 + self.rng.uniform(-amount, amount, 3)), 0, 1)

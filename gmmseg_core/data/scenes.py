"""``scenes``: procedurally generated street scenes, the package's embedded default dataset.

Each image is drawn from its own random generator seeded by ``(seed, split, index)``, so items do not depend on
the order they are requested in or on the DataLoader worker that draws them. Eight closed-set classes are laid
out like a road scene (sky on top, facades receding to a vanishing point, sidewalks, road at the bottom, vehicles,
persons and poles on them); every class has several clearly different appearance modes, so a class is
*multimodal* in pixel space, which is what a mixture of Gaussians per class is meant to capture:

==========  ===========================================================================
road        dark asphalt with lane markings | cobblestone (photo texture ``gravel``)
sidewalk    light paving tiles | beige concrete | reddish pavers
building    brick facade (photo ``brick``) | glass curtain wall | plaster with windows
vegetation  foliage crowns and hedges (noise) | lawns and bushes (photo ``grass``); trunks
sky         clear blue gradient | overcast clouds
vehicle     cars and vans; red, blue, white, black, silver, dark green; glossy or matte
person      dark coats | bright clothes; several skin tones
pole        metal grey | dark green | wooden brown; optional sign plate
==========  ===========================================================================

Global lighting (brightness, colour cast), cast shadows, blur and sensor noise make the classes overlap in colour.

Splits: ``train`` and ``val`` (closed set, labels 0..7), ``anomaly`` (road scenes with objects of kinds never seen
in training: boxes, tyres, animals, debris, in vivid colours and photo textures reserved for anomalies) and
``anomaly_near`` (vehicle- and person-shaped objects painted with the novel textures: harder). Anomaly labels are
0 = known, 1 = anomaly, 255 = void, with a void band ``void_width`` pixels wide just outside each object's border.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
from scipy import ndimage

from gmmseg_core._checks import check_int

from . import textures as tx
from .base import ANOMALY_CLASSES, ANOMALY_PALETTE, IGNORE_INDEX, GeneratedDataset, check_size_pair
from .canvas import Canvas

CLASSES = ["road", "sidewalk", "building", "vegetation", "sky", "vehicle", "person", "pole"]
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, VEHICLE, PERSON, POLE = range(len(CLASSES))
PALETTE = np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70], [107, 142, 35], [70, 130, 180],
                    [0, 0, 142], [220, 20, 60], [153, 153, 153]], dtype=np.uint8)
SPLITS = ("train", "val", "anomaly", "anomaly_near")
DEFAULT_NUM_IMAGES = {"train": 1000, "val": 200, "anomaly": 200, "anomaly_near": 200}
DEFAULT_IMAGE_SIZE = (64, 128)
_SPLIT_CODE = {"train": 11, "val": 23, "anomaly": 37, "anomaly_near": 41}
_VERSION = 2
ANOMALY_CODE = 254  # label painted by anomaly objects while drawing; becomes 1 (anomaly) / 255 (semantic)

# Closed-set colours (0..1 RGB). Anomaly colours below are deliberately absent from these lists.
VEHICLE_COLOURS = np.array([[0.62, 0.06, 0.06], [0.10, 0.18, 0.55], [0.88, 0.88, 0.86], [0.07, 0.07, 0.08],
                            [0.58, 0.60, 0.63], [0.08, 0.28, 0.14]], dtype=np.float32)
CLOTHES_COLOURS = np.array([[0.08, 0.10, 0.22], [0.06, 0.06, 0.06], [0.30, 0.18, 0.10], [0.40, 0.40, 0.42],
                            [0.70, 0.10, 0.12], [0.75, 0.68, 0.52], [0.12, 0.30, 0.16], [0.25, 0.35, 0.58]],
                           dtype=np.float32)
SKIN_TONES = np.array([[0.95, 0.78, 0.65], [0.80, 0.58, 0.42], [0.55, 0.36, 0.24], [0.35, 0.22, 0.14]],
                      dtype=np.float32)
NOVEL_COLOURS = np.array([[0.95, 0.10, 0.85], [0.55, 0.10, 0.85], [0.55, 1.00, 0.10], [1.00, 0.50, 0.00],
                          [0.10, 0.95, 0.95], [1.00, 0.45, 0.70], [1.00, 0.92, 0.05]], dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# one small drawing function per class
# --------------------------------------------------------------------------------------------------------------
def draw_sky(c: Canvas) -> None:
    """Clear (blue gradient) or overcast (grey clouds)."""
    t = (c.yy / max(c.horizon, 1.0))[..., None]
    if c.rng.random() < 0.5:
        top, bottom = c.jitter([0.20, 0.42, 0.80]), c.jitter([0.65, 0.80, 0.95])
        fill = top * (1 - t) + bottom * t
    else:
        clouds = c.noise("blobs", 1.5)
        grey = c.rng.uniform(0.55, 0.85)
        fill = c.tinted(clouds, c.jitter([grey, grey, grey * 1.04], 0.03), 0.25)
    c.paint(c.yy < c.ground_top()[None, :] + 1, fill, SKY)  # everything above the ground, so no holes


def _windows(c: Canvas, px: float, py: float, fw: float, fh: float) -> np.ndarray:
    ox, oy = c.rng.uniform(0, px), c.rng.uniform(0, py)
    cols = ((c.xx[0] + ox) % px) < px * fw  # separable: a column pattern AND a row pattern
    rows = ((c.yy[:, 0] + oy) % py) < py * fh
    return rows[:, None] & cols[None, :]


def draw_building(c: Canvas, mask: np.ndarray, box=None) -> None:
    """Brick (photo texture), glass curtain wall, or plaster with a window grid.

    A scene draws each style's picture once and gives every building its own tint of it.
    """
    mode = int(c.rng.integers(3))
    if mode not in c.styles:
        c.styles[mode] = _building_style(c, mode)
    gain = (1 + c.rng.uniform(-0.12, 0.12)) * (1 + c.rng.uniform(-0.05, 0.05, 3))
    c.paint(mask, c.styles[mode], BUILDING, gain=gain, box=box)


def _building_style(c: Canvas, mode: int) -> np.ndarray:
    scale = max(c.h / 64.0, 0.5)
    if mode == 0:
        fill = c.tinted(c.photo("brick"), c.jitter([0.62, 0.32, 0.22], 0.12), 0.45)
        win = _windows(c, 9 * scale, 10 * scale, 0.45, 0.5)
        fill[win] = c.jitter([0.12, 0.12, 0.14]) * 0.9
    elif mode == 1:
        base = c.jitter([0.30, 0.45, 0.55], 0.15)
        fill = c.tinted(c.noise("smooth", 0.5), base, 0.45)
        mullions = _windows(c, 6 * scale, 7 * scale, 0.85, 0.85)
        fill[~mullions] = c.jitter([0.72, 0.74, 0.76]) * 0.8
    else:
        base = c.jitter([[0.85, 0.80, 0.68], [0.78, 0.78, 0.76], [0.86, 0.74, 0.55]][c.rng.integers(3)], 0.05)
        fill = c.tinted(c.noise("fine"), base, 0.12)
        win = _windows(c, 8 * scale, 9 * scale, 0.4, 0.55)
        fill[win] = c.jitter([0.20, 0.22, 0.26])
    return fill


def draw_buildings(c: Canvas) -> None:
    """Far skyline blocks near the horizon, then a facade on each side receding to the vanishing point."""
    x = 0.0
    while x < c.w:
        bw = c.w * c.rng.uniform(0.06, 0.18)
        top = c.horizon - c.h * c.rng.uniform(0.05, 0.25)
        if c.rng.random() < 0.8:
            r0, c0 = max(int(np.floor(top)), 0), int(np.floor(x))
            draw_building(c, c.rect(x, top, x + bw, c.horizon + 2),
                          (slice(r0, max(int(np.ceil(c.horizon + 2)), r0)), slice(c0, int(np.ceil(x + bw)))))
        x += bw
    gt = c.ground_top()
    for side in (0, 1):
        if c.rng.random() < 0.15:  # open side: a park (lawn and bushes) instead of a facade
            band = (c.yy < gt[None, :] + 1) & (c.yy > c.horizon - c.h * c.rng.uniform(0.0, 0.08))
            band &= (c.xx < c.vx) if side == 0 else (c.xx >= c.vx)
            c.paint(band, _vegetation_fill(c), VEGETATION)
            continue
        far_x = c.vx + (-1 if side == 0 else 1) * c.w * c.rng.uniform(0.04, 0.15)
        near_x = 0.0 if side == 0 else float(c.w)
        near_top = c.h * c.rng.uniform(-0.1, 0.12)
        far_top = c.horizon - c.h * c.rng.uniform(0.04, 0.12)
        near_bottom = c.outer_left if side == 0 else c.outer_right
        far_bottom = gt[int(np.clip(far_x, 0, c.w - 1))]
        facade = c.polygon([(near_x, near_top), (far_x, far_top), (far_x, far_bottom + 1),
                            (near_x, near_bottom + 1)])
        # split the facade into 1-3 buildings with their own appearance
        cuts = np.sort(c.rng.uniform(min(near_x, far_x), max(near_x, far_x), c.rng.integers(0, 3)))
        edges = np.concatenate([[0], np.ceil(cuts).astype(int), [c.w]])
        for a, b in zip(edges[:-1], edges[1:]):
            part = np.zeros_like(facade)
            part[:, a:b] = facade[:, a:b]
            draw_building(c, part, (slice(None), slice(a, b)))


def draw_ground(c: Canvas) -> None:
    """Sidewalk over the whole ground (tiles, concrete or pavers), then the road (asphalt or cobblestone)."""
    ground = c.yy >= c.ground_top()[None, :]
    mode = c.rng.integers(3)
    scale = max(c.h / 64.0, 0.5)
    if mode == 0:
        fill = c.tinted(c.noise("fine"), c.jitter([0.68, 0.66, 0.66]), 0.12)
        joints = (((c.xx + c.yy * 0.3) % (7 * scale)) < 0.9) | ((c.yy % (4 * scale)) < 0.8)
        fill[joints] *= 0.7
    elif mode == 1:
        fill = c.tinted(c.noise("smooth"), c.jitter([0.76, 0.70, 0.60]), 0.15)
    else:
        fill = c.tinted(c.noise("fine", 0.5), c.jitter([0.62, 0.40, 0.36]), 0.25)
        joints = ((c.xx % (5 * scale)) < 0.8) | ((c.yy % (3 * scale)) < 0.7)
        fill[joints] *= 0.75
    c.paint(ground, fill, SIDEWALK)

    hz, h = c.horizon, c.h
    road = c.polygon([(c.vx - 1, hz), (c.vx + 1, hz), (c.road_right, h + 1), (c.road_left, h + 1)])
    if c.rng.random() < 0.7:
        grey = c.rng.uniform(0.22, 0.38)
        fill = c.tinted(c.noise("fine"), c.jitter([grey, grey, grey * 1.05], 0.04), 0.18)
        # dashed centre line, dashes evenly spaced in depth (1 / distance below the horizon)
        dy = np.maximum(c.yy - hz, 0.5)
        xc = c.vx + ((c.road_left + c.road_right) / 2 - c.vx) * dy / (h - hz)
        width = np.maximum(0.5, 0.012 * c.w * dy / (h - hz))
        dash = (np.floor(12.0 * h / 64.0 / dy + c.rng.uniform(0, 2)) % 2 == 0) & (dy > 2)
        fill[(np.abs(c.xx - xc) < width) & dash] = c.jitter([0.85, 0.84, 0.78], 0.04)
    else:
        fill = c.tinted(c.photo("gravel", 0.8), c.jitter([0.50, 0.44, 0.38], 0.1), 0.5)
    c.paint(road, fill, ROAD)


def _blob(c: Canvas, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """An irregular crown: an ellipse eaten away by blob noise."""
    ell = c.ellipse(cx, cy, rx * 1.15, ry * 1.15)
    dist = ((c.xx - cx) / max(rx, 1)) ** 2 + ((c.yy - cy) / max(ry, 1)) ** 2
    return ell & (dist + 0.9 * (c.noise("blobs", 0.7) - 0.5) < 1.0)


def _vegetation_fill(c: Canvas) -> np.ndarray:
    if c.rng.random() < 0.55:  # foliage: dark greens in blotches
        base = c.jitter([[0.12, 0.30, 0.10], [0.22, 0.38, 0.12], [0.10, 0.24, 0.16]][c.rng.integers(3)], 0.1)
        return c.tinted(c.noise("blobs", 0.4), base, 0.5)
    base = c.jitter([0.40, 0.58, 0.18], 0.1)  # grass: the photo texture, yellow-green
    return c.tinted(c.photo("grass"), base, 0.45)


def draw_vegetation(c: Canvas) -> None:
    """Hedges along facades and trees (trunk + crown) on the sidewalk (lawns: see draw_buildings)."""
    gt = c.ground_top()
    if c.rng.random() < 0.6:  # hedge strip just above the ground line
        height = (gt - c.horizon) * c.rng.uniform(0.15, 0.45) + 1
        hedge = (c.yy < gt[None, :] + 1) & (c.yy >= (gt - height)[None, :]) & (c.yy > c.horizon - 1)
        side = c.rng.integers(3)
        if side < 2:
            hedge &= (c.xx < c.vx) if side == 0 else (c.xx >= c.vx)
        c.paint(hedge, _vegetation_fill(c), VEGETATION)
    for _ in range(c.rng.integers(0, 4)):
        side = c.rng.integers(2)
        y = c.rng.uniform(c.horizon + 0.1 * (c.h - c.horizon), c.h * 0.95)
        s = c.depth(y)
        xl, xr = c.road_edges(y)
        x = xl - c.rng.uniform(0.02, 0.2) * c.w * s if side == 0 else xr + c.rng.uniform(0.02, 0.2) * c.w * s
        height = c.h * s * c.rng.uniform(0.7, 1.1)
        draw_tree(c, x, y, height)


def draw_tree(c: Canvas, x: float, y: float, height: float) -> None:
    """A trunk and an irregular crown (foliage or grass texture)."""
    r = height * c.rng.uniform(0.25, 0.4)
    rx = r * c.rng.uniform(0.8, 1.3)
    cy = y - height * 0.6 - r * 0.5
    c = c.local(x - rx * 1.2 - 1, cy - r * 1.2 - 1, x + rx * 1.2 + 1, y + 1)
    if c is None:
        return
    trunk_w = max(1.0, 0.015 * c.w * c.depth(y))
    trunk = c.rect(x - trunk_w / 2, y - height * 0.6, x + trunk_w / 2, y)
    c.paint(trunk, c.tinted(c.noise("fine"), c.jitter([0.30, 0.20, 0.12], 0.15), 0.2), VEGETATION)
    c.paint(_blob(c, x, cy, rx, r), _vegetation_fill(c), VEGETATION)


def draw_pole(c: Canvas, x: float, y: float) -> None:
    """A pole standing on row ``y``: metal, painted green or wood; maybe a sign plate on top."""
    s = c.depth(y)
    height = c.h * s * c.rng.uniform(0.8, 1.2)
    width = max(1.0, 0.012 * c.w * s)
    r = max(1.5, 0.035 * c.w * s)
    c = c.local(x - r - width - 1, y - height - 1, x + r + width + 1, y + 1)
    if c is None:
        return
    colour = c.jitter([[0.55, 0.56, 0.58], [0.10, 0.22, 0.14], [0.36, 0.25, 0.15]][c.rng.integers(3)], 0.08)
    grad = 0.8 + 0.4 * np.clip((c.xx - x + width / 2) / max(width, 1), 0, 1)
    c.paint(c.rect(x - width / 2, y - height, x + width / 2, y), colour * grad[..., None], POLE)
    if c.rng.random() < 0.5:
        plate = c.ellipse(x, y - height + r, r, r) if c.rng.random() < 0.5 else c.rect(
            x - r, y - height, x + r, y - height + 1.4 * r)
        sign = c.jitter([[0.12, 0.25, 0.65], [0.85, 0.85, 0.85], [0.70, 0.08, 0.08]][c.rng.integers(3)], 0.05)
        c.paint(plate, sign, POLE)


def draw_vehicle(c: Canvas, x: float, y: float, body=None, cls: int = VEHICLE) -> None:
    """A car or a van (side view) standing on row ``y``, centred at column ``x``.

    ``body(c) -> (h, w, 3) picture`` overrides the body paint (near-anomalies), ``cls`` the label.
    """
    s = c.depth(y)
    van = c.rng.random() < 0.3
    length = c.w * s * (c.rng.uniform(0.30, 0.40) if not van else c.rng.uniform(0.32, 0.42))
    body_h = length * (0.28 if not van else 0.48)
    cabin_h = length * (0.22 if not van else 0.0)
    x0, x1 = x - length / 2, x + length / 2
    wheel_r = length * 0.11
    yb = y - wheel_r * 0.6
    c = c.local(x - length * 0.6 - 1, yb - body_h - cabin_h - 1, x + length * 0.6 + 1, y + wheel_r + 1)
    if c is None:
        return
    if body is not None:
        body = body(c)
    else:
        colour = c.jitter(VEHICLE_COLOURS[c.rng.integers(len(VEHICLE_COLOURS))], 0.08)
        if c.rng.random() < 0.5:  # glossy: vertical shading + highlight band
            t = np.clip((c.yy - (yb - body_h - cabin_h)) / max(body_h + cabin_h, 1), 0, 1)
            body = colour * (1.25 - 0.55 * t)[..., None] + 0.25 * (np.abs(t - 0.35) < 0.06)[..., None]
        else:
            body = c.tinted(c.noise("fine"), colour, 0.1)
    shadow = c.ellipse(x, y, length * 0.55, max(wheel_r * 0.5, 1))  # contact shadow (image only)
    c.image[shadow] *= 0.5
    c.paint(c.rect(x0, yb - body_h, x1, yb), body, cls)
    if van:
        win = c.rect(x0 + length * 0.05, yb - body_h * 0.9, x1 - length * 0.05, yb - body_h * 0.55)
        win &= ((c.xx - x0) % max(length * 0.22, 2)) > length * 0.03
    else:
        cx0, cx1 = x0 + length * c.rng.uniform(0.15, 0.25), x1 - length * c.rng.uniform(0.15, 0.25)
        cabin = c.polygon([(cx0, yb - body_h + 0.5), (cx0 + length * 0.12, yb - body_h - cabin_h),
                           (cx1 - length * 0.08, yb - body_h - cabin_h), (cx1, yb - body_h + 0.5)])
        c.paint(cabin, body, cls)
        win = cabin & (c.yy > yb - body_h - cabin_h * 0.85) & (c.yy < yb - body_h) & (
            np.abs(c.xx - (cx0 + cx1) / 2) > length * 0.02)
    c.paint(win, c.tinted(c.noise("smooth"), c.jitter([0.16, 0.20, 0.26], 0.1), 0.4), cls)
    for wx in (x0 + length * 0.2, x1 - length * 0.2):
        c.paint(c.ellipse(wx, yb, wheel_r, wheel_r), c.jitter([0.05, 0.05, 0.05], 0.2), cls)
        c.paint(c.ellipse(wx, yb, wheel_r * 0.45, wheel_r * 0.45), c.jitter([0.45, 0.45, 0.48]), cls)


def draw_person(c: Canvas, x: float, y: float, clothes=None, cls: int = PERSON) -> None:
    """A pedestrian standing on row ``y``: head, torso, legs; dark coat or bright clothes.

    ``clothes(c) -> (h, w, 3) picture`` paints the whole figure instead (near-anomalies).
    """
    s = c.depth(y)
    height = c.h * s * c.rng.uniform(0.45, 0.6)
    width = height * c.rng.uniform(0.25, 0.32)
    c = c.local(x - width - 1, y - height - 1, x + width + 1, y + 1)
    if c is None:
        return
    if clothes is None:
        top = c.tinted(c.noise("fine"), c.jitter(CLOTHES_COLOURS[c.rng.integers(len(CLOTHES_COLOURS))]), 0.12)
        legs = c.jitter(CLOTHES_COLOURS[c.rng.integers(len(CLOTHES_COLOURS))] * 0.8)
        skin = c.jitter(SKIN_TONES[c.rng.integers(len(SKIN_TONES))], 0.05)
    else:
        top = legs = skin = clothes(c)
    head_r = height * 0.09
    torso = c.rect(x - width / 2, y - height * 0.8, x + width / 2, y - height * 0.42)
    if clothes is None and c.rng.random() < 0.4:  # a long coat reaching the knees
        torso |= c.rect(x - width / 2, y - height * 0.42, x + width / 2, y - height * 0.22)
    gap = max(width * 0.12, 0.5)
    leg_mask = c.rect(x - width * 0.42, y - height * 0.42, x - gap / 2, y) | c.rect(
        x + gap / 2, y - height * 0.42, x + width * 0.42, y)
    c.paint(leg_mask, legs, cls)
    c.paint(torso, top, cls)
    c.paint(c.ellipse(x, y - height * 0.8 - head_r, head_r * 0.85, head_r), skin, cls)


def draw_objects(c: Canvas, n_vehicles: tuple[int, int] = (1, 4)) -> None:
    """Vehicles on the road, persons and poles on the sidewalk, painted far to near."""
    items = []
    span = c.h - c.horizon
    for _ in range(c.rng.integers(*n_vehicles)):
        y = c.rng.uniform(c.horizon + 0.15 * span, c.h + 0.05 * span)
        xl, xr = c.road_edges(y)
        items.append((y, "vehicle", c.rng.uniform(xl + 0.1 * (xr - xl), xr - 0.1 * (xr - xl))))
    for _ in range(c.rng.integers(0, 5)):
        y = c.rng.uniform(c.horizon + 0.15 * span, c.h)
        xl, xr = c.road_edges(y)
        off = c.rng.uniform(0.02, 0.12) * c.w * c.depth(y)
        items.append((y, "person", xl - off if c.rng.random() < 0.5 else xr + off))
    for _ in range(c.rng.integers(0, 3)):
        y = c.rng.uniform(c.horizon + 0.1 * span, c.h)
        xl, xr = c.road_edges(y)
        off = c.rng.uniform(0.01, 0.05) * c.w * c.depth(y)
        items.append((y, "pole", xl - off if c.rng.random() < 0.5 else xr + off))
    for y, kind, x in sorted(items, key=lambda t: t[0]):
        {"vehicle": draw_vehicle, "person": draw_person, "pole": draw_pole}[kind](c, x, y)


# --------------------------------------------------------------------------------------------------------------
# anomalies (never drawn in train / val); they paint the label ANOMALY_CODE
# --------------------------------------------------------------------------------------------------------------
def _novel_fill(c: Canvas, contrast: float = 0.45) -> np.ndarray:
    name = tx.NOVEL_PHOTOS[c.rng.integers(len(tx.NOVEL_PHOTOS))]
    colour = NOVEL_COLOURS[c.rng.integers(len(NOVEL_COLOURS))]
    fill = c.tinted(c.photo(name, c.rng.uniform(0.5, 1.5)), colour, contrast)
    if c.rng.random() < 0.35:  # hazard stripes in a second novel colour
        period = max(3.0, c.h / 12)
        stripes = ((c.xx + c.yy) % period) < period / 2
        fill[stripes] = NOVEL_COLOURS[c.rng.integers(len(NOVEL_COLOURS))]
    return fill


def draw_box(c: Canvas, x: float, y: float, size: float) -> None:
    """A crate: front face, top face and side face in a novel colour / texture."""
    w, h, d = size * c.rng.uniform(0.8, 1.4), size * c.rng.uniform(0.6, 1.1), size * 0.35
    x0, x1, y1 = x - w / 2, x + w / 2, y
    y0 = y1 - h
    c = c.local(x0 - 1, y0 - d - 1, x1 + d + 1, y1 + 1)
    if c is None:
        return
    fill = _novel_fill(c)
    front = c.rect(x0, y0, x1, y1)
    top = c.polygon([(x0, y0), (x0 + d, y0 - d * 0.6), (x1 + d, y0 - d * 0.6), (x1, y0)])
    side = c.polygon([(x1, y0), (x1 + d, y0 - d * 0.6), (x1 + d, y1 - d * 0.6), (x1, y1)])
    c.paint(front, fill, ANOMALY_CODE)
    c.paint(top, np.clip(fill * 1.3, 0, 1), ANOMALY_CODE)
    c.paint(side, fill * 0.65, ANOMALY_CODE)


def draw_tyre(c: Canvas, x: float, y: float, size: float) -> None:
    """A standing tyre: dark treaded ring around a coloured rim."""
    ry = size * 0.6
    rx = ry * c.rng.uniform(0.35, 0.9)
    c = c.local(x - rx - 1, y - 2 * ry - 1, x + rx + 1, y + 1)
    if c is None:
        return
    c.paint(c.ellipse(x, y - ry, rx, ry), c.tinted(c.photo("coins", 0.5), c.jitter([0.10, 0.09, 0.09], 0.2), 0.5),
            ANOMALY_CODE)
    c.paint(c.ellipse(x, y - ry, rx * 0.5, ry * 0.5), NOVEL_COLOURS[c.rng.integers(len(NOVEL_COLOURS))],
            ANOMALY_CODE)


@lru_cache(maxsize=1)
def _horse() -> np.ndarray:
    import skimage.data

    sil = ~skimage.data.horse()
    rows, cols = np.nonzero(sil)
    return sil[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def draw_animal(c: Canvas, x: float, y: float, size: float) -> None:
    """An animal silhouette (scikit-image's horse) with fur from the cat / coffee photographs."""
    sil = _horse()
    h = max(int(size * c.rng.uniform(0.9, 1.4)), 3)
    w = max(int(h * sil.shape[1] / sil.shape[0] * c.rng.uniform(0.8, 1.2)), 3)
    rows = (np.arange(h) * sil.shape[0] / h).astype(int)
    cols = (np.arange(w) * sil.shape[1] / w).astype(int)
    small = sil[rows[:, None], cols[None, :]]
    if c.rng.random() < 0.5:
        small = small[:, ::-1]
    r0, c0 = int(round(y)) - h, int(round(x - w / 2))
    c = c.local(c0, r0, c0 + w, r0 + h)
    if c is None:
        return
    mask = small[c.oy - r0:c.oy - r0 + c.shape[0], c.ox - c0:c.ox - c0 + c.shape[1]]
    fur = c.photo(["chelsea", "coffee"][c.rng.integers(2)], c.rng.uniform(0.6, 1.2))
    colour = [[0.95, 0.55, 0.20], [0.95, 0.92, 0.85], [0.55, 0.10, 0.85], [0.95, 0.10, 0.85]][c.rng.integers(4)]
    c.paint(mask, c.tinted(fur, c.jitter(colour, 0.05), 0.5), ANOMALY_CODE)


def draw_debris(c: Canvas, x: float, y: float, size: float) -> None:
    """An irregular star-shaped piece of debris with a novel texture."""
    n = c.rng.integers(6, 12)
    ang = np.sort(c.rng.uniform(0, 2 * np.pi, n))
    rad = size * 0.5 * c.rng.uniform(0.45, 1.0, n)
    cy = y - size * 0.3
    c = c.local(x - size * 0.7 - 1, cy - size * 0.3 - 1, x + size * 0.7 + 1, cy + size * 0.3 + 1)
    if c is None:
        return
    pts = np.stack([x + rad * np.cos(ang) * 1.4, cy + rad * np.sin(ang) * 0.6], axis=1)
    c.paint(c.polygon(pts, convex=False), _novel_fill(c), ANOMALY_CODE)


ANOMALY_DRAWERS = {"box": draw_box, "tyre": draw_tyre, "animal": draw_animal, "debris": draw_debris}


def draw_anomalies(c: Canvas, near: bool) -> None:
    """1-3 anomaly objects standing on the road (label ANOMALY_CODE)."""
    span = c.h - c.horizon
    n = c.rng.integers(1, 4)
    ys = np.sort(c.rng.uniform(c.horizon + 0.4 * span, c.h - 0.02 * span, n))
    for y in ys:
        xl, xr = c.road_edges(y)
        xl, xr = max(xl, 0.0), min(xr, float(c.w))
        x = c.rng.uniform(xl + 0.15 * (xr - xl), xr - 0.15 * (xr - xl))  # on the road, clear of the kerb
        s = c.depth(y)
        if near:
            if c.rng.random() < 0.7:
                draw_vehicle(c, x, y, body=lambda v: _novel_fill(v, 0.35), cls=ANOMALY_CODE)
            else:
                draw_person(c, x, y, clothes=lambda v: _novel_fill(v, 0.35), cls=ANOMALY_CODE)
        else:
            kind = list(ANOMALY_DRAWERS)[c.rng.integers(len(ANOMALY_DRAWERS))]
            ANOMALY_DRAWERS[kind](c, x, y, c.h * s * c.rng.uniform(0.25, 0.45))


# --------------------------------------------------------------------------------------------------------------
# the whole scene
# --------------------------------------------------------------------------------------------------------------
def finish(c: Canvas) -> np.ndarray:
    """Cast shadow, global lighting, blur and noise; returns the uint8 image (H, W, 3)."""
    img = c.image
    if c.rng.random() < 0.5:  # a facade's shadow across the ground
        left = c.rng.random() < 0.5
        xs = c.rng.uniform(0.2, 0.8) * c.w
        pts = [(0, c.horizon), (c.vx, c.horizon), (xs, c.h), (0, c.h)] if left else [
            (c.vx, c.horizon), (c.w, c.horizon), (c.w, c.h), (xs, c.h)]
        shadow = c.polygon(pts) & (c.yy > c.horizon)
        img[shadow] *= c.rng.uniform(0.45, 0.75)
    gain = c.rng.uniform(0.65, 1.25) * (1 + c.rng.uniform(-0.08, 0.08, 3))
    img *= gain.astype(np.float32)
    sigma = c.rng.uniform(0.0, 0.8) * c.h / 64.0
    if sigma > 0.2:
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0))
    img += c.rng.uniform(0.005, 0.03) * tx.crop(tx.gaussian_bank(), c.h, c.w, c.rng)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def generate_scene(height: int, width: int, rng: np.random.Generator, anomaly: str | None = None):
    """Draw one scene.

    Parameters
    ----------
    height, width : int
        Image size.
    rng : numpy.random.Generator
        The scene's own generator.
    anomaly : {None, "far", "near"}
        Add anomaly objects (``"far"``: boxes, tyres, animals, debris; ``"near"``: vehicle / person shapes with
        novel textures).

    Returns
    -------
    image : numpy.ndarray
        (H, W, 3) uint8.
    semantic : numpy.ndarray
        (H, W) uint8 closed-set labels 0..7 (255 under anomaly objects).
    anomaly_mask : numpy.ndarray
        (H, W) bool, True on anomaly objects (all False when ``anomaly`` is None).
    """
    if anomaly not in (None, "far", "near"):
        raise ValueError(f"anomaly must be None, 'far' or 'near', got {anomaly!r}")
    c = Canvas(height, width, rng)
    draw_sky(c)
    draw_buildings(c)
    draw_ground(c)
    draw_vegetation(c)
    draw_objects(c)
    if anomaly is not None:
        draw_anomalies(c, near=anomaly == "near")
    mask = c.label == ANOMALY_CODE
    semantic = c.label.copy()
    semantic[mask] = IGNORE_INDEX
    return finish(c), semantic, mask


def anomaly_label(mask: np.ndarray, void_width: int) -> np.ndarray:
    """0 = known, 1 = anomaly, 255 = void band of ``void_width`` pixels just outside the anomaly border."""
    label = mask.astype(np.uint8)
    if void_width > 0 and mask.any():
        ring = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=void_width) & ~mask
        label[ring] = IGNORE_INDEX
    return label


def image_hw(image_size, height=None, width=None, default=DEFAULT_IMAGE_SIZE) -> tuple[int, int]:
    """(height, width) from ``image_size`` (positive int or pair of them; None -> ``default``), overridden by
    ``height`` / ``width`` (positive ints)."""
    h, w = default if image_size is None else check_size_pair("image_size", image_size)
    h = h if height is None else check_int("height", height)
    w = w if width is None else check_int("width", width)
    if h < 16 or w < 16:
        raise ValueError(f"image size must be at least 16 x 16, got height={h}, width={w}")
    return h, w


class SceneDataset(GeneratedDataset):
    """Generated street scenes (see the module docstring).

    Parameters
    ----------
    split : {"train", "val", "anomaly", "anomaly_near"}
    image_size : int or (int, int), optional
        (height, width); default (64, 128). ``height`` / ``width`` override one side.
    num_images : int, optional
        Default 1000 for ``train``, 200 for the other splits.
    seed : int
        Item ``i`` is drawn from ``numpy.random.default_rng([seed, split, i])``.
    void_width : int, optional
        Width in pixels of the void band around anomalies (default ``max(1, height // 32)``, 2 at 64 px).
    cache : bool
        Keep generated items in memory (default True).
    cache_dir : str or Path, optional
        Also store items as ``.npz`` files there and read them back on later runs.
    transform : callable, optional
        Training transform, see :class:`SegmentationDataset`.
    """

    name = "scenes"

    def __init__(self, split: str = "train", image_size=None, num_images: int | None = None, seed: int = 0,
                 height: int | None = None, width: int | None = None, void_width: int | None = None,
                 cache: bool = True, cache_dir=None, transform=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)} for dataset 'scenes', got {split!r}")
        super().__init__(split, transform, cache, cache_dir)
        self.height, self.width = image_hw(image_size, height, width)
        self.num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else check_int("num_images", num_images)
        self.seed = check_int("seed", seed, 0)
        self.void_width = max(1, self.height // 32) if void_width is None else check_int("void_width", void_width, 0)
        anomalous = split.startswith("anomaly")
        self.classes = list(ANOMALY_CLASSES) if anomalous else list(CLASSES)
        self.palette = ANOMALY_PALETTE.copy() if anomalous else PALETTE.copy()
        self.semantic_classes = list(CLASSES)
        self.semantic_palette = PALETTE.copy()

    def __len__(self) -> int:
        return self.num_images

    @property
    def cache_key(self) -> str:
        # r2: a strided texture window that wrapped around exactly once was drawn at step 1 before; the random
        # stream is unchanged (so _VERSION stays), and so are the items of sizes where that never happened (all
        # of the cpu profile's 64x128 splits)
        ident = f"v{_VERSION}r2-{self.split}-{self.seed}-{self.height}x{self.width}-{self.void_width}"
        digest = hashlib.sha1(ident.encode()).hexdigest()[:10]
        return f"scenes-{self.split}-{self.height}x{self.width}-s{self.seed}-{digest}"  # items do not depend on n

    def generate(self, index: int):
        """Draw item ``index``: (image uint8 (H, W, 3), label uint8 (H, W), semantic uint8 (H, W))."""
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index, _VERSION])
        kind = {"anomaly": "far", "anomaly_near": "near"}.get(self.split)
        image, semantic, mask = generate_scene(self.height, self.width, rng, kind)
        label = anomaly_label(mask, self.void_width) if kind else semantic
        return image, label, semantic

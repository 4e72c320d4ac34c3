"""Read every attribute of a shapes-world image back from its pixels: deterministic numpy.

    analyze(image)                       # {"shape": "star", "color": "red", "size": "small", ...}
    match(attributes, analyze(image))    # {"shape": True, "color": True, ...} for the keys asked
    accuracy(images, attributes_list)    # {"shape": 0.99, ...}: the fraction read back right

The recipe, one step per attribute (thresholds sit halfway between what draw.py draws):
1. background: the median of the 1 px border, named by the nearest BACKGROUNDS color.
2. color: the median of the pixels farthest from the background (the shape's own pixels),
   named by the nearest COLORS color.
3. coverage: each pixel's position between background and shape color, alpha in [0, 1]
   (alpha = <p - bg, fg - bg> / |fg - bg|^2); the shape is alpha > 0.5; the silhouette is the shape
   with its pattern's holes filled (background pixels that cannot reach the border).
4. shape: the template (draw.soft_mask) of best soft IoU with the silhouette, each template placed
   at the silhouette's centroid, scaled to its area, at rotations within the drawing's jitter.
5. size and position: the best template's radius and centre, against the midpoints of draw.SIZES
   and draw.CENTERS_X.
6. pattern: holes (1 - alpha) inside the silhouette's interior. Few holes: solid. Otherwise
   whichever of stripes and dots, at its best phase, matches the holes better (soft IoU,
   with a margin for the dots' extra freedom).
"""
import functools
import math

import numpy as np

from . import draw as world

ANGLES = (-8.0, -4.0, 0.0, 4.0, 8.0)    # template rotations: draw.JITTER_DEG in 4 degree steps
SMALL_BIG = sum(world.SIZES.values()) / 2  # radius threshold between small and big
# the horizontal centres that split left | center | right (midway between the nearest drawn centres)
LEFT_CENTER = (max(c[0] for c in world.CENTERS_X.values()) + world.SIZE / 2) / 2
CENTER_RIGHT = (min(c[2] for c in world.CENTERS_X.values()) + world.SIZE / 2) / 2
# soft hole fraction of the interior (mean of 1 - alpha) below which a fill is solid: clean solid
# fills give 0, VAE reconstructions of them <= 0.02; clean dots and stripes >= 0.12 (1600 images)
SOLID_MAX_HOLES = 0.04
# dots fit more hole sets than stripes (16 phases against 4): a small interior with one band
# fits a dot nearly as well. Measured on clean images: dotted - striped fit is >= 0.27 for
# dots and <= 0.12 for stripes (1600 images, seeds 123 and 7); the threshold sits between.
DOT_MARGIN = 0.19


def _nearest(color, palette):
    names = list(palette)
    table = np.asarray([palette[n] for n in names], np.float32)                  # [K, 3]
    return names[int(np.argmin(((table - color) ** 2).sum(axis=1)))]


def _shift(mask, dy, dx):
    """mask moved by (dy, dx) with False coming in at the edges."""
    out = np.zeros_like(mask)
    H, W = mask.shape
    out[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        mask[max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


_CROSS = ((0, 1), (0, -1), (1, 0), (-1, 0))
_SQUARE = _CROSS + ((1, 1), (1, -1), (-1, 1), (-1, -1))


def _dilate(mask, steps=_SQUARE):
    out = mask.copy()
    for dy, dx in steps:
        out |= _shift(mask, dy, dx)
    return out


def _erode(mask):
    return ~_dilate(~mask)


def fill_holes(mask):
    """mask with every False region that does not touch the border set True (4-connected flood fill)."""
    outside = ~mask
    border = np.zeros_like(mask)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    reach = outside & border
    while True:
        grown = _dilate(reach, _CROSS) & outside
        if (grown == reach).all():
            return ~reach
        reach = grown


@functools.lru_cache(maxsize=None)
def _template_geometry(shape):
    """(area at r=1, centroid offset (x, y) at r=1 and angle 0) of a shape's template."""
    r = 10.0
    mask = world.soft_mask(shape, world.SIZE / 2, world.SIZE / 2, r)             # [32, 32]
    y, x = np.mgrid[0:world.SIZE, 0:world.SIZE] + 0.5                           # pixel centres
    area = mask.sum()
    offset = ((mask * x).sum() / area - world.SIZE / 2, (mask * y).sum() / area - world.SIZE / 2)
    return area / r ** 2, (offset[0] / r, offset[1] / r)


def shape_fits(silhouette):
    """Each shape's best template for a soft silhouette [32, 32]: {shape: (iou, cx, cy, r, angle)}.

    How far the true shape's iou stands above the others' is how confusable the shapes are (a test keeps it).
    """
    area = silhouette.sum()
    y, x = np.mgrid[0:world.SIZE, 0:world.SIZE] + 0.5
    mx, my = (silhouette * x).sum() / area, (silhouette * y).sum() / area      # silhouette centroid
    fits = {}
    for shape in world.SHAPES:
        unit_area, (ox, oy) = _template_geometry(shape)
        r = math.sqrt(area / unit_area)
        for angle in ANGLES:
            c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            cx, cy = mx - r * (ox * c - oy * s), my - r * (ox * s + oy * c)  # the centroid offset, rotated
            template = world.soft_mask(shape, cx, cy, r, angle)              # [32, 32]
            iou = float(np.minimum(template, silhouette).sum() / np.maximum(template, silhouette).sum())
            if shape not in fits or iou > fits[shape][0]:
                fits[shape] = (iou, cx, cy, r, angle)
    return fits


def _fit_shape(silhouette):
    """The best template for a soft silhouette [32, 32]: (iou, shape, cx, cy, r, angle)."""
    shape, (iou, cx, cy, r, angle) = max(shape_fits(silhouette).items(), key=lambda item: item[1][0])
    return iou, shape, cx, cy, r, angle


def _soft_iou(a, b):
    union = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / union) if union > 0 else 0.0


@functools.lru_cache(maxsize=None)
def _phases(pattern):
    """Every phase of a pattern's holes at 32 px: a tuple of float32 [32, 32] coverages."""
    n = world.PERIOD
    phases = [(px, py) for py in range(n) for px in (range(n) if pattern == "dotted" else [0])]
    return tuple(world._holes(pattern, px, py).astype(np.float32)
                 .reshape(world.SIZE, world.SCALE, world.SIZE, world.SCALE).mean(axis=(1, 3))
                 for px, py in phases)


def features(image):
    """The measurements `analyze` decides from: a dict of numbers and masks (for debugging)."""
    image = np.asarray(image, np.float32)                                       # [32, 32, 3]
    if image.shape != (world.SIZE, world.SIZE, 3):
        raise ValueError(f"a shapes-world image is [{world.SIZE}, {world.SIZE}, 3], got {list(image.shape)}")
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])  # [124, 3]
    bg = np.median(border, axis=0)                                              # [3]
    distance = np.sqrt(((image - bg) ** 2).sum(axis=-1))                        # [32, 32]
    far = distance >= 0.7 * np.percentile(distance, 97)                         # the shape's own pixels
    fg = np.median(image[far], axis=0)                                          # [3]
    direction = fg - bg
    alpha = np.clip(((image - bg) @ direction) / max(direction @ direction, 1e-6), 0, 1)  # [32, 32]
    shape_mask = alpha > 0.5
    filled = fill_holes(shape_mask)                                             # holes of the pattern filled
    silhouette = np.maximum(alpha, filled)                                      # soft, [32, 32]
    iou, shape, cx, cy, r, angle = _fit_shape(silhouette) if filled.any() else (0.0, "circle", 16, 16, 0, 0)
    interior = _erode(filled)
    holes = interior & ~shape_mask
    n_interior = interior.sum()
    # the pattern: the phase of stripes, and of dots, whose holes best match the measured ones
    soft_holes = (1 - alpha) * interior                                         # [32, 32]
    fit = {pattern: max(_soft_iou(soft_holes, holes_1x * interior) for holes_1x in _phases(pattern))
           for pattern in ("striped", "dotted")}
    return {
        "bg": bg, "fg": fg, "alpha": alpha, "silhouette": silhouette, "holes": holes,
        "iou": iou, "shape": shape, "cx": cx, "cy": cy, "r": r, "angle": angle,
        "hole_fraction": float(soft_holes.sum() / n_interior) if n_interior else 0.0,
        "striped_fit": fit["striped"], "dotted_fit": fit["dotted"],
    }


def analyze(image):
    """uint8 [32, 32, 3] -> {shape, color, size, position, pattern, background}: names from draw.ATTRIBUTES."""
    f = features(image)
    if f["hole_fraction"] < SOLID_MAX_HOLES:
        pattern = "solid"
    else:
        pattern = "dotted" if f["dotted_fit"] - f["striped_fit"] > DOT_MARGIN else "striped"
    return {
        "shape": f["shape"],
        "color": _nearest(f["fg"], world.COLORS),
        "size": "small" if f["r"] < SMALL_BIG else "big",
        "position": "left" if f["cx"] < LEFT_CENTER else "right" if f["cx"] > CENTER_RIGHT else "center",
        "pattern": pattern,
        "background": _nearest(f["bg"], world.BACKGROUNDS),
    }


def match(attributes, analyzed):
    """{name: analyzed[name] == value} for each attribute given (None values are skipped)."""
    return {name: analyzed.get(name) == value for name, value in attributes.items() if value is not None}


def accuracy(images, attributes_list):
    """The fraction of images whose analysis agrees with their attributes, per attribute asked.

    Also "all": the fraction where every attribute asked agrees.
    """
    hits = {}
    for image, attributes in zip(images, attributes_list):
        m = match(attributes, analyze(image))
        for name, ok in m.items():
            hits.setdefault(name, []).append(ok)
        hits.setdefault("all", []).append(all(m.values()))
    return {name: float(np.mean(v)) for name, v in hits.items()}

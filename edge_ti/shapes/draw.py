"""The shapes world: one shape per 32x32 RGB image, every attribute known, drawn with pillow.

    rng = np.random.default_rng(0)
    attributes = sample_attributes(rng)          # {"shape": "star", "color": "red", ...}, never HELD_OUT
    image = draw(attributes, rng)                # uint8 [32, 32, 3]
    concept_images(6, rng, shape="star")         # 6 stars, the other attributes random
    caption(attributes, rng, drop_p=0.2)         # "a small striped red star on the left, blue background"

Six attributes, each a small closed set (ATTRIBUTES):

    shape       circle square triangle star diamond cross
    color       red orange yellow green cyan blue purple pink
    size        small (radius 6.5 px) big (radius 9.5 px)
    position    left center right (horizontal; the vertical centre is 16 px +- 1)
    pattern     solid; striped (horizontal bands of background, 2 px every 4 px, inside a 1.5 px
                outline); dotted (2 px square holes of background on a 4 px grid, inside a 1 px outline)
    background  black white gray brown, each far from every shape color

Images are drawn at 4x (128 px) and box-downsampled, so edges are anti-aliased and the 2 px
stripes and dots sit on whole pixels at 32 px. The pattern is a lattice fixed to the image, one
period per 4x4 latent cell of the VAE: each cell of a dotted fill holds the same dot. (Dots 6 px
apart at a random phase, the first world's, were drawn by the trained model in 20% of prompts:
36 lattices per caption on a 4 px latent grid; models.md.) Jitter (seeded by `rng`): position
+-1 px, radius +-6%, rotation +-8 degrees. HELD_OUT lists attribute combinations that
the training set never shows, so a learned token can be asked for something never named together.
"""
import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32          # image side in pixels
SCALE = 4          # drawn at 4x and box-downsampled: anti-aliased edges, whole-pixel patterns

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS = {  # RGB; pairwise distances >= 80, and >= 100 from every background
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40), "green": (50, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (130, 40, 200), "pink": (245, 130, 190),
}
BACKGROUNDS = {"black": (20, 20, 20), "white": (235, 235, 235), "gray": (125, 125, 125), "brown": (110, 75, 45)}
SIZES = {"small": 6.5, "big": 9.5}  # the shape's radius R in pixels (see _outline)
POSITIONS = ("left", "center", "right")
CENTERS_X = {"small": (8.5, 16.0, 23.5), "big": (11.0, 16.0, 21.0)}  # big shapes must stay in frame
PATTERNS = ("solid", "striped", "dotted")
PERIOD, HOLE = 4, 2  # pattern: a 2 px band or square dot of background every 4 px (one VAE latent cell)
PHASE = 3            # holes on rows (and columns) 1 and 2 of every 4: centred in each latent cell
# the solid outline around a pattern, in 4x pixels: stripes run into it along whole rows and need
# 1.5 px to keep the silhouette closed (never below 0.75 coverage); dots are islands, 1 px keeps
# room for a dot in a small cross's arm
OUTLINE = {"striped": 6, "dotted": 4}

ATTRIBUTES = {
    "shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "position": POSITIONS,
    "pattern": PATTERNS, "background": tuple(BACKGROUNDS),
}
POSITION_WORDS = {"left": "on the left", "center": "in the center", "right": "on the right"}

# Attribute combinations never drawn for training: one (shape, color) pair per shape, each with
# a different color, and two (pattern, background) styles. A sample matches an entry when it has
# every key of the entry with the same value.
HELD_OUT = (
    {"shape": "circle", "color": "yellow"},
    {"shape": "square", "color": "orange"},
    {"shape": "triangle", "color": "green"},
    {"shape": "star", "color": "blue"},
    {"shape": "diamond", "color": "red"},
    {"shape": "cross", "color": "purple"},
    {"pattern": "striped", "background": "white"},
    {"pattern": "dotted", "background": "black"},
)

JITTER_XY = 1.0      # px
JITTER_R = 0.06      # relative
JITTER_DEG = 8.0     # degrees


def is_held_out(attributes, held_out=HELD_OUT):
    """True when `attributes` contains one of the `held_out` combinations."""
    return any(all(attributes.get(k) == v for k, v in combo.items()) for combo in held_out)


def sample_attributes(rng, exclude=HELD_OUT, **fixed):
    """A random attribute dict, uniform over the combinations that contain none of `exclude`.

    fixed: attributes to keep (e.g. shape="star"); the others are drawn. exclude=() samples the
    whole world, held-out combinations included.
    """
    for name, value in fixed.items():
        if name not in ATTRIBUTES or value not in ATTRIBUTES[name]:
            raise ValueError(f"unknown attribute {name}={value!r}")
    for _ in range(10000):  # rejection sampling: uniform over the allowed combinations
        attributes = {name: fixed.get(name) or values[rng.integers(len(values))]
                      for name, values in ATTRIBUTES.items()}
        if not is_held_out(attributes, exclude):
            return attributes
    raise ValueError(f"no combination with {fixed} avoids the excluded ones")


def _outline(shape, cx, cy, r, angle):
    """The shape's outline as a polygon [(x, y), ...] (or a circle's bounding box) in pixel units."""
    if shape == "circle":
        rc = 0.85 * r
        return [(cx - rc, cy - rc), (cx + rc, cy + rc)]
    if shape == "square":
        local = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":  # equilateral, pointing up, shifted down so its box is centred
        rt = 1.1
        local = [(rt * math.cos(a), -rt * math.sin(a) + 0.275)
                 for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    elif shape == "star":  # five points, outer radius 1.1, inner 0.55
        local = [((1.1 if i % 2 == 0 else 0.55) * math.cos(math.pi / 2 + i * math.pi / 5),
                  -(1.1 if i % 2 == 0 else 0.55) * math.sin(math.pi / 2 + i * math.pi / 5) + 0.06)
                 for i in range(10)]
    elif shape == "diamond":  # a rhombus on its point, 1.1 tall, 0.9 wide. It replaced a hexagon, which at
        # 13 px differs from a circle by a few edge pixels: the analyzer's template-fit margin between the
        # two was 0.03, the diamond's from every other shape is 0.12 (mean, small; the square's 0.12), and
        # the model trained on that world drew circle for hexagon and back. Narrower diamonds leave too little
        # room for dots in a small one (0.72 wide: pattern read back from VAE reconstructions 0.81, 0.9: 0.95)
        local = [(0.0, -1.1), (0.9, 0.0), (0.0, 1.1), (-0.9, 0.0)]
    elif shape == "cross":  # a plus sign: arms 0.4 half-wide (room for a dot in a small one's), 0.95 long
        w, h = 0.4, 0.95
        local = [(-w, -h), (w, -h), (w, -w), (h, -w), (h, w), (w, w), (w, h), (-w, h), (-w, w),
                 (-h, w), (-h, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in local]


def shape_mask(shape, cx, cy, r, angle=0.0):
    """The shape's silhouette drawn at SCALE x: a PIL "L" image of SIZE*SCALE px, 255 inside."""
    big = SIZE * SCALE
    mask = Image.new("L", (big, big), 0)
    canvas = ImageDraw.Draw(mask)
    # pixel centres at (i + 0.5): a point (x, y) in 32 px units is at (x * SCALE) in the 4x image
    points = [(x * SCALE, y * SCALE) for x, y in _outline(shape, cx, cy, r, angle)]
    if shape == "circle":
        canvas.ellipse(points, fill=255)
    else:
        canvas.polygon(points, fill=255)
    return mask


def soft_mask(shape, cx, cy, r, angle=0.0):
    """The silhouette at 32 px as float32 [SIZE, SIZE] coverage in [0, 1]."""
    mask = np.asarray(shape_mask(shape, cx, cy, r, angle), np.float32) / 255  # [128, 128]
    return mask.reshape(SIZE, SCALE, SIZE, SCALE).mean(axis=(1, 3))           # [32, 32]


@functools.lru_cache(maxsize=None)
def _holes(pattern, phase_x, phase_y):
    """Where the fill shows background, at SCALE x: bool [128, 128] (before the outline is kept)."""
    big = SIZE * SCALE
    if pattern == "solid":
        return np.zeros((big, big), bool)
    y, x = np.mgrid[0:big, 0:big] / SCALE                                     # 32 px units
    if pattern == "striped":  # horizontal bands of HOLE px every PERIOD px
        return ((np.floor(y) + phase_y) % PERIOD) < HOLE
    if pattern == "dotted":  # square holes of HOLE px on a PERIOD px grid
        return (((np.floor(x) + phase_x) % PERIOD) < HOLE) & (((np.floor(y) + phase_y) % PERIOD) < HOLE)
    raise ValueError(f"unknown pattern {pattern!r}")


def geometry(attributes, rng=None):
    """(cx, cy, r, angle) of a drawing; jittered when rng is given."""
    size = attributes["size"]
    cx = CENTERS_X[size][POSITIONS.index(attributes["position"])]
    cy, r, angle = SIZE / 2, SIZES[size], 0.0
    if rng is not None:
        cx += rng.uniform(-JITTER_XY, JITTER_XY)
        cy += rng.uniform(-JITTER_XY, JITTER_XY)
        r *= 1 + rng.uniform(-JITTER_R, JITTER_R)
        angle = rng.uniform(-JITTER_DEG, JITTER_DEG)
    return cx, cy, r, angle


def draw(attributes, rng=None):
    """Attributes -> uint8 [32, 32, 3]. Without rng: the un-jittered drawing; same rng state, same image."""
    cx, cy, r, angle = geometry(attributes, rng)
    silhouette = shape_mask(attributes["shape"], cx, cy, r, angle)
    pattern = attributes["pattern"]
    if pattern == "solid":
        holes = np.zeros((SIZE * SCALE, SIZE * SCALE), bool)                      # [128, 128]
    else:  # the lattice fixed to the image, inside a solid outline that keeps the silhouette closed
        interior = np.asarray(silhouette.filter(ImageFilter.MinFilter(2 * OUTLINE[pattern] + 1))) > 127
        holes = _holes(pattern, PHASE, PHASE) & interior                          # [128, 128]
    coverage = np.asarray(silhouette, np.float32) / 255 * ~holes                  # [128, 128]
    coverage = coverage.reshape(SIZE, SCALE, SIZE, SCALE).mean(axis=(1, 3))[..., None]  # [32, 32, 1]
    fg = np.asarray(COLORS[attributes["color"]], np.float32)
    bg = np.asarray(BACKGROUNDS[attributes["background"]], np.float32)
    image = coverage * fg + (1 - coverage) * bg                                  # [32, 32, 3]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def concept_images(count, rng, exclude=HELD_OUT, **fixed):
    """COUNT images uint8 [32, 32, 3] of a concept: the FIXED attributes in each, the others drawn
    at random (see sample_attributes), each image's attributes then its drawing taken from rng."""
    return [draw(sample_attributes(rng, exclude, **fixed), rng) for _ in range(count)]


def caption(attributes, rng=None, drop_p=0.0):
    """"a small striped red star on the left, blue background", each attribute dropped with drop_p.

    Missing attributes (or None) are left out as dropped ones are; without a shape the noun is "shape".
    """
    keep = {name: value for name, value in attributes.items()
            if value is not None and not (rng is not None and drop_p > 0 and rng.random() < drop_p)}
    words = ["a"] + [keep[name] for name in ("size", "pattern", "color") if name in keep]
    words.append(keep.get("shape", "shape"))
    if "position" in keep:
        words.append(POSITION_WORDS[keep["position"]])
    text = " ".join(words)
    if "background" in keep:
        text += f", {keep['background']} background"
    return text


def caption_words():
    """Every word a caption can contain."""
    words = {"a", "shape", "background", ","}
    for name, values in ATTRIBUTES.items():
        words.update(values)
    for phrase in POSITION_WORDS.values():
        words.update(phrase.split())
    return sorted(words)

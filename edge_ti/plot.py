"""A loss-curve PNG drawn with pillow (no matplotlib in the runtime)."""
from PIL import Image, ImageDraw

from .files import atomic_path

COLORS = {"mean_loss": (160, 160, 220), "best_loss": (40, 60, 200), "heldout_loss": (220, 60, 40)}


def loss_curve(history, path, width=640, height=400, margin=48):
    """history: per-generation records with x = evaluations; lines per key in COLORS; atomic write."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    series = {k: [(r["evaluations"], r[k]) for r in history if k in r] for k in COLORS}
    points = [p for s in series.values() for p in s]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-12)
        fx = lambda x: margin + (x - x0) / (x1 - x0) * (width - 2 * margin)  # noqa: E731
        fy = lambda y: height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin)  # noqa: E731
        draw.rectangle([margin, margin, width - margin, height - margin], outline=(0, 0, 0))
        for key, pts in series.items():
            xy = [(fx(x), fy(y)) for x, y in pts]
            if len(xy) > 1:
                draw.line(xy, fill=COLORS[key], width=2)
            for x, y in xy if key == "heldout_loss" else []:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[key])
        draw.text((margin, height - margin + 8), f"evaluations {x0} .. {x1}", fill=(0, 0, 0))
        draw.text((4, 4), f"loss {y0:.5g} .. {y1:.5g}", fill=(0, 0, 0))
        for i, key in enumerate(COLORS):
            draw.text((width - 3 * margin - 60, 4 + 12 * i), key, fill=COLORS[key])
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")

"""The loss-curve PNG, drawn with pillow (no matplotlib in the runtime).

Two panels over the same x axis (candidate evaluations), each with its own y range: the
generation losses (they move with each generation's random numbers) on top, the held-out loss
(fixed numbers: the one that picks the result) below.
"""
from PIL import Image, ImageDraw

from .files import atomic_path

PANELS = [
    {"title": "generation loss", "lines": {"mean_loss": (160, 160, 220), "best_loss": (40, 60, 200)}},
    {"title": "held-out loss", "lines": {"heldout_loss": (230, 150, 130), "best_heldout": (200, 40, 20)}},
]


def _panel(draw, box, history, panel):
    left, top, right, bottom = box
    series = {k: [(r["evaluations"], r[k]) for r in history if k in r and r[k] != float("inf")]
              for k in panel["lines"]}
    points = [p for s in series.values() for p in s]
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left + 4, top + 2), panel["title"], fill=(0, 0, 0))
    if not points:
        return
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-12)
    fx = lambda x: left + 4 + (x - x0) / (x1 - x0) * (right - left - 8)  # noqa: E731
    fy = lambda y: bottom - 4 - (y - y0) / (y1 - y0) * (bottom - top - 20)  # noqa: E731
    for key, pts in series.items():
        xy = [(fx(x), fy(y)) for x, y in pts]
        color = panel["lines"][key]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        elif xy:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=color)
    draw.text((right + 4, top + 14), f"{y1:.6g}", fill=(0, 0, 0))
    draw.text((right + 4, bottom - 12), f"{y0:.6g}", fill=(0, 0, 0))
    for i, key in enumerate(panel["lines"]):
        draw.text((left + 120 + 110 * i, top + 2), key, fill=panel["lines"][key])


def loss_curve(history, path, width=720, height=480):
    """history: per-generation records (x = their 'evaluations'); written atomically to PATH."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, gap = 10, width - 90, 10
    panel_height = (height - 40 - gap) // 2
    for i, panel in enumerate(PANELS):
        top = 10 + i * (panel_height + gap)
        _panel(draw, (left, top, right, top + panel_height), history, panel)
    if history:
        draw.text((left, height - 22), f"candidate evaluations {history[0]['evaluations']} .. "
                                       f"{history[-1]['evaluations']}", fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")

"""The shapes world: procedurally drawn images whose every attribute is known, and the small
Stable-Diffusion-architecture model trained on them that ships with edge-ti.

    from edge_ti import shapes
    rng = np.random.default_rng(0)
    attributes = shapes.sample_attributes(rng)       # never one of shapes.HELD_OUT
    image = shapes.draw.draw(attributes, rng)        # uint8 [32, 32, 3]
    shapes.analyze(image)                            # the attributes read back
    model = edge_ti.open_model(shapes.model_dir())   # the shipped ONNX folder

The model is made by `python -m edge_ti_export.shapes_train --out DIR --seed 0`
(models.md: how it was trained and how well it draws).
"""
import os

from . import draw  # the module: shapes.draw.draw(attributes, rng) draws one image
from .analyzer import analyze, match
from .draw import ATTRIBUTES, HELD_OUT, caption, concept_images, is_held_out, sample_attributes

__all__ = ["ATTRIBUTES", "HELD_OUT", "analyze", "caption", "concept_images", "draw", "is_held_out", "match",
           "model_dir", "sample_attributes"]


def model_dir():
    """The path of the shipped ONNX model folder (read-only: edge-ti writes only to its cache)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")

"""`edge-ti demo`: learn a concept the shapes-world model never saw named, offline, in minutes.

The concept is a held-out combination (draw.HELD_OUT: the model never saw a blue star) with a
fill pattern: "a striped blue star". Six images of it are drawn (other attributes random), a token
is learned from them with forward passes only, starting from the word "star", and the analyzer
reads the concept's attributes back from images generated with the init and with the learned token.
"""
import os

import numpy as np
from PIL import Image

from . import shapes
from .init import from_word
from .generate import generate, make_grid, save_images, save_png
from .model import open_model
from .train import TrainSettings, train

CONCEPT = {"shape": "star", "color": "blue", "pattern": "striped"}
INIT_WORD = "star"
TOKEN = "<concept>"
# prompt templates in the world's caption style ("a small striped red star on the left, black
# background"): the token stands where the pattern, color and shape words would be
TEMPLATES = ["a {}", "a small {}", "a big {}", "a {} on the left", "a {} in the center", "a {} on the right",
             "a {}, black background", "a {}, white background", "a {}, gray background", "a {}, brown background"]
PROMPT = "a {}"


def attribute_accuracy(images, concept=CONCEPT):
    """{attribute: fraction of images whose analyzed attribute equals the concept's}."""
    hits = [shapes.match(concept, shapes.analyze(image)) for image in images]
    return {name: float(np.mean([h[name] for h in hits])) for name in concept}


def run(out_dir, budget=1000, seed=0, n=16, steps=25, guidance=4.0, images=6, on_generation=None,
        model_dir=None):
    """Draw, learn, generate, measure. Returns {"init": accuracies, "learned": accuracies, "result": TrainResult}."""
    model = open_model(model_dir or shapes.model_dir())
    os.makedirs(os.path.join(out_dir, "concept"), exist_ok=True)
    drawn = shapes.concept_images(images, np.random.default_rng(seed), exclude=(), **CONCEPT)
    for i, image in enumerate(drawn):
        save_png(image, os.path.join(out_dir, "concept", f"{i:02d}.png"))
    settings = TrainSettings(template=TEMPLATES, budget=budget, seed=seed, popsize=20)
    result = train(model, [Image.fromarray(x) for x in drawn], TOKEN, os.path.join(out_dir, "concept.safetensors"),
                   init_word=INIT_WORD, settings=settings, on_generation=on_generation,
                   resume="restart")  # the demo's folder is its own: a rerun learns again
    init = {TOKEN: from_word(model, INIT_WORD)}
    report = {"result": result}
    for name, embedding in (("init", init), ("learned", result.embedding)):
        generated = generate(model, PROMPT.format(TOKEN), embedding, steps=steps, guidance=guidance, seed=seed + 1,
                             n=n)
        save_images(generated, os.path.join(out_dir, name))
        save_png(make_grid(generated), os.path.join(out_dir, f"{name}-grid.png"))
        report[name] = attribute_accuracy(generated)
    return report

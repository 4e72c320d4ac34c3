"""`edge-ti demo`: learn a concept the shapes-world model never saw named, offline, in minutes.

The concept is a held-out combination (draw.HELD_OUT: the model never saw a blue star) with a
fill pattern: "a striped blue star". Six images of it are drawn (other attributes random), a token
is learned from them with forward passes only, starting from the word "star", and the analyzer
reads the concept's attributes back from images generated with the init and with the learned token.
The report says, attribute by attribute, what the learned token's generations show and what the
init word's already showed (`verdict`), and `side-by-side.png` puts the three sets of images
(drawn, init, learned) next to each other at a size a person can see.
"""
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import shapes
from .init import from_word
from .generate import generate, make_grid, save_images, save_png
from .model import open_model
from .train import TrainSettings, train

CONCEPT = {"shape": "star", "color": "blue", "pattern": "striped"}
INIT_WORD = "star"
TOKEN = "<concept>"
# candidate evaluations: on a v-prediction shapes model 1000 never reached the blue (0-19% of generations,
# 3 seeds) and 3000 did in every seed, in generations of 20 candidates x 4 samples; since stop 38 the search's
# generations are 10 x 2, and 6000 of its evaluations are the same 12,000 UNet samples (models.md). ~1 min on 2 cores
BUDGET = 6000
# prompt templates in the world's caption style ("a small striped red star on the left, black
# background"): the token stands where the pattern, color and shape words would be
TEMPLATES = ["a {}", "a small {}", "a big {}", "a {} on the left", "a {} in the center", "a {} on the right",
             "a {}, black background", "a {}, white background", "a {}, gray background", "a {}, brown background"]
PROMPT = "a {}"
# an attribute counts as shown when at least this share of the generations shows it
SHOWN = 0.75
UPSCALE = 4  # 32 px images -> 128 px in side-by-side.png (nearest neighbour: the pixels stay visible)


def attribute_accuracy(images, concept=CONCEPT):
    """{attribute: fraction of images whose analyzed attribute equals the concept's}."""
    hits = [shapes.match(concept, shapes.analyze(image)) for image in images]
    return {name: float(np.mean([h[name] for h in hits])) for name in concept}


def verdict(init, learned, shown=SHOWN):
    """One line from the two {attribute: accuracy} tables: what the learned token shows, what it only
    kept from the init word, what it does not show yet (with its accuracy and chance)."""
    chance = {name: 1 / len(shapes.ATTRIBUTES[name]) for name in learned}
    gained = [n for n in learned if learned[n] >= shown and init[n] < shown]
    kept = [n for n in learned if learned[n] >= shown and init[n] >= shown]
    missing = [f"{n} ({learned[n]:.2f}, chance {chance[n]:.2f})" for n in learned if learned[n] < shown]
    parts = [f"learned {', '.join(gained) or 'nothing the init word did not show'}"]
    if kept:
        parts.append(f"kept from the init word: {', '.join(kept)}")
    parts.append(f"not yet: {', '.join(missing) or 'nothing'}")
    return f"verdict (shown = in >= {shown:.0%} of generations): " + "; ".join(parts)


def _font(size):
    try:
        return ImageFont.load_default(size=size)   # a scalable font (pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def side_by_side(panels, upscale=UPSCALE):
    """[(title, lines, uint8 [n, H, W, 3])] -> one labelled uint8 image: each panel a grid of its images,
    upscaled, with its title above and its lines (accuracies) below."""
    grids = [make_grid(np.asarray(images)).repeat(upscale, axis=0).repeat(upscale, axis=1) for _, _, images in panels]
    font, pad, line = _font(14), 12, 18
    n_lines = max(len(lines) for _, lines, _ in panels) + 1
    width = sum(g.shape[1] for g in grids) + pad * (len(grids) + 1)
    height = max(g.shape[0] for g in grids) + pad * 2 + line * (n_lines + 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = pad
    for (title, lines, _), grid in zip(panels, grids):
        draw.text((x, pad), title, fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(grid), (x, pad + line + 4))
        for i, text in enumerate(lines):
            draw.text((x, pad + line + 8 + grid.shape[0] + i * line), text, fill=(0, 0, 0), font=font)
        x += grid.shape[1] + pad
    return np.asarray(canvas)


def run(out_dir, budget=BUDGET, seed=0, n=16, steps=25, guidance=4.0, images=6, on_generation=None,
        model_dir=None):
    """Draw, learn, generate, measure. Returns {"init": accuracies, "learned": accuracies, "verdict": line,
    "result": TrainResult}."""
    model = open_model(model_dir or shapes.model_dir())
    os.makedirs(os.path.join(out_dir, "concept"), exist_ok=True)
    drawn = shapes.concept_images(images, np.random.default_rng(seed), exclude=(), **CONCEPT)
    for i, image in enumerate(drawn):
        save_png(image, os.path.join(out_dir, "concept", f"{i:02d}.png"))
    # the templates are object prompts (in the world's caption style), so the token keeps "star" as its anchor,
    # as --anchor auto does for --template object
    settings = TrainSettings(template=TEMPLATES, budget=budget, seed=seed, anchor=True)
    result = train(model, [Image.fromarray(x) for x in drawn], TOKEN, os.path.join(out_dir, "concept.safetensors"),
                   init_word=INIT_WORD, settings=settings, on_generation=on_generation,
                   resume="restart")  # the demo's folder is its own: a rerun learns again
    init = {TOKEN: from_word(model, INIT_WORD)}
    report = {"result": result}
    panels = [(f"drawn: {CONCEPT['pattern']} {CONCEPT['color']} {CONCEPT['shape']}", ["what the token learns from"], drawn)]
    for name, embedding in (("init", init), ("learned", result.embedding)):
        generated = generate(model, PROMPT.format(TOKEN), embedding, steps=steps, guidance=guidance, seed=seed + 1,
                             n=n)
        save_images(generated, os.path.join(out_dir, name))
        save_png(make_grid(generated), os.path.join(out_dir, f"{name}-grid.png"))
        report[name] = attribute_accuracy(generated)
        title = f"init: the word {INIT_WORD!r}" if name == "init" else f"learned: {TOKEN}"
        panels.append((title, [f"{k} {v:.2f}" for k, v in report[name].items()], generated))
    report["verdict"] = verdict(report["init"], report["learned"])
    save_png(side_by_side(panels), os.path.join(out_dir, "side-by-side.png"))
    return report

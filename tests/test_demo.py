"""`edge-ti demo` (the README's first command) runs offline on the shipped model, without torch."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edge_ti import shapes
from edge_ti.demo import CONCEPT, UPSCALE, verdict

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_folder(folder):
    return [np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))]


@pytest.mark.skipif(not os.path.isfile(os.path.join(shapes.model_dir(), "model_index.json")),
                    reason="the shapes-world model is not in this checkout")
def test_demo_runs_without_torch(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "without_torch.py"), "edge_ti", "demo", "--out", str(out),
                           "--budget", "60", "--n", "4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("concept.safetensors", "concept.loss.png", "init-grid.png", "learned-grid.png", "side-by-side.png"):
        assert (out / name).is_file(), name
    # the concept images: a striped blue star each, whatever the other attributes (read back by the analyzer)
    concept = _read_folder(out / "concept")
    assert len(concept) == 6
    assert all({name: shapes.analyze(image)[name] for name in CONCEPT} == CONCEPT for image in concept)
    # the table: per attribute, the fraction of the written generations whose analyzed attribute is the concept's
    lines = proc.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.split() == ["shape", "color", "pattern"]))
    table = {}
    for row, name in zip(lines[header + 1:header + 3], ("init", "learned")):
        generated = _read_folder(out / name)
        assert len(generated) == 4
        read = [shapes.analyze(image) for image in generated]
        table[name] = {attribute: float(np.mean([r[attribute] == value for r in read]))
                       for attribute, value in CONCEPT.items()}
        assert row.split() == [name, *(f"{v:.2f}" for v in table[name].values())]
    # the verdict follows from the same table
    assert lines[header + 3] == verdict(table["init"], table["learned"])
    # side by side, upscaled: drawn (6 images, 3x2), init and learned (4 each, 2x2), at UPSCALE x 32 px
    side = np.asarray(Image.open(out / "side-by-side.png"))
    for name in ("init", "learned"):
        grid = np.asarray(Image.open(out / f"{name}-grid.png"))
        assert _contains(side, grid.repeat(UPSCALE, axis=0).repeat(UPSCALE, axis=1)), name


def _contains(image, block):
    """True when `block` appears in `image` at some offset."""
    h, w = block.shape[:2]
    ys, xs = np.nonzero((image[:image.shape[0] - h + 1, :image.shape[1] - w + 1] == block[0, 0]).all(axis=-1))
    return any(np.array_equal(image[y:y + h, x:x + w], block) for y, x in zip(ys, xs))


def test_the_verdict_separates_learned_kept_and_missing():
    init = {"shape": 0.8, "color": 0.1, "pattern": 0.3}
    learned = {"shape": 0.9, "color": 1.0, "pattern": 0.4}
    assert verdict(init, learned) == ("verdict (shown = in >= 75% of generations): learned color; "
                                      "kept from the init word: shape; not yet: pattern (0.40, chance 0.33)")
    assert verdict(learned, init) == ("verdict (shown = in >= 75% of generations): learned nothing the init word "
                                      "did not show; kept from the init word: shape; not yet: color (0.10, "
                                      "chance 0.12), pattern (0.30, chance 0.33)")

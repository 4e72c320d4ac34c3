"""`edge-ti demo` (the README's first command) runs offline on the shipped model, without torch."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edge_ti import shapes
from edge_ti.demo import CONCEPT

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
    for name in ("concept.safetensors", "concept.loss.png", "init-grid.png", "learned-grid.png"):
        assert (out / name).is_file(), name
    # the concept images: a striped blue star each, whatever the other attributes (read back by the analyzer)
    concept = _read_folder(out / "concept")
    assert len(concept) == 6
    assert all({name: shapes.analyze(image)[name] for name in CONCEPT} == CONCEPT for image in concept)
    # the table: per attribute, the fraction of the written generations whose analyzed attribute is the concept's
    lines = proc.stdout.splitlines()
    assert lines[-4].split() == ["shape", "color", "pattern"]
    for row, name in zip(lines[-3:-1], ("init", "learned")):
        generated = _read_folder(out / name)
        assert len(generated) == 4
        read = [shapes.analyze(image) for image in generated]
        fractions = [f"{np.mean([r[attribute] == value for r in read]):.2f}" for attribute, value in CONCEPT.items()]
        assert row.split() == [name, *fractions]

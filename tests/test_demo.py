"""`edge-ti demo` (the README's first command) runs offline on the shipped model, without torch."""
import os
import subprocess
import sys

import pytest

from edge_ti import shapes

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not os.path.isfile(os.path.join(shapes.model_dir(), "model_index.json")),
                    reason="the shapes-world model is not in this checkout")
def test_demo_runs_without_torch(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "without_torch.py"), "edge_ti", "demo", "--out", str(out),
                           "--budget", "60", "--n", "4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-4].split() == ["shape", "color", "pattern"]
    for row, name in zip(lines[-3:-1], ("init", "learned")):
        values = [float(v) for v in row.split()[1:]]
        assert row.startswith(name) and len(values) == 3 and all(0 <= v <= 1 for v in values)
    for name in ("concept.safetensors", "concept.loss.png", "init-grid.png", "learned-grid.png"):
        assert (out / name).is_file(), name
    assert len(os.listdir(out / "concept")) == 6 and len(os.listdir(out / "learned")) == 4

"""The runtime runs where torch, diffusers, transformers and optimum cannot be imported."""
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WITHOUT_TORCH = os.path.join(HERE, "without_torch.py")

RUNTIME_PATH = r'''
import sys
import numpy as np
import edge_ti
model_dir, out = sys.argv[1], sys.argv[2]
model = edge_ti.open_model(model_dir)
emb = {"<t>": np.full((2, model.hidden_size), 0.01, np.float32)}
ids = model.tokenize(["a photo of <t>"], emb)
hidden = model.encode_text(["a photo of <t>", "a cat"], emb)
assert hidden.shape == (2, 77, model.hidden_size)
edge_ti.save_embedding(out, emb)
assert np.array_equal(edge_ti.load_embedding(out)["<t>"], emb["<t>"])
for name in ("torch", "diffusers", "transformers", "optimum"):
    assert name not in sys.modules, name
print("runtime ok", ids[0, :6].tolist())
'''


def run_blocked(*args):
    return subprocess.run([sys.executable, WITHOUT_TORCH, *args], capture_output=True, text=True)


def test_blocker_blocks(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import torch\n")
    proc = run_blocked(str(script))
    assert proc.returncode != 0 and "blocked" in proc.stderr


def test_runtime_path_without_torch(tiny_sd, tmp_path):
    script = tmp_path / "runtime.py"
    script.write_text(RUNTIME_PATH)
    proc = run_blocked(str(script), tiny_sd[1], str(tmp_path / "e.safetensors"))
    assert proc.returncode == 0, proc.stderr
    assert "runtime ok" in proc.stdout


def test_cli_without_torch(tiny_sd, tmp_path):
    proc = run_blocked("edge_ti", "info", tiny_sd[1])
    assert proc.returncode == 0, proc.stderr
    proc = run_blocked("edge_ti", "export", str(tmp_path), str(tmp_path / "o"))
    assert proc.returncode == 1 and "pip install 'edge-ti[export]'" in proc.stderr


def test_generate_cli_without_torch(tiny_sd, tmp_path):
    """A diffusers-style and an A1111-style (emb_params, named by its file) embedding in one prompt."""
    from safetensors.numpy import save_file
    import edge_ti
    emb = str(tmp_path / "t.safetensors")
    edge_ti.save_embedding(emb, {"<t>": np.full((1, 32), 0.02, np.float32)})
    a1111 = str(tmp_path / "mystyle.safetensors")
    save_file({"emb_params": np.full((2, 32), -0.03, np.float32)}, a1111)
    out = tmp_path / "images"
    proc = run_blocked("edge_ti", "generate", tiny_sd[1], "a photo of <t> in mystyle", "--embedding", emb,
                       "--embedding", a1111, "--steps", "3", "--n", "2", "--sampler", "dpmpp-2m", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["seed0-00.png", "seed0-01.png", "seed0-grid.png"]
    proc = run_blocked("edge_ti", "tokenize", tiny_sd[1], "a <t> in mystyle", "--embedding", emb, "--embedding", a1111)
    ids = proc.stdout.split()  # BOS a <t> in mystyle(2 vectors) EOS
    assert len(ids) == 7 and ids[2] == "600" and ids[4:6] == ["601", "602"], ids

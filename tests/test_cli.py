"""Bad input gets one line naming the file and the problem: no traceback, nothing half-written."""
import os
import subprocess
import sys

import numpy as np

import edge_ti


def run_cli(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "edge_ti", *args], capture_output=True, text=True, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def _one_line_error(rc, err, *needles):
    assert rc != 0
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err


def test_missing_folder(tmp_path):
    rc, _, err = run_cli("info", str(tmp_path / "nope"))
    _one_line_error(rc, err, "nope", "no such model folder")


def test_folder_without_text_encoder(tiny_sd, tmp_path):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny_sd[1], folder)
    shutil.rmtree(folder / "text_encoder")
    rc, _, err = run_cli("info", str(folder))
    _one_line_error(rc, err, str(folder), "text_encoder")


def test_wrong_width_embedding(tiny_sd, tmp_path):
    path = str(tmp_path / "wide.safetensors")
    edge_ti.save_embedding(path, {"<w>": np.ones((1, 768), np.float32)})
    rc, _, err = run_cli("tokenize", tiny_sd[1], "a <w>", "--embedding", path)
    _one_line_error(rc, err, path, "768", "32")


def test_corrupt_embedding(tiny_sd, tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    rc, _, err = run_cli("tokenize", tiny_sd[1], "a", "--embedding", str(path))
    _one_line_error(rc, err, str(path), "safetensors")


def test_convert_corrupt_pt_writes_nothing(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a torch archive")
    from test_safe_by_default import invoke  # in this process: torch (for .pt files) loads once per session
    rc, err = invoke("convert", str(bad))
    _one_line_error(rc, err, str(bad))
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]


def test_export_refuses_non_diffusers_folder(tmp_path):
    rc, _, err = run_cli("export", str(tmp_path), str(tmp_path / "out"))
    _one_line_error(rc, err, "model_index.json")
    assert not (tmp_path / "out").exists()


def test_tokenize_prints_ids(tiny_sd, tmp_path):
    path = str(tmp_path / "t.safetensors")
    edge_ti.save_embedding(path, {"<t>": np.ones((2, 32), np.float32)})
    rc, out, err = run_cli("tokenize", tiny_sd[1], "a <t>", "--embedding", path)
    assert rc == 0, err
    assert out.split() == ["598", "320", "600", "601", "599"]  # BOS, "a</w>", <t>, <t>_1, EOS

"""Embedding files: our single-key safetensors, A1111 and ComfyUI layouts, pickles refused, atomic writes."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as torch_save_file

import edge_ti
from edge_ti.errors import EdgeTIError


def test_round_trip(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
    path = str(tmp_path / "tok.safetensors")
    edge_ti.save_embedding(path, {"<tok>": vectors})
    loaded = edge_ti.load_embedding(path)
    assert list(loaded) == ["<tok>"] and np.array_equal(loaded["<tok>"], vectors)
    assert os.listdir(tmp_path) == ["tok.safetensors"]  # no temp file left behind


def test_a1111_comfyui_and_bf16_layouts(tmp_path):
    t = torch.randn(2, 32)
    torch_save_file({"emb_params": t}, str(tmp_path / "a1111-style.safetensors"))
    torch_save_file({"clip_l": t, "clip_g": torch.randn(2, 64)}, str(tmp_path / "sdxl.safetensors"))
    torch_save_file({"<one>": t[0].to(torch.bfloat16)}, str(tmp_path / "one.safetensors"))
    a = edge_ti.load_embedding(str(tmp_path / "a1111-style.safetensors"))
    assert list(a) == ["a1111-style"] and np.allclose(a["a1111-style"], t.numpy())
    c = edge_ti.load_embedding(str(tmp_path / "sdxl.safetensors"))
    assert np.allclose(c["sdxl"], t.numpy())
    b = edge_ti.load_embedding(str(tmp_path / "one.safetensors"))
    assert b["<one>"].shape == (1, 32)
    assert np.array_equal(b["<one>"][0], t[0].to(torch.bfloat16).float().numpy())


def test_pickles_are_refused_and_converted(tmp_path):
    from edge_ti_export.convert import convert
    t = torch.randn(2, 32)
    a1111 = str(tmp_path / "style.pt")
    torch.save({"string_to_param": {"*": t}, "name": "style", "step": 100}, a1111)
    diffusers_bin = str(tmp_path / "learned_embeds.bin")
    torch.save({"<cat-toy>": t[0]}, diffusers_bin)
    for path in (a1111, diffusers_bin):
        with pytest.raises(EdgeTIError, match="pickled torch file"):
            edge_ti.load_embedding(path)
    assert np.allclose(edge_ti.load_embedding(convert(a1111))["style"], t.numpy())
    assert np.allclose(edge_ti.load_embedding(convert(diffusers_bin))["<cat-toy>"], t[:1].numpy())


@pytest.mark.parametrize("content, message", [
    (b"", "too short"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "unreadable header"),
    (b"\xff\xff\xff\xff\x00\x00\x00\x00{}", "header length"),
])
def test_corrupt_files(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(EdgeTIError, match=message):
        edge_ti.load_embedding(str(path))


def test_truncated_file(tmp_path):
    path = str(tmp_path / "t.safetensors")
    edge_ti.save_embedding(path, {"<t>": np.ones((4, 32), np.float32)})
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    with pytest.raises(EdgeTIError, match="truncated"):
        edge_ti.load_embedding(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "two.safetensors"
    with pytest.raises(EdgeTIError, match="one token"):
        edge_ti.save_embedding(str(path), {"<a>": np.ones((1, 4)), "<b>": np.ones((1, 4))})
    assert not path.exists()
    edge_ti.save_embedding(str(path), {"<a>": np.ones((1, 4))})

    class CrashMidway:  # the user presses Ctrl-C while the file is being written
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[:len(data) // 2])
            raise KeyboardInterrupt
    monkeypatch.setattr("edge_ti.embeddings.open", lambda path, mode="r": (CrashMidway if "w" in mode else open)(path, mode),
                        raising=False)
    with pytest.raises(KeyboardInterrupt):
        edge_ti.save_embedding(str(path), {"<a>": np.zeros((1, 4))})
    assert np.array_equal(edge_ti.load_embedding(str(path))["<a>"], np.ones((1, 4)))  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["two.safetensors"]


def test_our_file_loads_in_diffusers_and_a1111_reader(tiny_sd, tmp_path):
    # diffusers: covered numerically in test_text_encoder; AUTOMATIC1111 reads a single-key
    # safetensors dict by taking its one tensor (modules/textual_inversion/textual_inversion.py)
    from safetensors.torch import load_file
    path = str(tmp_path / "x.safetensors")
    edge_ti.save_embedding(path, {"<x>": np.ones((2, 32), np.float32)})
    data = load_file(path)
    assert len(data) == 1 and next(iter(data.values())).shape == (2, 32)
    assert next(iter(data.values())).dtype == torch.float32

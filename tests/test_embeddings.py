"""Embedding files: our single-key safetensors, A1111 and ComfyUI layouts, pickles refused, atomic writes."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file as torch_save_file

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
    c = edge_ti.load_embedding(str(tmp_path / "sdxl.safetensors"))   # both parts; an SD model reads clip_l
    assert np.allclose(c["sdxl"]["clip_l"], t.numpy()) and c["sdxl"]["clip_g"].shape == (2, 64)
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
    def crash_when_writing(path, mode="r"):
        return (CrashMidway if "w" in mode else open)(path, mode)
    monkeypatch.setattr("edge_ti.embeddings.open", crash_when_writing, raising=False)
    with pytest.raises(KeyboardInterrupt):
        edge_ti.save_embedding(str(path), {"<a>": np.zeros((1, 4))})
    assert np.array_equal(edge_ti.load_embedding(str(path))["<a>"], np.ones((1, 4)))  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["two.safetensors"]


def _a1111_read(path):
    """What AUTOMATIC1111's webui does with a .safetensors file in its embeddings folder
    (modules/textual_inversion/textual_inversion.py: EmbeddingDatabase.load_from_file, then
    create_embedding_from_data), its asserts kept -> (the name prompts use, vectors float32 [n, D])."""
    name, ext = os.path.splitext(os.path.basename(path))
    assert ext.upper() == ".SAFETENSORS"
    data = load_file(path, device="cpu")
    # not its .pt branch ('string_to_param') nor its SDXL one ('clip_g' and 'clip_l'): "diffuser concepts"
    assert "string_to_param" not in data and not ("clip_g" in data and "clip_l" in data)
    assert type(data) == dict and type(next(iter(data.values()))) == torch.Tensor
    assert len(data.keys()) == 1, "embedding file has multiple terms in it"
    emb = next(iter(data.values()))
    if len(emb.shape) == 1:
        emb = emb.unsqueeze(0)
    return name, emb.detach().to(dtype=torch.float32)


def test_our_file_loads_in_the_a1111_reader(tiny_sd, tmp_path):
    # diffusers reads it too: covered numerically in test_text_encoder
    vectors = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
    path = str(tmp_path / "x.safetensors")
    edge_ti.save_embedding(path, {"<x>": vectors})
    name, vec = _a1111_read(path)
    assert name == "x"  # A1111 names an embedding after its file, not after the key
    # A1111 skips an embedding whose width is not its text encoder's (get_expected_shape)
    assert vec.shape == (2, edge_ti.open_model(tiny_sd[1]).hidden_size)
    assert torch.equal(vec, torch.from_numpy(vectors))

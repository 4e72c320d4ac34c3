"""The patched ONNX text encoder equals torch's CLIPTextModel with the tokens added by diffusers."""
import os

import numpy as np
import onnx
import pytest
import torch
from diffusers import StableDiffusionPipeline

import edge_ti
from edge_ti import text_encoder as te
from edge_ti.errors import EdgeTIError

PROMPTS = ["a photo of {}", "a rendition of the {}", "{}, on a red table", "a cat and a dog"]


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def pipes(tiny_sd):
    source, onnx_dir = tiny_sd
    return source, edge_ti.open_model(onnx_dir)


def _torch_outputs(source, embedding_file, prompts):
    pipe = StableDiffusionPipeline.from_pretrained(source)
    pipe.load_textual_inversion(embedding_file)
    prompts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids)
    return pipe, ids.numpy(), out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.mark.parametrize("vectors", [1, 3])
def test_injection_matches_diffusers(pipes, tmp_path, vectors):
    source, model = pipes
    token = "<cat-toy>"
    emb = {token: np.random.default_rng(vectors).normal(0, 0.05, (vectors, model.hidden_size)).astype(np.float32)}
    path = str(tmp_path / "cat-toy.safetensors")
    edge_ti.save_embedding(path, emb)
    prompts = [p.format(token) for p in PROMPTS]
    _, ids, hidden, pooled = _torch_outputs(source, path, prompts)

    assert np.array_equal(model.tokenize(prompts, edge_ti.load_embedding(path)), ids)
    got = model.encode_text(prompts, edge_ti.load_embedding(path))
    assert _rel_err(got, hidden) <= 1e-4
    full_ids = model.tokenize(prompts, emb)
    _, got_pooled = te.encode(model.text_encoder, full_ids, emb[token])
    assert _rel_err(got_pooled, pooled) <= 1e-4


def test_population_batch_matches_row_by_row_torch(pipes, tmp_path):
    source, model = pipes
    token, n, P = "<cat-toy>", 2, 5
    rng = np.random.default_rng(0)
    candidates = rng.normal(0, 0.05, (P, n, model.hidden_size)).astype(np.float32)
    path = str(tmp_path / "cat-toy.safetensors")
    edge_ti.save_embedding(path, {token: candidates[0]})
    prompts = [p.format(token) for p in PROMPTS]
    pipe, ids, _, _ = _torch_outputs(source, path, prompts)

    prompt_ids = model.tokenize(prompts, {token: candidates[0]})                # (K, 77)
    got, _ = te.encode_population(model.text_encoder, prompt_ids, candidates, model.vocab_size)  # (P, K, 77, D)
    table = pipe.text_encoder.get_input_embeddings().weight
    V = model.vocab_size
    for p in range(P):
        with torch.no_grad():
            table[V:V + n] = torch.from_numpy(candidates[p])
            want = pipe.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
        assert _rel_err(got[p], want) <= 1e-4, p
    # the candidates really differ: rows of different candidates are not equal
    assert _rel_err(got[0], got[1]) > 1e-3


def test_no_embeddings_is_the_plain_encoder(pipes, tiny_sd):
    source, model = pipes
    import onnxruntime as ort
    plain = ort.InferenceSession(os.path.join(tiny_sd[1], "text_encoder", "model.onnx"))
    ids = model.tokenize(["a cat on a table"])
    want = plain.run(None, {"input_ids": ids})[0]
    assert np.array_equal(model.encode_text(["a cat on a table"]), want)


def test_table_found_by_gather_not_by_name(tiny_sd, tmp_path):
    # rename every initializer: the patch still finds the table through the Gather on input_ids
    m = onnx.load(os.path.join(tiny_sd[1], "text_encoder", "model.onnx"))
    renames = {t.name: f"w{i}" for i, t in enumerate(m.graph.initializer)}
    for t in m.graph.initializer:
        t.name = renames[t.name]
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    src = tmp_path / "renamed.onnx"
    onnx.save(m, str(src))
    table = te.patch_text_encoder(str(src), str(tmp_path / "patched"))
    assert table.shape == (600, 32)


def test_not_a_text_encoder(tiny_sd, tmp_path):
    with pytest.raises(EdgeTIError, match="not a CLIP text encoder"):
        te.patch_text_encoder(os.path.join(tiny_sd[1], "unet", "model.onnx"), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx at all")
    with pytest.raises(EdgeTIError, match="not a readable ONNX model"):
        te.patch_text_encoder(str(broken), str(tmp_path / "y"))


def test_user_folder_is_never_written(tiny_sd, tmp_path):
    import shutil
    folder = tmp_path / "ro"
    shutil.copytree(tiny_sd[1], folder)
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    model = edge_ti.open_model(str(folder))
    model.encode_text(["<t> a"], {"<t>": np.zeros((1, 32), np.float32)})
    after = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    assert before == after


def test_unavailable_device_lists_providers(tiny_sd):
    with pytest.raises(EdgeTIError, match="CPUExecutionProvider"):
        edge_ti.open_model(tiny_sd[1], device="directml")


def test_folder_made_by_optimum_cli_works_unchanged(tiny_sd, tmp_path, monkeypatch):
    """A folder written by `optimum-cli export onnx --task text-to-image` itself opens and encodes."""
    import sys
    from optimum.commands.optimum_cli import main  # what the optimum-cli script runs, in this process
    out = tmp_path / "optimum-cli-export"
    monkeypatch.setattr(sys, "argv", ["optimum-cli", "export", "onnx", "--model", tiny_sd[0], "--task",
                                      "text-to-image", str(out)])
    main()  # raises (or exits non-zero) on a failure
    model = edge_ti.open_model(str(out))
    emb = {"<t>": np.full((2, 32), 0.01, np.float32)}
    ours = edge_ti.open_model(tiny_sd[1]).encode_text(["a photo of <t>"], emb)
    assert np.allclose(model.encode_text(["a photo of <t>"], emb), ours, atol=1e-6)

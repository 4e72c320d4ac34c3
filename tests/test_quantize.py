"""int8 / fp16 copies of a model folder score candidates like fp32; the optimized-session cache.

Tolerances, on the tiny model (a 2% relative UNet output error for int8, 0.1% for fp16):
losses within 1% (int8) and 0.1% (fp16) of fp32, and the ranking of 12 candidates kept
(Spearman >= 0.8 for int8, >= 0.95 for fp16). The loss is mostly irreducible noise, so candidates
differ by ~1e-3 relative: the ranking check is the one that matters for the search.
"""
import json
import os

import numpy as np
import onnx
import pytest

import edge_ti
from edge_ti.denoiser import Denoiser
from edge_ti import objective, quantize
from edge_ti.cache import fingerprint
from edge_ti.errors import EdgeTIError
from edge_ti.metrics import spearman
from edge_ti.session import SessionSettings, create_session


def _snapshot(folder):
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)),
                   os.path.getmtime(os.path.join(d, f))) for d, _, fs in os.walk(folder) for f in fs)


def _losses(onnx_dir, P=12):
    model = edge_ti.open_model(onnx_dir)
    rng = np.random.default_rng(0)
    e0 = model.token_embeddings[model.tokenizer(["cat"])[0][1]][None]                   # (1, D)
    candidates = (e0[None] + rng.normal(0, 0.5 * model.token_embeddings.std(),
                                        (P, 1, model.hidden_size))).astype(np.float32)  # (P, 1, D)
    prompt_ids = model.tokenize(["a photo of a <t>", "a rendition of the <t>"], {"<t>": e0})
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    triples = objective.draw_triples(np.random.default_rng(1), 3, 2, 2, 1000, latents.shape[1:])
    return objective.population_loss(Denoiser(model), candidates, prompt_ids, latents, triples, max_batch=8)


@pytest.mark.parametrize("mode, rtol, rho", [("int8", 1e-2, 0.8), ("fp16", 1e-3, 0.95)])
def test_quantized_scores_like_fp32(tiny_sd, tmp_path, mode, rtol, rho):
    _, onnx_dir = tiny_sd
    before = _snapshot(onnx_dir)
    out = quantize.quantize_model(onnx_dir, str(tmp_path / mode), mode=mode)
    assert _snapshot(onnx_dir) == before  # the source folder is only read
    assert sorted(os.listdir(out)) == sorted(os.listdir(onnx_dir) + ["edge_ti_quantization.json"])
    assert json.load(open(os.path.join(out, "edge_ti_quantization.json")))["mode"] == mode
    reference, ours = _losses(onnx_dir), _losses(out)
    assert np.all(np.abs(ours - reference) <= rtol * np.abs(reference)), np.abs(ours / reference - 1).max()
    assert spearman(reference, ours) >= rho
    for part in ("unet", "text_encoder"):  # int8 / fp16 weights: smaller files
        size = lambda d: os.path.getsize(os.path.join(d, part, "model.onnx"))
        assert size(out) < size(onnx_dir), part
    if mode == "int8":
        nodes = onnx.load(os.path.join(out, "unet", "model.onnx")).graph.node
        ops = {n.op_type for n in nodes}
        assert "MatMulInteger" in ops and "ConvInteger" not in ops
        # the feed-forward layers stay float (quantize.FLOAT_LAYERS), every other weight MatMul is int8
        float_matmuls = {n.name for n in nodes if n.op_type == "MatMul" and n.name.endswith("/MatMul")
                         and not n.name.startswith("/MatMul")}
        weights = {i.name for i in onnx.load(os.path.join(onnx_dir, "unet", "model.onnx")).graph.initializer}
        feed_forward = {n.name for n in onnx.load(os.path.join(onnx_dir, "unet", "model.onnx")).graph.node
                        if "/ff/" in n.name and n.op_type == "MatMul" and any(i in weights for i in n.input)}
        assert feed_forward and feed_forward <= float_matmuls
        assert not {n for n in float_matmuls if "/to_q/" in n or "/to_k/" in n}
        record = json.load(open(os.path.join(out, "edge_ti_quantization.json")))
        assert record["float_layers"] == ["/ff/"]


def test_refuses_bad_outputs(tiny_sd, tmp_path):
    _, onnx_dir = tiny_sd
    before = _snapshot(onnx_dir)
    with pytest.raises(EdgeTIError, match="inside"):
        quantize.quantize_model(onnx_dir, os.path.join(onnx_dir, "int8"))
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(EdgeTIError, match="already exists"):
        quantize.quantize_model(onnx_dir, str(existing))
    with pytest.raises(EdgeTIError, match="unknown mode"):
        quantize.quantize_model(onnx_dir, str(tmp_path / "x"), mode="int4")
    with pytest.raises(EdgeTIError, match="unknown part"):
        quantize.quantize_model(onnx_dir, str(tmp_path / "x"), parts=("decoder",))
    with pytest.raises(EdgeTIError, match="not an ONNX"):
        quantize.quantize_model(str(tmp_path), str(tmp_path / "x"))
    assert _snapshot(onnx_dir) == before
    assert not (tmp_path / "x").exists()


def test_failure_leaves_nothing(tiny_sd, tmp_path, monkeypatch):
    _, onnx_dir = tiny_sd

    def fail_after_writing(src, dst, *args, **kwargs):
        with open(dst, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")
    monkeypatch.setattr(quantize, "quantize_int8", fail_after_writing)
    with pytest.raises(RuntimeError, match="disk full"):
        quantize.quantize_model(onnx_dir, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []  # neither OUT nor the temporary folder


def test_session_cache_same_outputs(tiny_sd, tmp_path):
    _, onnx_dir = tiny_sd
    path = os.path.join(onnx_dir, "unet", "model.onnx")
    rng = np.random.default_rng(0)
    plain = create_session(path, ["CPUExecutionProvider"], SessionSettings(cache=False))
    feeds = {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    feeds["timestep"] = np.array(500, dtype=np.int64 if "int64" in plain.get_inputs()[1].type else np.float32)
    want = plain.run(None, feeds)[0]
    cache = tmp_path / "sessions"
    first = create_session(path, ["CPUExecutionProvider"], SessionSettings(), str(cache))  # optimizes, saves
    (entry,) = os.listdir(cache)                                       # one entry, no temporary left
    assert sorted(os.listdir(cache / entry)) == ["model.onnx", "model.onnx.data"]
    second = create_session(path, ["CPUExecutionProvider"], SessionSettings(), str(cache))  # loads the saved graph
    assert os.listdir(cache) == [entry]
    for session in (first, second):
        assert np.allclose(session.run(None, feeds)[0], want, rtol=1e-5, atol=1e-5)


def test_fingerprint_covers_external_weights(tmp_path):
    # optimum keeps a large UNet's weights in model.onnx_data beside an unchanged graph file
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.onnx_data").write_bytes(b"\0" * 100)
    a = fingerprint(str(tmp_path / "model.onnx"))
    (tmp_path / "config.json").write_text('{"note": 1}')
    assert fingerprint(str(tmp_path / "model.onnx")) == a              # configs do not matter
    (tmp_path / "model.onnx_data").write_bytes(b"\1" + b"\0" * 99)
    assert fingerprint(str(tmp_path / "model.onnx")) != a              # weights do


NO_TORCH = r'''
import sys
from edge_ti.quantize import quantize_model
quantize_model(sys.argv[1], sys.argv[2], sys.argv[3])
for name in ("torch", "diffusers", "transformers", "optimum"):
    assert name not in sys.modules, name
print("quantized")
'''


@pytest.mark.parametrize("mode", ["int8", "fp16"])
def test_quantize_without_torch(tiny_sd, tmp_path, mode):
    import subprocess
    import sys
    script = tmp_path / "q.py"
    script.write_text(NO_TORCH)
    blocker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "without_torch.py")
    proc = subprocess.run([sys.executable, blocker, str(script), tiny_sd[1], str(tmp_path / "out"), mode],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "quantized" in proc.stdout


def test_cli_quantize(tiny_sd, tmp_path):
    from test_cli import _one_line_error, run_cli
    _, onnx_dir = tiny_sd
    out = tmp_path / "int8"
    rc, stdout, err = run_cli("quantize", onnx_dir, str(out), "--conv", "static", "--per-channel")
    assert rc == 0, err
    record = json.load(open(out / "edge_ti_quantization.json"))
    assert record["conv"] == "static" and record["per_channel"] and "calibration" in record
    ops = {n.op_type for n in onnx.load(str(out / "unet" / "model.onnx")).graph.node}
    assert {"MatMulInteger", "QuantizeLinear", "DequantizeLinear"} <= ops   # Conv in QDQ form, MatMul dynamic
    assert "WARNING" not in err                                  # onnxruntime.quantization's root-logger noise
    assert np.all(np.isfinite(_losses(str(out))))
    # a second run into the same folder: one line, the folder untouched
    from test_safe_by_default import invoke  # the refusals in this process: no interpreter start-up
    before = _snapshot(str(out))
    rc, err = invoke("quantize", onnx_dir, str(out))
    _one_line_error(rc, err, str(out), "already exists")
    assert _snapshot(str(out)) == before
    rc, err = invoke("quantize", str(tmp_path / "nothing"), str(tmp_path / "x"))
    _one_line_error(rc, err, "nothing")


def test_cli_export_quantized(tiny_sd, tmp_path):
    # the CLI in this process: torch is loaded once per session, not by a new interpreter per call
    from test_cli import _one_line_error
    from test_safe_by_default import invoke
    source, onnx_dir = tiny_sd
    out = tmp_path / "exported-int8"
    rc, err = invoke("export", source, str(out), "--quantize", "int8")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["exported-int8"]     # the fp32 staging export is gone
    record = json.load(open(out / "edge_ti_quantization.json"))
    assert record["mode"] == "int8" and record["conv"] == "none" and record["source"] == source
    # the quantized export scores like the fp32 export of the same weights
    assert spearman(_losses(onnx_dir), _losses(str(out))) >= 0.8
    rc, err = invoke("export", source, str(tmp_path / "y"), "--quantize", "int8", "--fp16")
    _one_line_error(rc, err, "--fp16")
    assert not (tmp_path / "y").exists()


def test_unet_calls_capped(tiny_sd, monkeypatch):
    from edge_ti.denoiser import auto_max_batch
    assert [auto_max_batch((1, 4, s, s)) for s in (8, 16, 32, 64, 96)] == [64, 16, 4, 1, 1]
    model = edge_ti.open_model(tiny_sd[1])
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((40, 4, 16, 16), dtype=np.float32)
    hidden = rng.standard_normal((40, 77, 32), dtype=np.float32)
    whole = Denoiser(model).unet(sample, 500.0, hidden, max_batch=40)
    session, open_session, batches = model.session("unet"), model.session, []

    class Counting:
        def run(self, names, feed):
            batches.append(len(feed["sample"]))
            return session.run(names, feed)

        def __getattr__(self, name):
            return getattr(session, name)
    counting = Counting()
    monkeypatch.setattr(model, "session", lambda part: counting if part == "unet" else open_session(part))
    capped = Denoiser(model).unet(sample, 500.0, hidden)        # 16x16 latents: 16 per call
    assert batches == [16, 16, 8]
    np.testing.assert_allclose(capped, whole, rtol=1e-5, atol=1e-6)


def test_model_sessions_use_the_optimized_graph_cache(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_TI_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    hidden = rng.standard_normal((2, 77, 32), dtype=np.float32)
    first = Denoiser(edge_ti.open_model(tiny_sd[1])).unet(sample, 500.0, hidden)
    entries = os.listdir(tmp_path / "cache" / "sessions")
    assert len(entries) == 1                                     # the UNet's optimized graph, saved once
    again = Denoiser(edge_ti.open_model(tiny_sd[1], threads=1)).unet(sample, 500.0, hidden)
    assert os.listdir(tmp_path / "cache" / "sessions") == entries  # loaded, not optimized again
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-6)


def test_export_refuses_an_unknown_quantization_before_exporting(tiny_sd, tmp_path):
    from edge_ti_export.onnx_export import export_pipeline
    with pytest.raises(EdgeTIError, match="unknown quantization 'int4'"):
        export_pipeline(tiny_sd[0], str(tmp_path / "out"), quantize="int4")
    assert os.listdir(tmp_path) == []


def test_int8_keeps_excluded_layers_in_float(tiny_sd, tmp_path):
    """quantize_int8(exclude=...) leaves those MatMuls float; only=... quantizes just those."""
    src = os.path.join(tiny_sd[1], "unet", "model.onnx")
    graph = onnx.load(src).graph
    weights = {i.name for i in graph.initializer}
    layers = [n.name for n in graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)]
    keep = [n for n in layers if "/attn2/to_k/" in n or "/attn2/to_v/" in n]
    assert keep and len(keep) < len(layers)

    def float_matmuls(path):
        return {n.name for n in onnx.load(path).graph.node if n.op_type == "MatMul"} & set(layers)
    quantize.quantize_int8(src, str(tmp_path / "all.onnx"))
    quantize.quantize_int8(src, str(tmp_path / "kept.onnx"), exclude=keep)
    quantize.quantize_int8(src, str(tmp_path / "only.onnx"), only=keep)
    assert float_matmuls(tmp_path / "all.onnx") == set()
    assert float_matmuls(tmp_path / "kept.onnx") == set(keep)
    assert float_matmuls(tmp_path / "only.onnx") == set(layers) - set(keep)


def test_int8_of_every_layer_on_request(tiny_sd, tmp_path):
    out = quantize.quantize_model(tiny_sd[1], str(tmp_path / "all"), float_layers=())
    assert not [n.name for n in onnx.load(os.path.join(out, "unet", "model.onnx")).graph.node
                if "/ff/" in n.name and n.op_type == "MatMul"]
    assert json.load(open(os.path.join(out, "edge_ti_quantization.json")))["float_layers"] == []

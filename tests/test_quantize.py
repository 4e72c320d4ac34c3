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


def test_cli_quantize_feed_forward(tiny_sd, tmp_path):
    """--feed-forward int8 quantizes the UNet's feed-forward MatMuls too; bad values are one line."""
    from test_safe_by_default import invoke
    out = tmp_path / "all"
    rc, err = invoke("quantize", tiny_sd[1], str(out), "--feed-forward", "int8")
    assert rc == 0, err
    assert err.splitlines() == ["[1/2] text_encoder: int8", "[2/2] unet: int8"]   # one line per part, as it starts
    assert json.load(open(out / "edge_ti_quantization.json"))["float_layers"] == []
    assert not [n.name for n in onnx.load(str(out / "unet" / "model.onnx")).graph.node
                if "/ff/" in n.name and n.op_type == "MatMul"]
    for args, message in [(["--feed-forward", "int4"], "Invalid value for '--feed-forward'"),
                          (["--mode", "fp16", "--feed-forward", "int8"], "apply to --mode int8, not fp16"),
                          (["--calibration", "0"], "Invalid value for '--calibration'")]:
        rc, err = invoke("quantize", tiny_sd[1], str(tmp_path / "x"), *args)
        assert rc != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


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
    assert record["mode"] == "int8" and record["conv"] == "weights" and record["source"] == source
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


def _unet_feed(session):
    """One input of the tiny UNet's SESSION (batch 2, 16x16), the timestep as its export types it."""
    rng = np.random.default_rng(0)
    timestep = session.get_inputs()[1]
    return {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
            timestep.name: np.array(500, np.int64 if "int64" in timestep.type else np.float32)}


def _run(path, part):
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if part == "text_encoder":
        ids = np.random.default_rng(0).integers(0, 500, (2, 77))
        return session.run(None, {session.get_inputs()[0].name: ids.astype(
            np.int32 if "int32" in session.get_inputs()[0].type else np.int64)})
    return session.run(None, _unet_feed(session))


def _weights(path):
    return {t.name: onnx.numpy_helper.to_array(t, base_dir=os.path.dirname(str(path)))
            for t in onnx.load(str(path), load_external_data=False).graph.initializer}


@pytest.mark.parametrize("per_channel, qmax", [(False, 64), (True, 64), (False, 127)])
@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_int8_is_quantize_dynamics_graph(tiny_sd, tmp_path, part, per_channel, qmax):
    """int8_matmul writes what onnxruntime's quantize_dynamic writes: the same int8 weights and scales
    (by name), the same nodes, the same outputs; MatMul and Gemm (time embeddings) alike; 7-bit weights
    (reduce_range, what quantize_int8 writes) or full-range ones."""
    import collections

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edge_ti import int8_matmul
    src = os.path.join(tiny_sd[1], part, "model.onnx")
    with quantize._QuietRoot():
        quantize_dynamic(src, str(tmp_path / "ort.onnx"), op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=per_channel, weight_type=QuantType.QInt8, reduce_range=qmax == 64,
                         extra_options={"MatMulConstBOnly": True})
    if qmax == int8_matmul.QMAX:
        quantize.quantize_int8(src, str(tmp_path / "ours.onnx"), per_channel=per_channel)
    else:
        int8_matmul.quantize_matmuls(src, str(tmp_path / "ours.onnx"), per_channel=per_channel, qmax=qmax)
    theirs, ours = _weights(tmp_path / "ort.onnx"), _weights(tmp_path / "ours.onnx")
    assert sorted(theirs) == sorted(ours)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and np.array_equal(ours[name], value), name
    ops = lambda p: collections.Counter(n.op_type for n in onnx.load(str(p)).graph.node)  # noqa: E731
    assert ops(tmp_path / "ours.onnx") == ops(tmp_path / "ort.onnx")
    assert ops(tmp_path / "ours.onnx")["MatMulInteger"] > 0
    if part == "unet":
        assert ops(src)["Gemm"] > 0 and ops(tmp_path / "ours.onnx")["Gemm"] == 0
    for a, b in zip(_run(tmp_path / "ort.onnx", part), _run(tmp_path / "ours.onnx", part)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_int8_streams_external_weights(tiny_sd, tmp_path):
    """A model whose weights lie in external files (one per tensor, as torch.onnx.export writes a
    large model) is quantized into one data file beside the graph, the same weights as from one piece;
    the source's weights are read one tensor at a time, never the whole model."""
    from edge_ti import external_data
    src = os.path.join(tiny_sd[1], "unet", "model.onnx")
    split = tmp_path / "split"
    split.mkdir()
    onnx.save(onnx.load(src), str(split / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)  # Constants' too
    assert len(os.listdir(split)) > 10
    assert any(external_data.is_external(t) for t in external_data.attribute_tensors(
        onnx.load(str(split / "model.onnx"), load_external_data=False).graph.node))
    reads = []
    read = external_data.ExternalData.read

    def counting(self, tensor):
        reads.append(tensor.name)
        return read(self, tensor)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(external_data.ExternalData, "read", counting)
        load = onnx.load
        patch.setattr(onnx, "load", lambda path, load_external_data=True: load(path, load_external_data=False)
                      if not load_external_data else pytest.fail("the whole model was loaded"))
        quantize.quantize_int8(str(split / "model.onnx"), str(out / "model.onnx"))
    named = [r for r in reads if r]                         # (a Constant's value has no name)
    assert named and len(named) == len(set(named))          # each tensor read once
    assert sorted(os.listdir(out)) == ["model.onnx", "model.onnx.data"]
    quantize.quantize_int8(src, str(tmp_path / "whole.onnx"))
    whole, streamed = _weights(tmp_path / "whole.onnx"), _weights(out / "model.onnx")
    assert sorted(whole) == sorted(streamed)
    assert all(np.array_equal(whole[k], streamed[k]) for k in whole)
    for a, b in zip(_run(tmp_path / "whole.onnx", "unet"), _run(out / "model.onnx", "unet")):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_fp16_streams_external_weights(tiny_sd, tmp_path, part):
    """fp16 of a model whose weights (Constants' values too) lie in external files: the same float16
    weights and outputs as the conversion of the same model in one piece, without loading it whole."""
    src = os.path.join(tiny_sd[1], part, "model.onnx")
    split = tmp_path / "split"
    split.mkdir()
    onnx.save(onnx.load(src), str(split / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    quantize.convert_fp16(src, str(tmp_path / "whole.onnx"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        load = onnx.load
        patch.setattr(onnx, "load", lambda path, load_external_data=True: load(path, load_external_data=False)
                      if not load_external_data else pytest.fail("the whole model was loaded"))
        quantize.convert_fp16(str(split / "model.onnx"), str(out / "model.onnx"))
    assert sorted(os.listdir(out)) == ["model.onnx", "model.onnx.data"]
    whole, streamed = _weights(tmp_path / "whole.onnx"), _weights(out / "model.onnx")
    assert sorted(whole) == sorted(streamed)
    for name, value in whole.items():
        assert streamed[name].dtype == value.dtype and np.array_equal(streamed[name], value), name
    assert any(v.dtype == np.float16 for v in streamed.values())
    for a, b in zip(_run(tmp_path / "whole.onnx", part), _run(out / "model.onnx", part)):
        np.testing.assert_array_equal(b, a)


def _set_entries(tensor, change):
    entries = {e.key: e.value for e in tensor.external_data}
    change(entries)
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)


@pytest.mark.parametrize("weight, change, problem", [
    ("matmul", lambda tensor: _set_entries(tensor, lambda e: e.update(location="../outside.bin")), "outside the model"),
    ("matmul", lambda tensor: _set_entries(tensor, lambda e: e.update(location="/etc/hostname")), "outside the model"),
    ("matmul", lambda tensor: _set_entries(tensor, lambda e: e.update(location="gone.bin")), "is missing"),
    ("matmul", lambda tensor: _set_entries(tensor, lambda e: e.update(length=str(int(e["length"]) - 4))),
     "bytes stored for shape"),
    ("matmul", lambda tensor: _set_entries(tensor, lambda e: e.update(offset=str(10 ** 9))), "beyond the end"),
    ("matmul", lambda tensor: _set_entries(tensor, lambda e: e.update(offset="abc")), "unreadable external data"),
    ("matmul", lambda tensor: _set_entries(tensor, lambda e: e.update(location="model.onnx.data\x00x")),
     "unreadable external data"),
    ("matmul", lambda tensor: tensor.dims.__setitem__(slice(None), [-1, -1]), "negative shape"),
    ("matmul", lambda tensor: setattr(tensor, "data_type", 999), "unreadable external data"),
    # a Conv weight is copied through (read with --conv weights): its entries are checked all the same
    ("conv", lambda tensor: _set_entries(tensor, lambda e: e.update(length=str(int(e["length"]) - 4))),
     "bytes stored for shape"),
    ("conv", lambda tensor: _set_entries(tensor, lambda e: e.update(location="../outside.bin")), "outside the model"),
])
@pytest.mark.parametrize("convert", ["quantize_int8", "quantize_int8 conv=weights", "convert_fp16"])
def test_refuses_hostile_external_data(tiny_sd, tmp_path, weight, change, problem, convert):
    """External-data entries name files and byte ranges: outside the folder, missing, the wrong size,
    unparsable, a negative shape or an unknown type is one line naming the model file, and nothing
    is written (int8, int8 with Conv weights, fp16 alike)."""
    src = os.path.join(tiny_sd[1], "unet", "model.onnx")
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(bytes(1 << 20))
    onnx.save(onnx.load(src), str(folder / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    wanted = (lambda n: n.op_type == "MatMul" and "/to_q/" in n.name) if weight == "matmul" else \
        (lambda n: n.op_type == "Conv")
    name = next(n.input[1] for n in model.graph.node if wanted(n))
    change(next(t for t in model.graph.initializer if t.name == name))
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EdgeTIError, match=problem) as err:
        function, _, option = convert.partition(" conv=")
        getattr(quantize, function)(str(folder / "model.onnx"), str(out / "model.onnx"),
                                    **({"conv": option} if option else {}))
    assert str(folder / "model.onnx") in str(err.value) and "\n" not in str(err.value)
    assert os.listdir(out) == []


def _tiny_graph(nodes, weights, extra_inputs=()):
    from onnx import TensorProto, helper
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8]), *extra_inputs]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [onnx.numpy_helper.from_array(w, n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _check_runs_like_float(model, path):
    import onnxruntime as ort
    onnx.save(model, str(path) + ".src.onnx")
    quantize.quantize_int8(str(path) + ".src.onnx", str(path))
    onnx.checker.check_model(onnx.load(str(path)))
    x = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
    want = ort.InferenceSession(str(path) + ".src.onnx", providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_int8_weight_listed_as_graph_input(tmp_path):
    """Old exports list weights among the graph's inputs: the quantized weight's entry goes with it."""
    from onnx import TensorProto, helper
    w = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
    model = _tiny_graph([helper.make_node("MatMul", ["x", "W"], ["y"], "m")], {"W": w},
                        [helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 8])])
    _check_runs_like_float(model, tmp_path / "q.onnx")
    assert [i.name for i in onnx.load(str(tmp_path / "q.onnx")).graph.input] == ["x"]


def test_int8_names_never_collide(tmp_path):
    """Generated names (W_Transposed_quantized, x_scale, ...) that the graph already uses get a suffix."""
    from onnx import helper
    rng = np.random.default_rng(2)
    w, wt = rng.standard_normal((8, 8)).astype(np.float32), rng.standard_normal((8, 8)).astype(np.float32)
    model = _tiny_graph([helper.make_node("Gemm", ["x", "W"], ["a"], "g", transB=1),
                         helper.make_node("MatMul", ["x", "W_Transposed"], ["b"], "m"),
                         helper.make_node("Identity", ["x"], ["x_scale"], "i"),
                         helper.make_node("Add", ["a", "b"], ["y"], "add")], {"W": w, "W_Transposed": wt})
    _check_runs_like_float(model, tmp_path / "q.onnx")




def _dequantized_weights(path):
    """{float weight name the node read before: s_W W_q} for every DequantizeLinear of PATH's graph."""
    graph = onnx.load(str(path)).graph
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    out = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in weights:
            # the scale is scale + 0 * Size(layer input) (int8_matmul._after_input): Add(scale, ...)
            tied = producers[node.input[1]]
            assert tied.op_type == "Add" and tied.input[0] in weights
            w_q, scale = weights[node.input[0]], weights[tied.input[0]]
            axis = next(a.i for a in node.attribute if a.name == "axis")
            shape = [1] * w_q.ndim
            shape[axis] = -1
            assert w_q.dtype == np.int8 and scale.shape == (w_q.shape[axis],) and not weights[node.input[2]].any()
            out[node.output[0]] = (w_q, scale.reshape(shape), axis)
    return out


def test_int8_conv_weights_keep_float_arithmetic(tiny_sd, tmp_path):
    """conv="weights": every UNet Conv reads its weight from a DequantizeLinear of int8 values with one
    scale per output channel (|W - s W_q| <= s/2), and the model computes exactly what the float model
    computes with those dequantized weights; the file is smaller than with Conv float."""
    import onnxruntime as ort
    src = os.path.join(tiny_sd[1], "unet", "model.onnx")
    quantize.quantize_int8(src, str(tmp_path / "none.onnx"))
    quantize.quantize_int8(src, str(tmp_path / "weights.onnx"), conv="weights")
    assert os.path.getsize(tmp_path / "weights.onnx") < 0.8 * os.path.getsize(tmp_path / "none.onnx")
    source = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(src).graph.initializer}
    convs = [n for n in onnx.load(src).graph.node if n.op_type == "Conv"]
    graph = onnx.load(str(tmp_path / "weights.onnx")).graph
    dequantized = _dequantized_weights(tmp_path / "weights.onnx")
    assert convs and sorted(n.input[1] for n in graph.node if n.op_type == "Conv") == sorted(dequantized)
    # the same model with each Conv reading its dequantized weight as a float initializer
    reference = onnx.load(src)
    reads = {n.name: n.input[1] for n in graph.node if n.op_type == "Conv"}
    for node in (n for n in reference.graph.node if n.op_type == "Conv"):
        w = source[node.input[1]]
        w_q, scale, axis = dequantized[reads[node.name]]
        assert axis == 0 and np.all(np.abs(w - scale * w_q) <= scale * (0.5 + 1e-4))  # float32 rounding of w / s
        for t in reference.graph.initializer:
            if t.name == node.input[1]:
                t.CopyFrom(onnx.numpy_helper.from_array((scale * w_q.astype(np.float32)).astype(np.float32), t.name))
    onnx.save(reference, str(tmp_path / "reference.onnx"))
    # Conv alone (MatMuls float: their dynamic int8 would turn float-order noise into rounding flips)
    from edge_ti import int8_matmul
    int8_matmul.quantize_matmuls(src, str(tmp_path / "conv-only.onnx"), only=[], weight_only=[n.name for n in convs])
    for a, b in zip(_run(tmp_path / "reference.onnx", "unet"), _run(tmp_path / "conv-only.onnx", "unet")):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    for a, b in zip(_run(src, "unet"), _run(tmp_path / "conv-only.onnx", "unet")):
        assert np.linalg.norm(b - a) <= 0.1 * np.linalg.norm(a)  # 4% on this tiny random model (a wrong axis: ~100%)
    # onnxruntime keeps the DequantizeLinear (no constant folding back to float weights at load time)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "weights.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    assert sum(n.op_type == "DequantizeLinear" for n in optimized.node) == len(dequantized)
    assert not [t for t in optimized.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4]


def test_int8_weights_of_shared_and_transposed_matmuls(tmp_path):
    """weight_only on MatMul and Gemm (transB): scales per output column, a weight shared by two nodes
    of the same layout stored once; the output is the float graph's on the dequantized weights."""
    import onnxruntime as ort
    from onnx import helper

    from edge_ti import int8_matmul
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 8)).astype(np.float32) * np.linspace(0.1, 10, 8, dtype=np.float32)  # columns differ
    model = _tiny_graph([helper.make_node("MatMul", ["x", "W"], ["a"], "m1"),
                         helper.make_node("MatMul", ["x", "W"], ["b"], "m2"),
                         helper.make_node("Gemm", ["x", "W"], ["c"], "g", transB=1),
                         helper.make_node("Sum", ["a", "b", "c"], ["y"], "sum")], {"W": w})
    onnx.save(model, str(tmp_path / "src.onnx"))
    int8_matmul.quantize_matmuls(str(tmp_path / "src.onnx"), str(tmp_path / "q.onnx"),
                                 weight_only=int8_matmul.weight_only_nodes(model.graph, ("MatMul", "Gemm")))
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    onnx.checker.check_model(onnx.load(str(tmp_path / "q.onnx")))
    assert {n.op_type for n in graph.node} == {"DequantizeLinear", "MatMul", "Gemm", "Sum",
                                               "Size", "Cast", "Mul", "Add"}  # (_after_input's nodes)
    dequantized = _dequantized_weights(tmp_path / "q.onnx")
    assert sorted(axis for _, _, axis in dequantized.values()) == [0, 1]  # MatMul's columns; Gemm's rows of B
    x = rng.standard_normal((4, 8)).astype(np.float32)
    (by_column, s1, _), (by_row, s0, _) = sorted(dequantized.values(), key=lambda v: -v[2])
    want = 2 * x @ (s1 * by_column) + x @ (s0 * by_row).T
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    exact = 2 * x @ w + x @ w.T
    assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()


def test_int8_weights_need_opset_13(tmp_path):
    from onnx import helper

    from edge_ti import int8_matmul
    model = _tiny_graph([helper.make_node("MatMul", ["x", "W"], ["y"], "m")],
                        {"W": np.ones((8, 8), np.float32)})
    model.opset_import[0].version = 11
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(EdgeTIError, match="opset 11: int8 weights dequantized per channel need opset >= 13") as err:
        int8_matmul.quantize_matmuls(str(tmp_path / "old.onnx"), str(tmp_path / "q.onnx"), weight_only=["m"])
    assert str(tmp_path / "old.onnx") in str(err.value) and not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("level", ["ORT_ENABLE_ALL", "cached"])
def test_int8_conv_weights_dequantized_just_before_their_layer(tiny_sd, tmp_path, level):
    """onnxruntime runs each Conv weight's DequantizeLinear only after the layer's input exists (so the
    float copies are not all alive at once), as optimized on load and as loaded from the saved optimized
    graph (edge_ti.session's cache) alike: checked in onnxruntime's own profile of one run."""
    import onnxruntime as ort
    src = os.path.join(tiny_sd[1], "unet", "model.onnx")
    quantize.quantize_int8(src, str(tmp_path / "weights.onnx"), conv="weights")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "weights.onnx"), options, providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    if level == "cached":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    path = tmp_path / ("optimized.onnx" if level == "cached" else "weights.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, _unet_feed(session))
    events = json.load(open(session.end_profiling()))
    order = [e["name"][:-len("_kernel_time")] for e in events if e.get("cat") == "Node"
             and e["name"].endswith("_kernel_time")]
    position = {name: i for i, name in enumerate(order)}
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    producer = {o: n.name for n in graph.node for o in n.output}
    checked = 0
    for layer in graph.node:
        dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in layer.input]
        if not dequantize or layer.input[0] not in producer:  # (the first Conv reads the graph's input)
            continue
        assert position[producer[layer.input[0]]] < position[dequantize[0].name] < position[layer.name], layer.name
        checked += 1
    assert checked >= 10


def test_cli_quantize_conv_weights(tiny_sd, tmp_path):
    """edge-ti quantize --conv weights: Conv weights int8 behind DequantizeLinear, recorded; scores like fp32."""
    from test_safe_by_default import invoke
    out = tmp_path / "w"
    rc, err = invoke("quantize", tiny_sd[1], str(out), "--conv", "weights")
    assert rc == 0, err
    record = json.load(open(out / "edge_ti_quantization.json"))
    assert record["conv"] == "weights" and "Conv" in record["op_types"] and "dequantized" in record["activations"]
    nodes = onnx.load(str(out / "unet" / "model.onnx")).graph.node
    dequantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert convs and all(n.input[1] in dequantized for n in convs)
    reference, ours = _losses(tiny_sd[1]), _losses(str(out))
    assert np.all(np.abs(ours - reference) <= 1e-2 * np.abs(reference)) and spearman(reference, ours) >= 0.8
    rc, err = invoke("quantize", tiny_sd[1], str(tmp_path / "x"), "--mode", "fp16", "--conv", "weights")
    assert rc != 0 and "apply to --mode int8, not fp16" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_untied_weight_scales_for_openvino_compute_the_same(tiny_sd, tmp_path):
    """OpenVINO cannot compile int8_matmul._after_input's tied scales, so sessions for it load the graph
    with every DequantizeLinear reading its constant scale again (session._openvino_graph): no tie node
    is left, nothing else changes, the outputs are the tied graph's exactly, and the weights are still
    read from the model's folder (external data), not copied."""
    import onnxruntime as ort

    from edge_ti import external_data, int8_matmul, session
    src = os.path.join(tiny_sd[1], "unet", "model.onnx")
    split = tmp_path / "split"
    split.mkdir()
    onnx.save(onnx.load(src), str(split / "source.onnx"), save_as_external_data=True, size_threshold=0)
    quantize.quantize_int8(str(split / "source.onnx"), str(split / "model.onnx"), conv="weights")
    tied = onnx.load(str(split / "model.onnx"), load_external_data=False)
    scales = sum(n.op_type == "DequantizeLinear" for n in tied.graph.node)
    assert scales and any(n.op_type == "Size" for n in tied.graph.node)
    options = ort.SessionOptions()
    graph = session._openvino_graph(str(split / "model.onnx"), options)
    assert isinstance(graph, bytes) and len(graph) <= os.path.getsize(split / "model.onnx")  # no weights pulled in
    untied = onnx.load_from_string(graph).graph
    constants = {t.name for t in untied.initializer}
    assert [n.op_type for n in untied.node if n.op_type in ("Size", "Cast", "Mul", "Add") and
            n.name.endswith(("_input_size", "_input_size_float", "_zero", "_after_input"))] == []
    assert all(n.input[1] in constants for n in untied.node if n.op_type == "DequantizeLinear")
    assert len(untied.node) == len(tied.graph.node) - 4 * scales
    assert int8_matmul.untie_weight_scales(untied) == 0  # nothing left to untie
    expected = _run(split / "model.onnx", "unet")
    got = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    for a, b in zip(expected, got.run(None, _unet_feed(got))):
        np.testing.assert_array_equal(b, a)
    # a graph with nothing to untie is loaded from its path as before
    assert session._openvino_graph(src, ort.SessionOptions()) == src
    # hostile external data is refused before onnxruntime resolves it against the folder
    for tensor in tied.graph.initializer:
        if external_data.is_external(tensor):
            next(e for e in tensor.external_data if e.key == "location").value = "../../etc/passwd"
            break
    onnx.save(tied, str(split / "hostile.onnx"))
    with pytest.raises(EdgeTIError, match="hostile.onnx: tensor .* points to '../../etc/passwd', outside the model's"):
        session._openvino_graph(str(split / "hostile.onnx"), ort.SessionOptions())

"""Model folders are hostile until checked: broken ones give one line naming the folder and the
problem; cache keys cover every byte of a part; a failed cache write blames the cache, not the model."""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edge_ti
from edge_ti import shapes
from edge_ti.cache import file_digest, fingerprint
from edge_ti.errors import EdgeTIError
from edge_ti.session import SessionSettings, create_session

# the CLI in this process, for one-line errors where a new interpreter is not what is tested
from test_safe_by_default import invoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ["CPUExecutionProvider"]
# no limit on a write (RLIMIT_FSIZE) below this many bytes: the limited subprocesses' own small writes
SMALL_WRITES = 8192


def run_cli(*args, cwd=ROOT, env=None, preexec_fn=None):
    # PYTHONPATH: this checkout's edge_ti, whatever the current directory
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "edge_ti", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, preexec_fn=preexec_fn)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(rc, err, *needles):
    """Non-zero exit, no traceback, and the error as the one last line (warnings may come before it)."""
    assert rc != 0
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: ") and sum(line.startswith("Error: ") for line in lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], err


def snapshot(folder):
    """{relative path: sha256} of every file under folder."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture
def model_copy(tiny_sd, tmp_path):
    """A copy of the tiny ONNX folder, to break."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd[1], folder)
    return folder


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A fresh EDGE_TI_CACHE for this test (and its subprocesses)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGE_TI_CACHE", str(cache))
    return cache


def age(path, seconds=3600):
    """Set a file's mtime back: digests of files modified in the last seconds are not remembered."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


def poke_float(path, offset, value):
    """Overwrite the float32 at byte `offset` of a file in place (same size, same inode)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<f", value))


# ---- cache keys: the whole content of a part ----
def _matmul_model(folder, rows=2048):
    """y = x @ w with w [rows, rows] float32 in model.onnx_data (16 MiB: more than the first and last 4 MiB)."""
    w = np.random.default_rng(0).standard_normal((rows, rows)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])],
                              [numpy_helper.from_array(w, "w")])
    os.makedirs(folder)
    path = os.path.join(folder, "model.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path,
              save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    return path


def test_edit_in_the_middle_of_external_weights_gives_a_new_session(tmp_path, own_cache):
    path = _matmul_model(tmp_path / "unet")
    data = tmp_path / "unet" / "model.onnx_data"
    x = np.ones((1, 2048), np.float32)
    sessions = tmp_path / "sessions"
    before = create_session(path, CPU, SessionSettings(), str(sessions)).run(None, {"x": x})[0]
    key = fingerprint(path)
    poke_float(data, os.path.getsize(data) // 2, 1000.0)              # w[1024, 0]: y[0] grows by ~1000
    assert fingerprint(path) != key
    after = create_session(path, CPU, SessionSettings(), str(sessions)).run(None, {"x": x})[0]
    assert len(os.listdir(sessions)) == 2                             # a new optimized graph, not the old one
    assert after[0, 0] - before[0, 0] > 900
    np.testing.assert_allclose(after[0, 1:], before[0, 1:], rtol=1e-5)


def _external_text_encoder(folder):
    """Re-save folder/text_encoder with its weights in model.onnx_data; the byte offset of a
    float32 in the middle of the position-embedding table (every prompt position reads it)."""
    path = os.path.join(folder, "text_encoder", "model.onnx")
    onnx.save(onnx.load(path), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=0)
    table = next(t for t in onnx.load(path, load_external_data=False).graph.initializer
                 if "position_embedding" in t.name)
    where = {e.key: int(e.value) for e in table.external_data if e.key in ("offset", "length")}
    return where["offset"] + where["length"] // 2 // 4 * 4


def test_edit_in_the_text_encoders_weights_gives_a_new_encoder(model_copy, own_cache):
    offset = _external_text_encoder(model_copy)
    first = edge_ti.open_model(str(model_copy))
    before, key, patched = first.encode_text(["a photo"]), first.text_encoder_key, first.patched_text_encoder_dir
    poke_float(model_copy / "text_encoder" / "model.onnx_data", offset, 50.0)
    second = edge_ti.open_model(str(model_copy))
    assert second.text_encoder_key != key
    assert second.patched_text_encoder_dir != patched
    assert np.abs(second.encode_text(["a photo"]) - before).max() > 1e-3


def test_an_unchanged_file_is_read_once(tmp_path, own_cache):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * 1000)
    age(path)
    digest = file_digest(path)
    index = json.loads((own_cache / "digests.json").read_text())
    assert index[str(path)][3] == digest
    stamp = os.stat(path)
    path.write_bytes(b"\2" * 1000)                                    # same size, inode, and (below) mtime
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert file_digest(path) == digest                                # remembered: the file was not read
    age(path, 60)                                                     # a new mtime: read again
    assert file_digest(path) != digest


def test_a_just_modified_file_is_not_remembered(tmp_path, own_cache):
    # its mtime may not change at a second write within the same clock tick
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * 1000)
    file_digest(path)
    assert not (own_cache / "digests.json").exists()


# ---- broken folders: one line naming the file and the problem ----
def test_training_without_vae_encoder(model_copy, concept_dir, tmp_path, own_cache):
    shutil.rmtree(model_copy / "vae_encoder")
    before = snapshot(model_copy)
    out = tmp_path / "out" / "e.safetensors"
    with pytest.raises(EdgeTIError) as caught:
        edge_ti.train(edge_ti.open_model(str(model_copy)), [concept_dir], "<t>", str(out), init_word="disc",
                      settings=edge_ti.TrainSettings(budget=4))
    assert str(caught.value) == f"{model_copy}: no vae_encoder/model.onnx: training needs the VAE encoder"
    assert not os.path.exists(tmp_path / "out")
    assert snapshot(model_copy) == before


def test_cli_training_without_vae_encoder(model_copy, concept_dir, tmp_path):
    shutil.rmtree(model_copy / "vae_encoder")
    rc, _, err = run_cli("train", str(model_copy), concept_dir, "--token", "<t>", "--init-word", "disc",
                         "--budget", "4", "--out", str(tmp_path / "out" / "e.safetensors"))
    one_line_error(rc, err, f"{model_copy}: no vae_encoder/model.onnx: training needs the VAE encoder")


def _fake_unet(path, inputs):
    """An ONNX graph with these float inputs {name: shape} whose output is its first input."""
    first = next(iter(inputs))
    graph = helper.make_graph([helper.make_node("Identity", [first], ["out_sample"])], "not_a_unet",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, inputs[first])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


WRONG_UNETS = {
    "inputs": ({"x": ["b", 4, "h", "w"]},
               "not a Stable Diffusion UNet (no input sample, timestep, encoder_hidden_states; its inputs: x)"),
    "channels": ({"sample": ["b", 3, "h", "w"], "timestep": [], "encoder_hidden_states": ["b", 77, 32]},
                 "this UNet takes 3-channel latents, but was given 4 channels (from the VAE, or unet/config.json "
                 "in_channels)"),
    "width": ({"sample": ["b", 4, "h", "w"], "timestep": [], "encoder_hidden_states": ["b", 77, 768]},
              "this UNet takes text states of width 768, but the text encoder gives 32"),
}


@pytest.mark.parametrize("wrong", list(WRONG_UNETS))
def test_wrong_unet(model_copy, own_cache, wrong):
    inputs, message = WRONG_UNETS[wrong]
    unet = model_copy / "unet" / "model.onnx"
    _fake_unet(unet, inputs)
    before = snapshot(model_copy)
    with pytest.raises(EdgeTIError) as caught:
        edge_ti.generate(edge_ti.open_model(str(model_copy)), "a photo", steps=1, n=1)
    assert str(caught.value) == f"{unet}: {message}"
    assert snapshot(model_copy) == before


def test_cli_wrong_unet(model_copy, tmp_path):
    _fake_unet(model_copy / "unet" / "model.onnx", WRONG_UNETS["inputs"][0])
    out = tmp_path / "images"
    rc, _, err = run_cli("generate", str(model_copy), "a photo", "--steps", "1", "--n", "1", "--out", str(out))
    one_line_error(rc, err, "not a Stable Diffusion UNet")
    assert not out.exists()


def _keep_outputs(folder, names):
    path = os.path.join(folder, "text_encoder", "model.onnx")
    model = onnx.load(path)
    kept = [o for o in model.graph.output if o.name in names]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, path)
    return path


def test_text_encoder_with_only_the_hidden_state(tiny_sd, model_copy, own_cache):
    _keep_outputs(model_copy, ["last_hidden_state"])
    want = edge_ti.open_model(tiny_sd[1]).encode_text(["a photo"])
    np.testing.assert_allclose(edge_ti.open_model(str(model_copy)).encode_text(["a photo"]), want,
                               rtol=1e-5, atol=1e-6)


def test_text_encoder_with_only_the_pooled_output(model_copy):
    path = _keep_outputs(model_copy, ["pooler_output"])
    before = snapshot(model_copy)
    rc, err = invoke("info", str(model_copy))
    one_line_error(rc, err, f"{path}: no last hidden state [batch, tokens, width] among its outputs (pooler_output)")
    assert snapshot(model_copy) == before


@pytest.mark.parametrize("name, text, message", [
    ("tokenizer_config.json", '{"model_max_length": 77,', "not a readable JSON file"),
    ("special_tokens_map.json", "\xff\xfe", "not a readable JSON file"),
    ("special_tokens_map.json", '["<|endoftext|>"]', "not a JSON object"),
    ("tokenizer_config.json", '{"model_max_length": "abc"}', "model_max_length is 'abc', but must be a number"),
])
def test_broken_tokenizer_config(model_copy, name, text, message):
    path = model_copy / "tokenizer" / name
    path.write_text(text, encoding="latin-1")
    before = snapshot(model_copy)
    rc, err = invoke("tokenize", str(model_copy), "a photo")
    named = path if "JSON" in message else model_copy / "tokenizer"
    one_line_error(rc, err, f"{named}: {message}")
    assert snapshot(model_copy) == before


@pytest.mark.parametrize("part, key, value, must", [
    ("scheduler/scheduler_config.json", "num_train_timesteps", '"abc"', "a whole number >= 1"),
    ("scheduler/scheduler_config.json", "beta_start", "-1", "a number between 0 and 1"),
    ("scheduler/scheduler_config.json", "beta_end", "NaN", "a number between 0 and 1"),
    ("scheduler/scheduler_config.json", "prediction_type", '"bogus"', "epsilon or v_prediction"),
    ("unet/config.json", "sample_size", '"x"', "a whole number >= 1"),
    ("vae_decoder/config.json", "block_out_channels", "5", "a non-empty list of whole numbers >= 1"),
    ("vae_decoder/config.json", "scaling_factor", '"y"', "a positive number"),
])
def test_config_value_of_the_wrong_kind(model_copy, part, key, value, must):
    path = model_copy / part
    config = json.loads(path.read_text())
    config[key] = "VALUE"
    path.write_text(json.dumps(config).replace('"VALUE"', value))     # NaN is not what json.dumps writes
    before = snapshot(model_copy)
    rc, err = invoke("info", str(model_copy))
    one_line_error(rc, err, f"{path}: {key} is {value}, but must be {must}")
    assert snapshot(model_copy) == before


def test_config_that_is_not_an_object(model_copy):
    path = model_copy / "unet" / "config.json"
    path.write_text("[64]")
    rc, err = invoke("info", str(model_copy))
    one_line_error(rc, err, f"{path}: not a JSON object")


# ---- a cache that cannot be written blames the cache ----
def test_cache_below_a_file(tiny_sd, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    cache = tmp_path / "file" / "cache"
    rc, _, err = run_cli("info", tiny_sd[1], env={"EDGE_TI_CACHE": str(cache)})
    one_line_error(rc, err, str(cache), "cannot write the cache (Not a directory): the disk is full or the "
                   "folder is not writable; set EDGE_TI_CACHE to another folder")
    assert tiny_sd[1] not in err


def _file_size_limit():
    # a full disk, for this process only: writes past SMALL_WRITES bytes fail with EFBIG
    import resource
    import signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (SMALL_WRITES, SMALL_WRITES))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_full_disk_while_patching_the_text_encoder(tiny_sd, tmp_path):
    cache = tmp_path / "cache"
    rc, _, err = run_cli("info", tiny_sd[1], env={"EDGE_TI_CACHE": str(cache)}, preexec_fn=_file_size_limit)
    one_line_error(rc, err, f"{cache}{os.sep}text_encoders: cannot write the cache (File too large)", "EDGE_TI_CACHE")
    assert [n for n in os.listdir(cache / "text_encoders")] == []     # no half-written entry


FULL_DISK_SESSION = r'''
import sys
from edge_ti.errors import EdgeTIError
from edge_ti.session import SessionSettings, create_session
try:
    create_session(sys.argv[1], ["CPUExecutionProvider"], SessionSettings(), sys.argv[2])
except EdgeTIError as err:
    print(err)
'''


def test_full_disk_while_saving_the_optimized_graph(tmp_path):
    path = _matmul_model(tmp_path / "unet")
    sessions = tmp_path / "cache" / "sessions"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SESSION, path, str(sessions)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT, "EDGE_TI_CACHE": str(tmp_path / "cache")},
                          preexec_fn=_file_size_limit)
    assert proc.stdout.strip() == (f"{sessions}: cannot write the cache (onnxruntime could not save the optimized "
                                   "graph): the disk is full or the folder is not writable; set EDGE_TI_CACHE to "
                                   "another folder"), proc.stdout + proc.stderr
    assert os.listdir(sessions) == []                                 # the temporary folder removed


# ---- `shapes`: the built-in model's short name ----
def test_shapes_short_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert edge_ti.open_model("shapes").path == shapes.model_dir()
    rc, out, err = run_cli("info", "shapes", cwd=tmp_path)
    assert rc == 0, err
    assert json.loads(out)["path"] == shapes.model_dir()


def test_a_real_shapes_folder_wins(tmp_path):
    (tmp_path / "shapes").mkdir()
    rc, _, err = run_cli("info", "shapes", cwd=tmp_path)
    one_line_error(rc, err, "shapes: no text_encoder/model.onnx")


# ---- packaging ----
def test_every_data_folder_is_a_listed_package():
    # setuptools prints pages of warnings for data in an importable folder that `packages` does not list
    tomllib = pytest.importorskip("tomllib")                          # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    for package, folder in (("edge_ti.shapes.model", "edge_ti/shapes/model"),
                            ("edge_ti_export.sd_configs", "export/sd_configs")):
        for parent, dirs, _ in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            relative = os.path.relpath(parent, os.path.join(ROOT, folder))
            name = package if relative == "." else f"{package}.{relative.replace(os.sep, '.')}"
            assert name in listed, name

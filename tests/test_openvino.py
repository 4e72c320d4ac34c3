"""--device openvino: onnxruntime's OpenVINO execution provider on the CPU.

onnxruntime-openvino installs the same `onnxruntime` folder as the plain build, so it cannot share
this test environment: the end-to-end test runs in the Python named by EDGE_TI_OPENVINO_PYTHON
(.ci/run makes one: a second venv with onnxruntime-openvino and edge-ti's base dependencies).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import edge_ti
from edge_ti import objective, quantize, runtime
from edge_ti.denoiser import Denoiser
from edge_ti.errors import EdgeTIError
from edge_ti.session import SessionSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENVINO_PYTHON = os.environ.get("EDGE_TI_OPENVINO_PYTHON")


def test_openvino_options_carry_the_precision_as_a_json_load_config(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    name, options = runtime.openvino_provider("auto", threads=3)
    assert name == "OpenVINOExecutionProvider"
    # a dict, or the `precision` option with BF16, make onnxruntime 1.24 drop the provider (measured)
    assert json.loads(options["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "f32"}}
    assert options["device_type"] == "CPU" and options["num_of_threads"] == "3"
    assert "precision" not in options and "cache_dir" not in options  # the cache: 7.4 GB, and slower
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert "bf16" in runtime.openvino_provider("auto")[1]["load_config"]
    assert "f32" in runtime.openvino_provider("f32")[1]["load_config"]
    assert json.loads(runtime.openvino_provider("f16")[1]["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "f16"}}
    assert "num_of_threads" not in runtime.openvino_provider("auto")[1]


def test_bad_openvino_precision_is_one_line():
    with pytest.raises(EdgeTIError, match="OpenVINO precision 'fp8': choose one of auto, f32, bf16, f16$"):
        runtime.openvino_provider("fp8")


def test_precision_without_openvino_is_refused(tiny_sd):
    with pytest.raises(EdgeTIError, match="precision 'bf16' is OpenVINO's setting: it needs --device openvino"):
        edge_ti.open_model(tiny_sd[1], session_settings=SessionSettings(precision="bf16"))


@pytest.mark.parametrize("args, message", [
    (["info", "{model}", "--precision", "f32"], "precision 'f32' is OpenVINO's setting: it needs --device openvino"),
    (["info", "{model}", "--precision", "f64"], "Invalid value for '--precision'"),
    (["train", "{model}", "{model}", "--token", "<t>", "--out", "{out}", "--precision", "f32",
      "--workers", "ray-local:2"], "precision 'f32' is OpenVINO's setting: it needs --device openvino (or --worker"),
])
def test_cli_precision_refusals_are_one_line(tiny_sd, tmp_path, args, message):
    from test_safe_by_default import invoke
    rc, err = invoke(*[a.format(model=tiny_sd[1], out=tmp_path / "t.safetensors") for a in args])
    assert rc != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []


def test_openvino_on_the_plain_build_says_what_to_install(tiny_sd):
    if "OpenVINOExecutionProvider" in runtime.onnxruntime().get_available_providers():
        pytest.skip("this onnxruntime has OpenVINO")
    with pytest.raises(EdgeTIError, match=r"needs OpenVINOExecutionProvider.*pip install 'edge-ti\[openvino\]'"):
        edge_ti.open_model(tiny_sd[1], device="openvino")


def test_a_dropped_provider_with_options_is_named():
    class Session:
        def get_providers(self):
            return ["CPUExecutionProvider"]
    with pytest.raises(EdgeTIError, match="could not start OpenVINOExecutionProvider .* refused its options"):
        runtime.check_providers(Session(), [runtime.openvino_provider("f32"), "CPUExecutionProvider"], "m.onnx")


# runs in the OpenVINO Python: a training generation's losses, and a provider onnxruntime drops
CHILD = r"""
import json, sys
import numpy as np
import edge_ti
from edge_ti import objective
from edge_ti.denoiser import Denoiser
from edge_ti.errors import EdgeTIError
from edge_ti.session import SessionSettings, create_session
spec = json.loads(sys.argv[1])
candidates = np.load(spec["candidates"])
data = np.load(spec["triples"])
triples = objective.Triples(data["latent_index"], data["prompt_index"], data["timesteps"], data["noise"])
losses = {}
for precision in ("f32", "auto", "f16"):
    model = edge_ti.open_model(spec["model"], device="openvino", threads=1,
                               session_settings=SessionSettings(precision=precision))  # cache=True asked
    assert not model.session_settings.cache  # the optimized-graph cache is CPU-only, whatever the settings say
    ids = model.tokenize(spec["prompts"], {"<t>": candidates[0]})
    losses[precision] = objective.population_loss(Denoiser(model), candidates, ids, data["latents"], triples).tolist()
# edge-ti quantize's default int8 folder (Conv weights in int8, their scales tied: session._openvino_graph unties
# them; this tiny UNet compiles either way, SD 1.5's failed tied: test_quantize checks the untying itself)
int8 = edge_ti.open_model(spec["int8"], device="openvino", threads=1, session_settings=SessionSettings(precision="f32"))
ids = int8.tokenize(spec["prompts"], {"<t>": candidates[0]})
losses["int8"] = objective.population_loss(Denoiser(int8), candidates, ids, data["latents"], triples).tolist()
try:  # onnxruntime 1.24 drops the provider for this option and runs on the CPU: must be an error
    create_session(model.part_path("unet"),
                   [("OpenVINOExecutionProvider", {"device_type": "CPU", "precision": "BF16"}), "CPUExecutionProvider"])
    dropped = "not detected"
except EdgeTIError as err:
    dropped = str(err)
print("RESULT " + json.dumps({"losses": losses, "providers": [p if isinstance(p, str) else p[0] for p in model.providers],
                              "dropped": dropped}))
"""


@pytest.mark.skipif(not OPENVINO_PYTHON and os.environ.get("CI") != "true",
                    reason="EDGE_TI_OPENVINO_PYTHON: a Python with onnxruntime-openvino (.ci/run makes one)")
def test_openvino_scores_a_generation_as_the_cpu_provider_does(tiny_sd, tmp_path):
    assert OPENVINO_PYTHON, "CI runs this test: .ci/run sets EDGE_TI_OPENVINO_PYTHON"
    model = edge_ti.open_model(tiny_sd[1])
    rng = np.random.default_rng(0)
    D = model.hidden_size
    e0 = model.token_embeddings[model.tokenizer.token_ids("cat")].mean(axis=0)
    candidates = (e0[None, None] + 0.5 * model.token_embeddings.std() * rng.standard_normal((8, 1, D))).astype(np.float32)
    prompts = ["a photo of a <t>", "a rendering of a <t>"]
    L = int(model.unet_config["sample_size"])
    latents = rng.standard_normal((2, 4, L, L)).astype(np.float32)
    triples = objective.draw_triples(rng, 4, 2, 2, 1000, latents.shape[1:])
    ids = model.tokenize(prompts, {"<t>": candidates[0]})
    expected = objective.population_loss(Denoiser(model), candidates, ids, latents, triples)
    np.save(tmp_path / "candidates.npy", candidates)
    np.savez(tmp_path / "triples.npz", latents=latents, latent_index=triples.latent_index,
             prompt_index=triples.prompt_index, timesteps=triples.timesteps, noise=triples.noise)
    quantize.quantize_model(tiny_sd[1], str(tmp_path / "int8"))
    int8 = edge_ti.open_model(str(tmp_path / "int8"))
    expected_int8 = objective.population_loss(Denoiser(int8), candidates, ids, latents, triples)
    spec = {"model": tiny_sd[1], "candidates": str(tmp_path / "candidates.npy"), "prompts": prompts,
            "triples": str(tmp_path / "triples.npz"), "int8": str(tmp_path / "int8")}
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([OPENVINO_PYTHON, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-2000:]
    result = json.loads(line[len("RESULT "):])
    assert result["providers"] == ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
    f32, auto = result["losses"]["f32"], result["losses"]["auto"]
    np.testing.assert_allclose(f32, expected, rtol=1e-4)
    assert list(np.argsort(f32)) == list(np.argsort(expected))  # the same ranking
    # auto: bf16 where the CPU has it (then the losses move by ~1e-4 relative), else f32 exactly as above
    if runtime.cpu_has_bf16():
        np.testing.assert_allclose(auto, expected, rtol=1e-2)
        assert not np.allclose(auto, f32, rtol=1e-6, atol=0), "auto should run in bf16 on this CPU"
    else:
        np.testing.assert_allclose(auto, f32, rtol=1e-6)
    # f16: in float16 where the CPU has it (AVX512-FP16), f32 elsewhere; on a trained model it ranked like f32 (0.99)
    f16 = result["losses"]["f16"]
    np.testing.assert_allclose(f16, expected, rtol=1e-2)
    if runtime.cpu_has_fp16():
        assert not np.allclose(f16, f32, rtol=1e-7, atol=0), "f16 should run in float16 on this CPU"
    # the int8 folder (OpenVINO computes the dynamic int8 MatMuls its own way: not bit-equal)
    np.testing.assert_allclose(result["losses"]["int8"], expected_int8, rtol=1e-2)
    assert "could not start OpenVINOExecutionProvider" in result["dropped"], result["dropped"]
    assert sys.executable != OPENVINO_PYTHON
    # the CLI's --precision reaches the provider's options
    proc = subprocess.run([OPENVINO_PYTHON, "-m", "edge_ti", "info", tiny_sd[1], "--device", "openvino",
                           "--precision", "f32"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    provider, options = json.loads(proc.stdout)["providers"][0]
    assert provider == "OpenVINOExecutionProvider"
    assert json.loads(options["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "f32"}}


def test_an_int8_folder_openvino_cannot_compile_names_the_fix(tiny_sd, tmp_path, monkeypatch):
    """OpenVINO in bf16 could not compile the int8 MatMuls of SD 1.5's text encoder (measured): the one-line
    error says what runs instead; at f32 (where that is not the cause) it adds nothing."""
    from edge_ti import model as model_module
    quantize.quantize_model(tiny_sd[1], str(tmp_path / "int8"))
    model = edge_ti.open_model(str(tmp_path / "int8"))
    model.device = "openvino"  # as open_model(device="openvino") sets it (this Python has no OpenVINO build)

    def failing(*args, **kwargs):
        raise RuntimeError("[OpenVINO-EP] Exception while Loading Network\nException from src/plugin.cpp")
    monkeypatch.setattr(model_module, "create_session", failing)
    with pytest.raises(EdgeTIError, match=r"model.onnx: onnxruntime cannot load it \(\[OpenVINO-EP\] Exception while "
                                          r"Loading Network\); OpenVINO could not compile this int8 folder at --precision "
                                          r"auto: use --precision f32, or give it the float folder"):
        model.open_session(model.part_path("unet"))
    model.session_settings.precision = "f32"
    with pytest.raises(EdgeTIError, match=r"Loading Network\)$"):
        model.open_session(model.part_path("unet"))

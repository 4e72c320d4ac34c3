"""SDXL: two text encoders, one token (issue 18), against diffusers on a tiny random SDXL pipeline.

The tiny pipeline (edge_ti_export.tiny.tiny_sdxl_pipeline) is built as the real SDXL is: tokenizer_2
pads with "!", text_encoder_2's config has the legacy eos_token_id 2 (end-of-text found as the
largest id), the two encoders have different widths (32 and 48).
"""
import json
import os

import numpy as np
import pytest
import torch

import edge_ti
from edge_ti.errors import EdgeTIError
from edge_ti.generate import denoise

TOKEN = "<tok>"


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl[0], local_files_only=True)


@pytest.fixture(scope="module")
def model(tiny_sdxl):
    return edge_ti.open_model(tiny_sdxl[1])


def _token_parts(model, n=2, seed=0):
    rng = np.random.default_rng(seed)
    widths = [p.columns.stop - p.columns.start for p in model.text_parts]
    return {key: rng.normal(0, 0.5, (n, w)).astype(np.float32) for key, w in zip(("clip_l", "clip_g"), widths)}


def _diffusers_with_token(pipe, parts, token=TOKEN):
    """A copy of PIPE with TOKEN loaded as the diffusers docs load an SDXL embedding (one call per encoder),
    and text_encoder_2 pooling at the end-of-text token rather than at the largest id (see tiny_sdxl_pipeline)."""
    import copy
    p = copy.deepcopy(pipe)
    p.load_textual_inversion(torch.from_numpy(parts["clip_l"]), token=token, text_encoder=p.text_encoder,
                             tokenizer=p.tokenizer)
    p.load_textual_inversion(torch.from_numpy(parts["clip_g"]), token=token, text_encoder=p.text_encoder_2,
                             tokenizer=p.tokenizer_2)
    p.text_encoder_2.text_model.eos_token_id = p.tokenizer_2.eos_token_id
    return p


def _reference_encode(pipe, prompts, negative=None):
    with torch.no_grad():
        hidden, neg_hidden, pooled, neg_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                                    do_classifier_free_guidance=True,
                                                                    negative_prompt=negative)
    return hidden.numpy(), pooled.numpy(), neg_hidden.numpy(), neg_pooled.numpy()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


PROMPTS = ["a photo of a cat", "a red mug on a table, cropped", ""]


def test_folder_is_sdxl(model, tiny_sdxl):
    assert model.family == "sdxl"
    assert [p.name for p in model.text_parts] == ["text_encoder", "text_encoder_2"]
    assert model.hidden_size == 32 + 48 and model.token_embeddings.shape[1] == 80
    assert edge_ti.open_model(tiny_sdxl[1]).tokenizer_2.pad_token == "!"


def test_tokenizers_equal_transformers(model, pipe):
    for ours, theirs in ((model.tokenizer, pipe.tokenizer), (model.tokenizer_2, pipe.tokenizer_2)):
        want = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        assert np.array_equal(ours(PROMPTS), np.array(want))
    assert model.tokenizer_2(["a cat"])[0, -1] != model.tokenizer(["a cat"])[0, -1]   # "!" vs end-of-text


def test_text_parity_without_token(model, pipe):
    hidden, pooled, _, _ = _reference_encode(pipe, PROMPTS)
    assert _rel(model.encode_text(PROMPTS), hidden) <= 1e-4
    assert _rel(model.encode_pooled(PROMPTS), pooled) <= 1e-4


def test_text_parity_with_token_in_both_encoders(model, pipe):
    parts = _token_parts(model)
    ref = _diffusers_with_token(pipe, parts)
    prompts = [f"a photo of {TOKEN}", f"{TOKEN} on a table", "a cat"]
    hidden, pooled, _, _ = _reference_encode(ref, prompts)
    ours_hidden = model.encode_text(prompts, {TOKEN: parts})
    ours_pooled = model.encode_pooled(prompts, {TOKEN: parts})
    assert _rel(ours_hidden, hidden) <= 1e-4
    assert _rel(ours_pooled, pooled) <= 1e-4
    # the token reaches the pooled output through attention (pooled at end-of-text, not at the token)
    without = model.encode_pooled(prompts)
    assert np.abs(ours_pooled[:2] - without[:2]).max() > 1e-3
    assert np.array_equal(ours_pooled[2], without[2])


def test_population_encoding_equals_one_by_one(model):
    from edge_ti.denoiser import Denoiser
    den = Denoiser(model)
    prompts = [f"a photo of {TOKEN}", f"a {TOKEN} in the style"]
    parts = [_token_parts(model, seed=s) for s in range(3)]
    joined = [np.concatenate([p["clip_l"], p["clip_g"]], axis=1) for p in parts]
    ids = model.tokenize(prompts, {TOKEN: joined[0]})
    hidden, pooled = den.encode_population(ids, np.stack(joined))           # (3, 2, 77, 80), (3, 2, 48)
    for p, vectors in enumerate(joined):
        want_hidden, want_pooled = den.encode(prompts, {TOKEN: vectors})
        np.testing.assert_allclose(hidden[p], want_hidden, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pooled[p], want_pooled, rtol=1e-5, atol=1e-6)


def test_sd_model_has_no_pooled_input(tiny_sd):
    with pytest.raises(EdgeTIError, match="SD 1.x/2.x model has no pooled"):
        edge_ti.open_model(tiny_sd[1]).encode_pooled(["a cat"])


# ---- generation: StableDiffusionXLPipeline's final latents, every sampler ----
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
GEN_CASES = [(s, 5.0, "") for s in SAMPLERS] + [("euler", 1.0, ""), ("ddim", 6.0, "dark, cropped")]


@pytest.mark.parametrize("sampler,guidance,negative", GEN_CASES)
def test_final_latents_match_diffusers(model, pipe, monkeypatch, one_torch_thread, sampler, guidance, negative):
    import diffusers
    n, steps = 2, 5
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((n, 4, 16, 16)).astype(np.float32)
    noises = [rng.standard_normal((n, 4, 16, 16)).astype(np.float32) for _ in range(steps)]
    ours, theirs = iter(noises), iter(noises)
    monkeypatch.setattr("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor",
                        lambda *a, **k: torch.from_numpy(next(theirs).copy()))
    name, extra = SAMPLERS[sampler]
    monkeypatch.setattr(pipe, "scheduler", getattr(diffusers, name).from_config(pipe.scheduler.config, **extra))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():   # negative None: SDXL's all-zero unconditional input (force_zeros_for_empty_prompt)
        ref = pipe("a photo of a red mug", negative_prompt=negative or None, num_inference_steps=steps,
                   guidance_scale=guidance, num_images_per_prompt=n, latents=torch.from_numpy(latents.copy()),
                   output_type="latent", height=32, width=32).images.numpy()
    got = denoise(model, "a photo of a red mug", negative_prompt=negative, steps=steps, guidance=guidance,
                  sampler=sampler, n=n, latents=latents, noise=lambda shape: next(ours))
    assert _rel(got, ref) <= 1e-3


def test_generation_with_token_matches_diffusers(model, pipe, one_torch_thread):
    parts = _token_parts(model, n=1)
    ref = _diffusers_with_token(pipe, parts)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(2).standard_normal((1, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = ref(f"a photo of {TOKEN}", num_inference_steps=4, guidance_scale=5.0,
                   latents=torch.from_numpy(latents.copy()), output_type="latent").images.numpy()
    got = denoise(model, f"a photo of {TOKEN}", {TOKEN: parts}, steps=4, guidance=5.0, sampler="euler", n=1,
                  latents=latents)
    assert _rel(got, want) <= 1e-3
    images = edge_ti.generate(model, f"a photo of {TOKEN}", {TOKEN: parts}, steps=2, n=1, sampler="euler")
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8


# ---- embedding files ----
def test_sdxl_file_round_trip_and_loads_in_diffusers(model, pipe, tmp_path):
    from safetensors.numpy import load_file
    parts = _token_parts(model)
    path = str(tmp_path / "my-tok.safetensors")
    edge_ti.save_embedding(path, {TOKEN: parts})
    on_disk = load_file(path)
    assert sorted(on_disk) == ["clip_g", "clip_l"]                        # AUTOMATIC1111's / ComfyUI's layout
    loaded = edge_ti.load_embedding(path)
    assert list(loaded) == ["my-tok"]                                      # the stem, as those tools name it
    assert list(edge_ti.load_embedding(path, token=TOKEN)) == [TOKEN]
    joined = model.check_embeddings(loaded, source=path)["my-tok"]
    assert joined.shape == (2, 80)
    np.testing.assert_array_equal(model.file_parts(joined)["clip_g"], parts["clip_g"])
    # diffusers, one load_textual_inversion per encoder (the README's recipe), encodes as we do
    ref = _diffusers_with_token(pipe, {k: on_disk[k] for k in on_disk})
    hidden, pooled, _, _ = _reference_encode(ref, [f"a photo of {TOKEN}"])
    assert _rel(model.encode_text([f"a photo of {TOKEN}"], {TOKEN: joined}), hidden) <= 1e-4
    assert _rel(model.encode_pooled([f"a photo of {TOKEN}"], {TOKEN: joined}), pooled) <= 1e-4


def test_sd_model_reads_the_clip_l_part_and_sdxl_refuses_sd_files(model, tiny_sd, tmp_path):
    from safetensors.numpy import save_file
    sd = edge_ti.open_model(tiny_sd[1])
    rng = np.random.default_rng(0)
    path = str(tmp_path / "x.safetensors")
    save_file({"clip_l": rng.normal(size=(1, sd.hidden_size)).astype(np.float32),
               "clip_g": rng.normal(size=(1, 48)).astype(np.float32)}, path)
    assert sd.check_embeddings(edge_ti.load_embedding(path))["x"].shape == (1, sd.hidden_size)   # as ComfyUI
    sd_path = str(tmp_path / "sd.safetensors")
    edge_ti.save_embedding(sd_path, {"<a>": rng.normal(size=(1, 32)).astype(np.float32)})
    with pytest.raises(EdgeTIError, match=r"sd.safetensors: token '<a>' is an SD 1.x/2.x embedding.*SDXL"):
        model.check_embeddings(edge_ti.load_embedding(sd_path), source=sd_path)


BAD_FILES = {
    "clip_g alone": ({"clip_g": np.zeros((1, 48))}, "holds clip_l and clip_g"),
    "an extra key": ({"clip_l": np.zeros((1, 32)), "clip_g": np.zeros((1, 48)), "x": np.zeros((1, 3))},
                     "holds clip_l and clip_g"),
    "vector counts differ": ({"clip_l": np.zeros((2, 32)), "clip_g": np.zeros((1, 48))}, "2 clip_l vectors but 1"),
    "NaN": ({"clip_l": np.full((1, 32), np.nan), "clip_g": np.zeros((1, 48))}, "NaN"),
    "wrong clip_g width": ({"clip_l": np.zeros((1, 32)), "clip_g": np.zeros((1, 40))}, r"\[n, 48\]"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_sdxl_files_are_one_line_errors(model, tmp_path, case):
    from safetensors.numpy import save_file
    tensors, message = BAD_FILES[case]
    path = str(tmp_path / "bad.safetensors")
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, path)
    with pytest.raises(EdgeTIError, match=message) as err:
        model.check_embeddings(edge_ti.load_embedding(path), source=path)
    assert "\n" not in str(err.value) and path in str(err.value)


def test_save_refuses_bad_parts(tmp_path):
    with pytest.raises(EdgeTIError, match="parts clip_l and clip_g"):
        edge_ti.save_embedding(str(tmp_path / "a.safetensors"), {TOKEN: {"clip_l": np.zeros((1, 4))}})
    with pytest.raises(EdgeTIError, match="1 clip_l but 2 clip_g"):
        edge_ti.save_embedding(str(tmp_path / "a.safetensors"), {TOKEN: {"clip_l": np.zeros((1, 4)),
                                                                         "clip_g": np.zeros((2, 6))}})
    assert not os.listdir(tmp_path)


def test_info_says_the_family(tiny_sdxl, tiny_sd):
    from click.testing import CliRunner
    from edge_ti.cli import cli
    for folder, family in ((tiny_sdxl[1], "sdxl"), (tiny_sd[1], "sd")):
        result = CliRunner().invoke(cli, ["info", folder])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["family"] == family


# ---- training ----
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_matches_diffusers(tiny_sdxl, pipe, tmp_path, prediction_type):
    """The population loss with SDXL's added conditioning: text_embeds of the candidate, time_ids of the
    training size (original = target = the latents' size in pixels, crop (0, 0))."""
    import shutil
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from edge_ti import latents as lat, objective
    from edge_ti.denoiser import Denoiser

    folder = str(tmp_path / "onnx")                     # the same weights, told to predict v when asked
    shutil.copytree(tiny_sdxl[1], folder)
    config_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "prediction_type": prediction_type}, f)
    model = edge_ti.open_model(folder)
    rng = np.random.default_rng(0)
    P, n = 2, 1
    candidates = rng.normal(0, 2.0, (P, n, model.hidden_size)).astype(np.float32)
    prompts = [f"a photo of a {TOKEN}", f"a {TOKEN} on a table"]
    prompt_ids = model.tokenize(prompts, {TOKEN: candidates[0]})
    pixels = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    latents = lat.encode_images(model, pixels)
    triples = objective.Triples(latent_index=np.array([0, 1, 1]), prompt_index=np.array([0, 1, 0]),
                                timesteps=np.array([10, 500, 10]),
                                noise=rng.standard_normal((3, *latents.shape[1:]), dtype=np.float32))
    ours = objective.population_loss(Denoiser(model), candidates, prompt_ids, latents, triples, max_batch=2)

    scheduler = DDPMScheduler.from_config({**pipe.scheduler.config, "prediction_type": prediction_type})
    x0 = torch.from_numpy(latents[triples.latent_index])
    noise, t = torch.from_numpy(triples.noise), torch.from_numpy(triples.timesteps)
    noisy = scheduler.add_noise(x0, noise, t)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(3, 1)
    for p in range(P):
        ref = _diffusers_with_token(pipe, model.file_parts(candidates[p]))
        hidden, pooled, _, _ = _reference_encode(ref, [prompts[i] for i in triples.prompt_index])
        with torch.no_grad():
            pred = ref.unet(noisy, t, torch.from_numpy(hidden),
                            added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": time_ids}).sample
        want = F.mse_loss(pred, target).item()
        assert abs(ours[p] - want) <= 1e-5 * abs(want), (p, ours[p], want)
    assert abs(ours[0] - ours[1]) > 1e-4 * ours[0]     # the token moves the loss 10x more than the tolerance


def test_train_writes_an_sdxl_token(model, tiny_sdxl, concept_dir, tmp_path, pipe):
    out = str(tmp_path / "tok.safetensors")
    settings = edge_ti.TrainSettings(dim=4, popsize=6, budget=36, eval_every=2, heldout_triples=8, seed=0)
    result = edge_ti.train(model, concept_dir, TOKEN, out, init_word="cat", settings=settings)
    vectors = result.embedding[TOKEN]
    assert vectors.shape == (2, 80)   # the searched vector and the anchor, the init word's rows of both tables
    # z has a subspace per encoder: the init word's rows of both tables, each capped at its own table's norms
    from edge_ti.init import from_word
    e0 = from_word(model, "cat", 1)
    np.testing.assert_allclose(e0, np.concatenate([t[model.tokenize(["cat"])[0, 1]][None] for t in model.token_tables],
                                                  axis=1), rtol=1e-6)
    np.testing.assert_array_equal(vectors[1:], e0)
    for part, table in zip(model.text_parts, model.token_tables):
        assert np.linalg.norm(vectors[0, part.columns]) <= np.linalg.norm(table, axis=1).max() * (1 + 1e-5)
    loaded = edge_ti.load_embedding(out)
    assert sorted(loaded["tok"]) == ["clip_g", "clip_l"]
    np.testing.assert_array_equal(model.check_embeddings({TOKEN: loaded["tok"]})[TOKEN], vectors)
    images = edge_ti.generate(model, f"a photo of {TOKEN}", {TOKEN: loaded["tok"]}, steps=2, n=1)
    assert images.shape == (1, 32, 32, 3)


def test_cli_train_and_generate_sdxl(tiny_sdxl, concept_dir, tmp_path):
    from click.testing import CliRunner
    from edge_ti.cli import cli
    out = str(tmp_path / "cli-tok.safetensors")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", tiny_sdxl[1], concept_dir, "--token", TOKEN, "--init-word", "cat",
                                 "--out", out, "--budget", "24", "--popsize", "6", "--dim", "4"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["generate", tiny_sdxl[1], f"a photo of {TOKEN}", "--embedding", out,
                                 "--steps", "2", "--n", "1", "--out", str(tmp_path / "images")])
    assert result.exit_code == 0, result.output
    assert len(os.listdir(tmp_path / "images")) >= 1


def test_sdxl_without_torch(tiny_sdxl, concept_dir, tmp_path):
    """quantize, train and generate on an SDXL folder where torch & co. cannot be imported; the file is
    used as AUTOMATIC1111 uses one, by its name in the prompt."""
    from test_no_torch import run_blocked
    int8, out = str(tmp_path / "int8"), str(tmp_path / "mytok.safetensors")
    for args in (["quantize", tiny_sdxl[1], int8, "--feed-forward", "int8"],
                 ["train", int8, concept_dir, "--token", TOKEN, "--init-word", "cat", "--out", out,
                  "--budget", "6", "--popsize", "3", "--dim", "4", "--heldout-triples", "2"],
                 ["generate", int8, "a photo of mytok", "--embedding", out, "--steps", "2", "--n", "1",
                  "--out", str(tmp_path / "images")]):
        proc = run_blocked("edge_ti", *args)
        assert proc.returncode == 0, (args[0], proc.stderr)
    assert sorted(edge_ti.load_embedding(out)["mytok"]) == ["clip_g", "clip_l"]
    assert os.listdir(tmp_path / "images")
    import onnx
    assert not [n.name for n in onnx.load(os.path.join(int8, "unet", "model.onnx")).graph.node
                if n.op_type == "MatMul" and "/ff/" in n.name]                    # --feed-forward int8 took
    proc = run_blocked("edge_ti", "tokenize", int8, "a photo of mytok", "--embedding", out)
    vocab = edge_ti.open_model(int8).vocab_size
    assert proc.returncode == 0 and any(int(i) >= vocab for i in proc.stdout.split()), proc.stdout  # the token


@pytest.mark.parametrize("conv", ["none", "static"])
def test_int8_quantizes_both_text_encoders_and_runs(tiny_sdxl, tmp_path, conv):
    from edge_ti import quantize
    out = quantize.quantize_model(tiny_sdxl[1], str(tmp_path / "int8"), mode="int8", conv=conv, calibration=2)
    assert json.load(open(os.path.join(out, "edge_ti_quantization.json")))["parts"] == \
        ["unet", "text_encoder", "text_encoder_2"]
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert os.path.getsize(os.path.join(out, part, "model.onnx")) < \
            os.path.getsize(os.path.join(tiny_sdxl[1], part, "model.onnx")), part
    fp32, int8 = edge_ti.open_model(tiny_sdxl[1]), edge_ti.open_model(out)
    prompts = ["a photo of a cat", "a red mug"]
    assert _rel(int8.encode_pooled(prompts), fp32.encode_pooled(prompts)) <= 0.15   # int8 of a tiny random CLIP
    from edge_ti import objective
    from edge_ti.denoiser import Denoiser
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    triples = objective.draw_triples(rng, 4, 2, 2, 1000, latents.shape[1:])
    candidates = fp32.token_embeddings[[5, 9]][:, None]                        # (2, 1, D): two words
    ids = fp32.tokenize(["a photo of a <t>", "a <t> on a table"], {"<t>": candidates[0]})
    losses = [objective.population_loss(Denoiser(m), candidates, ids, latents, triples) for m in (fp32, int8)]
    assert np.all(np.abs(losses[1] - losses[0]) <= 2e-2 * losses[0]), losses
    assert np.all(np.isfinite(denoise(int8, "a photo of a cat", steps=2, n=1)))


def _copy_folder(tiny_sdxl, tmp_path, drop=(), edit=None):
    import shutil
    folder = str(tmp_path / "copy")
    shutil.copytree(tiny_sdxl[1], folder)
    for name in drop:
        shutil.rmtree(os.path.join(folder, name))
    if edit:
        edit(folder)
    return folder


def test_bad_sdxl_folders_are_one_line_errors(tiny_sdxl, tmp_path):
    folder = _copy_folder(tiny_sdxl, tmp_path, drop=("tokenizer_2",))
    with pytest.raises(EdgeTIError, match=r"text_encoder_2/ \(SDXL\) but no tokenizer_2/"):
        edge_ti.open_model(folder)


def test_tokenizers_that_differ_are_refused(tiny_sdxl, tmp_path):
    def edit(folder):
        path = os.path.join(folder, "tokenizer_2", "vocab.json")
        vocab = json.load(open(path))
        vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
        json.dump(vocab, open(path, "w"))
    model = edge_ti.open_model(_copy_folder(tiny_sdxl, tmp_path, edit=edit))
    with pytest.raises(EdgeTIError, match="tokenizer/ and tokenizer_2/ differ"):
        model.encode_text(["a cat"])


def test_sdxl_unet_without_second_encoder_is_refused(tiny_sdxl, tmp_path):
    model = edge_ti.open_model(_copy_folder(tiny_sdxl, tmp_path, drop=("text_encoder_2", "tokenizer_2")))
    assert model.family == "sd"
    with pytest.raises(EdgeTIError, match="unet/model.onnx: this UNet takes text states of width 80"):
        denoise(model, "a cat", steps=1, n=1)


def test_cli_refuses_cma_with_two_candidates(tiny_sdxl, concept_dir, tmp_path):
    from click.testing import CliRunner
    from edge_ti.cli import cli
    out = str(tmp_path / "x.safetensors")
    result = CliRunner().invoke(cli, ["train", tiny_sdxl[1], concept_dir, "--token", TOKEN, "--init-word", "cat",
                                      "--out", out, "--popsize", "2"])
    assert result.exit_code != 0 and "popsize must be at least 3 for cma" in result.output
    assert "Traceback" not in result.output and not os.path.exists(out)


def test_export_in_parts_equals_optimum(tiny_sdxl, tmp_path):
    """edge_ti_export.sdxl_parts (the SDXL export that fits 24 GB) gives the folder optimum gives."""
    import subprocess
    import sys
    from edge_ti.denoiser import Denoiser
    out = str(tmp_path / "parts")
    subprocess.run([sys.executable, "-m", "edge_ti_export.sdxl_parts", tiny_sdxl[0], out], check=True,
                   capture_output=True)
    assert sorted(os.listdir(out)) == sorted(os.listdir(tiny_sdxl[1]))
    ours, optimum = edge_ti.open_model(out), edge_ti.open_model(tiny_sdxl[1])
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    hidden, pooled = Denoiser(optimum).encode(["a photo of a cat", "a red mug"])
    want = Denoiser(optimum).unet(sample, 300.0, hidden, pooled=pooled)
    assert _rel(Denoiser(ours).unet(sample, 300.0, hidden, pooled=pooled), want) <= 1e-5
    assert _rel(ours.encode_pooled(["a photo of a cat"]), optimum.encode_pooled(["a photo of a cat"])) <= 1e-6


@pytest.fixture(scope="module")
def sdxl_with_clip(tiny_sdxl, tmp_path_factory):
    """A copy of the tiny SDXL with a tiny CLIP in clip/ (for --init auto and `edge-ti evaluate`)."""
    import shutil
    from edge_ti_export.clip_export import export_clip
    from edge_ti_export.tiny_clip import tiny_clip
    base = tmp_path_factory.mktemp("sdxl-clip")
    folder = str(base / "onnx")
    shutil.copytree(tiny_sdxl[1], folder)
    export_clip(tiny_clip(str(base / "clip-src"), seed=0), folder)
    return folder


def test_init_from_images_mixes_both_tables(sdxl_with_clip, concept_dir):
    """--init auto on SDXL: CLIP's weights over the vocabulary mix each word's rows of both tables alike."""
    from edge_ti import init
    from edge_ti.latents import image_paths
    model = edge_ti.open_model(sdxl_with_clip)
    e0, top = init.from_images(model, image_paths([concept_dir]), show=None)
    assert e0.shape == (1, model.hidden_size)
    words, weights = zip(*top)
    mixed = np.asarray(weights) @ init.token_features(model, list(words))     # (D,): the same weights, both parts
    ratio = e0[0] / mixed
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)                   # one scale for both encoders' columns


def test_cli_evaluate_sdxl(sdxl_with_clip, concept_dir, tmp_path):
    from click.testing import CliRunner
    from edge_ti.cli import cli
    out = str(tmp_path / "tok.safetensors")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", sdxl_with_clip, concept_dir, "--token", TOKEN, "--init-word", "cat",
                                 "--out", out, "--budget", "12", "--popsize", "4", "--dim", "4"])
    assert result.exit_code == 0, result.output
    report = str(tmp_path / "eval.json")
    result = runner.invoke(cli, ["evaluate", sdxl_with_clip, "--embedding", out, "--images", concept_dir,
                                 "--n", "1", "--steps", "2", "--json", report])
    assert result.exit_code == 0, result.output
    assert "CLIP-I" in result.output and os.path.isfile(report)

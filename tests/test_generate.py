"""generate(): the numpy samplers and the sampling loop equal diffusers' StableDiffusionPipeline.

Per sampler, eps and v-prediction: same initial latents (and, for euler-a, the same per-step
noise) -> the same final latents. Then the UNet batching under guidance, embeddings in the
prompt, and the images and PNG files that come out.
"""
import os

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline)
from PIL import Image

import edge_ti
from edge_ti import schedulers
from edge_ti.errors import EdgeTIError
from edge_ti.generate import denoise, generate, make_grid, save_images, save_png

# our sampler name -> the diffusers scheduler it must equal, and from_config's extra arguments
REFERENCE = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
PROMPT = "a photo of a red mug"


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def load(request):
    """kind ("eps" or "v") -> (diffusers pipeline, edge_ti model) of the tiny pipeline, loaded once."""
    loaded = {}

    def _load(kind):
        if kind not in loaded:
            source, onnx_dir = request.getfixturevalue({"eps": "tiny_sd", "v": "tiny_sd_v"}[kind])
            pipe = StableDiffusionPipeline.from_pretrained(source)
            pipe.set_progress_bar_config(disable=True)
            loaded[kind] = pipe, edge_ti.open_model(onnx_dir)
        return loaded[kind]
    return _load


def _noise_source(noises):
    """The same list of arrays, in order, for our euler-a (numpy) and diffusers' (torch)."""
    ours, theirs = iter(noises), iter(noises)
    return (lambda shape: next(ours)), (lambda *args, **kwargs: torch.from_numpy(next(theirs).copy()))


CASES = [(sampler, kind, 7.5, "") for sampler in REFERENCE for kind in ("eps", "v")] + [
    ("ddim", "eps", 1.0, ""),                   # no guidance: the conditional batch alone
    ("euler", "v", 7.5, "dark, cropped"),       # a negative prompt in the unconditional half
    ("dpmpp-2m", "eps", 5.0, "blue"),
]


@pytest.mark.parametrize("sampler,kind,guidance,negative", CASES)
def test_final_latents_match_diffusers(load, monkeypatch, one_torch_thread, sampler, kind, guidance, negative):
    pipe, model = load(kind)
    n, steps = 2, 6
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((n, 4, 16, 16)).astype(np.float32)
    noises = [rng.standard_normal((n, 4, 16, 16)).astype(np.float32) for _ in range(steps)]
    ours_noise, torch_noise = _noise_source(noises)
    monkeypatch.setattr("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor", torch_noise)

    cls, extra = REFERENCE[sampler]
    monkeypatch.setattr(pipe, "scheduler", cls.from_config(pipe.scheduler.config, **extra))
    with torch.no_grad():
        # the pipeline multiplies given latents by init_noise_sigma itself (prepare_latents); so do we
        ref = pipe(PROMPT, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                   num_images_per_prompt=n, latents=torch.from_numpy(latents.copy()), output_type="latent").images
    got = denoise(model, PROMPT, negative_prompt=negative, steps=steps, guidance=guidance, sampler=sampler,
                  n=n, latents=latents, noise=ours_noise)
    assert got.shape == (n, 4, 16, 16) and got.dtype == np.float32
    assert _rel_err(got, ref.numpy()) <= 1e-3


# scheduler configs as a model folder ships them: our tiny DDIM one, SD 1.x's PNDM one (no
# timestep_spacing: each sampler falls back to its own default), and options that move the numbers
_TINY = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
             timestep_spacing="leading", _class_name="DDIMScheduler")
_PNDM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
             _class_name="PNDMScheduler")
CONFIGS = {
    "tiny": _TINY,
    "pndm": _PNDM,
    "trailing-v": {**_TINY, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "linspace-linear": {**_TINY, "timestep_spacing": "linspace", "beta_schedule": "linear",
                        "beta_start": 0.0001, "beta_end": 0.02},
    "cosine": {**_TINY, "beta_schedule": "squaredcos_cap_v2"},
    "karras-sigma_min": {**_TINY, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    "clip-alpha_one": {**_TINY, "clip_sample": True, "set_alpha_to_one": True},
}


@pytest.mark.parametrize("sampler", list(REFERENCE))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_sampler_schedule_matches_diffusers(monkeypatch, one_torch_thread, sampler, config_name):
    """Timesteps, init_noise_sigma and steps on random model outputs, without a UNet."""
    config, (cls, extra) = CONFIGS[config_name], REFERENCE[sampler]
    source_cls = PNDMScheduler if config["_class_name"] == "PNDMScheduler" else DDIMScheduler
    steps = 7
    ref = cls.from_config(source_cls.from_config(config).config, **extra)
    ref.set_timesteps(steps)
    rng = np.random.default_rng(0)
    noises = [rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(steps)]
    ours_noise, torch_noise = _noise_source(noises)
    monkeypatch.setattr("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor", torch_noise)
    ours = schedulers.make(sampler, config, steps, noise=ours_noise)

    assert np.allclose(np.asarray(ours.timesteps, np.float64), ref.timesteps.numpy(), rtol=1e-5, atol=0)
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        out = rng.standard_normal(x.shape).astype(np.float32)
        assert _rel_err(ours.scale_model_input(x, i), ref.scale_model_input(x_ref, t).numpy()) <= 1e-5
        x = ours.step(out, i, x)
        x_ref = ref.step(torch.from_numpy(out), t, x_ref).prev_sample
        assert x.dtype == np.float32
    assert _rel_err(x, x_ref.numpy()) <= 1e-4


class _CountingSession:
    """An onnxruntime session that records the batch size of every run."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, names, feed):
        self.batches.append(feed["sample"].shape[0])
        return self.session.run(names, feed)


@pytest.mark.parametrize("guidance,batch", [(7.5, 6), (1.0, 3)])
def test_one_unet_call_per_step(load, monkeypatch, guidance, batch):
    _, model = load("eps")
    unet = _CountingSession(model.session("unet"))
    session = model.session
    monkeypatch.setattr(model, "session", lambda part: unet if part == "unet" else session(part))
    seen = []
    denoise(model, PROMPT, steps=4, guidance=guidance, sampler="euler", n=3,
            progress=lambda i, total: seen.append((i, total)))
    assert unet.batches == [batch] * 4  # cond + uncond in one call of 2n under guidance
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_embeddings_in_the_prompt(load):
    _, model = load("eps")
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (2, model.hidden_size)).astype(np.float32)
    b = rng.normal(0, 1, (1, model.hidden_size)).astype(np.float32)

    def run(prompt, embeddings=None):
        return denoise(model, prompt, embeddings, steps=3, sampler="ddim", n=1, seed=3)

    plain = run("a photo of a mug")
    with_a = run("a photo of a <a>", {"<a>": a})
    assert np.abs(with_a - plain).max() > 1e-3 * np.abs(plain).max()
    # a token the prompt does not use changes nothing
    assert np.array_equal(run("a photo of a <a>", {"<a>": a, "<b>": b}), with_a)
    # two embeddings in one prompt: each one matters
    both = run("a <a> on a <b>", {"<a>": a, "<b>": b})
    other_b = run("a <a> on a <b>", {"<a>": a, "<b>": -b})
    assert np.isfinite(both).all()
    assert np.abs(both - other_b).max() > 1e-3 * np.abs(both).max()
    with pytest.raises(EdgeTIError, match="<a>"):
        run("a <a>", {"<a>": np.zeros((1, model.hidden_size + 1), np.float32)})


def test_images_and_files(load, tmp_path):
    _, model = load("eps")
    images = generate(model, PROMPT, steps=2, n=3, seed=5, sampler="dpmpp-2m")
    assert images.dtype == np.uint8 and images.shape == (3, model.resolution, model.resolution, 3)
    assert np.array_equal(images, generate(model, PROMPT, steps=2, n=3, seed=5, sampler="dpmpp-2m"))
    assert not np.array_equal(images, generate(model, PROMPT, steps=2, n=3, seed=6, sampler="dpmpp-2m"))

    out = tmp_path / "out"
    paths = save_images(images, str(out), "mug")
    grid = make_grid(images)
    assert grid.shape == (2 * 32, 2 * 32, 3)  # 3 images on a 2 x 2 grid, the last cell black
    assert np.array_equal(grid[32:, 32:], np.zeros((32, 32, 3), np.uint8))
    grid_path = save_png(grid, str(out / "mug-grid.png"))
    for path, image in zip(paths, images):
        assert np.array_equal(np.asarray(Image.open(path)), image)
    assert np.array_equal(np.asarray(Image.open(grid_path)), grid)
    assert sorted(os.listdir(out)) == ["mug-00.png", "mug-01.png", "mug-02.png", "mug-grid.png"]  # no temp files


def test_bad_arguments(load):
    _, model = load("eps")
    with pytest.raises(EdgeTIError, match="unknown sampler 'plms'"):
        generate(model, PROMPT, sampler="plms", n=1, steps=1)
    with pytest.raises(EdgeTIError, match=r"expected \[2, 4, 16, 16\]"):
        denoise(model, PROMPT, n=2, steps=1, latents=np.zeros((1, 4, 16, 16), np.float32))
    with pytest.raises(EdgeTIError, match="scale factor"):
        generate(model, PROMPT, n=1, steps=1, size=33)
    with pytest.raises(EdgeTIError, match="thresholding=True"):
        schedulers.make("dpmpp-2m", {**_TINY, "thresholding": True}, 5)
    with pytest.raises(EdgeTIError, match="prediction_type 'sample'"):
        schedulers.make("euler", {**_TINY, "prediction_type": "sample"}, 5)

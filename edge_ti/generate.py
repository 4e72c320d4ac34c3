"""Text to image: the sampling loop with classifier-free guidance on the ONNX UNet, then the VAE decoder.

    model = edge_ti.open_model("sd15-onnx")
    images = edge_ti.generate(model, "a photo of <my-mug>", edge_ti.load_embedding("my-mug.safetensors"),
                              steps=30, sampler="dpmpp-2m", seed=0, n=4)      # uint8 [4, 512, 512, 3]
    save_images(images, "out", "my-mug"); save_png(make_grid(images), "out/my-mug-grid.png")

Classifier-free guidance (Ho & Salimans 2022, eq. 6) with the conditional and unconditional
predictions from ONE UNet call on a batch of 2n:

    model_output = model_output(x, uncond) + guidance * (model_output(x, cond) - model_output(x, uncond))

applied to eps or v alike, as diffusers' StableDiffusionPipeline does; guidance <= 1 runs the
conditional batch of n alone (diffusers guides only above 1). The loop follows that pipeline step
for step, so that given the same initial latents the final latents match it (tests/test_generate.py).

SDXL follows StableDiffusionXLPipeline: the UNet also reads the pooled text (text_embeds) and the
time ids of the image size (edge_ti.denoiser), and an empty negative prompt is all zeros, hidden and
pooled, where the folder's model_index.json says force_zeros_for_empty_prompt (SDXL's default; diffusers
zeroes when no negative prompt is given: "" here means none).
"""
import logging
import math
import os

import numpy as np
from PIL import Image

from . import schedulers
from .denoiser import Denoiser
from .errors import EdgeTIError
from .files import atomic_path
from .tokenizer import placeholder_ids

log = logging.getLogger(__name__)

def denoise(model, prompt, embeddings=None, negative_prompt="", steps=30, guidance=7.5, sampler="ddim",
            seed=0, n=4, size=None, latents=None, progress=None, noise=None):
    """The sampling loop: prompt -> final latents float32 [n, C, h, w] (not yet divided by scaling_factor).

    latents: initial latents [n, C, h, w] (before scaling by the sampler's init_noise_sigma, as
    diffusers' `latents=` argument); default: standard normal from np.random.default_rng(seed).
    noise: a callable(shape) -> array for euler-a's per-step noise; default: the same generator.
    progress: called as progress(i + 1, steps) after each step.
    """
    if n < 1 or steps < 1:
        raise EdgeTIError(f"n and steps must be at least 1, got n={n}, steps={steps}")
    size = size or model.resolution
    factor = model.vae_scale_factor
    if size % factor:
        raise EdgeTIError(f"size {size} is not a multiple of the VAE's scale factor {factor}")
    shape = (n, int(model.unet_config.get("in_channels", 4)), size // factor, size // factor)  # [n, C, h, w]
    rng = np.random.default_rng(seed)
    if latents is None:
        latents = rng.standard_normal(shape, dtype=np.float32)              # [n, C, h, w]
    latents = np.asarray(latents, dtype=np.float32)
    if latents.shape != shape:
        raise EdgeTIError(f"initial latents have shape {list(latents.shape)}, expected {list(shape)}")
    _warn_unused_tokens(model, [prompt, negative_prompt] if guidance > 1 else [prompt], embeddings)
    sampler_name = sampler
    sampler = schedulers.make(sampler_name, model.scheduler_config, steps, noise=noise if noise is not None else rng)

    # text: the negative prompt and the prompt in one text-encoder call, each repeated n times
    denoiser = Denoiser(model)
    guided = guidance > 1
    hidden, pooled = _conditioning(model, denoiser, prompt, negative_prompt if guided else None, embeddings)
    hidden = np.repeat(hidden, n, 0)                                        # [2n or n, 77, D']
    pooled = None if pooled is None else np.repeat(pooled, n, 0)            # SDXL: [2n or n, D_g]

    log.info("sampling %d x %dpx: %s, %d steps, guidance %g", n, size, sampler_name, steps, guidance)
    x = latents * np.float32(sampler.init_noise_sigma)                      # [n, C, h, w], x_T
    for i, t in enumerate(sampler.timesteps):
        model_input = sampler.scale_model_input(x, i)                       # [n, C, h, w]
        if guided:
            model_input = np.concatenate([model_input, model_input])        # [2n, C, h, w]
        model_output = denoiser.unet(model_input, t, hidden, pooled=pooled)  # [2n or n, C, h, w]
        if guided:
            out_uncond, out_cond = model_output[:n], model_output[n:]       # [n, C, h, w] each
            model_output = out_uncond + guidance * (out_cond - out_uncond)  # eq. 6
        x = sampler.step(model_output, i, x)                                # [n, C, h, w]
        if progress is not None:
            progress(i + 1, len(sampler.timesteps))
    return x


def _conditioning(model, denoiser, prompt, negative_prompt, embeddings):
    """(hidden [2 or 1, 77, D'], pooled [2 or 1, D_g] or None): the negative prompt's first where it guides."""
    if negative_prompt is None:
        return denoiser.encode([prompt], embeddings)
    if not negative_prompt and model.force_zeros_for_empty_prompt:
        hidden, pooled = denoiser.encode([prompt], embeddings)
        return (np.concatenate([np.zeros_like(hidden), hidden]),
                np.concatenate([np.zeros_like(pooled), pooled]))
    return denoiser.encode([negative_prompt, prompt], embeddings)


def _warn_unused_tokens(model, prompts, embeddings):
    """Warn about loaded tokens the prompts never name (or name only past the 77-token limit)."""
    if not embeddings:
        return
    ids = set(model.tokenize(prompts, embeddings).ravel().tolist())
    placeholders = placeholder_ids(model.check_embeddings(embeddings), model.vocab_size)
    unused = [token for token in embeddings if not ids & set(placeholders[token])]
    if len(unused) == len(embeddings):
        log.warning("the prompt names none of the loaded tokens (%s) in its first %d tokens: "
                    "the embeddings change nothing", ", ".join(unused), model.tokenizer.max_length)
    elif unused:
        log.warning("the prompt never names the loaded token(s) %s in its first %d tokens",
                    ", ".join(unused), model.tokenizer.max_length)


def decode(model, latents):
    """Final latents [n, C, h, w] -> uint8 images [n, H, W, 3], decoded one at a time to bound memory."""
    vae = model.session("vae_decoder")
    dtype = model.input_types("vae_decoder")["latent_sample"][0]
    images = []
    for z in latents / np.float32(model.scaling_factor):                    # [C, h, w]
        sample = vae.run(None, {"latent_sample": z[None].astype(dtype)})[0].astype(np.float32)  # [1, 3, H, W]
        image = np.clip(sample[0] / 2 + 0.5, 0, 1)                          # [-1, 1] -> [0, 1], [3, H, W]
        images.append((image.transpose(1, 2, 0) * 255).round().astype(np.uint8))  # [H, W, 3]
    return np.stack(images)                                                 # [n, H, W, 3]


def generate(model, prompt, embeddings=None, negative_prompt="", steps=30, guidance=7.5, sampler="ddim",
             seed=0, n=4, size=None, latents=None, progress=None, noise=None):
    """Prompt (with `embeddings` {token: [n_vectors, D]} injected) -> uint8 images [n, size, size, 3].

    sampler: ddim, euler, euler-a or dpmpp-2m (schedulers.SAMPLERS); size: pixels, default the
    model's resolution. Same seed, same images. See `denoise` for latents, noise and progress.
    """
    final = denoise(model, prompt, embeddings=embeddings, negative_prompt=negative_prompt, steps=steps,
                    guidance=guidance, sampler=sampler, seed=seed, n=n, size=size, latents=latents,
                    progress=progress, noise=noise)
    return decode(model, final)


def make_grid(images, cols=None):
    """uint8 [n, H, W, 3] -> one uint8 [rows * H, cols * W, 3] image, row-major, black where empty."""
    n, H, W, C = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, H, W, C), np.uint8)                       # [rows * cols, H, W, 3]
    grid[:n] = images
    grid = grid.reshape(rows, cols, H, W, C).transpose(0, 2, 1, 3, 4)       # [rows, H, cols, W, 3]
    return grid.reshape(rows * H, cols * W, C)


def save_png(image, path):
    """Write uint8 [H, W, 3] to `path` atomically: a temporary file beside it, then os.replace."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
    return path


def image_paths(out_dir, prefix, n):
    """The paths save_images writes n images to: out_dir/{prefix}-{i}.png, i zero-padded."""
    width = max(2, len(str(n - 1)))
    return [os.path.join(out_dir, f"{prefix}-{i:0{width}d}.png") for i in range(n)]


def save_images(images, out_dir, prefix="image"):
    """Write uint8 [n, H, W, 3] as out_dir/{prefix}-{i}.png; returns the paths."""
    return [save_png(image, path) for image, path in zip(images, image_paths(out_dir, prefix, len(images)))]

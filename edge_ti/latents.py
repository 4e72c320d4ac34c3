"""Concept images -> VAE latents, encoded once and cached on disk.

Images are center-cropped to a square and resized to the model's resolution (diffusers'
textual_inversion.py does the same), optionally with their horizontal mirror images added.
The VAE encoder (optimum's export returns the latent distribution's parameters: mean and
log-variance) runs once per image; latents are cached keyed by the pixels and the encoder.
"""
import hashlib
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import EdgeTIError
from .files import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_paths(inputs):
    """Files and folders (their images, sorted) -> a list of image files."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise EdgeTIError(f"{item}: no images in this folder")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise EdgeTIError(f"{item}: no such image file or folder")
    if not paths:
        raise EdgeTIError("no concept images given")
    return paths


def load_image(path_or_image, size):
    """One image -> float32 [3, size, size] in [-1, 1]: center crop to a square, bicubic resize."""
    if isinstance(path_or_image, Image.Image):
        image = path_or_image
    else:
        try:
            image = Image.open(path_or_image)
            image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise EdgeTIError(f"{path_or_image}: not a readable image ({err})") from None
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0   # (H, W, 3) in [-1, 1]
    return pixels.transpose(2, 0, 1)                              # (3, H, W)


def load_images(inputs, size, flip=False):
    """Image files/folders (or PIL images) -> float32 [N, 3, size, size]; with flip, mirrors appended."""
    items = inputs if all(isinstance(i, Image.Image) for i in inputs) else image_paths(inputs)
    pixels = np.stack([load_image(item, size) for item in items])  # (N, 3, H, W)
    if flip:
        pixels = np.concatenate([pixels, pixels[..., ::-1]])       # (2N, 3, H, W)
    return np.ascontiguousarray(pixels)


def encode_images(model, pixels, sample=False, seed=0, batch=1):
    """pixels [N, 3, H, W] -> latents [N, 4, H/f, W/f] x scaling_factor, cached by content.

    sample=False takes the latent distribution's mean (deterministic); sample=True draws
    mean + std * noise with a seeded generator, as diffusers' training scripts sample.
    One image per encoder call by default: at 512 px the SD VAE's activations are ~1 GB per image.
    """
    encoder_path = os.path.join(model.path, "vae_encoder", "model.onnx")
    key = hashlib.sha256()
    key.update(model.part_fingerprint("vae_encoder").encode())
    key.update(f"{pixels.shape}{sample}{seed}{model.scaling_factor}".encode())
    key.update(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    cache_file = os.path.join(model.cache_dir("latents"), key.hexdigest()[:32] + ".npy")
    if os.path.isfile(cache_file):
        return np.load(cache_file)

    session = model.session("vae_encoder")
    input_name = session.get_inputs()[0].name
    parameters = np.concatenate([session.run(None, {input_name: pixels[i:i + batch]})[0]
                                 for i in range(0, len(pixels), batch)])  # (N, 2C, h, w)
    del session
    model.release("vae_encoder")  # needed once per image set: free it before the UNet loads
    mean, logvar = np.split(parameters, 2, axis=1)                         # (N, C, h, w) each
    if sample:
        # DiagonalGaussianDistribution.sample: mean + std * eps, logvar clamped to [-30, 20]
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        mean = mean + std * np.random.default_rng(seed).standard_normal(mean.shape).astype(np.float32)
    latents = (mean * model.scaling_factor).astype(np.float32)
    with atomic_path(cache_file) as tmp:
        np.save(tmp, latents)
    return latents

"""Concept images -> VAE latents, encoded once and cached on disk.

Images are center-cropped to a square and resized to the model's resolution (diffusers'
textual_inversion.py does the same), optionally with their horizontal mirror images added.
The VAE encoder (optimum's export returns the latent distribution's parameters: mean and
log-variance) runs once per image; latents are cached keyed by the pixels and the encoder.
"""
import hashlib
import logging
import os
import warnings

import numpy as np
from PIL import Image

from .errors import EdgeTIError
from .files import atomic_path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# larger images are refused before they are decoded: a small file can claim a huge size (a
# "decompression bomb"), and PIL only warns up to 2x its own limit of ~89 Mpixels
MAX_PIXELS = 8192 * 8192
# full scales a 32-bit integer ("I") or float ("F") image's values may be on, in order
_FULL_SCALES = (1.0, 255.0, 65535.0)


def image_paths(inputs):
    """Files and folders (their images, sorted) -> a list of image files.

    Only regular files are images: opening a FIFO or a device would block or never end. A
    folder's other entries are skipped (with a warning if named like an image), a file given
    by name must be a regular one.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]   # one file or folder, not the characters of its name
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths.extend(_folder_images(item))
        elif os.path.isfile(item):
            paths.append(item)
        elif os.path.exists(item):
            raise EdgeTIError(f"{item}: not a regular file")
        else:
            raise EdgeTIError(f"{item}: no such image file or folder")
    if not paths:
        raise EdgeTIError("no concept images given")
    return paths


def _folder_images(folder):
    """A folder's regular files with image extensions, sorted."""
    named = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    found = []
    for path in named:
        if os.path.isfile(path):
            found.append(path)
        else:
            log.warning("%s: skipped, not a regular file", path)
    if not found:
        raise EdgeTIError(f"{folder}: no images in this folder")
    return found


def read_image(path):
    """An image file -> an 8-bit RGB PIL image (to_rgb), or a one-line error naming the file."""
    if not os.path.isfile(path):
        raise EdgeTIError(f"{path}: not a regular file" if os.path.exists(path) else f"{path}: no such image file")
    try:
        return _decode(path)
    except EdgeTIError as err:
        raise EdgeTIError(f"{path}: {err}") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise EdgeTIError(f"{path}: too large to open safely ({err})") from None
    except Exception as err:  # PIL's decoders raise OSError, SyntaxError, ValueError, ... on broken files
        raise EdgeTIError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def _decode(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            w, h = image.size  # from the header: nothing is decoded yet
            if w * h > MAX_PIXELS:
                raise EdgeTIError(f"{w}x{h} pixels is too large (the limit is {MAX_PIXELS:,} pixels); "
                                  f"scale it down first")
            image.load()
            return to_rgb(image)


def to_rgb(image):
    """Any PIL image -> 8-bit RGB. PIL's convert("RGB") clips 16-bit values to white and drops alpha.

    16-bit ("I;16*"): value / 257. 32-bit integer or float ("I", "F"): the smallest full scale of
    1, 255 and 65535 that holds the largest value, taken to 255. Transparency (RGBA, LA, P with a
    transparent color, ...): composited on white, as viewers show it; the colors under transparent
    pixels are often black or arbitrary, and a black background would hide dark objects.
    """
    if image.mode.startswith("I;16"):
        return _gray_to_rgb(np.asarray(image, dtype=np.float64) / 257.0)
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if values.size and not np.isfinite(values).all():
            raise EdgeTIError("image has non-finite pixel values")
        largest = values.max(initial=0.0)
        scale = next((s for s in _FULL_SCALES if largest <= s), None)
        if scale is None or values.min(initial=0.0) < 0:
            raise EdgeTIError(f"image has pixel values from {values.min():g} to {largest:g}, "
                              f"not on a 0..1, 0..255 or 0..65535 scale")
        return _gray_to_rgb(values * (255.0 / scale))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def _gray_to_rgb(values):
    """float gray values in 0..255 [H, W] -> an RGB PIL image."""
    gray = np.clip(np.round(values), 0, 255).astype(np.uint8)  # (H, W)
    return Image.fromarray(gray).convert("RGB")


def square_pixels(image, size):
    """An RGB PIL image -> float32 [3, size, size] in [-1, 1]: center crop to a square, bicubic resize."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0   # (H, W, 3) in [-1, 1]
    return pixels.transpose(2, 0, 1)                              # (3, H, W)


def load_image(path_or_image, size):
    """One image file or PIL image -> float32 [3, size, size] in [-1, 1] (square_pixels)."""
    is_file = not isinstance(path_or_image, Image.Image)
    image = read_image(path_or_image) if is_file else to_rgb(path_or_image)
    return square_pixels(image, size)


def load_images(inputs, size, flip=False):
    """Image files/folders (or PIL images) -> float32 [N, 3, size, size]; with flip, mirrors appended.

    Says (a warning, since the CLI shows warnings) how many images are used and how they were changed.
    """
    if isinstance(inputs, (str, os.PathLike, Image.Image)):
        inputs = [inputs]   # one file, folder or image
    items = inputs if all(isinstance(i, Image.Image) for i in inputs) else image_paths(inputs)
    pixels, cropped, resized = [], 0, 0
    for item in items:
        image = to_rgb(item) if isinstance(item, Image.Image) else read_image(item)
        w, h = image.size
        cropped += w != h
        resized += min(w, h) != size
        pixels.append(square_pixels(image, size))
    pixels = np.stack(pixels)                                      # (N, 3, H, W)
    _report_images(len(items), cropped, resized, size, flip)
    if flip:
        pixels = np.concatenate([pixels, pixels[..., ::-1]])       # (2N, 3, H, W)
    return np.ascontiguousarray(pixels)


def _report_images(count, cropped, resized, size, flip):
    changes = [f"{cropped} center-cropped to a square"] if cropped else []
    changes += [f"{resized} resized to {size} px"] if resized else []
    message = f"using {count} image{'s' * (count != 1)}" + (f" ({', '.join(changes)})" if changes else "")
    message += ", plus their mirror images" if flip else ""
    (log.warning if changes else log.info)(message)


def encode_images(model, pixels, sample=False, seed=0, batch=1):
    """pixels [N, 3, H, W] -> latents [N, 4, H/f, W/f] x scaling_factor, cached by content.

    sample=False takes the latent distribution's mean (deterministic); sample=True draws
    mean + std * noise with a seeded generator, as diffusers' training scripts sample.
    One image per encoder call by default: at 512 px the SD VAE's activations are ~1 GB per image.
    """
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

"""CLIP on onnxruntime + numpy: normalized image and text features for `init.from_images` and metrics.

    MODEL_DIR/clip/  (edge_ti_export.clip_export, `edge-ti export SOURCE OUT --clip CLIP_DIR`)
      text_model.onnx     input_ids int64 [B, L] -> text_embeds float32 [B, P], projected
      vision_model.onnx   pixel_values float32 [B, 3, S, S] -> image_embeds float32 [B, P], projected
      clip_config.json    logit_scale, projection_dim, CLIPImageProcessor's settings
      vocab.json merges.txt tokenizer_config.json special_tokens_map.json preprocessor_config.json

    clip = edge_ti.clip.clip_model(model)
    q = clip.image_features(images)                 # (N, P), unit rows
    t = clip.text_features(["a photo of a cat"])    # (1, P), unit rows
    logits = clip.logit_scale * q @ t.T             # what CLIP's softmax sees

Images are uint8 arrays [N, H, W, 3] (or [H, W] / [H, W, 4] per image), PIL images or file paths.
Preprocessing repeats transformers' CLIPImageProcessor step for step with pillow and numpy.
"""
import functools
import json
import os
import weakref

import numpy as np
from PIL import Image

from .cache import fingerprint
from .errors import EdgeTIError
from .latents import read_image
from .tokenizer import ClipTokenizer

TEXT_BATCH = 64  # prompts per text-model call: the vocabulary is encoded in tens of thousands
IMAGE_BATCH = 16  # images per vision-model call: bounds memory at 224 px for a ViT-L


# ---- images ----
def load_image(image):
    """A PIL image, a uint8 array or a path -> an RGB PIL image.

    A file is read as for training (latents.read_image: checked, 16-bit kept, transparency on
    white); an image in memory converts as CLIPImageProcessor's convert_rgb does.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise EdgeTIError(f"an image must be a uint8 array [H, W, 3] or a PIL image, "
                          f"got {array.dtype} {list(array.shape)}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")


def image_list(images):
    """uint8 [N, H, W, C], or a sequence of images, or one PIL image / path -> a list of images."""
    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise EdgeTIError(f"images must be a uint8 array [N, H, W, 3], got {list(images.shape)}")
        return list(images)
    return list(images)


def preprocess(images, config):
    """Images -> pixel_values float32 [N, 3, S, S], as transformers' CLIPImageProcessor computes them."""
    out = []
    mean = np.asarray(config["image_mean"], np.float32)  # (3,)
    std = np.asarray(config["image_std"], np.float32)  # (3,)
    for image in image_list(images):
        image = load_image(image)
        # 1. resize: the shortest side to size["shortest_edge"], the other by int(S * long / short)
        if config["do_resize"]:
            size, (w, h) = config["size"], image.size
            if "shortest_edge" in size:
                short, long = min(w, h), max(w, h)
                new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
                new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            else:
                new_w, new_h = size["width"], size["height"]
            image = image.resize((new_w, new_h), resample=config["resample"])
        # 2. center crop at ((h - ch) // 2, (w - cw) // 2); PIL fills any part outside with zeros,
        #    where transformers pads the same way when the crop is larger than the image
        if config["do_center_crop"]:
            ch, cw = config["crop_size"]["height"], config["crop_size"]["width"]
            w, h = image.size
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image.crop((left, top, left + cw, top + ch))
        x = np.asarray(image)  # (S, S, 3) uint8
        # 3. rescale in float64, kept in float32 (transformers' rescale)
        if config["do_rescale"]:
            x = (x.astype(np.float64) * config["rescale_factor"]).astype(np.float32)
        # 4. normalize in float32: (x - mean) / std per channel
        x = x.astype(np.float32)
        if config["do_normalize"]:
            x = (x - mean) / std
        out.append(x.transpose(2, 0, 1))  # (3, S, S)
    if not out:
        raise EdgeTIError("no images given")
    return np.stack(out)  # (N, 3, S, S)


def _normalize(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# ---- the model ----
class ClipModel:
    """MODEL_DIR/clip/: sessions created on first use, with the Stable Diffusion model's providers."""

    FILES = ("text_model.onnx", "vision_model.onnx", "clip_config.json")

    def __init__(self, model):
        self.path = os.path.join(model.path, "clip")
        if not os.path.isdir(self.path):
            raise EdgeTIError(f"{model.path}: no clip/ folder; add one with "
                              f"`edge-ti export SOURCE OUT --clip CLIP_DIR` (a transformers CLIP folder)")
        missing = [name for name in self.FILES if not os.path.isfile(os.path.join(self.path, name))]
        if missing:
            raise EdgeTIError(f"{self.path}: missing {', '.join(missing)}; export it again with --clip")
        self.open_session = model.open_session  # sessions as the model's own: options, providers, cache

    @functools.cached_property
    def config(self):
        try:
            with open(os.path.join(self.path, "clip_config.json"), encoding="utf-8") as f:
                return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EdgeTIError(f"{self.path}/clip_config.json: not valid JSON ({err})") from None

    @property
    def logit_scale(self):
        """CLIP's temperature exp(t): the factor on cosine similarities before its softmax (100 for ViT-L/14)."""
        return float(self.config["logit_scale"])

    @functools.cached_property
    def tokenizer(self):
        return ClipTokenizer(self.path)

    @functools.cached_property
    def text_key(self):
        """Content key of the text model, for caches of text features."""
        return fingerprint(os.path.join(self.path, "text_model.onnx"))[:24]

    @functools.cached_property
    def text_session(self):
        return self.open_session(os.path.join(self.path, "text_model.onnx"))

    @functools.cached_property
    def vision_session(self):
        return self.open_session(os.path.join(self.path, "vision_model.onnx"))

    def image_features(self, images, batch=IMAGE_BATCH):
        """Images -> float32 [N, P], L2-normalized CLIP image features."""
        images = image_list(images)
        if not images:
            raise EdgeTIError("no images given")
        out = []
        for start in range(0, len(images), batch):
            pixels = preprocess(images[start:start + batch], self.config)  # (b, 3, S, S)
            out.append(self.vision_session.run(None, {"pixel_values": pixels})[0])  # (b, P)
        return _normalize(np.concatenate(out))  # (N, P)

    def text_features(self, prompts, batch=TEXT_BATCH):
        """Prompts -> float32 [N, P], L2-normalized CLIP text features."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenizer(prompts)  # (N, 77)
        if not len(ids):
            return np.zeros((0, self.config["projection_dim"]), np.float32)
        # the text model is causal and pools at the first EOS: positions after a batch's last EOS
        # change nothing, so they are not computed (about 8x fewer for short prompts); batches of
        # prompts of equal length (sorted by it) compute no padding at all
        eos = (ids == self.tokenizer.eos_id).argmax(axis=1)  # (N,)
        order = np.argsort(eos, kind="stable")
        out = np.empty((len(ids), self.config["projection_dim"]), np.float32)
        for start in range(0, len(ids), batch):
            rows = order[start:start + batch]
            end = int(eos[rows].max()) + 1
            out[rows] = self.text_session.run(None, {"input_ids": ids[rows, :end]})[0]  # (b, P)
        return _normalize(out)


_OPEN = weakref.WeakKeyDictionary()


def clip_model(model):
    """The ClipModel of an open Stable Diffusion model, created once per model object."""
    if model not in _OPEN:
        _OPEN[model] = ClipModel(model)
    return _OPEN[model]

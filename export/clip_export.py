"""A local transformers CLIP folder -> MODEL_DIR/clip/, the two towers edge-ti runs on onnxruntime.

    MODEL_DIR/clip/text_model.onnx     input_ids int64 [B, L] -> text_embeds float32 [B, P]
    MODEL_DIR/clip/vision_model.onnx   pixel_values float32 [B, 3, S, S] -> image_embeds float32 [B, P]
    MODEL_DIR/clip/clip_config.json    logit_scale, projection_dim and CLIPImageProcessor's settings
    MODEL_DIR/clip/vocab.json merges.txt tokenizer_config.json special_tokens_map.json
    MODEL_DIR/clip/preprocessor_config.json

Both outputs are the projected features, not normalized (CLIPModel.get_text_features /
get_image_features). B and L are dynamic: the text model is causal and pools at the first EOS,
so edge_ti.clip cuts each batch after its last EOS instead of running all 77 positions.
The folder is written beside MODEL_DIR's other parts, checked against torch, then renamed
into place: there is never a half-written clip/.
"""
import json
import logging
import os
import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from edge_ti.errors import EdgeTIError
from edge_ti.files import atomic_folder
from edge_ti.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is one op from 17 on
TOLERANCE = 1e-3  # max |onnx - torch| / max |torch| the export must meet (fp32 gives ~1e-6)
CHECK_PROMPTS = ["a photo of a cat", "a rendering of a red mug on the table", "dog"]


class _TextFeatures(torch.nn.Module):
    """CLIPTextModelWithProjection's text_embeds, from the CLIPModel's own modules."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids):
        return self.clip.get_text_features(input_ids=input_ids)  # (B, P)


class _ImageFeatures(torch.nn.Module):
    """CLIPVisionModelWithProjection's image_embeds, from the CLIPModel's own modules."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        return self.clip.get_image_features(pixel_values=pixel_values)  # (B, P)


def _rel_err(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def _export(module, example, input_name, output_name, dynamic, out_path):
    """torch.onnx.export (TorchScript exporter) into a scratch folder, then one .onnx (+ one .data)."""
    scratch = out_path + ".scratch"
    os.makedirs(scratch)
    path = os.path.join(scratch, "model.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer's notes on shape checks it freezes (true for every input we feed) are noise here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index")  # EOS positions are >= 0
        torch.onnx.export(module, (example,), path, dynamo=False, opset_version=OPSET,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: dynamic, output_name: {0: "batch"}})
    if os.listdir(scratch) == ["model.onnx"]:
        os.replace(path, out_path)
    else:  # over 2 GB: torch wrote one file per tensor; gather them into one external data file
        proto = onnx.load(path)
        onnx.save_model(proto, out_path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(out_path) + ".data", size_threshold=1024)
    shutil.rmtree(scratch)


def _clip_config(clip, processor):
    """What edge_ti.clip needs, in one file: the logit scale and CLIPImageProcessor's recipe."""
    size, crop = dict(processor.size), dict(processor.crop_size)
    return {
        "logit_scale": float(clip.logit_scale.detach().exp()),  # CLIP's learned temperature, exp(log scale)
        "projection_dim": int(clip.config.projection_dim),
        "image_size": int(clip.config.vision_config.image_size),
        "do_resize": bool(processor.do_resize), "size": size, "resample": int(processor.resample),
        "do_center_crop": bool(processor.do_center_crop), "crop_size": crop,
        "do_rescale": bool(processor.do_rescale), "rescale_factor": float(processor.rescale_factor),
        "do_normalize": bool(processor.do_normalize),
        "image_mean": [float(m) for m in processor.image_mean],
        "image_std": [float(s) for s in processor.image_std],
    }


def _check(clip, tokenizer, config, folder):
    """ONNX (with edge-ti's tokenizer) against torch (with transformers'), at other batch sizes."""
    ids = tokenizer(CHECK_PROMPTS, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    ours = ClipTokenizer(folder)(CHECK_PROMPTS)
    if not np.array_equal(ours, ids.numpy()):
        raise EdgeTIError(f"{folder}: edge-ti's tokenizer gives other ids than transformers' CLIPTokenizer")
    S = config["image_size"]
    pixels = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (2, 3, S, S)).astype(np.float32))
    with torch.no_grad():
        want_text = clip.get_text_features(input_ids=ids).numpy()
        want_image = clip.get_image_features(pixel_values=pixels).numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    text = ort.InferenceSession(os.path.join(folder, "text_model.onnx"), options, providers=["CPUExecutionProvider"])
    vision = ort.InferenceSession(os.path.join(folder, "vision_model.onnx"), options, providers=["CPUExecutionProvider"])
    got_text = text.run(None, {"input_ids": ours})[0]
    got_image = vision.run(None, {"pixel_values": pixels.numpy()})[0]
    errors = {"text": _rel_err(got_text, want_text), "vision": _rel_err(got_image, want_image)}
    log.info("clip export check: relative errors %s", errors)
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    if bad:
        raise EdgeTIError(f"CLIP export differs from torch: relative error {bad} > {TOLERANCE}")


def check_source(clip_source):
    """CLIP_SOURCE's CLIPConfig, or a one-line error: cheap, so `edge-ti export` checks it first."""
    for name, what in (("config.json", "not a transformers model folder"),
                       ("preprocessor_config.json", "CLIP's image preprocessing")):
        if not os.path.isfile(os.path.join(clip_source, name)):
            raise EdgeTIError(f"{clip_source}: no {name} ({what})")
    try:
        with open(os.path.join(clip_source, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise EdgeTIError(f"{clip_source}/config.json: not a model config ({err})") from None
    # a text or vision tower alone (clip_text_model, clip_vision_model) would load with random weights
    if model_type != "clip":
        raise EdgeTIError(f"{clip_source}: model_type is {model_type!r}, not 'clip' (a full CLIPModel)")
    return CLIPConfig.from_pretrained(clip_source, local_files_only=True)


def export_clip(clip_source, model_dir):
    """Export the CLIPModel folder CLIP_SOURCE into MODEL_DIR/clip/ (atomically); returns that path."""
    check_source(clip_source)
    if not os.path.isdir(model_dir):
        raise EdgeTIError(f"{model_dir}: no such model folder")
    out = os.path.join(model_dir, "clip")
    if os.path.exists(out):
        raise EdgeTIError(f"{out}: already exists; remove it to export another CLIP")
    # eager attention: the TorchScript exporter traces it into plain MatMul/Softmax
    clip = CLIPModel.from_pretrained(clip_source, local_files_only=True, attn_implementation="eager").float().eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_source, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(clip_source, local_files_only=True)
    clip_config = _clip_config(clip, processor)

    with atomic_folder(out) as tmp:
        tokenizer.save_pretrained(tmp)  # vocab.json merges.txt tokenizer_config.json special_tokens_map.json
        processor.save_pretrained(tmp)  # preprocessor_config.json
        with open(os.path.join(tmp, "clip_config.json"), "w", encoding="utf-8") as f:
            json.dump(clip_config, f, indent=2)
        ids = tokenizer(CHECK_PROMPTS[:2], padding="max_length", max_length=77, return_tensors="pt").input_ids
        S = clip_config["image_size"]
        log.info("exporting the CLIP text model -> %s", out)
        _export(_TextFeatures(clip), ids, "input_ids", "text_embeds", {0: "batch", 1: "sequence"},
                os.path.join(tmp, "text_model.onnx"))
        log.info("exporting the CLIP vision model -> %s", out)
        _export(_ImageFeatures(clip), torch.zeros(1, 3, S, S), "pixel_values", "image_embeds", {0: "batch"},
                os.path.join(tmp, "vision_model.onnx"))
        _check(clip, tokenizer, clip_config, tmp)
    return out

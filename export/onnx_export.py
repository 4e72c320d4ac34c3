"""A local diffusers Stable Diffusion folder -> optimum's ONNX layout, the folder edge-ti runs on."""
import os

from edge_ti.errors import EdgeTIError
from edge_ti.files import atomic_folder, scratch_folder

PARTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder", "tokenizer", "scheduler")


def export_pipeline(source, out, opset=None, clip_source=None, quantize=None):
    """Export SOURCE (a diffusers folder with model_index.json) to OUT through optimum, atomically.

    The same as `optimum-cli export onnx --model SOURCE --task text-to-image OUT`, run offline;
    OUT appears only when the export (and optimum's numerical validation) succeeded. With
    clip_source (a transformers CLIPModel folder), OUT/clip/ is added for --init auto and metrics.
    quantize: "int8" or "fp16" writes OUT quantized (edge_ti.quantize.PRESETS) from an fp32
    export in a temp folder, removed afterwards.
    """
    if not os.path.isfile(os.path.join(source, "model_index.json")):
        raise EdgeTIError(f"{source}: not a diffusers folder (no model_index.json)")
    if os.path.lexists(out):
        raise EdgeTIError(f"{out}: already exists; choose a new output folder")
    if clip_source:
        from .clip_export import check_source, export_clip
        check_source(clip_source)  # fail in a second, not after the long SD export
    from optimum.exporters.onnx import main_export  # slow to import: only once the input is valid

    if quantize:
        from edge_ti.quantize import PRESETS, quantize_model
        if quantize not in PRESETS:
            raise EdgeTIError(f"unknown quantization {quantize!r}: choose one of {', '.join(PRESETS)}")
        with scratch_folder(os.path.dirname(os.path.abspath(out))) as staging:
            fp32 = export_pipeline(source, os.path.join(staging, "fp32"), opset=opset, clip_source=clip_source)
            return quantize_model(fp32, out, **PRESETS[quantize], source_label=source)
    with atomic_folder(out) as tmp:
        main_export(source, tmp, task="text-to-image", opset=opset, local_files_only=True)
        missing = [p for p in PARTS if not os.path.isdir(os.path.join(tmp, p))]
        if missing:
            raise EdgeTIError(f"{source}: the export lacks {', '.join(missing)}")
        if clip_source:
            export_clip(clip_source, tmp)
    return out

"""A local diffusers Stable Diffusion folder -> optimum's ONNX layout, the folder edge-ti runs on."""
import os
import shutil
import tempfile

from edge_ti.errors import EdgeTIError

PARTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder", "tokenizer", "scheduler")


def export_pipeline(source, out, opset=None, clip_source=None):
    """Export SOURCE (a diffusers folder with model_index.json) to OUT through optimum, atomically.

    The same as `optimum-cli export onnx --model SOURCE --task text-to-image OUT`, run offline;
    OUT appears only when the export (and optimum's numerical validation) succeeded. With
    clip_source (a transformers CLIPModel folder), OUT/clip/ is added for --init auto and metrics.
    """
    if not os.path.isfile(os.path.join(source, "model_index.json")):
        raise EdgeTIError(f"{source}: not a diffusers folder (no model_index.json)")
    if os.path.exists(out):
        raise EdgeTIError(f"{out}: already exists; choose a new output folder")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    if clip_source:
        from .clip_export import check_source, export_clip
        check_source(clip_source)  # fail in a second, not after the long SD export
    from optimum.exporters.onnx import main_export  # slow to import: only once the input is valid

    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-export-")
    try:
        main_export(source, tmp, task="text-to-image", opset=opset, local_files_only=True)
        missing = [p for p in PARTS if not os.path.isdir(os.path.join(tmp, p))]
        if missing:
            raise EdgeTIError(f"{source}: the export lacks {', '.join(missing)}")
        if clip_source:
            export_clip(clip_source, tmp)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

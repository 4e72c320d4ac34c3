"""Smaller, faster copies of an ONNX model folder: int8 (dynamic quantization) or float16.

    quantize_model(MODEL_DIR, OUT_DIR, mode="int8")     # UNet + text encoder, MatMul/Gemm to int8

int8 is onnxruntime's dynamic quantization (onnxruntime.quantization.quantize_dynamic): the
weights of MatMul/Gemm nodes with a constant B are stored as int8 with one scale per tensor (or
per output column, `per_channel`), and each activation is quantized to uint8 at run time from
its own min/max, so no calibration images are needed:
    W_q = round(W / s_W),              s_W = max|W| / 127                 (symmetric int8 weights)
    x_q = round(x / s_x) + z_x,        s_x = (max x - min x) / 255        (asymmetric uint8 activations)
    y   = s_x s_W (x_q - z_x) W_q                                         (MatMulInteger, int32 accumulate)
Conv is left in float by default: the UNet's 3x3 convolutions quantized the same way (ConvInteger)
were slower and less accurate here (benchmarks/results/speed.md). The token-embedding table
(a Gather) is never quantized, so the text encoder's token injection works unchanged.

fp16 converts the weights and arithmetic to float16 with float32 inputs and outputs (keep_io_types),
for providers with float16 kernels (CUDA, DirectML); onnxruntime's CPU provider has almost none.

The output folder is written in a temporary folder beside OUT_DIR and renamed into place: it
exists complete or not at all, and MODEL_DIR is only read.
"""
import json
import logging
import os
import shutil
import tempfile

import onnx

from .errors import EdgeTIError

log = logging.getLogger(__name__)

MODES = ("int8", "fp16")
PARTS = ("unet", "text_encoder", "vae_encoder", "vae_decoder")
# at or above 2 GB a protobuf cannot hold the weights: they go to one external data file
_EXTERNAL_THRESHOLD = 1 << 30


def _has_external_data(model):
    return any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
               for t in model.graph.initializer)


def _weights_bytes(model_path):
    """Size of model.onnx plus the external data files beside it (what loading reads)."""
    folder = os.path.dirname(model_path)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.startswith("model.onnx"))


def _save(model, path):
    """Save with one external data file when the model is large (protobuf's 2 GB limit)."""
    large = model.ByteSize() > _EXTERNAL_THRESHOLD if not _has_external_data(model) else True
    if large:
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)
    else:
        onnx.save(model, path)


def quantize_int8(src, dst, conv=False, per_channel=False):
    """Dynamic int8 quantization of MatMul/Gemm (and Conv if asked) of src into dst/model.onnx."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_types = ["MatMul", "Gemm"] + (["Conv"] if conv else [])
    large = _weights_bytes(src) > _EXTERNAL_THRESHOLD
    # quantize_dynamic reads external data from src's folder and writes model.onnx.data beside dst
    quantize_dynamic(src, dst, op_types_to_quantize=op_types, per_channel=per_channel,
                     weight_type=QuantType.QInt8, use_external_data_format=large,
                     extra_options={"MatMulConstBOnly": True})


def _constants_to_initializers(graph):
    """Constant nodes holding a tensor -> initializers of the same name (same values)."""
    kept = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None:
            kept.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    del graph.node[:]
    graph.node.extend(kept)


def convert_fp16(src, dst):
    """float32 -> float16 weights and arithmetic, float32 inputs/outputs (Cast at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(src)  # with its external data
    _constants_to_initializers(model.graph)  # so Resize's scales stay float32 (the converter keeps those)
    # keep_io_types: callers keep feeding float32; shape inference is impossible above 2 GB
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    _save(model, dst)


def _copy_part(src_dir, dst_dir):
    shutil.copytree(src_dir, dst_dir)


def quantize_model(model_dir, out_dir, mode="int8", parts=("unet", "text_encoder"), conv=False,
                   per_channel=False):
    """Copy the ONNX folder MODEL_DIR to OUT_DIR with PARTS quantized (int8) or converted (fp16).

    Returns OUT_DIR. OUT_DIR must not exist and must not be inside MODEL_DIR; it appears only
    when every part was written. OUT_DIR/edge_ti_quantization.json records what was done.
    """
    if mode not in MODES:
        raise EdgeTIError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    model_dir, out_dir = os.path.abspath(model_dir), os.path.abspath(out_dir)
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")) and \
            not os.path.isfile(os.path.join(model_dir, "text_encoder", "model.onnx")):
        raise EdgeTIError(f"{model_dir}: not an ONNX Stable Diffusion folder")
    if os.path.exists(out_dir):
        raise EdgeTIError(f"{out_dir}: already exists; choose a new output folder")
    if os.path.commonpath([model_dir, out_dir]) == model_dir:
        raise EdgeTIError(f"{out_dir}: inside {model_dir}; edge-ti never writes into a model folder")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise EdgeTIError(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    missing = [p for p in parts if not os.path.isfile(os.path.join(model_dir, p, "model.onnx"))]
    if missing:
        raise EdgeTIError(f"{model_dir}: no {', '.join(p + '/model.onnx' for p in missing)}")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-quantize-")
    try:
        record = {"mode": mode, "parts": list(parts), "source": model_dir}
        if mode == "int8":
            record.update(op_types=["MatMul", "Gemm"] + (["Conv"] if conv else []), per_channel=per_channel,
                          weights="int8 symmetric", activations="uint8 asymmetric, dynamic")
        for entry in sorted(os.listdir(model_dir)):
            src = os.path.join(model_dir, entry)
            dst = os.path.join(tmp, entry)
            if entry not in parts:
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
                continue
            # the part's other files (config.json, ...) as they are, then the converted graph
            os.makedirs(dst)
            for name in os.listdir(src):
                if not name.startswith("model.onnx"):
                    (shutil.copytree if os.path.isdir(os.path.join(src, name)) else shutil.copy2)(
                        os.path.join(src, name), os.path.join(dst, name))
            log.info("%s: %s -> %s", entry, mode, dst)
            if mode == "int8":
                quantize_int8(os.path.join(src, "model.onnx"), os.path.join(dst, "model.onnx"), conv, per_channel)
            else:
                convert_fp16(os.path.join(src, "model.onnx"), os.path.join(dst, "model.onnx"))
        with open(os.path.join(tmp, "edge_ti_quantization.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

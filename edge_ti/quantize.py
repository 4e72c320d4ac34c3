"""Smaller, faster copies of an ONNX model folder: int8 (dynamic quantization) or float16.

    quantize_model(MODEL_DIR, OUT_DIR, mode="int8")     # UNet + text encoder: MatMul/Gemm int8, Conv weights int8
    quantize_model(MODEL_DIR, OUT_DIR, mode="int8", conv="static", per_channel=True)  # Conv int8, calibrated

int8 is onnxruntime's dynamic quantization (the graph onnxruntime.quantization.quantize_dynamic
writes, written by int8_matmul.py one weight at a time, so that SDXL's 10 GB UNet fits in memory): the
weights of MatMul/Gemm nodes with a constant B are stored as int8 with one scale per tensor (or
per output column, `per_channel`), and each activation is quantized to uint8 at run time from
its own min/max, so no calibration images are needed:
    W_q = round(W / s_W),              s_W = max|W| / 64                  (symmetric 7-bit weights)
    x_q = round(x / s_x) + z_x,        s_x = (max x - min x) / 255        (asymmetric uint8 activations)
    y   = s_x s_W (x_q - z_x) W_q                                         (MatMulInteger, int32 accumulate)
Weights use 7 of their 8 bits (reduce_range): on x86 CPUs without VNNI (AVX2 only) onnxruntime's
u8 x s8 kernel (VPMADDUBSW) saturates its int16 pair sums with full-range weights, which on such a
CPU reordered the tiny test model's candidates (Spearman -0.16 against fp32; 0.96 with 7 bits). On
the trained shapes-world model neither saturates much: a generation's 20 candidates ranked at
Spearman 0.73-0.87 (7 bits) and 0.83-0.96 (8 bits) against fp32 on that CPU (3 generations).
The UNet's feed-forward MatMuls stay in float (FLOAT_LAYERS): with them in int8 too, a training
generation of the trained shapes-world model ranked at Spearman 0.80 against fp32 (8 generations, an
AVX2 CPU), with them float 0.96; no other group of layers moved it as much (benchmarks/int8_layers.py).
Conv weights (conv="weights", the default): stored in int8, one full-range scale per output channel,
and dequantized by a DequantizeLinear node as the layer runs (int8_matmul.py), so the convolution
itself is float; onnxruntime does not fold that node into a float weight at load time (its constant
folding skips DequantizeLinear), so the weights stay int8 in memory: SD 1.5's UNet 3.1 GB -> 1.3 GB,
`edge-ti train` at 256 px 4.4 GB -> 2.8 GB, ~6% slower per generation (a float Conv with a computed
weight cannot use onnxruntime's NCHWc layout), candidates ranked as before (benchmarks/results/int8_weights.md).
Quantized at run time (conv="dynamic", ConvInteger) the UNet's
convolutions were slower; calibrated (conv="static": activation ranges from a few UNet inputs,
QLinearConv) they are about twice as fast on SD 1.5 with a third of the memory, but the 2-5% output
error reorders a population's candidates (Spearman ~0.6 against fp32 on the shapes-world model,
0.98 for MatMul/Gemm alone): opt-in (benchmarks/results/speed.md). The token-embedding table
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

import onnx
from onnx import numpy_helper

from .errors import EdgeTIError
from .files import atomic_folder
from .external_data import (EXTERNAL_THRESHOLD, INLINE_BELOW, DataFile, ExternalData, attribute_tensors, is_external,
                            place)
from .int8_matmul import quantize_matmuls, weight_only_nodes
from .model import QUANTIZATION_RECORD

log = logging.getLogger(__name__)

MODES = ("int8", "fp16")
# int8 Conv: float (none), int8 weights with float arithmetic (weights), calibrated (static), ConvInteger (dynamic)
CONV = ("none", "weights", "static", "dynamic")
PARTS = ("unet", "text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder")


# what `export --quantize int8` and `--fp16` mean, chosen by benchmarks/results/speed.md: int8 Conv
# weights (float arithmetic) take SD 1.5's `edge-ti train` from 4.4 to 2.8 GB at the same speed and
# ranking (benchmarks/int8_weights.py); int8 Conv arithmetic (static) is faster still, but ranked
# candidates unlike fp32 (Spearman ~0.6), so it is opt-in
PRESETS = {"int8": {"mode": "int8", "conv": "weights", "per_channel": False}, "fp16": {"mode": "fp16"}}

# UNet layers that int8 leaves in float, by a part of their node name: the transformer blocks'
# feed-forward MatMuls (ff/net.0/proj, ff/net.2). In int8 they reordered a trained model's candidates:
# on the shapes-world model a generation ranked at Spearman 0.80 against fp32 with every MatMul in int8,
# 0.96 with these kept float (benchmarks/int8_layers.py; no other group of layers mattered as much)
FLOAT_LAYERS = ("/ff/",)


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
    large = model.ByteSize() > EXTERNAL_THRESHOLD if not _has_external_data(model) else True
    if large:
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)
    else:
        onnx.save(model, path)


def quantize_int8(src, dst, conv="none", per_channel=False, exclude=(), only=None):
    """int8 weights for the MatMuls of src with a constant B, into dst (int8_matmul: one weight in
    memory at a time, so SDXL's UNet fits); conv == "weights" stores Conv weights in int8 too, for
    float arithmetic; conv == "dynamic" adds ConvInteger through onnxruntime's quantize_dynamic (whole
    model in memory). Nodes named in EXCLUDE stay float; with ONLY, just those."""
    if conv != "dynamic":
        weight_only = []
        if conv == "weights":
            weight_only = weight_only_nodes(onnx.load(src, load_external_data=False).graph, op_types=("Conv",))
        quantize_matmuls(src, dst, per_channel=per_channel, exclude=exclude, only=only, weight_only=weight_only)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = _weights_bytes(src) > EXTERNAL_THRESHOLD
    # quantize_dynamic reads external data from src's folder and writes model.onnx.data beside dst
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm", "Conv"], per_channel=per_channel,
                     weight_type=QuantType.QInt8, use_external_data_format=large,
                     reduce_range=True,  # 7-bit weights: no u8s8 saturation on AVX2-only CPUs
                     nodes_to_exclude=list(exclude), nodes_to_quantize=list(only) if only else None,
                     extra_options={"MatMulConstBOnly": True})


class _Feeds:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def unet_calibration_feeds(model_dir, count=8, latent=None, seed=0):
    """UNet inputs as training sees them: x_t of Gaussian x0 at timesteps spread over [0, 1000),
    with the hidden states of object-template prompts from the folder's own text encoder, at the
    model's own latent size capped at 32x32 unless `latent` is given (MinMax calibration keeps every
    activation of every feed in memory: SD 1.5 at 32x32 already peaks near 11 GB; conv activation
    ranges barely depend on the image size)."""
    import numpy as np

    from .denoiser import Denoiser
    from .model import open_model
    model = open_model(model_dir)
    denoiser = Denoiser(model)
    latent = latent or min(32, int(model.unet_config.get("sample_size", 64)))
    rng = np.random.default_rng(seed)
    prompts = ["a photo of a cat", "a rendering of a dog", "a close-up photo of the mug",
               "a painting in the style of a cat"]
    hidden, pooled = denoiser.encode(prompts)                             # (K, 77, D'), SDXL (K, D_g)
    feeds = []
    for i in range(count):
        t = int((i + rng.uniform()) * len(denoiser.alphas_bar) / count)  # stratified over the schedule
        x0 = rng.standard_normal((1, 4, latent, latent)).astype(np.float32)
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        x_t = denoiser.add_noise(x0, [t], eps)                           # (1, 4, latent, latent)
        k = i % len(prompts)
        feeds.append(denoiser.unet_feed(x_t, t, hidden[k][None], None if pooled is None else pooled[k][None]))
    return feeds


def quantize_int8_static_conv(src, dst, feeds, per_channel=True, exclude=()):
    """Conv to int8 with activation ranges calibrated on feeds (QDQ: onnxruntime runs QLinearConv),
    then MatMul/Gemm dynamic as in quantize_int8 (but EXCLUDE)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    large = _weights_bytes(src) > EXTERNAL_THRESHOLD
    staged = os.path.join(os.path.dirname(dst), ".conv-int8")
    os.makedirs(staged)
    try:
        # uint8 activations x int8 weights: the u8s8 kernels of x86 VNNI (onnxruntime's CPU advice)
        quantize_static(src, os.path.join(staged, "model.onnx"), _Feeds(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large,
                        reduce_range=True)
        quantize_int8(os.path.join(staged, "model.onnx"), dst, per_channel=per_channel, exclude=exclude)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


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
    """float32 -> float16 weights and arithmetic, float32 inputs/outputs (Cast at the edges), with one
    weight in memory at a time: onnxruntime's converter rewrites the graph while each external weight
    is a stub of shape [0], then each weight it made float16 is converted from the source's bytes and
    written to the data file (the rest copied). A whole SDXL UNet in memory failed at 23.5 GB."""
    from onnxruntime.transformers.float16 import convert_float_to_float16, convert_np_to_float16

    model = onnx.load(src, load_external_data=False)
    _constants_to_initializers(model.graph)  # so Resize's scales stay float32 (the converter keeps those)
    source, stubs = ExternalData(src), {}
    for tensor in attribute_tensors(model.graph.node):  # what Constants are left (ConstantOfShape's value...)
        if is_external(tensor):                        # is small, and the converter changes it in place
            tensor.CopyFrom(numpy_helper.from_array(source.read(tensor), tensor.name))
    for tensor in model.graph.initializer:
        if is_external(tensor):
            stubs[tensor.name] = onnx.TensorProto()
            stubs[tensor.name].CopyFrom(tensor)
            del tensor.external_data[:], tensor.dims[:]
            tensor.data_location, tensor.dims[:] = onnx.TensorProto.DEFAULT, [0]
    # keep_io_types: callers keep feeding float32; shape inference is impossible above 2 GB
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    graph = model.graph
    if not stubs and os.path.getsize(src) <= EXTERNAL_THRESHOLD:
        _save(model, dst)
        return
    # the stubs' [0] shapes (the converter copies them to its Casts' value_info too): shape info is optional
    value_info = [v for v in graph.value_info if v.name not in stubs and
                  [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim] != [0]]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    data = DataFile(dst + ".data")
    try:
        for tensor in graph.initializer:
            original = stubs.get(tensor.name)
            if original is None:
                place(tensor, source, data)
                continue
            if tensor.data_type == onnx.TensorProto.FLOAT16 and original.data_type == onnx.TensorProto.FLOAT:
                tensor.dims[:] = original.dims
                values = convert_np_to_float16(source.read(original).reshape(-1))  # 1-D, as the converter's
                if values.nbytes < INLINE_BELOW:  # small ones inline, as place() keeps them
                    tensor.raw_data = values.tobytes()
                else:
                    data.write_array(tensor, values)
            else:                            # left float32 by the converter: as it was
                tensor.CopyFrom(original)
                place(tensor, source, data)
    except BaseException:
        data.close()
        os.remove(data.path)
        raise
    data.close()
    with open(dst, "wb") as f:
        f.write(model.SerializeToString())


def float_layers_of(path, patterns):
    """Names of PATH's MatMul/Gemm nodes whose name contains one of PATTERNS."""
    graph = onnx.load(path, load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(p in n.name for p in patterns)]


def _convert_part(mode, conv, part, src, dst, per_channel, feeds, float_layers=()):
    """One part's model.onnx src -> dst; Conv is quantized in the UNet only, FLOAT_LAYERS stay float there."""
    if mode == "fp16":
        convert_fp16(src, dst)
        return
    exclude = float_layers_of(src, float_layers) if part == "unet" and float_layers else []
    if part == "unet" and conv == "static":
        quantize_int8_static_conv(src, dst, feeds, per_channel, exclude)
    else:
        quantize_int8(src, dst, conv if part == "unet" else "none", per_channel, exclude=exclude)


class _QuietRoot:
    """onnxruntime.quantization warns through the root logger about things that do not apply here
    ("consider pre-processing"): silence the root logger while it runs."""

    def __enter__(self):
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self.level)


def quantize_model(model_dir, out_dir, mode="int8", parts=None, conv="weights",
                   per_channel=False, calibration=8, source_label=None, float_layers=FLOAT_LAYERS,
                   progress=None):
    """Copy the ONNX folder MODEL_DIR to OUT_DIR with PARTS quantized (int8) or converted (fp16);
    int8 leaves the UNet's MatMuls named by FLOAT_LAYERS in float (() quantizes them all).
    PROGRESS(part, i, n), if given, is called before the i-th of the n parts is converted.
    PARTS: default the UNet and the text encoder(s) (SDXL: text_encoder_2 too).

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
    if conv not in CONV:
        raise EdgeTIError(f"unknown conv mode {conv!r}: choose one of {', '.join(CONV)}")
    if parts is None:
        parts = ("unet", "text_encoder") + (
            ("text_encoder_2",) if os.path.isfile(os.path.join(model_dir, "text_encoder_2", "model.onnx")) else ())
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise EdgeTIError(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    missing = [p for p in parts if not os.path.isfile(os.path.join(model_dir, p, "model.onnx"))]
    if missing:
        raise EdgeTIError(f"{model_dir}: no {', '.join(p + '/model.onnx' for p in missing)}")

    with atomic_folder(out_dir) as tmp:
        record = {"mode": mode, "parts": list(parts), "source": source_label or model_dir}
        feeds = None
        if mode == "int8":
            record.update(op_types=["MatMul", "Gemm"] + (["Conv"] if conv != "none" else []), conv=conv,
                          per_channel=per_channel, weights="int8 symmetric, 7-bit range (reduce_range)",
                          activations="uint8 asymmetric, dynamic" + {
                              "static": ", Conv: static (calibrated)",
                              "weights": ", Conv: float (int8 weights per output channel, full range, "
                                         "dequantized at run time)"}.get(conv, ""),
                          float_layers=list(float_layers))
            if conv == "static" and "unet" in parts:
                feeds = unet_calibration_feeds(model_dir, count=calibration)
                record["calibration"] = f"{calibration} UNet inputs: Gaussian x0, stratified timesteps"
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
            if progress:
                progress(entry, sorted(parts).index(entry) + 1, len(parts))
            with _QuietRoot():
                _convert_part(mode, conv, entry, os.path.join(src, "model.onnx"), os.path.join(dst, "model.onnx"),
                              per_channel, feeds, float_layers)
        with open(os.path.join(tmp, QUANTIZATION_RECORD), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return out_dir

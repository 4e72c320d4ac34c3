"""int8 weights for an ONNX graph's MatMuls (and Gemms), reading one weight at a time.

onnxruntime.quantization.quantize_dynamic holds the whole model in memory, several times over: on
SDXL's 10 GB UNet it was killed at 24 GB. This rewrite keeps the graph (no weights) in memory, reads
one weight from disk, appends its int8 copy to the output's data file and moves on, so memory holds
the graph and one weight. It writes the nodes quantize_dynamic writes for a MatMul with a constant B
(IntegerOps, reduce_range, symmetric int8 weights; onnxruntime fuses them into DynamicQuantizeMatMul):
    x_q, s_x, z_x = DynamicQuantizeLinear(x)     # uint8, s_x = (max(x, 0) - min(x, 0)) / 255 (ONNX spec)
    y = Cast(MatMulInteger(x_q, W_q, z_x, 0)) * (s_x * s_W)
    W_q = round(W / s_W),  s_W = max|W| / 64     # per tensor, or per output column (per_channel)
(reduce_range: weights in [-64, 64], onnxruntime's reduced int8 range; see quantize.py for why).
A Gemm y = x B^T + C becomes that MatMul with B^T, then Add C, as onnxruntime rewrites it.
tests/test_quantize.py checks the result equals quantize_dynamic's on the tiny model. Where they differ:
a weight shared with a node kept float stays float for that node (quantize_dynamic feeds it the
dequantized int8 copy), and generated names that the graph already uses get a suffix.

weight_only nodes (Conv, MatMul, Gemm) keep float arithmetic and only store their weight in int8:
    W_q = round(W / s_c),  s_c = max|W[c]| / 127   # one full-range scale per output channel c
    W = DequantizeLinear(W_q, s_c + 0 * Size(x))    # as the layer runs; x its input (_after_input: when)
onnxruntime keeps the DequantizeLinear (its constant folding skips it), so the weight stays int8 in
memory; the non-constant scale also keeps a MatMul out of onnxruntime's MatMulNBits fusion, which
would quantize its activations (benchmarks/results/int8_weights.md).
Weights are read and written through external_data.py (checked locations and lengths).
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import EdgeTIError
from .external_data import EXTERNAL_THRESHOLD, DataFile, ExternalData, attribute_tensors, is_external, place

QMAX = 64                # reduce_range int8: [-64, 64] (onnxruntime's ONNX_INT_TYPE_REDUCED_RANGE)


def quantize_weight(w, per_channel=False, qmax=QMAX):
    """W [K, N] float32 -> (W_q int8, s_W float32 scalar or [N], zero point int8 of s_W's shape);
    QMAX 127 is full-range int8 (benchmarks/int8_ff.py: no better ranking than 64)."""
    if per_channel:
        return quantize_weight_per_channel(w, 1, qmax)
    absmax = np.maximum(w.max(), -w.min())          # max|W| without a copy of W
    return _rounded(w, _scale(absmax, qmax), qmax)


def quantize_weight_per_channel(w, axis, qmax=127):
    """W (any rank) -> (W_q int8, s_W [W.shape[axis]] float32, zero points int8): one symmetric scale
    per output channel along AXIS (full range by default: the storage of weight_only nodes)."""
    others = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.maximum(w.max(axis=others), -w.min(axis=others))
    scale = _scale(absmax, qmax)
    shape = [1] * w.ndim
    shape[axis] = -1
    w_q, _, zero = _rounded(w, scale.reshape(shape), qmax)
    return w_q, scale, zero.reshape(scale.shape)


def _scale(absmax, qmax):
    scale = (absmax / qmax).astype(np.float32)      # exact for 64: a power-of-two divisor
    return np.where(scale < np.finfo(np.float32).tiny, np.float32(1), scale).astype(np.float32)  # all-zero W


def _rounded(w, scale, qmax):
    w_q = w / scale                                 # one float copy, rounded and clipped in place
    np.clip(np.round(w_q, out=w_q), -qmax, qmax, out=w_q)
    return w_q.astype(np.int8), scale, np.zeros(scale.shape, np.int8)


def _after_input(x, scale, zero_constant, new_name):
    """Nodes computing SCALE + 0 * Size(X): the same scale, ready only once the layer's input X is.
    onnxruntime orders nodes by its own heuristics, and a DequantizeLinear whose inputs are all
    constants may be scheduled long before its layer: on SD 1.5's UNet, 1.95 GB of dequantized Conv
    weights were alive at once (0.43 GB in the order where each runs just before its layer). Tied to
    the layer's input, each float weight exists only from that input to the layer."""
    size, as_float, zero, tied = (new_name(scale + suffix) for suffix in ("_input_size", "_input_size_float",
                                                                          "_zero", "_after_input"))
    return [helper.make_node("Size", [x], [size], size),
            helper.make_node("Cast", [size], [as_float], as_float, to=TensorProto.FLOAT),
            helper.make_node("Mul", [as_float, zero_constant], [zero], zero),
            helper.make_node("Add", [scale, zero], [tied], tied)]


def untie_weight_scales(graph):
    """Undo _after_input in GRAPH (in place): each DequantizeLinear reads its constant scale again.
    For OpenVINO, whose CPU plugin cannot compile the tied form ("Supported precisions set is not
    available for Constant operation", onnxruntime-openvino 1.24) and orders the weights itself.
    Returns how many scales it untied."""
    constants = {t.name for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    dead = set()
    for node in graph.node:
        add = producer.get(node.input[1]) if node.op_type == "DequantizeLinear" and len(node.input) > 1 else None
        if add is None or add.op_type != "Add" or not add.name.endswith("_after_input") or add.input[0] not in constants:
            continue
        mul = producer[add.input[1]]             # _after_input's nodes: Add(s, Mul(Cast(Size(x)), 0))
        cast = producer[mul.input[0]]
        node.input[1] = add.input[0]
        dead |= {add.name, mul.name, cast.name, producer[cast.input[0]].name}
    kept = [n for n in graph.node if n.name not in dead]
    del graph.node[:]
    graph.node.extend(kept)
    return len(dead) // 4


def _opset(model):
    return max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [0])


def _inputs(nodes):
    """Every name NODES read, their subgraphs' reads of outer names included."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _inputs(graph.node)
    return names


def _names(graph):
    """Every tensor name GRAPH uses (initializers, inputs, outputs, node outputs, value_info)."""
    return ({t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
            | {v.name for v in graph.value_info} | _inputs(graph.node) | {o for n in graph.node for o in n.output})


def _constant_weight(node, weights):
    """(B's name, transposed?) when NODE multiplies by a constant 2-D float32 B that quantize_dynamic
    quantizes: MatMul(x, B), or Gemm(x, B, C) with alpha = beta = 1 and no transA (y = x B^T + C
    when transB): onnxruntime first rewrites such a Gemm as MatMul + Add. Else None."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
                                   or attrs.get("transA", 0)):
        return None
    b = weights.get(node.input[1])
    if b is None or b.data_type != TensorProto.FLOAT or len(b.dims) != 2:
        return None
    return node.input[1], bool(attrs.get("transB", 0))


def _weight_of(node, weights):
    """(W's name, its output-channel axis) when NODE reads a constant float32 weight that can be stored
    in int8 and dequantized at run time: MatMul's 2-D B (axis 1), Gemm's B (axis 0 with transB, else 1),
    Conv's W [O, I/g, k...] (axis 0). Else None."""
    if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
        return None
    w = weights.get(node.input[1])
    if w is None or w.data_type != TensorProto.FLOAT or len(w.dims) < 2 or \
            (node.op_type != "Conv" and len(w.dims) != 2):
        return None
    if node.op_type == "MatMul":
        return node.input[1], 1
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return node.input[1], 0 if attrs.get("transB", 0) else 1
    return node.input[1], 0


def weight_only_nodes(graph, op_types=(), names=()):
    """Names of GRAPH's MatMul/Gemm/Conv nodes with a constant float32 weight whose op type is in
    OP_TYPES or whose name is in NAMES: the ones quantize_matmuls(weight_only=...) can store in int8."""
    weights = {t.name: t for t in graph.initializer}
    return [n.name for n in graph.node if (n.op_type in op_types or n.name in names) and _weight_of(n, weights)]


def quantizable_matmuls(graph, exclude=(), only=None):
    """Names of GRAPH's MatMul/Gemm nodes with a constant float32 weight (what quantize_dynamic's
    MatMulConstBOnly quantizes), less EXCLUDE; with ONLY, just those of them."""
    weights = {t.name: t for t in graph.initializer}
    return [n.name for n in graph.node if _constant_weight(n, weights) and n.name not in exclude
            and (only is None or n.name in only)]


def quantize_matmuls(src, dst, per_channel=False, exclude=(), only=None, qmax=QMAX, weight_only=()):
    """Write DST: SRC with its MatMuls' constant weights in int8 (see the module's docstring).
    EXCLUDE: node names kept float; ONLY: quantize just these. WEIGHT_ONLY: MatMul/Gemm/Conv node
    names whose weights are stored in int8 and dequantized at run time (float arithmetic: the
    module's docstring), whatever EXCLUDE and ONLY say. A large SRC (external data or
    > 1 GiB) gets its weights in one file beside DST, DST's name + ".data"."""
    model = onnx.load(src, load_external_data=False)
    graph = model.graph
    source = ExternalData(src)
    weight_only = set(weight_only)
    chosen = set(quantizable_matmuls(graph, exclude, set(only) if only is not None else None)) - weight_only
    if weight_only and _opset(model) < 13:
        raise EdgeTIError(f"{src}: opset {_opset(model)}: int8 weights dequantized per channel need opset >= 13")
    external = any(is_external(t) for t in graph.initializer) or os.path.getsize(src) > EXTERNAL_THRESHOLD \
        or any(is_external(t) for t in attribute_tensors(graph.node))
    data = DataFile(dst + ".data") if external else None
    float_weights = {t.name: t for t in graph.initializer}
    taken = _names(graph)

    def new_name(name):
        """NAME, or NAME_1, NAME_2 ... if the graph already has a tensor of that name (as onnxruntime does)."""
        unique, i = name, 0
        while unique in taken:
            i += 1
            unique = f"{name}_{i}"
        taken.add(unique)
        return unique
    try:
        nodes, added, activations, weights, dequantized, zero_constant = [], [], {}, {}, {}, None
        for node in graph.node:
            stored = _weight_of(node, float_weights) if node.name in weight_only else None
            if stored is not None:  # int8 storage, float arithmetic: W = s_W[c] W_q (DequantizeLinear)
                if stored not in dequantized:  # a weight shared by several nodes is stored once
                    w_name, axis = stored
                    w_q, scale, zero = quantize_weight_per_channel(source.read(float_weights[w_name]), axis)
                    q_name, s_name, z_name, dequantized[stored] = (
                        new_name(w_name + suffix) for suffix in ("_quantized", "_scale", "_zero_point", "_dequantized"))
                    quantized = numpy_helper.from_array(w_q, q_name)
                    if data is not None:
                        data.write_array(quantized, w_q)
                    added += [quantized, numpy_helper.from_array(scale, s_name), numpy_helper.from_array(zero, z_name)]
                    if not zero_constant:
                        zero_constant = new_name("weights_after_input_zero")
                        added.append(numpy_helper.from_array(np.array(0, np.float32), zero_constant))
                    nodes += _after_input(node.input[0], s_name, zero_constant, new_name)
                    nodes.append(helper.make_node("DequantizeLinear", [q_name, nodes[-1].output[0], z_name],
                                                  [dequantized[stored]], new_name(w_name + "_DequantizeLinear"),
                                                  axis=axis))
                node.input[1] = dequantized[stored]
                nodes.append(node)
                continue
            weight = _constant_weight(node, float_weights) if node.name in chosen else None
            if weight is None:
                nodes.append(node)
                continue
            x, (b, transposed) = node.input[0], weight
            if x not in activations:  # one DynamicQuantizeLinear per activation, shared by its MatMuls
                activations[x] = tuple(new_name(x + suffix) for suffix in ("_quantized", "_scale", "_zero_point"))
                nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(activations[x]),
                                              x + "_QuantizeLinear"))
            if weight not in weights:  # a weight shared by several nodes is quantized once
                w = source.read(float_weights[b])
                w_q, scale, zero = quantize_weight(np.ascontiguousarray(w.T) if transposed else w, per_channel, qmax)
                base = b + ("_Transposed" if transposed else "")
                weights[weight] = tuple(new_name(base + suffix) for suffix in ("_quantized", "_scale", "_zero_point"))
                quantized = numpy_helper.from_array(w_q, weights[weight][0])
                if data is not None:
                    data.write_array(quantized, w_q)
                added += [quantized, numpy_helper.from_array(scale, weights[weight][1]),
                          numpy_helper.from_array(zero, weights[weight][2])]
            (x_q, s_x, z_x), (w_q_name, s_w, z_w) = activations[x], weights[weight]
            bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
            out = node.output[0]
            y = new_name(out + "_MatMul") if bias else out
            name = (node.name or out) + ("_MatMul" if node.op_type == "Gemm" else "")
            y_int, y_float, scales = (new_name(y + "_output_quantized"), new_name(y + "_output_quantized_cast_output"),
                                      new_name(name + "_quant_scales_mul:0"))
            nodes += [helper.make_node("MatMulInteger", [x_q, w_q_name, z_x, z_w], [y_int], name + "_quant"),
                      helper.make_node("Cast", [y_int], [y_float], y + "_output_quantized_cast", to=TensorProto.FLOAT),
                      helper.make_node("Mul", [s_x, s_w], [scales], name + "_quant_scales_mul"),
                      helper.make_node("Mul", [y_float, scales], [y], name + "_quant_output_scale_mul")]
            if bias:  # Gemm's C
                nodes.append(helper.make_node("Add", [y, bias], [out], (node.name or out) + "_Add"))
        # the float weights still read by some node (or output) stay; the quantized ones' originals go
        used = _inputs(nodes) | {o.name for o in graph.output}
        kept = [t for t in graph.initializer if t.name in used]
        if data is not None:
            for tensor in kept:
                place(tensor, source, data)
        del graph.initializer[:]
        graph.initializer.extend(kept + added)
        # a dropped weight that was also listed as a graph input (old exports) would become a required input
        inputs = [i for i in graph.input if i.name not in float_weights or i.name in used]
        del graph.input[:]
        graph.input.extend(inputs)
        del graph.node[:]
        graph.node.extend(nodes)
        for tensor in attribute_tensors(graph.node):
            if is_external(tensor):
                place(tensor, source, data)
    except BaseException:
        if data is not None:
            data.close()
            os.remove(data.path)
        raise
    if data is not None:
        data.close()
    with open(dst, "wb") as f:
        f.write(model.SerializeToString())

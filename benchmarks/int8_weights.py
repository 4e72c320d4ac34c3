"""Weights stored in fewer bits, arithmetic in float: which layers can be, without reordering candidates?
(issue 17: `edge-ti train` within 3 GB on SD 1.5 at 256 px with a ranking like fp32's)

    python benchmarks/int8_weights.py                  # the trained shapes-world model, ~2 min on 2 cores
    python benchmarks/int8_weights.py --generations 16

A weight W stored as W_q (int8, or int16 for > 8 bits) with one scale per output channel,
W = s_c W_q (DequantizeLinear; onnxruntime keeps the node, so the weight stays small in memory and
is dequantized as the layer runs), changes the model by the rounding of W alone: the activations
stay float. Each row is quantize's int8 (MatMul/Gemm dynamic int8, the UNet's feed-forward MatMuls
float) with some weights stored so; agreement with fp32 is int8_layers.py's (Spearman of a training
generation's 20 candidates on the same 4 triples, mean and min over the generations).
"""
import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def store_wider(path, originals, bits):
    """Rewrite PATH's DequantizeLinear weights of ORIGINALS (float arrays by name) with BITS-bit
    per-output-channel values: int16 storage through com.microsoft's DequantizeLinear for > 8 bits."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(path)
    tensors = {t.name: t for t in model.graph.initializer}
    qmax = 2 ** (bits - 1) - 1
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith("_quantized"):
            continue
        source = node.input[0][:-len("_quantized")]
        if source not in originals:
            continue
        axis = next(a.i for a in node.attribute if a.name == "axis")
        w = originals[source]
        others = tuple(i for i in range(w.ndim) if i != axis)
        scale = np.maximum(np.abs(w).max(axis=others) / qmax, np.finfo(np.float32).tiny).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        w_q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int16 if bits > 8 else np.int8)
        scale_name = producers[node.input[1]].input[0]  # int8_matmul._after_input: Add(scale, 0 * Size(x))
        values = (w_q, scale, np.zeros(scale.shape, w_q.dtype))
        for name, value in zip((node.input[0], scale_name, node.input[2]), values):
            tensors[name].CopyFrom(numpy_helper.from_array(value, name))
        if bits > 8:
            node.domain = "com.microsoft"
    if bits > 8:
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=8)
    args = parser.parse_args()
    import onnx
    from onnx import numpy_helper

    import edge_ti
    import int8_layers
    from edge_ti.int8_matmul import quantize_matmuls, weight_only_nodes
    from edge_ti.quantize import FLOAT_LAYERS, float_layers_of
    from edge_ti.shapes import model_dir
    base = model_dir()
    os.environ.setdefault("EDGE_TI_SESSION_CACHE", "0")
    gens = int8_layers.generations(edge_ti.open_model(base), args.generations, 0)
    reference, _ = int8_layers.agreement(base, gens)
    unet, text = os.path.join(base, "unet", "model.onnx"), os.path.join(base, "text_encoder", "model.onnx")
    graph = onnx.load(unet).graph
    originals = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    ff = float_layers_of(unet, FLOAT_LAYERS)
    convs = weight_only_nodes(graph, op_types=("Conv",))
    print(f"# {' '.join(sys.argv)}\n# {base}: {args.generations} generations x 20 candidates x 4 triples "
          f"(int8_layers.py's); {len(convs)} Conv, {len(ff)} feed-forward MatMuls")
    print("| variant (text encoder int8 in every row but the last) | UNet file MB | rho vs fp32 (mean, min) |\n"
          "|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        def row(name, stored=(), ff_bits=None, dynamic=True, text_dynamic=True):
            folder = os.path.join(tmp, "v")
            shutil.copytree(base, folder)
            dst = os.path.join(folder, "unet", "model.onnx")
            quantize_matmuls(unet, dst, exclude=ff, only=None if dynamic else [], weight_only=stored)
            if ff_bits:
                store_wider(dst, {n.input[1]: originals[n.input[1]] for n in graph.node if n.name in ff}, ff_bits)
            if text_dynamic:
                quantize_matmuls(text, os.path.join(folder, "text_encoder", "model.onnx"))
            else:
                quantize_matmuls(text, os.path.join(folder, "text_encoder", "model.onnx"), only=[],
                                 weight_only=weight_only_nodes(onnx.load(text).graph, ("MatMul", "Gemm")))
            unet_folder = os.path.join(folder, "unet")
            size = sum(os.path.getsize(os.path.join(unet_folder, f)) for f in os.listdir(unet_folder)
                       if f.startswith("model.onnx"))
            _, (mean, low) = int8_layers.agreement(folder, gens, reference)
            print(f"| {name} | {size / 1e6:.1f} | {mean:.3f}, {low:.3f} |", flush=True)
            shutil.rmtree(folder)
        row("quantize's int8 (Conv and feed-forward float)")
        row("+ Conv weights int8 (`--conv weights`)", stored=convs)
        for bits in (8, 10, 12, 16):
            row(f"+ Conv weights int8, feed-forward weights {bits}-bit", stored=convs + ff, ff_bits=bits)
        every = weight_only_nodes(graph, op_types=("Conv", "MatMul", "Gemm"))
        row("every UNet weight stored int8, no dynamic int8 (float arithmetic)", stored=every, dynamic=False)
        row("the same and the text encoder's weights stored int8", stored=every, dynamic=False, text_dynamic=False)


if __name__ == "__main__":
    main()

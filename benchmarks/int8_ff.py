"""Can the UNet's feed-forward MatMuls be int8 without reordering candidates? (issues 17 and 18)

    python benchmarks/int8_ff.py           # the trained shapes-world model, ~2 min on 2 cores

int8_layers.py found that every MatMul in int8 ranks a training generation at Spearman ~0.80 against
fp32, and ~0.95 with the feed-forward layers kept float; those float layers are 4.9 of SDXL's 7.3 GB of
int8-folder UNet weights, the difference between fitting 8 GB or not (models.md). Two fixes tried here,
on the same generations and fp32 reference as int8_layers.py (per-output-column weight scales are its
own `--per-channel` option):
- weight precision: full-range int8 weights (|W_q| <= 127) instead of the 7-bit range, for every layer
  or for the feed-forward layers only;
- activation outliers: SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
  Quantization for Large Language Models", eq. 4): x W = (x diag(s)^-1) (diag(s) W) with
  s_k = max|x_k|^alpha / max_n |W_kn|^(1 - alpha), the channel maxima max|x_k| taken over calibration
  UNet inputs (edge_ti.quantize.unet_calibration_feeds); the feed-forward inputs' largest channel is up
  to ~20x their median channel on this model.
"""
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def feed_forward_input_maxima(unet_path, feeds, nodes):
    """{input name: max |x| per channel [K]} of NODES' inputs over the UNet FEEDS."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    probe = onnx.load(unet_path)
    names = sorted({n.input[0] for n in nodes})
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    maxima = {name: 0.0 for name in names}
    for feed in feeds:
        for name, x in zip(names, session.run(names, feed)):
            maxima[name] = np.maximum(maxima[name], np.abs(x).reshape(-1, x.shape[-1]).max(axis=0))
    return maxima


def smooth(unet_path, out_path, maxima, alpha):
    """OUT_PATH: the UNet with each feed-forward MatMul's input divided by s and its weight rows times s."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(unet_path)
    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and "/ff/" in node.name and node.input[1] in weights:
            w = numpy_helper.to_array(weights[node.input[1]])                       # [K, N]
            s = (np.maximum(maxima[node.input[0]], 1e-5) ** alpha
                 / np.maximum(np.abs(w).max(axis=1), 1e-5) ** (1 - alpha)).astype(np.float32)
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(w * s[:, None], node.input[1]))
            model.graph.initializer.append(numpy_helper.from_array(1 / s, node.name + "_smooth_inv"))
            smoothed = node.input[0] + "_smoothed_" + node.name
            nodes.append(helper.make_node("Mul", [node.input[0], node.name + "_smooth_inv"], [smoothed],
                                          node.name + "_smooth"))
            node.input[0] = smoothed
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, out_path)


def main():
    import onnx

    import edge_ti
    import int8_layers
    from edge_ti.int8_matmul import quantize_matmuls
    from edge_ti.quantize import unet_calibration_feeds
    from edge_ti.shapes import model_dir
    base = model_dir()
    os.environ.setdefault("EDGE_TI_SESSION_CACHE", "0")
    gens = int8_layers.generations(edge_ti.open_model(base), 8, 0)
    reference, _ = int8_layers.agreement(base, gens)
    unet = os.path.join(base, "unet", "model.onnx")
    weights = {t.name for t in onnx.load(unet).graph.initializer}
    ff_nodes = [n for n in onnx.load(unet).graph.node
                if n.op_type == "MatMul" and "/ff/" in n.name and n.input[1] in weights]
    ff = [n.name for n in ff_nodes]
    maxima = feed_forward_input_maxima(unet, unet_calibration_feeds(base, count=16), ff_nodes)
    print(f"# {' '.join(sys.argv)}\n# {base}: 8 generations x 20 candidates x 4 triples (int8_layers.py's); "
          f"{len(ff)} feed-forward MatMuls; their inputs' largest channel max / median channel max: "
          + " ".join(f"{m.max() / np.median(m):.1f}" for m in maxima.values()))
    print("| variant (text encoder int8 in every row) | rho vs fp32 (mean, min) |\n|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        def row(name, rest_qmax=64, ff_qmax=64, alpha=None):
            folder = os.path.join(tmp, "v")
            shutil.copytree(base, folder)
            source = unet
            if alpha is not None:
                source = os.path.join(tmp, "smoothed.onnx")
                smooth(unet, source, maxima, alpha)
            staged, dst = os.path.join(tmp, "staged.onnx"), os.path.join(folder, "unet", "model.onnx")
            quantize_matmuls(source, staged, exclude=ff, qmax=rest_qmax)
            if ff_qmax:
                quantize_matmuls(staged, dst, only=ff, qmax=ff_qmax)
            else:
                shutil.copy2(staged, dst)
            quantize_matmuls(os.path.join(base, "text_encoder", "model.onnx"),
                             os.path.join(folder, "text_encoder", "model.onnx"))
            _, (mean, low) = int8_layers.agreement(folder, gens, reference)
            print(f"| {name} | {mean:.3f}, {low:.3f} |", flush=True)
            shutil.rmtree(folder)
        row("every MatMul, 7-bit weights (quantize --feed-forward int8)")
        row("feed-forward float, the rest 7-bit (quantize's default)", ff_qmax=None)
        row("every MatMul, full-range 8-bit weights", rest_qmax=127, ff_qmax=127)
        row("feed-forward 8-bit, the rest 7-bit", ff_qmax=127)
        row("feed-forward float, the rest 8-bit", rest_qmax=127, ff_qmax=None)
        for alpha in (0.5, 0.75, 0.9):
            row(f"every MatMul 7-bit, feed-forward smoothed (alpha {alpha})", alpha=alpha)


if __name__ == "__main__":
    main()

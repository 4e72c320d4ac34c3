"""Which static-int8 Conv layers reorder a training generation's candidates (issue 17: accurate int8).

    python benchmarks/int8_conv_layers.py                 # the trained shapes-world model, ~1 min on 2 cores
    python benchmarks/int8_conv_layers.py --single        # also each Conv alone (~3 min)

int8_layers.py measured the MatMuls (dynamic int8); this does the same for the UNet's convolutions in
static int8 (`--conv static`: activation ranges calibrated once, onnxruntime's QDQ -> QLinearConv), the
variant that ran fastest on SD 1.5 (speed.md) and ranked the shapes model's candidates at 0.64. Every
MatMul and the text encoder stay float here, so each row shows what the convolutions alone do.

A Conv whose input does not depend on the prompt (upstream of the first cross-attention: the token
has not entered yet) sees the same input for every candidate of a generation (common random
numbers), so its rounding error is the same for all of them and cannot reorder them; the other
convolutions see inputs that differ between candidates by ~0.1%, below one int8 step, and their
rounding flips differ between candidates. Rows by group, and (--single) one Conv alone; calibration
on onnxruntime's default feeds (edge_ti.quantize.unet_calibration_feeds: Gaussian x0 at stratified
timesteps) or on the generations' own UNet inputs (concept latents, their prompts: "as training draws").
"""
import os
import shutil
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def conv_nodes(path):
    """(all Conv node names, those whose input depends on encoder_hidden_states) of the ONNX model at PATH."""
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    tainted = {"encoder_hidden_states"}
    for node in graph.node:  # ONNX graphs are topologically sorted
        if any(i in tainted for i in node.input):
            tainted.update(node.output)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    return [n.name for n in convs], [n.name for n in convs if any(i in tainted for i in n.input)]


def make_variant(base, out, feeds, only, per_channel=True):
    """BASE's folder at OUT with the UNet's Convs named in ONLY in static int8 (calibrated on FEEDS)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edge_ti.quantize import _Feeds, _QuietRoot
    shutil.copytree(base, out)
    with _QuietRoot():
        quantize_static(os.path.join(base, "unet", "model.onnx"), os.path.join(out, "unet", "model.onnx"),
                        _Feeds(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                        nodes_to_quantize=list(only), per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, reduce_range=True)
    return out


def training_feeds(model, gens):
    """The UNet inputs the trainer gives the model while it scores GENS (one feed per UNet call: a timestep's
    whole population), recorded from edge_ti.denoiser.Denoiser.unet_feed."""
    from edge_ti import objective
    from edge_ti.denoiser import Denoiser
    feeds, denoiser = [], Denoiser(model)
    record = denoiser.unet_feed

    def recording(*a, **kw):
        feeds.append(record(*a, **kw))
        return feeds[-1]
    denoiser.unet_feed = recording
    for candidates, ids, latents, triples in gens:
        objective.population_loss(denoiser, candidates, ids, latents, triples)
    return feeds


def main():
    from int8_layers import agreement, generations, layers_parser
    args = layers_parser(__doc__).parse_args()
    import edge_ti
    from edge_ti.quantize import unet_calibration_feeds
    from edge_ti.shapes import model_dir
    base = args.model or model_dir()
    os.environ.setdefault("EDGE_TI_SESSION_CACHE", "0")
    model = edge_ti.open_model(base)
    gens = generations(model, args.generations, args.seed)
    ref, _ = agreement(base, gens)
    convs, token_dependent = conv_nodes(os.path.join(base, "unet", "model.onnx"))
    independent = [c for c in convs if c not in token_dependent]
    last_up = "/" + max((c.split("/")[1] for c in convs if c.startswith("/up_blocks")), key=lambda b: int(b[10:]))
    default_feeds = unet_calibration_feeds(base, count=8)
    # other generations than the measured ones (seed + 1): 2 of them, 8 UNet calls of 20 samples each
    drawn_feeds = training_feeds(model, generations(model, 2, args.seed + 1))
    print(f"# {' '.join(sys.argv)}\n# {base}: {args.generations} generations x 20 candidates x 4 triples; "
          f"{len(convs)} Conv layers, {len(independent)} upstream of the prompt: {', '.join(independent)}")
    print("| variant | Convs in int8 | rho vs fp32 (mean, min) | s |\n|---|---|---|---|", flush=True)
    groups = {
        "every Conv": convs,
        "the Convs upstream of the prompt only": independent,
        "every Conv downstream of the prompt": token_dependent,
        "all but conv_out": [c for c in convs if c != "/conv_out/Conv"],
        "all but the attention proj_in/out": [c for c in convs if "/proj_" not in c],
        "the attention proj_in/out only": [c for c in convs if "/proj_" in c],
        "all but the up blocks and conv_out": [c for c in convs if not c.startswith(("/up_blocks", "/conv_out"))],
        "the up blocks only": [c for c in convs if c.startswith("/up_blocks")],
        "all but the resnets' conv2": [c for c in convs if "/conv2/" not in c],
        # the levels below full resolution (the single rows: the full-resolution ones reorder most), and the
        # Convs upstream of the prompt (which cannot reorder)
        "the lower levels (down 1+, mid, up but the last level and its upsampler) and upstream":
            [c for c in convs if c in independent or (c.startswith(("/down_blocks", "/mid_block", "/up_blocks"))
                                                      and not c.startswith(("/down_blocks.0", last_up))
                                                      and "/upsamplers" not in c)],
    }
    with tempfile.TemporaryDirectory() as tmp:
        def row(name, only, feeds=default_feeds):
            start = time.perf_counter()
            folder = make_variant(base, os.path.join(tmp, f"v{len(os.listdir(tmp))}"), feeds, only)
            _, (mean, low) = agreement(folder, gens, ref)
            print(f"| {name} | {len(only)} | {mean:.3f}, {low:.3f} | {time.perf_counter() - start:.0f} |", flush=True)
            shutil.rmtree(folder)
        for name, only in groups.items():
            row(name, only)
        row("every Conv, calibrated as training draws", convs, drawn_feeds)
        row("every Conv downstream of the prompt, calibrated as training draws", token_dependent, drawn_feeds)
        if args.single:
            for conv in token_dependent:
                row(f"{conv} alone", [conv])


if __name__ == "__main__":
    main()

"""Which int8 layers reorder a training generation's candidates (issue 17: accurate int8).

    python benchmarks/int8_layers.py                      # the trained shapes-world model, ~10 min on 2 cores
    python benchmarks/int8_layers.py --single             # also each layer alone (slow: one model per layer)
    python benchmarks/int8_layers.py --per-channel        # weight scales per output column, not per tensor

A candidate's token changes the UNet's output only through the text encoder and the UNet's
cross-attention keys and values, by ~0.1% of the loss: int8 noise of a similar size reorders the
population. Measured here on the trained shapes-world model (a random-weight model ranks almost
anything consistently, speed.md): G training generations (20 candidates drawn as CMA-ES's first
generation, z ~ N(0, 0.5^2 I) in the pca subspace around the init word; 4 triples each, drawn as
edge_ti.train draws them, from a concept's images), each scored by fp32 and by a variant on the same
triples; the variant's agreement is Spearman's rho with fp32, averaged over the generations. Variants
are made with edge_ti.quantize.quantize_int8 (dynamic MatMul/Gemm, 7-bit weights) by layer groups:
everything, everything but a group kept in float (the UNet's feed-forward layers: what `--quantize
int8` keeps float since this measurement), and (--single) one layer alone.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

TOKEN = "<c>"

# layer groups by what they compute, from the exported node names (diffusers' module paths)
GROUPS = {
    "unet cross-attn k,v (the text's keys and values)": lambda n: "/attn2/to_k/" in n or "/attn2/to_v/" in n,
    "unet cross-attn q,out": lambda n: "/attn2/to_q/" in n or "/attn2/to_out" in n,
    "unet self-attn": lambda n: "/attn1/" in n,
    "unet feed-forward": lambda n: "/ff/" in n,
    "unet feed-forward in (GEGLU proj)": lambda n: "/ff/net.0/" in n,
    "unet feed-forward out": lambda n: "/ff/net.2/" in n,
    # (Gemm layers, the time embedding's, are in int8 in every variant: no group names them)
    "unet proj_in/out (linear projection models only)": lambda n: "/proj_in/" in n or "/proj_out/" in n,
}


def weight_nodes(path):
    """Names of the MatMul/Gemm nodes with a constant weight: what quantize_int8 quantizes."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(i in inits for i in n.input)]


def make_variant(base, out, unet_exclude=(), text="all", unet="all", unet_only=None, text_only=None,
                 per_channel=False):
    """A copy of the model folder BASE at OUT with its UNet / text encoder quantized as told."""
    from edge_ti.quantize import quantize_int8
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("model.onnx*"), symlinks=False)
    for part, mode, exclude, only in (("unet", unet, unet_exclude, unet_only), ("text_encoder", text, (), text_only)):
        src, dst = os.path.join(base, part, "model.onnx"), os.path.join(out, part, "model.onnx")
        if mode == "float":
            shutil.copy2(src, dst)
        else:
            quantize_int8(src, dst, per_channel=per_channel, exclude=exclude, only=only)
    for part in ("vae_encoder", "vae_decoder"):
        shutil.copy2(os.path.join(base, part, "model.onnx"), os.path.join(out, part, "model.onnx"))
    return out


def generations(model, count, seed):
    """COUNT (candidates [20, 1, D], triples) as edge_ti.train's first generation draws them."""
    from PIL import Image

    from edge_ti import latents as lat
    from edge_ti import objective
    from edge_ti.init import from_word
    from edge_ti.shapes import concept_images
    from edge_ti.subspace import embeddings_from_z, pca_basis
    from edge_ti.train import OBJECT_TEMPLATES
    rng = np.random.default_rng(seed)
    out = []
    shapes = ["star", "diamond", "triangle", "cross"]
    for g in range(count):
        shape = shapes[g % len(shapes)]
        images = [Image.fromarray(i) for i in concept_images(6, rng, shape=shape, pattern="dotted")]
        latents = lat.encode_images(model, lat.load_images(images, model.resolution, flip=True))
        e0 = from_word(model, shape)
        W = pca_basis(model.token_embeddings, model.hidden_size)
        candidates = embeddings_from_z(e0, W, 0.5 * rng.standard_normal((20, W.shape[1])))
        prompts = [t.format(TOKEN) for t in OBJECT_TEMPLATES]
        ids = model.tokenize(prompts, {TOKEN: e0})
        triples = objective.draw_triples(rng, 4, len(latents), len(prompts), 1000, latents.shape[1:])
        out.append((candidates, ids, latents, triples))
    return out


def agreement(path, gens, reference=None):
    """Losses of every generation under the model at PATH; with REFERENCE, mean Spearman rho with it."""
    import edge_ti
    from edge_ti import objective
    from edge_ti.denoiser import Denoiser
    from edge_ti.metrics import spearman
    model = edge_ti.open_model(path, threads=2)
    losses = [objective.population_loss(Denoiser(model), c, ids, lat, tr) for c, ids, lat, tr in gens]
    if reference is None:
        return losses, None
    rhos = [spearman(a, b) for a, b in zip(reference, losses)]
    return losses, (float(np.mean(rhos)), float(np.min(rhos)))


def layers_parser(doc):
    """The options this script and int8_conv_layers.py share: the model, its generations, one layer at a time."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default=None, help="an ONNX model folder [the shipped shapes model]")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single", action="store_true")
    return parser


def main():
    parser = layers_parser(__doc__)
    parser.add_argument("--per-channel", action="store_true", help="int8 weight scales per output column")
    args = parser.parse_args()
    import edge_ti
    from edge_ti.shapes import model_dir
    base = args.model or model_dir()
    os.environ.setdefault("EDGE_TI_SESSION_CACHE", "0")  # one-off folders: no optimized-graph copies
    model = edge_ti.open_model(base)
    gens = generations(model, args.generations, args.seed)
    ref, _ = agreement(base, gens)
    spread = np.mean([r.std() / r.mean() for r in ref])
    unet_nodes = weight_nodes(os.path.join(base, "unet", "model.onnx"))
    text_nodes = weight_nodes(os.path.join(base, "text_encoder", "model.onnx"))
    print(f"# {' '.join(sys.argv)}\n# {base}: {args.generations} generations x 20 candidates x 4 triples; "
          f"loss spread std/mean {spread:.2e}; {len(unet_nodes)} UNet and {len(text_nodes)} text-encoder "
          "MatMul/Gemm layers with constant weights")
    print("| variant | layers in int8 | rho vs fp32 (mean, min) | s |\n|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        def row(name, count, **kw):
            start = time.perf_counter()
            folder = make_variant(base, os.path.join(tmp, f"v{len(os.listdir(tmp))}"), per_channel=args.per_channel,
                                  **kw)
            _, (mean, low) = agreement(folder, gens, ref)
            print(f"| {name} | {count} | {mean:.3f}, {low:.3f} | {time.perf_counter() - start:.0f} |", flush=True)
            shutil.rmtree(folder)
            return mean
        n = len(unet_nodes) + len(text_nodes)
        row("every MatMul (--quantize int8 before 2026-11-30)", n)
        row("UNet only (text encoder float)", len(unet_nodes), text="float")
        row("text encoder only (UNet float)", len(text_nodes), unet="float")
        for name, test in GROUPS.items():
            keep = [x for x in unet_nodes if test(x)]
            now = " = --quantize int8 since 2026-11-30" if name == "unet feed-forward" else ""
            row(f"all but {name} ({len(keep)} layers float{now})", n - len(keep), unet_exclude=keep)
        keep = [x for x in unet_nodes if GROUPS["unet cross-attn k,v (the text's keys and values)"](x)]
        row("all but cross-attn k,v and the text encoder", len(unet_nodes) - len(keep), unet_exclude=keep, text="float")
        keep = [x for x in unet_nodes if GROUPS["unet feed-forward"](x)]
        row("all but feed-forward and the text encoder", len(unet_nodes) - len(keep), unet_exclude=keep, text="float")
        if args.single:
            for node in unet_nodes:
                row(f"UNet {node} alone", 1, unet_only=[node], text="float")
            for node in text_nodes:
                row(f"text encoder {node} alone", 1, text_only=[node], unet="float")


if __name__ == "__main__":
    main()

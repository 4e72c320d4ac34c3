"""How much of gradient TI's improvement a small subspace holds: pca-k vs CLIP word directions vs random.

    python benchmarks/subspace_ceiling.py --json out.json        # 4 concepts, ~3 min on 2 cores
    python benchmarks/subspace_ceiling.py --report out.json      # the table again

A forward-only search in d dimensions needs ~d UNet samples for what one backward pass gives in all D,
so a small subspace that still holds the improvement is what it needs (issue 16). For concepts drawn
as benchmarks/optimizers.py draws them (none of quality.py's eight), gradient TI (edge_ti_export.
gradient_ti, 20 s, batch 4) trains a token from the init word; delta = e_grad - e0. For each k-column
basis B (orthonormalized): captured = |P delta|^2 / |delta|^2, and the judged loss change (optimizers.
judge: fresh images, 256 fixed triples) of e0 + P delta, as a fraction of e_grad's own ("kept").
Bases: pca-k (the top-k principal directions of the token table: what `--subspace pca --dim k` searches),
words-k (the directions from e0 to the k words CLIP ranks highest for the concept's images, as
--init auto weighs them), rand-k (random).
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "export"))
KS = (2, 4, 8, 16)


def measure(concept_seed, count):
    import importlib.util

    from PIL import Image

    import edge_ti
    from edge_ti import init as initialization
    from edge_ti.shapes import HELD_OUT, concept_images
    from edge_ti.subspace import pca_basis
    from edge_ti_export import gradient_ti
    spec = importlib.util.spec_from_file_location("optimizers", os.path.join(HERE, "optimizers.py"))
    optimizers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(optimizers)
    model = edge_ti.open_model("shapes", threads=1)
    table = model.token_embeddings
    D = table.shape[1]
    concepts, name_of = optimizers.draw_concepts(concept_seed, count)
    out = {}
    for fixed in concepts:
        seed = 0
        rng = np.random.default_rng([seed, 1])
        exclude = tuple(c for c in HELD_OUT if not all(fixed.get(k) == v for k, v in c.items()))
        images = [Image.fromarray(i) for i in concept_images(6, rng, exclude=exclude, **fixed)]
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for j, image in enumerate(images):
                paths.append(os.path.join(tmp, f"{j}.png"))
                image.save(paths[-1])
            settings = gradient_ti.GradientSettings(seed=seed, max_time=20, threads=1, max_steps=10 ** 9)
            result = gradient_ti.train(os.path.join(os.path.dirname(HERE), "export", "shapes_diffusers"), paths,
                                       "<c>", init_word=fixed["shape"], settings=settings)
        e_grad, e0 = result.embedding["<c>"][0], result.init[0]
        delta = e_grad - e0
        _, top = initialization.from_images(model, images, show=None)
        rows = initialization.token_features(model, [w for w, _ in top])     # (K, D), best first
        bases = {}
        for k in KS:
            bases[f"pca{k}"] = np.linalg.qr(pca_basis(table, k))[0]
            bases[f"words{k}"] = np.linalg.qr((rows[:k] - e0).T)[0]
            bases[f"rand{k}"] = np.linalg.qr(np.random.default_rng(k).standard_normal((D, k)))[0]
        projected = {name: Q @ (Q.T @ delta) for name, Q in bases.items()}
        changes = optimizers.judge(model, fixed, seed, e0[None], [e_grad[None]] + [(e0 + p)[None] for p in projected.values()])
        g = float(changes[0])
        out[name_of(fixed)] = {"grad": g, "top": top[:8], **{
            name: (float(p @ p / (delta @ delta)), float(c), float(c / g))
            for (name, p), c in zip(projected.items(), changes[1:])}}
        print(name_of(fixed), "done", flush=True)
    return out


def report(out):
    names = [f"{b}{k}" for k in KS for b in ("pca", "words", "rand")]
    print("| concept | gradient TI judged | top CLIP words | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for concept, v in out.items():
        words = ", ".join(w for w, _ in v["top"][:3])
        print(f"| {concept} | {100 * v['grad']:+.2f}% | {words} | "
              + " | ".join(f"{v[n][0]:.2f} / {v[n][2]:+.2f}" for n in names) + " |")
    print("| **mean** | | | " + " | ".join(
        f"{np.mean([v[n][0] for v in out.values()]):.2f} / {np.mean([v[n][2] for v in out.values()]):+.2f}"
        for n in names) + " |")
    print("(each cell: captured fraction of |delta|^2 / kept fraction of gradient TI's judged loss change)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=4)
    parser.add_argument("--concept-seed", type=int, default=11)
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--report", help="print the table of a --json file")
    args = parser.parse_args()
    if args.report:
        return report(json.load(open(args.report)))
    out = measure(args.concept_seed, args.concepts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    report(out)


if __name__ == "__main__":
    main()

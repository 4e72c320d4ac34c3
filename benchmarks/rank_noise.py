"""How much of a generation's ranking is signal: rank agreement of one population on two triple sets.

    python benchmarks/rank_noise.py [--onnx edge_ti/shapes/model] [--concepts ...] [--triples 4 8 16 32 64 128]

CMA-ES keeps the best-ranked candidates of each generation. Every candidate is scored on the same
T triples (common random numbers), so what matters is whether the order it sees would hold on
other triples. For a population drawn as the search draws its first one (z ~ N(0, sigma^2 I) in the
pca subspace around the init word, edge_ti.train's defaults), this scores it on two independent
sets of T triples and reports Spearman's rho between the two rankings, averaged over repeats:
rho ~ 0 means selection on T triples is picking noise, rho ~ 1 that it picks what a larger
sample would pick. The concepts and images are those of benchmarks/quality.py.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import quality  # noqa: E402  (the concepts, their images and prompts)


def main():
    from PIL import Image

    import edge_ti
    from edge_ti import init as initialization, latents as lat, objective, subspace
    from edge_ti.denoiser import Denoiser
    from edge_ti.metrics import spearman
    from edge_ti.train import prompt_templates

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", default=os.path.join(quality.ROOT, "edge_ti", "shapes", "model"))
    parser.add_argument("--concepts", nargs="+", default=["dotted-blue-star", "big-yellow-circle-gray",
                                                          "style-cyan-dotted-brown"])
    parser.add_argument("--triples", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = edge_ti.open_model(args.onnx)
    table = model.token_embeddings
    dim = min(args.dim, table.shape[1])
    W = subspace.basis("pca", table, dim, args.sigma)
    T_train = int(model.scheduler_config.get("num_train_timesteps", 1000))
    print(f"# {args.onnx}: popsize {args.popsize}, pca dim {dim}, sigma {args.sigma} in z, {args.repeats} repeats")
    print("| concept | " + " | ".join(f"T={t}" for t in args.triples) + " |")
    print("|---|" + "---|" * len(args.triples))
    means = {t: [] for t in args.triples}
    for name in args.concepts:
        concept = quality.BY_NAME[name]
        images = [Image.fromarray(i) for i in quality.draw_concept(concept, 0, 6, salt=0)]
        latents = lat.encode_images(model, lat.load_images(images, model.resolution, flip=True))  # (N, C, h, w)
        prompts = [t.format(quality.TOKEN) for t in
                   prompt_templates("object" if concept.kind == "object" else "style")]
        e0 = initialization.from_word(model, concept.init_word, 1)                        # (1, D)
        prompt_ids = model.tokenize(prompts, {quality.TOKEN: e0})
        cells = []
        for T in args.triples:
            rhos = []
            for r in range(args.repeats):
                rng = np.random.default_rng([T, r])
                zs = rng.normal(0, args.sigma, (args.popsize, dim))                      # the first generation
                candidates = subspace.embeddings_from_z(e0, W, zs)                       # (P, 1, D)
                a, b = (objective.draw_triples(rng, T, len(latents), len(prompts), T_train, latents.shape[1:])
                        for _ in range(2))
                rhos.append(spearman(objective.population_loss(Denoiser(model), candidates, prompt_ids, latents, a),
                                     objective.population_loss(Denoiser(model), candidates, prompt_ids, latents, b)))
            means[T].append(np.mean(rhos))
            cells.append(f"{np.mean(rhos):+.2f} ± {np.std(rhos, ddof=1) / np.sqrt(len(rhos)):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("| **mean** | " + " | ".join(f"{np.mean(means[t]):+.2f}" for t in args.triples) + " |")


if __name__ == "__main__":
    main()

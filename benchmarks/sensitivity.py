"""Which directions of the token the UNet responds to (issue 16): the Gauss-Newton matrix of the search's loss in
the token's coordinates, at the search's start and at its end, for the object units of a benchmarks/quality.py work
folder.

    python benchmarks/sensitivity.py WORK [--units big-dotted-pink-cross-0 ...] [--onnx MODEL] [--threads 2]

For a triple (x0, prompt, t, noise) the residual r(e) = unet(x_t, t, text(e)) - target has Jacobian J in the
searched vector e (D coordinates); M = E[w J^T J] over the search's held-out triples (w: each triple's loss weight)
is the loss's Gauss-Newton curvature, and a step u changes the predictions by u^T M u on average. Measured by
central differences, e +- h b_i for the D unit vectors b_i (2D candidates, the anchor kept), from the scorer's
Gram matrix of residuals: M_ij = [G(+i,+j) - G(+i,-j) - G(-i,+j) + G(-i,-j)] / 4h^2 (exact where r is linear in e).
Per unit: the share of M's trace in its top 4 / 8 / 16 eigenvectors; how well 4 triples find the top 8 (subspace
overlap with the held-out set's 32: sum of squared cosines / k, 1 the same, k/D at random); how far that subspace
turns from the start to edge-ti's final token; and the share of gradient TI's and edge-ti's steps (and of the loss's
gradient at the start) in the top-k, against the vocabulary's top-k principal directions (what `--dim k` searches).
Then the overlap of the units' start subspaces with each other. Object units only (a style's search has no CLIP
path, whose start this reads); ~30 s per unit on 2 cores (3 x 128 candidates x 32 triples and the CLIP path).
"""
import argparse
import importlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (the benchmark's concepts and work folders)

KS = (4, 8, 16)


def sensitivity(scorer, e, anchor, triples, h=0.01, chunk=8):
    """scorer (population_gram), e [D] the searched vector, anchor [1, D] or None -> (eigenvalues [D], largest
    first; eigenvectors [D, D] as columns; the loss's gradient [D]) of M = E[w J^T J] by central differences."""
    from edge_ti import objective, subspace
    D = len(e)
    steps = np.concatenate([np.eye(D), -np.eye(D)]) * h                                   # (2D, D)
    candidates = subspace.with_anchor((e[None] + steps)[:, None].astype(np.float32), anchor)   # (2D, n, D)
    M, gradient, count = np.zeros((D, D)), np.zeros(D), len(triples.timesteps)
    for s in range(0, count, chunk):
        part = objective.subset(triples, slice(s, s + chunk))
        G = scorer.population_gram(candidates, part) * len(part.timesteps)                 # summed over the part
        plus, minus = slice(0, D), slice(D, 2 * D)
        M += (G[plus, plus] - G[plus, minus] - G[minus, plus] + G[minus, minus]) / (4 * h * h)
        gradient += (np.diag(G[plus, plus]) - np.diag(G[minus, minus])) / (2 * h)
    M, gradient = (M + M.T) / (2 * count), gradient / count
    eigenvalues, eigenvectors = np.linalg.eigh(M)
    order = np.argsort(eigenvalues)[::-1]
    return eigenvalues[order], eigenvectors[:, order], gradient


def overlap(V1, V2, k):
    """How much the span of V1's first k columns and V2's agree: sum of squared cosines / k (1 equal, ~k/D random)."""
    return float(np.sum((V1[:, :k].T @ V2[:, :k]) ** 2) / k)


def captured(V, k, step):
    """The share of |step|^2 in the span of V's first k (orthonormal) columns."""
    return float(np.sum((V[:, :k].T @ step) ** 2) / max(np.sum(step ** 2), 1e-30))


class _Start(Exception):
    """Raised once the trainer has chosen the search's start: the search itself is not needed."""


def search_start(model, work, unit, concept):
    """What edge_ti.train's defaults hand the search in this unit: {start, init, anchor, scorer, heldout}. The scorer
    is the default in-process one, which stays usable after the trainer closes it on _Start (its close does nothing)."""
    from edge_ti.train import TrainSettings
    train_module = importlib.import_module("edge_ti.train")
    chosen_by_the_defaults, seen = train_module._clip_refined, {}

    def recorded(score, e0, W, max_norm, sigma, settings, scorer, heldout, anchor):
        start = chosen_by_the_defaults(score, e0, W, max_norm, sigma, settings, scorer, heldout, anchor)[0]
        seen.update(start=start[0].astype(np.float64), init=e0[0].astype(np.float64), anchor=anchor, scorer=scorer,
                    heldout=heldout)
        raise _Start

    train_module._clip_refined = recorded
    try:
        train_module.train(model, [os.path.join(work, "runs", unit, "images")], quality.TOKEN,
                           os.path.join(work, "sensitivity.safetensors"),   # never written: _Start comes first
                           init_word=concept.init_word, settings=TrainSettings(template="object", seed=unit_seed(unit)),
                           resume="restart")
    except _Start:
        pass
    finally:
        train_module._clip_refined = chosen_by_the_defaults
    if not seen:
        raise SystemExit(f"{unit}: the trainer chose no start on a CLIP path (no clip/ in the model?)")
    return seen


def unit_seed(unit):
    return int(unit.rsplit("-", 1)[1])


def final_vector(work, unit, method):
    return np.load(os.path.join(work, "runs", unit, f"{method}.safetensors.npz"))["embeddings"][-1, 0].astype(np.float64)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", help="a benchmarks/quality.py --work folder with edge-ti's and gradient TI's main runs")
    p.add_argument("--units", nargs="+", help="object units (CONCEPT-SEED); default: every main object unit")
    p.add_argument("--onnx", default=None, help="the ONNX model folder (default: the shipped shapes model)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    for folder in ("runs",) + (() if args.units else ("units",)):
        if not os.path.isdir(os.path.join(args.work, folder)):
            p.error(f"{args.work}: not a benchmarks/quality.py work folder (no {folder}/ in it)")
    import edge_ti
    from edge_ti.shapes import model_dir
    from edge_ti.subspace import pca_basis
    concepts = {c.name: c for c in quality.CONCEPTS}
    units = args.units or [f"{u['concept']}-{u['seed']}" for u in quality.load_units(args.work)
                           if u["group"] == "main" and u["kind"] == "object"]
    if not units:
        p.error(f"{args.work}: no main object units")
    for unit in units:
        name = unit.rsplit("-", 1)[0]
        if name not in concepts or concepts[name].kind != "object" or not unit.rsplit("-", 1)[1].isdigit():
            objects = sorted(c.name for c in quality.CONCEPTS if c.kind == "object")
            p.error(f"{unit}: not an object unit (CONCEPT-SEED with one of {', '.join(objects)})")
        for method in ("edge-ti", "gradient"):
            if not os.path.isfile(os.path.join(args.work, "runs", unit, f"{method}.safetensors.npz")):
                p.error(f"{unit}: no {method}.safetensors.npz in {os.path.join(args.work, 'runs', unit)}")
    model = edge_ti.open_model(args.onnx or model_dir(), threads=args.threads)
    pca = pca_basis(model.token_embeddings, model.token_embeddings.shape[1]).astype(np.float64)
    pca /= np.linalg.norm(pca, axis=0)                                   # the vocabulary's principal directions
    print("| unit | trace in top 4 / 8 / 16 | top 8 from 4 triples | start -> edge-ti's end (top 8) | "
          "gradient TI's step in top 4 / 8 / 16: M's; pca's | edge-ti's step: M's; pca's | the loss's gradient: M's; pca's |")
    print("|---|---|---|---|---|---|---|")
    starts, rows = {}, []
    for unit in units:
        seen = search_start(model, args.work, unit, concepts[unit.rsplit("-", 1)[0]])
        from edge_ti import objective
        values, V, gradient = sensitivity(seen["scorer"], seen["start"], seen["anchor"], seen["heldout"])
        _, V4, _ = sensitivity(seen["scorer"], seen["start"], seen["anchor"], objective.subset(seen["heldout"], slice(0, 4)))
        edge = final_vector(args.work, unit, "edge-ti")
        _, V_end, _ = sensitivity(seen["scorer"], edge, seen["anchor"], seen["heldout"])
        steps = {"gradient": final_vector(args.work, unit, "gradient") - seen["init"], "edge-ti": edge - seen["start"],
                 "loss gradient": gradient}
        row = {"trace": [values[:k].sum() / values.sum() for k in KS], "few": overlap(V4, V, 8),
               "turn": overlap(V, V_end, 8),
               **{s: ([captured(V, k, d) for k in KS], [captured(pca, k, d) for k in KS]) for s, d in steps.items()}}
        rows.append(row)
        starts[unit] = V
        three = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"| {unit} | {three(row['trace'])} | {row['few']:.2f} | {row['turn']:.2f} | "
              + " | ".join(f"{three(row[s][0])}; {three(row[s][1])}" for s in steps) + " |", flush=True)
    mean = lambda key: np.mean([r[key] for r in rows], axis=0)  # noqa: E731
    print(f"| **mean** | {' / '.join(f'{x:.2f}' for x in mean('trace'))} | {mean('few'):.2f} | {mean('turn'):.2f} | "
          + " | ".join(" / ".join(f"{x:.2f}" for x in np.mean([r[s][0] for r in rows], 0)) + "; "
                       + " / ".join(f"{x:.2f}" for x in np.mean([r[s][1] for r in rows], 0))
                       for s in ("gradient", "edge-ti", "loss gradient")) + " |")
    pairs = [overlap(starts[a], starts[b], 8) for i, a in enumerate(units) for b in units[i + 1:]]
    if pairs:
        print(f"\nthe start's top 8 across units: overlap {np.mean(pairs):.2f} (min {min(pairs):.2f}, max "
              f"{max(pairs):.2f}, {len(pairs)} pairs); at random {8 / len(pca):.3f}")


if __name__ == "__main__":
    main()

"""Where edge-ti's held-out loss stands against gradient TI's, from a finished quality.py run (issue 16, target 2).

    python benchmarks/heldout_gap.py WORK            # a benchmarks/quality.py work folder with main units
    python benchmarks/heldout_gap.py WORK --line     # also the loss along the line between the two tokens

Three measurements per (concept, seed), each a table per concept kind (the held-out loss relative to the
init word's, negative is better; forward passes only, ~8 s per unit on the shapes model, 2 cores). The loss is
the model's own (`--weighting model`, as quality.py's held-out column: the v loss on a v-prediction model, which
gradient TI minimizes) or in epsilon units (`--weighting eps`: what edge-ti's search minimizes by default):

1. Fresh images (quality.py's own held-out set: its images and triples, checked against the recorded loss):
   gradient TI's final token as it is and shortened to the norm cap (e * min(1, cap / |e|), cap = the
   vocabulary's longest row, which edge-ti never exceeds, as the issue requires), and edge-ti's final token.
2. The training images themselves (the unit's images and their mirror images, TRAINING_TRIPLES fixed
   triples): gradient TI's final token, edge-ti's first snapshot and its last. A gap here is the search's;
   one only on fresh images would be overfitting.
3. --line: the training-image loss at LINE points e(a) = (1 - a) edge-ti + a gradient-capped (each shortened
   to the cap), for the units whose two tokens have the same number of vectors: whether a better token lies
   within the norms, and whether a barrier separates it from edge-ti's.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (the benchmark's concepts, held-out images and triples)

TRAINING_TRIPLES = 256
LINE = np.linspace(0.0, 1.0, 6)


class Unit:
    """One (concept, seed) of a quality.py work folder, with its held-out sets and a loss function."""

    def __init__(self, model, settings, unit, weighting="model"):
        from edge_ti import latents as lat, objective
        self.model, self.unit, self.weighting = model, unit, weighting
        concept = quality.concept_of({"concept": unit["concept"], "concept_seed": settings.get("concept_seed"),
                                      "concept_kind": settings.get("concept_kind", "object")})
        self.kind = concept.kind
        self.run = os.path.join(settings["work"], "runs", f"{unit['concept']}-{unit['seed']}")
        latents, self.prompts, triples = quality.heldout_set(model, concept, unit["seed"], settings["heldout_images"],
                                                             settings["heldout_triples"])
        self.fresh = (latents, self._weighted(triples))
        folder = os.path.join(self.run, "images")
        latents = lat.encode_images(model, lat.load_images([os.path.join(folder, f) for f in sorted(os.listdir(folder))],
                                                           model.resolution, flip=True))
        T_train = int(model.scheduler_config.get("num_train_timesteps", 1000))
        triples = objective.draw_triples(np.random.default_rng([unit["seed"], concept.index, 3]), TRAINING_TRIPLES,
                                         len(latents), len(self.prompts), T_train, latents.shape[1:])
        self.training = (latents, self._weighted(triples))

    def _weighted(self, triples):
        from edge_ti.denoiser import Denoiser
        # eps: what edge-ti's search minimizes on a v model for objects (TrainSettings.loss_weighting)
        if self.weighting == "eps":
            triples.weight = Denoiser(self.model).eps_weight(triples.timesteps)
        return triples

    def loss(self, embeddings, on):
        """[P, n, D] -> [P]: each token's loss on the fresh or training set ON."""
        from edge_ti import objective
        from edge_ti.denoiser import Denoiser
        latents, triples = on
        ids = self.model.tokenize(self.prompts, {quality.TOKEN: embeddings[0]})
        return objective.population_loss(Denoiser(self.model), np.asarray(embeddings, np.float32), ids, latents,
                                         triples)


def capped(embeddings, cap):
    return embeddings * np.minimum(1.0, cap / np.linalg.norm(embeddings, axis=-1, keepdims=True))


def measure(u, method, cap, line):
    """-> dict of relative losses (fractions) and gradient TI's |e| / cap."""
    gradient = np.load(os.path.join(u.run, "gradient.safetensors.npz"))
    edge = np.load(os.path.join(u.run, method + ".safetensors.npz"))["embeddings"]   # (snapshots, n, D)
    g = gradient["embeddings"][-1:]                                                   # (1, n, D)
    raw, short = u.loss(np.concatenate([g, capped(g, cap)]), u.fresh)
    ev = u.unit["eval"]
    if u.weighting == "model":
        recorded = ev["gradient"]["heldout"][-1]
        if not np.isclose(raw, recorded, rtol=1e-4):  # the same set as quality.py's, or this measures something else
            raise SystemExit(f"{u.run}: gradient TI's held-out loss {raw:.6f} is not the recorded {recorded:.6f}")
        fresh_init, fresh_edge = ev["init"]["heldout"][0], ev[method]["heldout"][-1]
    else:
        fresh_init, fresh_edge = (u.loss(e, u.fresh)[0] for e in (gradient["init"][None], edge[[-1]]))
    out = {"norm": float(np.linalg.norm(g, axis=-1).max() / cap), "fresh gradient": raw / fresh_init - 1,
           "fresh gradient capped": short / fresh_init - 1, f"fresh {method}": fresh_edge / fresh_init - 1}
    init = u.loss(gradient["init"][None], u.training)[0]
    first, last = u.loss(edge[[0]], u.training)[0], u.loss(edge[[-1]], u.training)[0]
    grad_training = u.loss(g, u.training)[0]
    out.update({"training gradient": grad_training / init - 1, f"training {method} first": first / init - 1,
                f"training {method} last": last / init - 1})
    if line and edge.shape[1:] == g.shape[1:]:
        points = np.stack([capped((1 - a) * edge[-1] + a * capped(g[0], cap), cap) for a in LINE])
        out["line"] = u.loss(points, u.training) / init - 1
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", help="a benchmarks/quality.py work folder with finished main units")
    p.add_argument("--method", default="edge-ti", help="the edge-ti method to compare (a main method)")
    p.add_argument("--line", action="store_true", help="also the training-image loss along the line between the tokens")
    p.add_argument("--weighting", choices=["model", "eps"], default="model",
                   help="model: the model's own loss, quality.py's held-out column (v loss on a v model); eps: in "
                        "epsilon units, what edge-ti's search minimizes (--loss-weighting eps, its default)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import edge_ti
    from edge_ti import subspace
    try:
        with open(os.path.join(args.work, "settings.json")) as f:
            settings = {**json.load(f), "work": args.work}
    except (OSError, ValueError) as err:
        raise SystemExit(f"{args.work}: not a benchmarks/quality.py work folder ({err})") from None
    model = edge_ti.open_model(settings["onnx"], threads=args.threads)
    cap = subspace.max_row_norm(model.token_embeddings)
    rows = []
    for path in sorted(glob.glob(os.path.join(args.work, "units", "*-main.json"))):
        with open(path) as f:
            unit = json.load(f)
        if args.method not in unit["eval"] or "gradient" not in unit["eval"]:
            continue
        u = Unit(model, settings, unit, args.weighting)
        row = {"kind": u.kind, **measure(u, args.method, cap, args.line)}
        rows.append(row)
        print(f"{unit['concept']:28s} {unit['seed']}  " + "  ".join(
            f"{k} {100 * v:+.1f}%" for k, v in row.items() if k not in ("kind", "norm", "line"))
            + f"  gradient |e| / cap {row['norm']:.2f}", flush=True)
    if not rows:
        raise SystemExit(f"{args.work}: no finished main units with gradient and {args.method}")
    m = args.method
    columns = ["fresh gradient", "fresh gradient capped", f"fresh {m}", "training gradient", f"training {m} first",
               f"training {m} last"]
    print(f"\n| runs | gradient |e| / cap | {' | '.join(columns)} | fresh: capped gradient - {m} |")
    print("|---|---|" + "---|" * len(columns) + "---|")
    for kind in ("object", "style", "all"):
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        if not sel:
            continue
        mean = lambda key: 100 * np.mean([r[key] for r in sel])  # noqa: E731
        d = 100 * np.array([r["fresh gradient capped"] - r[f"fresh {m}"] for r in sel])
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        print(f"| {kind} ({len(sel)}) | {np.mean([r['norm'] for r in sel]):.2f} | "
              + " | ".join(f"{mean(c):+.2f}%" for c in columns) + f" | {d.mean():+.2f} ± {se:.2f} points |")
    for kind in ("object", "style"):
        lines = [r["line"] for r in rows if "line" in r and r["kind"] == kind]
        if lines:
            print(f"\nline ({kind}, {len(lines)} runs), training-image loss at a = "
                  + ", ".join(f"{a:.1f}" for a in LINE) + " (0: " + m + ", 1: gradient TI's, capped): "
                  + ", ".join(f"{100 * x:+.1f}%" for x in np.mean(lines, axis=0)))


if __name__ == "__main__":
    main()

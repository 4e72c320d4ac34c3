"""What the tokens of a benchmarks/quality.py work folder draw, attribute by attribute (issue 16: which part of a
concept a method misses, where the benchmark's accuracy only says how much).

    python benchmarks/attributes.py WORK [--group main] [--methods gradient edge-ti@half edge-ti]
    python benchmarks/attributes.py WORK --group G --methods edge-ti:path-only-10s edge-ti:vloss-path-10s
    python benchmarks/attributes.py WORK --path-stages [--kind style]
    python benchmarks/attributes.py WORK --geometry [--group main] [--methods edge-ti@half edge-ti]
    python benchmarks/attributes.py WORK --methods edge-ti edge-ti+along      # its token, then its step along
                                                                             # gradient TI's alone

Tokens: each unit's snapshot of METHOD (its last; `edge-ti@half` is edge-ti's last at <= half of gradient TI's
wall time, `gradient@half` gradient TI's at half its budget, as the report's). Generations as quality.py's evaluation (its prompts and seeds, --eval-images per
snapshot, DDIM --eval-steps, guidance 4), read by the analyzer; printed per kind of concept, the share of images
with each target attribute right, mean over the units.

--path-stages: for each main unit, the points edge-ti's defaults choose the search's start among (the init and
the CLIP path's stages, with the anchor), recomputed as edge_ti.train computes them (same images, seed and
settings), each with its held-out loss in the search's units and in the model's own, and what it draws. A style's
are those of the defaults of stops 46-48 (the images' CLIP init kept, the epsilon loss): since stop 49 a style has
no CLIP path.
~1 min per unit of the 15 style units (7 points x 12 images) on 2 cores; the token files are read, never written.

--geometry: where the tokens are, no generation (seconds): per kind, the mean over the units of each method's token
(its first, searched vector) against the init word's embedding and gradient TI's final token: its distance from the
init, its length over the vocabulary's longest row (the norm cap edge-ti keeps), and the cosine between its step from
the init and gradient TI's; the part of its step along gradient TI's and the part across it.
"""
import argparse
import collections
import importlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (the benchmark's concepts, prompts and evaluation settings)


def attribute_hits(model, concept, seed, embedding, images, steps):
    """{attribute: [1.0 or 0.0 per image]}: quality.py's evaluation of EMBEDDING (its prompts and seeds)."""
    hits = collections.defaultdict(list)
    for image in quality.read_back(model, concept, seed, embedding, images, steps, guidance=4.0):
        for name, hit in image.items():
            hits[name].append(float(hit))
    return hits


def snapshot(unit, run_dir, method):
    """The embedding of METHOD's snapshot in this unit (the @half ones as quality.unit_rows picks them), or None.
    METHOD+along: that token with its first vector's step from the init replaced by the step's projection on gradient
    TI's final step (what is left of it when the part across gradient TI's direction is taken away)."""
    if method.endswith("+along"):
        token, grad = snapshot(unit, run_dir, method.removesuffix("+along")), snapshot(unit, run_dir, "gradient")
        if token is None or grad is None:
            return None
        init = np.load(os.path.join(run_dir, "gradient.safetensors.npz"))["init"][0].astype(np.float64)
        g, step = grad[0] - init, token[0] - init
        if not np.any(g):  # gradient TI never moved: no direction to project on
            return None
        token = token.copy()
        token[0] = init + (step @ g) / (g @ g) * g
        return token
    name = method.removesuffix("@half")
    path = os.path.join(run_dir, name + ".safetensors.npz")
    if name not in unit["eval"] or not os.path.isfile(path):
        return None
    embeddings = np.load(path)["embeddings"]
    if not method.endswith("@half"):
        return embeddings[-1]
    half = 0.5 * unit["eval"]["gradient"]["wall"][-1]
    i = quality.at_or_before(unit["eval"][name], half if name == "edge-ti" else half + 1e-9)
    return None if i is None or (name == "gradient" and i == len(embeddings) - 1) else embeddings[i]


def token_table(args, model, concepts):
    hits = collections.defaultdict(list)                          # (kind, method, attribute) -> per-unit shares
    for unit in quality.load_units(args.work):
        if unit["group"] != args.group or (args.kind and unit["kind"] != args.kind):
            continue
        concept = concepts[unit["concept"]]
        run_dir = os.path.join(args.work, "runs", f"{concept.name}-{unit['seed']}")
        for method in args.methods:
            embedding = snapshot(unit, run_dir, method)
            if embedding is None:
                continue
            per_attribute = attribute_hits(model, concept, unit["seed"], embedding, args.eval_images, args.eval_steps)
            for name, h in per_attribute.items():
                hits[(unit["kind"], method, name)].append(float(np.mean(h)))
            # quality.py's accuracy: per image, the share of its target attributes right; mean over the images
            hits[(unit["kind"], method, "accuracy")].append(float(np.mean(np.mean(list(per_attribute.values()), 0))))
        print(f"  {concept.name} seed {unit['seed']}", file=sys.stderr, flush=True)
    for kind in ("object", "style"):
        names = sorted({a for k, _, a in hits if k == kind} - {"accuracy"})
        if not names:
            continue
        print(f"\n| {kind}s: per attribute | " + " | ".join(names) + " | mean (the benchmark's accuracy) | units |")
        print("|---|" + "---|" * (len(names) + 2))
        for method in args.methods:
            cells = [f"{np.mean(hits[(kind, method, a)]):.3f}" if hits[(kind, method, a)] else "-" for a in names]
            units = max(len(hits[(kind, method, a)]) for a in names)
            accuracy = np.mean(hits[(kind, method, "accuracy")]) if hits[(kind, method, "accuracy")] else float("nan")
            print(f"| {method} | " + " | ".join(cells) + f" | {accuracy:.3f} | {units} |")


class _Stop(Exception):
    """Raised once the start's candidates are known: the search itself is not needed."""


def path_stages(args, model, concepts):
    """The init and the CLIP path's stages of edge-ti's defaults, per main unit: held-out losses and attributes."""
    from edge_ti import clip_score, objective, subspace
    from edge_ti.train import TrainSettings
    train_module = importlib.import_module("edge_ti.train")
    chosen_by_the_defaults = train_module._clip_refined
    seen = {}

    def recorded(score, e0, W, max_norm, sigma, settings, scorer, heldout, anchor):
        start = chosen_by_the_defaults(score, e0, W, max_norm, sigma, settings, scorer, heldout, anchor)[0]
        zs, _ = clip_score.path(score, e0, W, max_norm, settings.clip_refine, settings.clip_path, sigma=sigma,
                                seed=settings.seed, anchor=anchor)
        zs = np.concatenate([np.zeros((1, zs.shape[1])), zs])                  # the init, then the stages
        points = subspace.embeddings_from_z(e0, W, zs, max_norm)
        model_loss = objective.Triples(heldout.latent_index, heldout.prompt_index, heldout.timesteps, heldout.noise)
        seen.update(points=subspace.with_anchor(points, anchor), search_loss=scorer.population_loss(
            subspace.with_anchor(points, anchor), heldout), model_loss=scorer.population_loss(
            subspace.with_anchor(points, anchor), model_loss), chosen=int(np.argmin(np.abs(points - start).sum((1, 2)))))
        raise _Stop

    reason = clip_score.why_not(model)
    if reason:  # no CLIP path to read (the trainer would run its whole search instead)
        raise SystemExit(f"--path-stages: {reason}")
    train_module._clip_refined = recorded
    shares = collections.defaultdict(list)                         # (kind, point, attribute) -> per-unit shares
    out = os.path.join(args.work, "attributes-path.safetensors")   # the trainer's output path (never written: _Stop)
    for unit in quality.load_units(args.work):
        if unit["group"] != "main" or (args.kind and unit["kind"] != args.kind):
            continue
        concept, seed = concepts[unit["concept"]], unit["seed"]
        images = os.path.join(args.work, "runs", f"{concept.name}-{seed}", "images")
        template = "object" if concept.kind == "object" else "style"
        settings = TrainSettings(template=template, seed=seed, **quality.defaults_of_48("edge-ti:path-only", template,
                                                                                        has_clip=True))
        seen.clear()
        try:
            train_module.train(model, [images], quality.TOKEN, out, init_word=concept.init_word, settings=settings,
                               resume="restart")
        except _Stop:
            pass
        if not seen:
            raise SystemExit(f"--path-stages: {concept.name} seed {seed}: the trainer chose no start on a CLIP path")
        cells = []
        for k, embedding in enumerate(seen["points"]):
            hits = attribute_hits(model, concept, seed, embedding, args.eval_images, args.eval_steps)
            for name, h in hits.items():
                shares[(unit["kind"], k, name)].append(float(np.mean(h)))
            cells.append(f"{'init' if k == 0 else f'stage {k}'}{' (chosen)' if k == seen['chosen'] else ''}: "
                         f"{seen['search_loss'][k]:.5f} / {seen['model_loss'][k]:.4f} "
                         + " ".join(f"{name} {np.mean(h):.2f}" for name, h in sorted(hits.items())))
        print(f"{concept.name} seed {seed} (held-out loss: the search's / the model's own): " + " | ".join(cells),
              flush=True)
    for kind in ("object", "style"):
        names = sorted({a for k, _, a in shares if k == kind})
        points = sorted({p for k, p, _ in shares if k == kind})
        if not names:
            continue
        print(f"\n| {kind}s: point | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for p in points:
            print(f"| {'init' if p == 0 else f'stage {p}'} | "
                  + " | ".join(f"{np.mean(shares[(kind, p, a)]):.3f}" for a in names) + " |")


def geometry(args, model, concepts):
    """Per kind, the methods' tokens against the init and gradient TI's final token (no generation)."""
    cap = float(np.linalg.norm(model.token_embeddings, axis=1).max())
    rows = collections.defaultdict(list)                     # (kind, method) -> [(distance, norm, cos, along, across)]
    for unit in quality.load_units(args.work):
        if unit["group"] != args.group or (args.kind and unit["kind"] != args.kind):
            continue
        concept = concepts[unit["concept"]]
        run_dir = os.path.join(args.work, "runs", f"{concept.name}-{unit['seed']}")
        grad = snapshot(unit, run_dir, "gradient")
        if grad is None:
            continue
        init = np.load(os.path.join(run_dir, "gradient.safetensors.npz"))["init"][0].astype(np.float64)  # the word
        g = grad[0] - init
        if not np.any(g):  # gradient TI never moved: no direction to measure against
            continue
        for method in args.methods:
            embedding = snapshot(unit, run_dir, method)
            if embedding is None:
                continue
            step = embedding[0] - init
            along = float(step @ g / np.linalg.norm(g))
            rows[(unit["kind"], method)].append((np.linalg.norm(step), np.linalg.norm(embedding[0]) / cap,
                                                 along / max(np.linalg.norm(step), 1e-12), along,
                                                 np.sqrt(max(np.linalg.norm(step) ** 2 - along ** 2, 0.0))))
    for kind in ("object", "style"):
        methods = [m for m in args.methods if rows[(kind, m)]]
        if not methods:
            continue
        print(f"\n| {kind}s: token (first vector) | from the init | length / longest row | cos(step, gradient TI's) | "
              "along gradient TI's step | across it | units |")
        print("|---|---|---|---|---|---|---|")
        for method in methods:
            x = np.array(rows[(kind, method)])
            print(f"| {method} | " + " | ".join(f"{v:.3f}" for v in x.mean(axis=0)) + f" | {len(x)} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", help="a benchmarks/quality.py --work folder")
    p.add_argument("--group", default="main", help="the units' group (main, or an --ablation-group)")
    p.add_argument("--methods", nargs="+", default=["gradient", "edge-ti@half", "edge-ti"])
    p.add_argument("--kind", choices=("object", "style"), help="only this kind of concept")
    p.add_argument("--path-stages", action="store_true", help="the start's candidates of edge-ti's defaults instead")
    p.add_argument("--geometry", action="store_true", help="where the tokens are, against the init and gradient TI's")
    p.add_argument("--onnx", help="the ONNX model folder (default: the work folder's, from its settings.json)")
    p.add_argument("--eval-images", type=int, default=12)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if not (os.path.isdir(os.path.join(args.work, "units")) and os.path.isfile(os.path.join(args.work, "settings.json"))):
        p.error(f"{args.work}: no units/ folder or settings.json: not a benchmarks/quality.py work folder")
    with open(os.path.join(args.work, "settings.json")) as f:
        work_settings = json.load(f)
    import edge_ti
    from edge_ti.errors import EdgeTIError
    try:
        model = edge_ti.open_model(args.onnx or work_settings["onnx"], threads=args.threads)
    except EdgeTIError as error:  # the folder moved or is not a model: one line, no traceback
        p.error(str(error))
    seed = work_settings.get("concept_seed")   # a folder of drawn concepts (--concept-seed; objects, styles or both)
    drawn = [] if seed is None else quality.drawn(seed, "object") + quality.drawn(seed, "style")
    concepts = {c.name: c for c in quality.CONCEPTS + drawn}
    if args.path_stages and args.geometry:
        p.error("--path-stages and --geometry: choose one")
    (path_stages if args.path_stages else geometry if args.geometry else token_table)(args, model, concepts)


if __name__ == "__main__":
    main()

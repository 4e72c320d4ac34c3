"""Which search moves the token furthest per UNet sample: CMA-ES against zo-adam (issue 16, step 2).

    python benchmarks/optimizers.py                         # 4 concepts x 2 seeds, ~15 min on 2 cores
    python benchmarks/optimizers.py --quick                 # a smoke run
    python benchmarks/optimizers.py --methods cma:dim16 zo:lr0.05 --budget 1200

Every method trains the same concepts (drawn like benchmarks/signal_per_sample.py: a shape plus two other
attributes, none of quality.py's eight) from the same images, init word and seed with
edge_ti.train, the same budget of candidate evaluations, in this process one after another
(so the wall times are comparable within a run). The trainer picks its result on its own held-out
triples; this script judges it on a separate set: fresh images of the concept (another draw) and
JUDGE_TRIPLES fixed triples, the same for every method of a (concept, seed). Reported per method:

    judged      relative change of the judged loss from the init's (negative is better), mean +- s.e.
                over concept x seed pairs, at each fraction of the budget (the trainer's best-so-far
                embedding at that point is re-made from its log: best_z is only kept at the end, so
                the fractions are separate runs with smaller budgets)
    vs first    the paired difference from the first method, mean +- s.e., and how many pairs are better
    |e|/|row|   the learned vector's norm over the vocabulary's median row norm (a runaway shows here)
    samples     UNet samples spent (evaluations x triples + held-out checks x held-out triples)
    s           wall time of the training
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

TOKEN = "<c>"
JUDGE_TRIPLES = 256
JUDGE_IMAGES = 6

# name -> TrainSettings overrides
METHODS = {
    "cma": {},                                                   # today's defaults (pca 256 -> D)
    "cma:dim16": {"dim": 16},
    "zo:lr0.05": {"optimizer": "zo-adam", "lr": 0.05, "sigma": 0.1},
    "zo:lr0.1": {"optimizer": "zo-adam", "lr": 0.1, "sigma": 0.1},
    "zo:lr0.02": {"optimizer": "zo-adam", "lr": 0.02, "sigma": 0.1},
    "zo:lr0.05-r0.5": {"optimizer": "zo-adam", "lr": 0.05, "sigma": 0.5},
    "zo:lr0.05-dim16": {"optimizer": "zo-adam", "lr": 0.05, "sigma": 0.1, "dim": 16},
}


def draw_concepts(seed, count):
    import importlib.util
    spec = importlib.util.spec_from_file_location("signal_per_sample", os.path.join(HERE, "signal_per_sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.draw_concepts(np.random.default_rng(seed), count), module.concept_name


def judge(model, fixed, seed, e0, embeddings):
    """Relative change of each embedding's loss from e0's on fresh images and fixed triples."""
    from PIL import Image

    from edge_ti import latents as lat
    from edge_ti import objective
    from edge_ti.denoiser import Denoiser
    from edge_ti.shapes import HELD_OUT, concept_images
    from edge_ti.train import OBJECT_TEMPLATES
    rng = np.random.default_rng([seed, 99])
    exclude = tuple(c for c in HELD_OUT if not all(fixed.get(k) == v for k, v in c.items()))
    images = [Image.fromarray(i) for i in concept_images(JUDGE_IMAGES, rng, exclude=exclude, **fixed)]
    latents = lat.encode_images(model, lat.load_images(images, model.resolution, flip=True))
    prompts = [t.format(TOKEN) for t in OBJECT_TEMPLATES]
    prompt_ids = model.tokenize(prompts, {TOKEN: e0})
    T = int(model.scheduler_config.get("num_train_timesteps", 1000))
    triples = objective.draw_triples(rng, JUDGE_TRIPLES, len(latents), len(prompts), T, latents.shape[1:])
    candidates = np.stack([e0] + list(embeddings))                          # (1 + M, n, D)
    losses = objective.population_loss(Denoiser(model, None), candidates, prompt_ids, latents, triples)
    return (losses[1:] - losses[0]) / losses[0]


def run_one(model, fixed, init_word, seed, settings, budget):
    from PIL import Image

    from edge_ti.init import from_word
    from edge_ti.shapes import HELD_OUT, concept_images
    from edge_ti.train import TrainSettings, train
    rng = np.random.default_rng([seed, 1])
    exclude = tuple(c for c in HELD_OUT if not all(fixed.get(k) == v for k, v in c.items()))
    images = [Image.fromarray(i) for i in concept_images(6, rng, exclude=exclude, **fixed)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = train(model, images, TOKEN, os.path.join(tmp, "c.safetensors"), init_word=init_word,
                       settings=TrainSettings(**{"budget": budget, "seed": seed, "patience": 0,
                                                 "clip_refine": 0, **settings}),  # the search alone
                       resume="restart")
        seconds = time.perf_counter() - start
    e = result.embedding[TOKEN]
    samples = (result.evaluations * settings.get("triples", 4)
               + result.heldout_evaluations * settings.get("heldout_triples", 32))
    return e, from_word(model, init_word), seconds, samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--methods", nargs="+", default=["cma", "cma:dim16", "zo:lr0.05", "zo:lr0.1"])
    parser.add_argument("--concepts", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--concept-seed", type=int, default=11, help="draws the concepts")
    parser.add_argument("--budget", type=int, default=600)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--settings", default="{}", help="JSON overrides for every method (e.g. threads)")
    parser.add_argument("--define", default="{}", help='more methods as JSON: {"name": {TrainSettings overrides}}')
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    METHODS.update(json.loads(args.define))
    if args.quick:
        args.concepts, args.seeds, args.budget, args.fractions = 1, [0], 200, [1.0]
    import edge_ti
    model = edge_ti.open_model(args.model)
    table = model.token_embeddings
    row_norm = float(np.median(np.linalg.norm(table, axis=1)))
    concepts, name_of = draw_concepts(args.concept_seed, args.concepts)
    common = json.loads(args.settings)
    rows = []
    for fixed in concepts:
        for seed in args.seeds:
            learned, meta = [], []
            for method in args.methods:
                for fraction in args.fractions:
                    budget = max(20, int(round(args.budget * fraction)))
                    e, e0, seconds, samples = run_one(model, fixed, fixed["shape"], seed,
                                                      {**METHODS[method], **common}, budget)
                    learned.append(e)
                    meta.append({"concept": name_of(fixed), "seed": seed, "method": method, "fraction": fraction,
                                 "seconds": seconds, "samples": samples,
                                 "norm_ratio": float(np.linalg.norm(e) / row_norm)})
                    print(f"  {meta[-1]['concept']} seed {seed} {method} x{fraction}: {seconds:.0f} s", flush=True)
            for m, change in zip(meta, judge(model, fixed, seed, e0, learned)):
                rows.append({**m, "judged": float(change)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    report(rows, args.methods, args.fractions)


def report(rows, methods, fractions):
    print(f"\n{'method':<18}{'x budget':>9}{'judged':>18}{'vs ' + methods[0]:>22}{'better':>8}"
          f"{'|e|/|row|':>11}{'samples':>9}{'s':>7}")
    for fraction in fractions:
        base = {(r["concept"], r["seed"]): r["judged"] for r in rows
                if r["method"] == methods[0] and r["fraction"] == fraction}
        for method in methods:
            sel = [r for r in rows if r["method"] == method and r["fraction"] == fraction]
            judged = np.array([r["judged"] for r in sel])
            diff = np.array([r["judged"] - base[(r["concept"], r["seed"])] for r in sel])
            se = lambda x: x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")  # noqa: E731
            print(f"{method:<18}{fraction:>9.2f}{judged.mean() * 100:>10.2f}% ±{se(judged) * 100:.2f}"
                  f"{diff.mean() * 100:>14.2f}% ±{se(diff) * 100:.2f}{int((diff < 0).sum()):>5}/{len(diff)}"
                  f"{np.mean([r['norm_ratio'] for r in sel]):>11.2f}{np.mean([r['samples'] for r in sel]):>9.0f}"
                  f"{np.mean([r['seconds'] for r in sel]):>7.0f}")


if __name__ == "__main__":
    main()

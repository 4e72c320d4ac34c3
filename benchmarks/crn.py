"""Common random numbers: fixed for the whole run vs redrawn each generation, same budget.

    python benchmarks/crn.py MODEL_DIR IMAGES --init-word WORD [--budget 1000] [--seeds 0 1 2]
    python benchmarks/crn.py --tiny --init-word cat     # the tiny random model of the tests (export extra)

Prints, per strategy and seed, the held-out loss of the init and of the result (the held-out set
is the same for both strategies: it depends on the seed only) and the relative gain.
"""
import argparse
import os
import tempfile
import time

import edge_ti
from edge_ti.train import TrainSettings, train


def tiny_model_and_concept(folder):
    """The tests' tiny model (text_gain 10, tests/conftest.py) and three images of a red disc on blue."""
    from edge_ti_export.onnx_export import export_pipeline
    from edge_ti_export.tiny import tiny_pipeline, write_tiny_concept

    tiny_pipeline(seed=0, tokenizer_dir=os.path.join(folder, "tok"), text_gain=10.0).save_pretrained(
        os.path.join(folder, "diffusers"))
    model_dir = export_pipeline(os.path.join(folder, "diffusers"), os.path.join(folder, "onnx"))
    return model_dir, [write_tiny_concept(os.path.join(folder, "concept"))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("images", nargs="*")
    parser.add_argument("--tiny", action="store_true", help="build the tests' tiny model and concept images")
    parser.add_argument("--init-word", required=True)
    parser.add_argument("--token", default="<concept>")
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--triples", type=int, default=4)
    parser.add_argument("--template", default="object")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    keep = tempfile.mkdtemp(prefix="edge-ti-crn-")
    if args.tiny:
        args.model_dir, args.images = tiny_model_and_concept(keep)
    model = edge_ti.open_model(args.model_dir)
    print(f"model {args.model_dir}, budget {args.budget}, popsize {args.popsize}, triples {args.triples}/generation")
    print("| crn | seed | init held-out | result held-out | gain | generations | seconds |")
    print("|---|---|---|---|---|---|---|")
    gains = {}
    with tempfile.TemporaryDirectory() as tmp:
        for crn in ("fixed", "redraw"):
            for seed in args.seeds:
                settings = TrainSettings(crn=crn, seed=seed, clip_refine=0, budget=args.budget, popsize=args.popsize,
                                         triples=args.triples, template=args.template, patience=0)
                start = time.perf_counter()
                r = train(model, args.images, args.token, os.path.join(tmp, f"{crn}-{seed}.safetensors"),
                          init_word=args.init_word, settings=settings)
                gain = (r.init_heldout - r.best_heldout) / r.init_heldout
                gains.setdefault(crn, []).append(gain)
                print(f"| {crn} | {seed} | {r.init_heldout:.6f} | {r.best_heldout:.6f} | {gain:+.3%} | "
                      f"{r.generations} | {time.perf_counter() - start:.1f} |", flush=True)
    for crn, g in gains.items():
        print(f"mean gain, {crn}: {sum(g) / len(g):+.3%}")


if __name__ == "__main__":
    main()

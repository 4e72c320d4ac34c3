"""What --clip-refine costs on a model: seconds per CLIP-score evaluation of a candidate token.

    python benchmarks/clip_refine_cost.py MODEL_DIR [--threads 2] [--reps 5]

A CLIP-score evaluation (edge_ti.clip_score) is the candidate's clip_score.TEMPLATES prompts through
CLIP's text tower, cut after the end-of-text token, and one matrix product with the image features.
On SD 1.x that text tower is the model's own text encoder (CLIP ViT-L/14's; the projection to the
feature space is one 768 x 768 product more), so its cost is timed here on the patched text encoder of
MODEL_DIR: a population of 20 candidates x 4 prompts per call, as clip_score.refine sends it. A UNet
candidate evaluation (4 UNet samples + the text encoder at 77 tokens) is in benchmarks/results/speed.md.
"""
import argparse
import time

import numpy as np

import edge_ti
from edge_ti import clip_score, text_encoder as te
from edge_ti.train import OBJECT_TEMPLATES


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--popsize", type=int, default=20)
    args = p.parse_args()
    model = edge_ti.open_model(args.model, threads=args.threads)
    rng = np.random.default_rng(0)
    e0 = model.token_embeddings[model.tokenizer.token_ids("cat")].mean(axis=0)
    prompts = [t.format("<t>") for t in OBJECT_TEMPLATES[:clip_score.TEMPLATES]]
    ids = model.tokenize(prompts, {"<t>": e0[None]})                                 # (K, 77)
    eos = max(int(np.flatnonzero(row == model.tokenizer.eos_id)[0]) for row in ids)
    session = model.text_encoder                                                     # the patched encoder
    table = model.token_embeddings
    rows = []
    for length in (eos + 1, ids.shape[1]):
        candidates = (e0[None, None] + 0.3 * table.std() * rng.standard_normal((args.popsize, 1, table.shape[1])))
        candidates = candidates.astype(np.float32)
        population = te.population_ids(ids[:, :length], model.vocab_size, 1, args.popsize)
        te.encode(session, population, candidates.reshape(args.popsize, -1))         # warm-up
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            te.encode(session, population, candidates.reshape(args.popsize, -1))
            times.append(time.perf_counter() - start)
        rows.append((length, float(np.median(times)) / args.popsize))
    print(f"# {args.model}: {args.popsize} candidates x {len(prompts)} prompts per call, {args.threads} threads, "
          f"median of {args.reps}")
    print("| tokens per prompt | s per CLIP-score evaluation | 2000 evaluations (--clip-refine 2000) |")
    print("|---|---|---|")
    for length, seconds in rows:
        note = " (cut after end-of-text, as clip_score runs it)" if length != ids.shape[1] else " (all 77)"
        print(f"| {length}{note} | {seconds:.4f} | {2000 * seconds:.0f} s |")


if __name__ == "__main__":
    main()

"""The oracle of benchmarks/quality.py (a concept's own caption words as its token), read back per attribute and
per prompt: where a shapes model fails to draw what the benchmark's prompts ask (issue 15).

    python benchmarks/oracle_breakdown.py MODEL_DIR                       # the benchmark's 8 concepts
    python benchmarks/oracle_breakdown.py MODEL_DIR --concept-seed 45     # 8 drawn objects + 8 drawn styles

Each concept's prompts are quality.py's (OBJECT_PROMPTS for objects, STYLE_PROMPT with every shape for styles), each
drawn --images times (DDIM 25, guidance 4, as quality.py's evaluation) and read by the analyzer. Prints the mean
accuracy per concept, then per (kind, attribute) and per prompt. ~1.5 min for the 8 concepts on 2 cores.
"""
import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (the benchmark's concepts, prompts and oracle)


def breakdown(model, concepts, images, seed=5000):
    """-> ({concept: accuracy}, {(kind, attribute): accuracy}, {prompt: accuracy}) of the oracle's generations."""
    from edge_ti.generate import generate
    from edge_ti.shapes.analyzer import analyze
    per_concept, per_attribute, per_prompt = {}, collections.defaultdict(list), collections.defaultdict(list)
    for concept in concepts:
        oracle = model.token_embeddings[model.tokenizer.token_ids(quality.oracle_text(concept))]     # (words, D)
        scores = []
        for k, (prompt, target, _) in enumerate(quality.eval_prompts(concept, 10 ** 6)):   # every prompt once
            for image in generate(model, prompt, {quality.TOKEN: oracle}, steps=25, guidance=4.0, sampler="ddim",
                                  seed=seed + k, n=images):
                read = analyze(image)
                hits = {name: read[name] == value for name, value in target.items()}
                for name, hit in hits.items():
                    per_attribute[(concept.kind, name)].append(hit)
                scores.append(np.mean(list(hits.values())))
                per_prompt[prompt.replace(quality.TOKEN, "X") if concept.kind == "object" else "a {shape} in the "
                           "style of X"].append(scores[-1])
        per_concept[concept.name] = float(np.mean(scores))
    return per_concept, {k: float(np.mean(v)) for k, v in per_attribute.items()}, \
        {k: float(np.mean(v)) for k, v in per_prompt.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="an ONNX shapes model folder (or 'shapes', the shipped one)")
    p.add_argument("--images", type=int, default=16, help="generations per prompt")
    p.add_argument("--concept-seed", type=int, default=None,
                   help="8 objects and 8 styles drawn by this seed (quality.py's drawn_concepts / drawn_styles)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be >= 1")
    import edge_ti
    model = edge_ti.open_model(args.model, threads=args.threads)
    concepts = quality.CONCEPTS if args.concept_seed is None else \
        quality.drawn(args.concept_seed, "object") + quality.drawn(args.concept_seed, "style")
    per_concept, per_attribute, per_prompt = breakdown(model, concepts, args.images)
    print(f"oracle of {args.model}, {args.images} images per prompt")
    for name, acc in per_concept.items():
        print(f"  {name:32s} {acc:.3f}")
    print(f"  {'mean':32s} {np.mean(list(per_concept.values())):.3f}")
    for (kind, name), acc in sorted(per_attribute.items()):
        print(f"  {kind:6s} {name:25s} {acc:.3f}")
    for prompt, acc in per_prompt.items():
        print(f"  {prompt:32s} {acc:.3f}")


if __name__ == "__main__":
    main()

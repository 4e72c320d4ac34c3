"""Where in t the denoising loss tells one attribute of a concept, and how loudly per UNet sample (issue 16).

    python benchmarks/attribute_signal.py MODEL_DIR [--concepts style-striped-white ...] [--triples 512] [--seeds 0 1]

For each concept, its own caption words as the token (quality.py's oracle, "dotted, black background") against the
same words with one attribute's word swapped ("dotted, white background"): both scored on the same fresh images
and triples (quality.py's held-out set: common random numbers, t uniform). Per t bin: the mean loss difference
(wrong - right) in the model's own units, its standard deviation over triples, their ratio (the z of one sample),
and each bin's share of the difference in epsilon units (the search's default) and in the model's. Then the z of
one uniformly drawn sample under each weighting, and with each bin weighted by mean / variance (the best linear
combination of the bins, for this pair). On an epsilon model the two units are one.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (the benchmark's concepts, oracle text and held-out set)

# a word of the same attribute to swap in for each of the world's words (any other value would do)
SWAP = {"background": {"black": "white", "white": "black", "brown": "gray", "gray": "brown"},
        "pattern": {"striped": "dotted", "dotted": "striped", "solid": "dotted"},
        "color": {"cyan": "red", "red": "cyan", "green": "blue", "blue": "green", "yellow": "pink", "pink": "yellow",
                  "purple": "orange", "orange": "purple", "white": "black", "black": "white"},
        "shape": {"triangle": "circle", "star": "cross", "circle": "square", "diamond": "star", "cross": "triangle",
                  "square": "diamond"},
        "size": {"big": "small", "small": "big"}}


def per_triple_losses(model, concept, seed, triples):
    """-> ({variant: caption}, losses [variants, triples] in the model's units, timesteps, alpha_bar_t)."""
    from edge_ti import objective
    from edge_ti.denoiser import Denoiser
    right = quality.oracle_text(concept)
    variants = {"right": right}
    for attribute, value in concept.attributes.items():
        if value in SWAP.get(attribute, {}):
            variants[attribute] = right.replace(value, SWAP[attribute][value], 1)
    ids = {k: model.tokenizer.token_ids(text) for k, text in variants.items()}
    variants = {k: v for k, v in variants.items() if len(ids[k]) == len(ids["right"])}  # one shape of token
    candidates = np.stack([model.token_embeddings[ids[k]] for k in variants])                # (P, n, D)
    latents, prompts, fixed = quality.heldout_set(model, concept, seed, 6, triples)
    denoiser = Denoiser(model)
    losses = np.zeros((len(candidates), triples))
    prompt_ids = model.tokenize(prompts, {quality.TOKEN: candidates[0]})
    for i, residual, _ in objective._residuals(denoiser, candidates, prompt_ids, latents, fixed, None):
        losses[:, i] = (residual.astype(np.float64) ** 2).mean(axis=(1, 2, 3))
    return variants, losses, fixed.timesteps, denoiser.eps_weight(fixed.timesteps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="an ONNX shapes model folder ('shapes': the shipped one)")
    p.add_argument("--concepts", nargs="+", default=[c.name for c in quality.CONCEPTS if c.kind == "style"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--triples", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    known = {c.name: c for c in quality.CONCEPTS}
    unknown = [c for c in args.concepts if c not in known]
    if unknown:
        p.error(f"unknown concept {unknown[0]!r}: choose from {', '.join(known)}")
    if args.triples < 20:
        p.error("--triples must be at least 20 (2 per t bin)")
    import edge_ti
    from edge_ti.errors import EdgeTIError
    try:
        model = edge_ti.open_model(args.model, threads=args.threads)
    except EdgeTIError as error:  # not a model folder, or a broken one: one line, no traceback
        p.error(str(error))
    pairs = {}                                                 # attribute -> [(t, difference, eps factor)]
    for name in args.concepts:
        for seed in args.seeds:
            variants, losses, t, eps = per_triple_losses(model, known[name], seed, args.triples)
            for k, attribute in enumerate(variants):
                if attribute != "right":
                    pairs.setdefault(attribute, []).append((t, losses[k] - losses[0], eps))
            print(f"{name} seed {seed}: " + "; ".join(f"{k} {v!r}" for k, v in variants.items()), flush=True)
    bins = np.linspace(0, int(model.scheduler_config.get("num_train_timesteps", 1000)), 11).astype(int)
    for attribute, parts in pairs.items():
        t, d, eps = (np.concatenate([part[i] for part in parts]) for i in range(3))
        print(f"\n{attribute} swapped ({len(parts)} concept-seeds, {len(t)} triples): loss(wrong) - loss(right)")
        print("| t | mean (model units) | sd | z of one sample | share in eps units | share in model units |")
        print("|---|---|---|---|---|---|")
        z_bins = []
        for lo, hi in zip(bins[:-1], bins[1:]):
            m = (t >= lo) & (t < hi)
            z_bins.append(d[m].mean() / d[m].std())
            print(f"| {lo}-{hi - 1} | {d[m].mean():+.5f} | {d[m].std():.5f} | {z_bins[-1]:+.3f} | "
                  f"{(d[m] * eps[m]).sum() / (d * eps).sum():.2f} | {d[m].sum() / d.sum():.2f} |")
        for label, weight in (("epsilon units (the default)", eps), ("the model's units", np.ones_like(eps)),
                              ("halfway (eps / sqrt(alpha_bar))", np.sqrt(eps))):
            x = d * weight
            print(f"z of one uniformly drawn sample, {label}: {x.mean() / x.std():+.3f}")
        print(f"z of one sample with the bins weighted by mean / variance: {np.sqrt(np.mean(np.square(z_bins))):+.3f}")


if __name__ == "__main__":
    main()

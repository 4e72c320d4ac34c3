"""Does the ideal denoiser's target rank a population better than the sampled one? (issue 16, step 1)

    python benchmarks/posterior_target.py                  # 4 concepts, ~8 min on 2 cores
    python benchmarks/posterior_target.py --concepts 1     # ~2 min

The search scores a candidate by mean((unet(x_t, t, text(e)) - target)^2), target = eps (or v) of the
sampled noise. Over the concept's own latents x0_1..x0_N (drawn uniformly, as edge_ti.train draws them),
the conditional mean of the target given x_t is known in closed form (the "ideal denoiser" of the
empirical distribution; the reference-batch target of Xu et al. 2023, "Stable target field"):

    w_j(x_t)   = softmax_j(-|x_t - sqrt(a_t) x0_j|^2 / (2 (1 - a_t)))          the posterior of x0 = x0_j
    E[x0|x_t]  = sum_j w_j x0_j;   E[eps|x_t] = (x_t - sqrt(a_t) E[x0|x_t]) / sqrt(1 - a_t)

and since the prediction depends on (x_t, t, e) only, E|pred - target|^2 = E|pred - E[target|x_t]|^2 +
a constant: the same objective for every candidate, with the target's own sampling noise removed. This
script scores one population (as signal_per_sample.py draws it: 20 candidates at sigma 0.5 in the pca-16
subspace, around the init word and around a briefly trained token) with both targets on the same
samples and prints each one's agreement with the truth (Spearman of the ranking from k samples with the
ranking on 512 fresh ones, scored with the posterior target; the sampled target's ranking on the same
512 is printed beside it) and the ratio of the per-sample variances of D = E - population mean.
"""
import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import signal_per_sample as sps  # noqa: E402  (its concepts, populations and Spearman)

KINDS = ("init", "trained")


def posterior_target(denoiser, latents, x_t, t):
    """E[target | x_t] over the concept latents [N, C, h, w] drawn uniformly; x_t [S, C, h, w], t [S]."""
    a = denoiser.alphas_bar[np.asarray(t)].astype(np.float64)[:, None]                 # (S, 1)
    x0s = latents.reshape(len(latents), -1).astype(np.float64)                          # (N, F)
    xt = x_t.reshape(len(x_t), -1).astype(np.float64)                                   # (S, F)
    d2 = ((xt[:, None, :] - np.sqrt(a)[:, :, None] * x0s[None]) ** 2).sum(-1)           # (S, N)
    logw = -d2 / (2 * (1 - a))                                                          # q(x_t | x0_j), Ho et al. eq. 4
    w = np.exp(logw - logw.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)                                                   # (S, N) posterior
    x0 = (w @ x0s).reshape(x_t.shape)
    sa, s1 = np.sqrt(a).reshape(-1, 1, 1, 1), np.sqrt(1 - a).reshape(-1, 1, 1, 1)
    eps = (x_t - sa * x0) / s1
    return denoiser.target(x0.astype(np.float32), t, eps.astype(np.float32)), w.max(axis=1)


def error_matrices(denoiser, hidden, latents, t, latent_index, prompt_index, eps):
    """{"sampled", "posterior"} -> squared errors [P, S] in the trainer's units (epsilon-weighted), on
    the same UNet predictions; and the posterior's largest weight per sample [S]."""
    P = hidden.shape[0]
    x0 = latents[latent_index]
    x_t = denoiser.add_noise(x0, t, eps)
    posterior, top = posterior_target(denoiser, latents, x_t, t)
    targets = {"sampled": denoiser.target(x0, t, eps), "posterior": posterior}
    weight = denoiser.eps_weight(t)                                                     # (S,)
    E = {k: np.zeros((P, len(t))) for k in targets}
    for step in np.unique(t):
        cols = np.flatnonzero(t == step)
        n = len(cols)
        sample = np.broadcast_to(x_t[cols][None], (P, n, *x_t.shape[1:])).reshape(P * n, *x_t.shape[1:])
        states = hidden[:, prompt_index[cols]].reshape(P * n, *hidden.shape[2:])
        pred = denoiser.unet(np.ascontiguousarray(sample), float(step), states).reshape(P, n, *x_t.shape[1:])
        for k, target in targets.items():
            E[k][:, cols] = weight[cols] * ((pred - target[cols][None]) ** 2).mean(axis=(2, 3, 4))
    return E, top


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truth", type=int, default=512)
    parser.add_argument("--pool", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--resamples", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.concepts < 1 or args.truth < 2 or args.pool < max(args.ks) or min(args.ks) < 1:
        parser.error("--concepts >= 1, --truth >= 2, every k >= 1 and --pool >= the largest k")

    import edge_ti
    from edge_ti import init as initialization, subspace
    from edge_ti.denoiser import Denoiser
    from edge_ti.train import prompt_templates

    start = time.time()
    model = edge_ti.open_model("shapes", threads=args.threads)
    denoiser = Denoiser(model)
    T = len(denoiser.alphas_bar)
    W = subspace.basis("pca", model.token_embeddings, 16, 0.5)
    templates = [t.format(sps.TOKEN) for t in prompt_templates("object")]
    concepts = sps.draw_concepts(np.random.default_rng(args.seed), args.concepts)
    print(f"# posterior_target.py: {args.concepts} concepts (seed {args.seed}), P=20, sigma 0.5, pca 16, "
          f"truth {args.truth}, pool {args.pool}, {args.resamples} resamples, {args.threads} threads")
    rows = {kind: [] for kind in KINDS}
    for ci, fixed in enumerate(concepts):
        name = sps.concept_name(fixed)
        latents, images = sps.concept_latents(model, fixed, np.random.default_rng([args.seed, ci, 0]))
        e0 = initialization.from_word(model, fixed["shape"], 1)
        prompt_ids = model.tokenize(templates, {sps.TOKEN: e0})
        for kind in KINDS:
            centre = e0 if kind == "init" else sps.trained_centre(model, images, fixed["shape"], 16, 600, args.seed)[0]
            rng = np.random.default_rng([args.seed, ci, 1 + KINDS.index(kind)])
            z = rng.standard_normal((20, 16)) * 0.5
            hidden, _ = denoiser.encode_population(prompt_ids, subspace.embeddings_from_z(centre, W, z))

            def draw(n):
                t = rng.integers(0, T, n)
                li, pi = rng.integers(0, len(latents), n), rng.integers(0, len(templates), n)
                eps = rng.standard_normal((n, *latents.shape[1:]), dtype=np.float32)
                return error_matrices(denoiser, hidden, latents, t, li, pi, eps)

            truth_E, _ = draw(args.truth)
            pool_E, top = draw(args.pool)
            truth = truth_E["posterior"].mean(axis=1)                                    # (P,)
            row = {"sampled truth": float(sps.spearman_rows(truth_E["sampled"].mean(axis=1)[None], truth)[0]),
                   "top weight": float(top.mean())}
            for target, E in pool_E.items():
                D = E - E.mean(axis=0)
                row[target, "var"] = float(D.var(axis=1).mean())
                for k in args.ks:
                    cols = np.stack([rng.choice(args.pool, k, replace=False) for _ in range(args.resamples)])
                    row[target, k] = float(sps.spearman_rows(E[:, cols].mean(axis=2).T, truth).mean())
            rows[kind].append(row)
            print(f"# {name} {kind}: posterior's largest weight {row['top weight']:.3f} (mean over samples); "
                  f"variance of D sampled / posterior {row['sampled', 'var'] / row['posterior', 'var']:.3f}; "
                  f"rho(sampled truth, posterior truth) {row['sampled truth']:+.3f}", flush=True)
    for kind in KINDS:
        print(f"\n### {kind}: agreement with the truth (Spearman), mean over {len(rows[kind])} concepts\n")
        print("| target | " + " | ".join(f"k={k}" for k in args.ks) + " | variance of D |")
        print("|---" * (len(args.ks) + 2) + "|")
        for target in ("sampled", "posterior"):
            print(f"| {target} | " + " | ".join(f"{np.mean([r[target, k] for r in rows[kind]]):.2f}" for k in args.ks)
                  + f" | {np.mean([r[target, 'var'] for r in rows[kind]]):.3e} |")
    print(f"\n# wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()

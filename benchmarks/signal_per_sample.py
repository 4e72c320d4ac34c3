"""Signal per UNet sample: how well a population's ranking from k samples per candidate agrees with its
ranking on many fresh samples, for several ways of drawing and scoring the samples (issue 16, step 1).

    python benchmarks/signal_per_sample.py                     # the default run (4 concepts, ~20 min on 2 cores)
    python benchmarks/signal_per_sample.py --quick             # a smoke run, under a minute
    python benchmarks/signal_per_sample.py --concepts 6 --seed 1 --truth 1024 --pool 512 --ks 4 8 16 32 64

For each population (P candidates e = c + W z, z ~ sigma N(0, I) in the pca subspace of dimension d
around a centre c: the init word, or a token trained briefly with edge_ti.train; `default` and
`defaulttrained`: where the defaults' search starts and where it is after --train-budget evaluations, the
candidates built as edge_ti.train builds them: norm-capped, with the anchor) it computes the
squared error of every candidate on the same samples (latent x0, prompt, timestep t, noise eps), one
UNet call per timestep with the whole population, as edge_ti.objective.population_loss does:

    E[p, i] = mean((unet(x_t(i), t_i, text(prompt_i, candidate p)) - eps_i)^2)          [P, S]

on three sets of samples, drawn independently:
    truth   N iid samples (t uniform): its mean ranks the candidates (the "truth")
    pool    M samples, t on a jittered grid over [0, T) (so strata of t are filled exactly), each with
            its antithetic twin (same x0, prompt, t; noise -eps); and the first M/2 of them again with
            the first prompt template only
Every scoring rule is then evaluated by drawing k pool columns many times (never truth columns) and
taking Spearman's rho of its scores with the truth. Rules:

    uniform          k columns at random, mean (what edge_ti.train does today)
    antithetic       k/2 columns and their twins (antithetic variates: Hammersley & Morton 1956)
    stratified t     one column in each of k equal strata of t (stratified sampling, e.g. Owen,
                     "Monte Carlo theory, methods and examples", ch. 8)
    t in [200, 800)  uniform over the truncated range (biased: another objective)
    IS t             t bucket b drawn with q_b ~ p_b sqrt(E[D^2 | b]) (the variance-optimal proposal for
                     differences, D = error minus the population's mean), mixed 90/10 with uniform,
                     weighted p_b / q_b so the objective stays unbiased; q is measured on the pools of
                     the other concepts (leave-one-concept-out; on the own pool when there is only one)
    min-SNR-5        weight min(SNR_t, 5) / SNR_t, SNR_t = alpha_bar / (1 - alpha_bar), for eps prediction
                     (Hang et al. 2023, "Efficient diffusion training via min-SNR weighting strategy")
    standardized     each sample's errors standardized across the population, then the mean
    ranks            each sample's ranks across the population, then the mean rank
    one template     the first prompt template only (k of its M/2 columns; "many (same columns)" is the
                     uniform rule on the same M/2 draws with their own random templates)
    and combinations.
The "ceiling" column is rho(the rule's objective on all truth columns, the truth): what a biased rule
agrees with at infinitely many samples (up to the truth's own noise, given as its split-half rho).
The variance decomposition splits the per-sample variance of D[p, i] = E[p, i] - mean_q E[q, i]
(what the ranking sees) into t (between buckets of t), latent and prompt (main effects within t
buckets, random-effects one-way ANOVA), the part odd in eps (what antithetic pairs cancel) and the
rest (even in eps, interactions); the signal is the spread of the candidates' true means.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import quality  # noqa: E402  (its concepts are excluded here)

TOKEN = "<c>"
T_BUCKETS = 10          # buckets of t for importance sampling and the per-t tables
GAMMA = 5.0             # min-SNR-gamma
TRUNC = (200, 800)      # the truncated range of t
DEFENSIVE = 0.1         # the uniform share of the IS proposal (a defensive mixture, Hesterberg 1995)


# ---------------------------------------------------------------- concepts and populations
def draw_concepts(rng, count):
    """COUNT object concepts: a shape plus 2 other attributes, drawn by rng; none of quality.py's."""
    from edge_ti.shapes.draw import ATTRIBUTES, sample_attributes
    taken = [c.attributes for c in quality.CONCEPTS]
    others = [a for a in ATTRIBUTES if a != "shape"]
    concepts = []
    while len(concepts) < count:
        full = sample_attributes(rng, exclude=())
        keys = ["shape"] + list(rng.choice(others, 2, replace=False))
        fixed = {k: full[k] for k in keys}
        if fixed not in taken and fixed not in concepts:
            concepts.append(fixed)
    return concepts


def concept_name(fixed):
    return "-".join(fixed[k] for k in sorted(fixed))


def concept_latents(model, fixed, rng, count=6):
    """The concept's images (held-out combinations allowed only if the concept contains them), flipped
    too, encoded: latents [2 count, C, h, w] and the PIL images."""
    from PIL import Image

    from edge_ti import latents as lat
    from edge_ti.shapes import HELD_OUT, concept_images
    exclude = tuple(c for c in HELD_OUT if not all(fixed.get(k) == v for k, v in c.items()))
    images = [Image.fromarray(i) for i in concept_images(count, rng, exclude=exclude, **fixed)]
    return lat.encode_images(model, lat.load_images(images, model.resolution, flip=True)), images


def default_centre(model, images, init_word, seed, budget=20):
    """edge_ti.train with its defaults for BUDGET evaluations (20: one generation, i.e. where its search
    starts): the searched vectors [1, D] of the result (20: e0 after the CLIP refinement, where the model's
    clip/ can score tokens and the held-out loss agrees), the anchor [1, D] (the word's embedding, kept) or None,
    whether the refinement was kept, and the held-out losses (at the start, best)."""
    from edge_ti.train import TrainSettings, train
    with tempfile.TemporaryDirectory() as tmp:
        result = train(model, images, TOKEN, os.path.join(tmp, "c.safetensors"), init_word=init_word,
                       settings=TrainSettings(budget=budget, seed=seed, patience=0), resume="restart")
    searched = result.embedding[TOKEN][:-1] if result.anchor is not None else result.embedding[TOKEN]
    return searched, result.anchor, result.clip_refined, (result.start_heldout, result.best_heldout)


def trained_centre(model, images, init_word, dim, budget, seed):
    """A token trained briefly (edge_ti.train, pca dim DIM, BUDGET evaluations): its embedding [1, D] and
    the held-out losses (init, best) the trainer reports."""
    from edge_ti.train import TrainSettings, train
    with tempfile.TemporaryDirectory() as tmp:
        result = train(model, images, TOKEN, os.path.join(tmp, "c.safetensors"), init_word=init_word,
                       settings=TrainSettings(dim=dim, budget=budget, seed=seed, patience=0, clip_refine=0),
                       resume="restart")
    return result.embedding[TOKEN], result.init_heldout, result.best_heldout


# ---------------------------------------------------------------- the error matrix
def error_matrix(denoiser, hidden, latents, t, latent_index, prompt_index, eps):
    """Squared errors E [P, S] of every candidate on S samples; hidden [P, K, 77, D] text states,
    t, latent_index, prompt_index [S], eps [S, C, h, w]. One UNet call (split by the denoiser's cap)
    per distinct timestep, with the whole population's samples at it."""
    P = hidden.shape[0]
    x0 = latents[latent_index]                                           # (S, C, h, w)
    x_t = denoiser.add_noise(x0, t, eps)                                 # (S, C, h, w)
    target = denoiser.target(x0, t, eps)                                 # (S, C, h, w)
    E = np.zeros((P, len(t)))
    for step in np.unique(t):
        cols = np.flatnonzero(t == step)                                 # (n,)
        n = len(cols)
        sample = np.broadcast_to(x_t[cols][None], (P, n, *x_t.shape[1:])).reshape(P * n, *x_t.shape[1:])
        states = hidden[:, prompt_index[cols]].reshape(P * n, *hidden.shape[2:])    # (P n, 77, D)
        pred = denoiser.unet(np.ascontiguousarray(sample), float(step), states)     # (P n, C, h, w)
        err = (pred.reshape(P, n, *x_t.shape[1:]) - target[cols][None]) ** 2        # (P, n, C, h, w)
        E[:, cols] = err.mean(axis=(2, 3, 4))
    return E


def measure_population(denoiser, hidden, latents, n_prompts, T, rng, n_truth, n_pool):
    """The truth and pool error matrices of one population (see the module docstring)."""
    shape = latents.shape[1:]
    # truth: iid samples, uniform t
    tt = rng.integers(0, T, n_truth)
    tl, tp = rng.integers(0, len(latents), n_truth), rng.integers(0, n_prompts, n_truth)
    te = rng.standard_normal((n_truth, *shape), dtype=np.float32)
    truth = error_matrix(denoiser, hidden, latents, tt, tl, tp, te)     # (P, N)
    # pool: t on a jittered grid, continuous tc for the strata, integer t for the UNet
    tc = (np.arange(n_pool) + rng.random(n_pool)) * T / n_pool           # (M,) sorted, one per cell
    pt = np.minimum(tc.astype(int), T - 1)
    pl, pp = rng.integers(0, len(latents), n_pool), rng.integers(0, n_prompts, n_pool)
    pe = rng.standard_normal((n_pool, *shape), dtype=np.float32)
    E = error_matrix(denoiser, hidden, latents, pt, pl, pp, pe)          # (P, M)
    Em = error_matrix(denoiser, hidden, latents, pt, pl, pp, -pe)        # (P, M) antithetic twins
    half = np.arange(0, n_pool, 2)                                       # every other column: t still spread
    E1 = error_matrix(denoiser, hidden, latents, pt[half], pl[half], np.zeros(len(half), int), pe[half])
    return dict(truth=truth, truth_t=tt, truth_latent=tl, truth_prompt=tp,
                E=E, Em=Em, E1=E1, half=half, tc=tc, t=pt, latent=pl, prompt=pp)


# ---------------------------------------------------------------- scoring rules
def min_snr_weight(alphas_bar, t):
    snr = alphas_bar[t] / (1 - alphas_bar[t])                           # (S,)
    return np.minimum(snr, GAMMA) / snr


def standardize(A):
    """Per sample (column): errors minus the population's mean, over its std."""
    return (A - A.mean(0, keepdims=True)) / (A.std(0, keepdims=True) + 1e-12)


def column_ranks(A):
    return np.argsort(np.argsort(A, axis=0), axis=0).astype(float)      # (P, S)


def bucket_of(tc, T):
    return np.minimum((tc * T_BUCKETS / T).astype(int), T_BUCKETS - 1)


def is_proposal(profiles):
    """q [B] from per-bucket RMS profiles (each normalised to sum 1): q_b ~ p_b rms_b, mixed with uniform."""
    rms = np.mean([p / p.sum() for p in profiles], axis=0)              # (B,)
    q = rms / rms.sum()
    return (1 - DEFENSIVE) * q + DEFENSIVE / T_BUCKETS


def rms_profile(pool, T):
    D = pool["E"] - pool["E"].mean(0, keepdims=True)                    # (P, M)
    b = bucket_of(pool["tc"], T)
    return np.array([np.sqrt((D[:, b == j] ** 2).mean()) for j in range(T_BUCKETS)])


def draw_uniform(rng, allowed, k, R):
    """R draws of k distinct columns from ALLOWED: indices [R, k]."""
    keys = rng.random((R, len(allowed)))
    return allowed[np.argsort(keys, axis=1)[:, :k]]


def draw_strata(rng, tc, T, k, R):
    """R draws of one column in each of k equal strata of t: indices [R, k]."""
    stratum = np.minimum((tc * k / T).astype(int), k - 1)
    idx = np.empty((R, k), int)
    for j in range(k):
        members = np.flatnonzero(stratum == j)
        idx[:, j] = members[rng.integers(0, len(members), R)]
    return idx


def draw_is(rng, tc, T, q, k, R):
    """R draws of k columns, bucket b with probability q_b, a random column in it: indices, weights [R, k]."""
    b_of = bucket_of(tc, T)
    buckets = rng.choice(T_BUCKETS, size=(R, k), p=q)                   # (R, k)
    idx = np.empty((R, k), int)
    for j in range(T_BUCKETS):
        members = np.flatnonzero(b_of == j)
        at = buckets == j
        idx[at] = members[rng.integers(0, len(members), at.sum())]
    return idx, (1.0 / T_BUCKETS) / q[buckets]                          # p_b / q_b


def rule_scores(rule, pool, k, R, rng, ctx):
    """Scores [R, P] of the rule from R draws of k samples per candidate (lower is better)."""
    E, Em, tc, T = pool["E"], pool["Em"], pool["tc"], ctx["T"]
    M = E.shape[1]
    every = np.arange(M)
    mean_of = lambda A, idx, w=None: (A[:, idx] * (1 if w is None else w)).mean(-1).T  # noqa: E731  (R, P)
    anti = lambda idx, w=None: (mean_of(E, idx, w) + mean_of(Em, idx, w)) / 2          # noqa: E731
    if rule == "uniform":
        return mean_of(E, draw_uniform(rng, every, k, R))
    if rule == "antithetic":
        return anti(draw_uniform(rng, every, k // 2, R))
    if rule == "stratified t":
        return mean_of(E, draw_strata(rng, tc, T, k, R))
    if rule == "t in [200, 800)":
        return mean_of(E, draw_uniform(rng, np.flatnonzero((pool["t"] >= TRUNC[0]) & (pool["t"] < TRUNC[1])), k, R))
    if rule == "IS t":
        return mean_of(E, *draw_is(rng, tc, T, ctx["q"], k, R))
    if rule == "min-SNR-5":
        idx = draw_uniform(rng, every, k, R)
        return mean_of(E, idx, ctx["w_snr"][idx])
    if rule == "standardized":
        return mean_of(ctx["Z"], draw_uniform(rng, every, k, R))
    if rule == "ranks":
        return mean_of(ctx["ranks"], draw_uniform(rng, every, k, R))
    if rule == "many templates (same columns)":
        return mean_of(E[:, pool["half"]], draw_uniform(rng, np.arange(len(pool["half"])), k, R))
    if rule == "one template":
        return mean_of(pool["E1"], draw_uniform(rng, np.arange(len(pool["half"])), k, R))
    if rule == "stratified + antithetic":
        return anti(draw_strata(rng, tc, T, k // 2, R))
    if rule == "IS + antithetic":
        return anti(*draw_is(rng, tc, T, ctx["q"], k // 2, R))
    if rule == "standardized + stratified + antithetic":
        idx = draw_strata(rng, tc, T, k // 2, R)
        return (mean_of(ctx["Z"], idx) + mean_of(ctx["Zm"], idx)) / 2
    raise ValueError(rule)


RULES = ["uniform", "antithetic", "stratified t", "t in [200, 800)", "IS t", "min-SNR-5", "standardized", "ranks",
         "many templates (same columns)", "one template", "stratified + antithetic", "IS + antithetic",
         "standardized + stratified + antithetic"]


def full_objective(rule, pool, ctx):
    """The rule's objective on all truth columns [P] (for the ceiling column), or None (template rules:
    the truth set has no one-template columns)."""
    A, t = pool["truth"], pool["truth_t"]
    if rule in ("t in [200, 800)",):
        return A[:, (t >= TRUNC[0]) & (t < TRUNC[1])].mean(1)
    if rule == "min-SNR-5":
        return (A * ctx["w_snr_truth"]).mean(1)
    if rule.startswith("standardized"):
        return standardize(A).mean(1)
    if rule == "ranks":
        return column_ranks(A).mean(1)
    if rule in ("one template", "many templates (same columns)"):
        return None
    return A.mean(1)                                                     # unbiased rules


def spearman_rows(scores, truth):
    """Spearman's rho of each row of scores [R, P] with truth [P]: [R]."""
    r = np.argsort(np.argsort(scores, axis=1), axis=1).astype(float)     # (R, P)
    s = np.argsort(np.argsort(truth)).astype(float)                      # (P,)
    r -= r.mean(1, keepdims=True)
    s -= s.mean()
    return (r @ s) / (np.sqrt((r ** 2).sum(1)) * np.sqrt((s ** 2).sum()))


def split_half(truth, rng, reps=100):
    """Mean rho between the truth's rankings on two random halves of its columns."""
    N = truth.shape[1]
    out = []
    for _ in range(reps):
        perm = rng.permutation(N)
        out.append(spearman_rows(truth[:, perm[:N // 2]].mean(1)[None], truth[:, perm[N // 2:]].mean(1))[0])
    return float(np.mean(out))


# ---------------------------------------------------------------- variance decomposition
def between_variance(x, groups):
    """The variance of the true group means of x [S] over groups (weighted by size), debiased by the
    within-group variance: sum_g n_g/N (m_g - m)^2 - (G - 1)/N * s_w^2."""
    labels, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    N, G = len(x), len(labels)
    means = np.bincount(inverse, x) / counts                            # (G,)
    within = ((x - means[inverse]) ** 2).sum() / max(N - G, 1)
    between = (counts / N * (means - x.mean()) ** 2).sum() - (G - 1) / N * within
    return between, x - means[inverse]


def decompose(pool, T):
    """Shares of the per-sample variance of D = E - population mean (averaged over candidates) due to t,
    latent, prompt, the part odd in eps and the rest; and the signal's variance in the same units."""
    E, Em = pool["E"], pool["Em"]
    D = E - E.mean(0, keepdims=True)                                     # (P, M)
    Dm = Em - Em.mean(0, keepdims=True)                                  # (P, M)
    b = bucket_of(pool["tc"], T)
    parts = {"t": [], "latent": [], "prompt": [], "eps odd": [], "rest": []}
    total = []
    for p in range(len(D)):
        x = D[p]
        v = x.var()
        v_t, r = between_variance(x, b)                                  # r: within t buckets
        v_l, _ = between_variance(r, pool["latent"])
        v_p, _ = between_variance(r, pool["prompt"])
        v_odd = ((D[p] - Dm[p]) / 2).var()                               # what (eps, -eps) pairs cancel
        total.append(v)
        for name, val in (("t", v_t), ("latent", v_l), ("prompt", v_p), ("eps odd", v_odd)):
            parts[name].append(val)
        parts["rest"].append(v - v_t - v_l - v_p - v_odd)
    V = float(np.mean(total))
    truth = pool["truth"]
    Dt = truth - truth.mean(0, keepdims=True)                            # (P, N)
    signal = float(Dt.mean(1).var() - Dt.var(1).mean() / Dt.shape[1])   # debiased spread of true means
    shares = {k: float(np.mean(v)) / V for k, v in parts.items()}
    return shares, V, signal


def per_bucket(pool, T):
    """Per t bucket: mean loss, noise (rms std of D), signal (debiased rms over candidates of D's bucket
    mean), signal/noise per sample, rho(bucket's candidate means, truth)."""
    E = pool["E"]
    D = E - E.mean(0, keepdims=True)                                     # (P, M)
    b = bucket_of(pool["tc"], T)
    truth = pool["truth"].mean(1)
    rows = []
    for j in range(T_BUCKETS):
        cols = b == j
        m = D[:, cols].mean(1)                                           # (P,)
        noise2 = D[:, cols].var(1).mean()
        signal2 = max((m ** 2).mean() - noise2 / cols.sum(), 0.0)
        rows.append(dict(loss=E[:, cols].mean(), noise=np.sqrt(noise2), signal=np.sqrt(signal2),
                         snr=np.sqrt(signal2 / noise2), rho=spearman_rows(E[:, cols].mean(1)[None], truth)[0]))
    return rows


# ---------------------------------------------------------------- tables
def equivalent_k(value, ks, uniform):
    """The k at which the uniform rule's mean rho reaches VALUE (log-linear in k), as a string."""
    if value < uniform[0]:
        return f"<{ks[0]}"
    if value > uniform[-1]:
        return f">{ks[-1]}"
    for j in range(len(ks) - 1):
        lo, hi = uniform[j], uniform[j + 1]
        if lo <= value <= hi and hi > lo:
            f = (value - lo) / (hi - lo)
            return f"{np.exp(np.log(ks[j]) + f * (np.log(ks[j + 1]) - np.log(ks[j]))):.0f}"
    return "?"


def print_tables(kind, results, ks, T):
    names = list(results)
    print(f"\n### {kind}: agreement with the truth (Spearman), mean over {len(names)} concepts (min-max)\n")
    print("| rule | " + " | ".join(f"k={k}" for k in ks) + " | ceiling |")
    print("|---|" + "---|" * (len(ks) + 1))
    means = {}
    for rule in RULES:
        per = np.array([[results[n]["rho"][rule][k] for k in ks] for n in names])  # (concepts, ks)
        means[rule] = per.mean(0)
        cells = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in zip(per.mean(0), per.min(0), per.max(0))]
        ceil = [results[n]["ceiling"][rule] for n in names]
        cells.append("-" if ceil[0] is None else f"{np.mean(ceil):.2f}")
        print(f"| {rule} | " + " | ".join(cells) + " |")
    print(f"\ntruth split-half rho (each half {results[names[0]]['n_truth'] // 2} samples): "
          + ", ".join(f"{n} {results[n]['split_half']:.2f}" for n in names))
    print(f"\n### {kind}: the uniform samples each rule is worth (k at which uniform reaches the rule's mean rho)\n")
    print("| rule | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for rule in RULES:
        print(f"| {rule} | " + " | ".join(equivalent_k(v, ks, means["uniform"]) for v in means[rule]) + " |")
    print(f"\n### {kind}: variance of D = E - population mean per sample, shares (mean over concepts; min-max)\n")
    keys = ["t", "latent", "prompt", "eps odd", "rest"]
    print("| " + " | ".join(keys) + " | samples for signal = noise |")
    print("|" + "---|" * (len(keys) + 1))
    sh = np.array([[results[n]["shares"][k] for k in keys] for n in names])  # (concepts, 5)
    need = np.array([results[n]["V"] / max(results[n]["signal"], 1e-30) for n in names])
    print("| " + " | ".join(f"{m:.3f} ({lo:.3f}-{hi:.3f})" for m, lo, hi in zip(sh.mean(0), sh.min(0), sh.max(0)))
          + f" | {np.median(need):.0f} (median; {need.min():.0f}-{need.max():.0f}) |")
    print(f"\n### {kind}: per t bucket (pool columns; mean over concepts)\n")
    print("| t | mean loss | noise (std of D) | signal (rms mean D) | signal/noise | rho(bucket, truth) | IS q |")
    print("|---|---|---|---|---|---|---|")
    for j in range(T_BUCKETS):
        row = {key: np.mean([results[n]["buckets"][j][key] for n in names])
               for key in ("loss", "noise", "signal", "snr", "rho")}
        q = np.mean([results[n]["q"][j] for n in names])
        lo = j * T // T_BUCKETS
        print(f"| {lo}-{lo + T // T_BUCKETS - 1} | {row['loss']:.4f} | {row['noise']:.2e} | {row['signal']:.2e} | "
              f"{row['snr']:.3f} | {row['rho']:+.2f} | {q:.3f} |")
    spread = [results[n]["rel_spread"] for n in names]
    print("\ntruth: candidates' mean losses differ by (max-min)/mean = "
          + ", ".join(f"{s:.2%}" for s in spread))


# ---------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=4, help="concepts drawn by the seeded generator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--populations", nargs="+", default=["init:16", "init:64", "trained:16"],
                        help="CENTRE:DIM, centre init (the shape word), trained (edge_ti.train, pca DIM), default "
                             "(where the defaults' search starts: CLIP-refined, anchored, norm-capped as train does) "
                             "or defaulttrained (the defaults after --train-budget evaluations)")
    parser.add_argument("--popsize", "-P", type=int, default=20)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--truth", type=int, default=512, help="fresh samples for the truth ranking")
    parser.add_argument("--pool", type=int, default=256, help="pool samples (each with its antithetic twin)")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--resamples", type=int, default=400)
    parser.add_argument("--train-budget", type=int, default=600, help="evaluations of the brief training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 concept, small sets: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.concepts, args.truth, args.pool, args.ks, args.resamples = 1, 48, 32, [4, 8], 100
        args.populations, args.train_budget = ["init:16", "trained:16"], 40
    assert all(k % 2 == 0 and k <= args.pool // 2 and args.pool % k == 0 for k in args.ks), \
        "each k must be even, divide the pool size and be at most half of it"

    import edge_ti
    from edge_ti import init as initialization, subspace
    from edge_ti.denoiser import Denoiser
    from edge_ti.train import prompt_templates

    start = time.time()
    model = edge_ti.open_model("shapes", threads=args.threads)
    denoiser = Denoiser(model)
    table = model.token_embeddings                                       # (V, D)
    T = len(denoiser.alphas_bar)
    templates = [t.format(TOKEN) for t in prompt_templates("object")]
    concepts = draw_concepts(np.random.default_rng(args.seed), args.concepts)
    print(f"# signal_per_sample.py: {args.concepts} concepts (seed {args.seed}), P={args.popsize}, sigma {args.sigma}, "
          f"truth {args.truth}, pool {args.pool} (+ twins, + {args.pool // 2} one-template), "
          f"{args.resamples} resamples, {len(templates)} templates, {args.threads} threads")
    print("# concepts: " + ", ".join(concept_name(c) for c in concepts), flush=True)

    pools = {}                                                           # (kind, concept) -> pool
    for ci, fixed in enumerate(concepts):
        name = concept_name(fixed)
        latents, images = concept_latents(model, fixed, np.random.default_rng([args.seed, ci, 0]))
        e0 = initialization.from_word(model, fixed["shape"], 1)          # (1, D)
        prompt_ids = model.tokenize(templates, {TOKEN: e0})              # (K, 77)
        trained = {}
        for kind in args.populations:
            centre, dim = kind.split(":")
            dim = min(int(dim), table.shape[1])
            W = subspace.basis("pca", table, dim, args.sigma)           # (D, dim)
            anchor, max_norm, ids = None, None, prompt_ids
            if centre in ("default", "defaulttrained"):
                budget = 20 if centre == "default" else args.train_budget
                c, anchor, refined, (h0, h1) = default_centre(model, images, fixed["shape"], args.seed, budget)
                max_norm = subspace.max_row_norm(table)
                ids = model.tokenize(templates, {TOKEN: subspace.with_anchor(c[None], anchor)[0]})
                print(f"# {name} {kind}: the defaults after {budget} evaluations: CLIP refinement "
                      f"{'kept' if refined else 'refused'}, "
                      f"{'anchored to ' + repr(fixed['shape']) if anchor is not None else 'no anchor'}, "
                      f"held-out loss {h0:.5f} -> {h1:.5f}, norm cap {max_norm:.3f}", flush=True)
            elif centre == "trained":
                if dim not in trained:
                    t0 = time.time()
                    trained[dim] = trained_centre(model, images, fixed["shape"], dim, args.train_budget, args.seed)
                    e, h0, h1 = trained[dim]
                    print(f"# {name}: trained centre (dim {dim}, {args.train_budget} evaluations, "
                          f"{time.time() - t0:.0f} s): held-out loss {h0:.5f} -> {h1:.5f} ({h1 / h0 - 1:+.2%})",
                          flush=True)
                c = trained[dim][0]
            else:
                c = e0
            rng = np.random.default_rng([args.seed, ci, 1 + args.populations.index(kind)])
            z = rng.standard_normal((args.popsize, dim)) * args.sigma   # (P, dim)
            candidates = subspace.embeddings_from_z(c, W, z, max_norm, anchor)                     # (P, n, D)
            hidden, _ = denoiser.encode_population(ids, candidates)                                   # (P, K, 77, D)
            t0 = time.time()
            pools[kind, name] = measure_population(denoiser, hidden, latents, len(templates), T, rng,
                                                   args.truth, args.pool)
            samples = args.popsize * (args.truth + 2 * args.pool + args.pool // 2)
            print(f"# {name} {kind}: {samples} UNet samples in {time.time() - t0:.0f} s", flush=True)

    # every rule on every population, from the same error matrices
    for kind in args.populations:
        results = {}
        for ci, fixed in enumerate(concepts):
            name = concept_name(fixed)
            pool = pools[kind, name]
            others = [rms_profile(pools[kind, concept_name(f)], T) for f in concepts if f is not fixed]
            q = is_proposal(others or [rms_profile(pool, T)])
            ctx = dict(T=T, q=q, w_snr=min_snr_weight(denoiser.alphas_bar, pool["t"]),
                       w_snr_truth=min_snr_weight(denoiser.alphas_bar, pool["truth_t"]),
                       Z=standardize(pool["E"]), Zm=standardize(pool["Em"]), ranks=column_ranks(pool["E"]))
            truth = pool["truth"].mean(1)                               # (P,)
            rng = np.random.default_rng([args.seed, ci, 99])
            rho = {rule: {k: float(spearman_rows(rule_scores(rule, pool, k, args.resamples, rng, ctx), truth).mean())
                          for k in args.ks} for rule in RULES}
            ceiling = {}
            for rule in RULES:
                obj = full_objective(rule, pool, ctx)
                ceiling[rule] = None if obj is None else float(spearman_rows(obj[None], truth)[0])
            shares, V, signal = decompose(pool, T)
            results[name] = dict(rho=rho, ceiling=ceiling, shares=shares, V=V, signal=signal,
                                 buckets=per_bucket(pool, T), q=q, n_truth=args.truth,
                                 split_half=split_half(pool["truth"], rng),
                                 rel_spread=float((truth.max() - truth.min()) / truth.mean()))
        print_tables(kind, results, args.ks, T)
    if len(concepts) == 1:
        print("\n(one concept: the IS proposal was measured on the population's own pool)")
    print(f"\n# wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()

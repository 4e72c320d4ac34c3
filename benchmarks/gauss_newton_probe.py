"""The Gauss-Newton probe: the loop that chose gauss-newton's design before it went into edge_ti (issue 16).

    python benchmarks/gauss_newton_probe.py '{"iters": 64, "checkpoints": [16, 32, 64], "concepts": 4, "seeds": [0],
                                              "mode": "online", "k": 8, "N": 4, "lam": 1.0, "radius": 1000}'

Its own loop (not edge_ti.train), on benchmarks/optimizers.py's concepts (--concept-seed 11, none of
quality.py's eight), judged as optimizers.py judges (fresh images, 256 fixed triples, relative change
from the init word's loss). Per iteration: the point z and k probes z + h u_j (u random orthonormal,
or the pca axes in turn with "directions": "axes"), scored on N triples with objective.population_gram;
J^T J and J^T r from the Gram matrix (edge_ti/gauss_newton.py's docstring). Then, with "mode":
    plain    one damped Gauss-Newton step in the probes' span, ridge lam x mean curvature, |step| <= radius
    online   the minimum of all iterations' models summed (gamma < 1: older ones forgotten), ridge
             lam x the first iteration's mean curvature (what edge_ti.gauss_newton does with gamma 1,
             radius off), optionally |z| <= ball, and |step| <= radius
Every 2 iterations z is scored on 32 held-out triples of the training images; a checkpoint reports the
best z so held out (CUR=1: the current z) -- unlike train(), the init is not among the candidates, so a
run whose every point is worse than the init reports a loss above the init's. "samples" counts UNet
samples: (k + 1) N per iteration + 32 per held-out check. DBG=1 prints every step.
"""
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import optimizers as ob  # noqa: E402

import edge_ti  # noqa: E402
from edge_ti import latents as lat, objective, subspace  # noqa: E402
from edge_ti.denoiser import Denoiser  # noqa: E402
from edge_ti.init import from_word  # noqa: E402
from edge_ti.shapes import HELD_OUT, concept_images  # noqa: E402
from edge_ti.train import OBJECT_TEMPLATES, TrainSettings, search_space  # noqa: E402
from PIL import Image  # noqa: E402

cfg_debug = os.environ.get("DBG")

def gn_run(model, fixed, init_word, seed, k=8, N=8, h=0.25, lam=0.1, lr=1.0, dim=64, radius=1.0, iters=20,
           directions="random", checkpoints=(), mode="plain", gamma=1.0, ball=None):
    SH = None
    rng = np.random.default_rng([seed, 1])
    exclude = tuple(c for c in HELD_OUT if not all(fixed.get(kk) == v for kk, v in c.items()))
    images = [Image.fromarray(i) for i in concept_images(6, rng, exclude=exclude, **fixed)]
    latents = lat.encode_images(model, lat.load_images(images, model.resolution, flip=True))
    e0 = from_word(model, init_word)
    table = model.token_embeddings
    _, _, W, max_norm = search_space(table, TrainSettings(dim=dim))
    prompts = [t.format("<c>") for t in OBJECT_TEMPLATES]
    pid = model.tokenize(prompts, {"<c>": e0})
    den = Denoiser(model)
    T = 1000
    def triples(key, count):
        r = np.random.default_rng([seed, 7, key])
        tr = objective.draw_triples(r, count, len(latents), len(prompts), T, latents.shape[1:])
        tr.weight = den.eps_weight(tr.timesteps)
        return tr
    heldout = triples(10**6, 32)
    z = np.zeros(dim)
    drng = np.random.default_rng([seed, 3])
    samples = 0; out = []; best = (np.inf, z.copy())
    start = time.perf_counter()
    for it in range(iters):
        if directions == "random":
            U, _ = np.linalg.qr(drng.standard_normal((dim, k)))
        else:
            idx = [(it * k + j) % dim for j in range(k)]
            U = np.eye(dim)[:, idx]
        zs = np.vstack([z, z + h * U.T])
        candidates = subspace.embeddings_from_z(e0, W, zs, max_norm)
        G = objective.population_gram(den, candidates, pid, latents, triples(it, N))
        samples += len(zs) * N
        D = G[1:, 1:] - G[1:, :1] - G[:1, 1:] + G[0, 0]
        A = D / h**2
        b = (G[1:, 0] - G[0, 0]) / h
        if mode == "online":
            H, g = U @ A @ U.T, U @ b
            if SH is None:
                SH, Sv, prior = np.zeros((dim, dim)), np.zeros(dim), lam * np.trace(A) / k
            SH, Sv = gamma * SH + H, gamma * Sv + H @ z - g
            target = np.linalg.solve(SH + prior * np.eye(dim), Sv)
            if ball:
                ev, V = np.linalg.eigh(SH)
                c = V.T @ Sv
                zl = lambda ridge: V @ (c / (ev + ridge))  # noqa: E731
                lo, hi = prior, prior
                if np.linalg.norm(zl(prior)) > ball:
                    while np.linalg.norm(zl(hi)) > ball:
                        hi *= 2
                    for _ in range(60):
                        mid = np.sqrt(lo * hi)
                        lo, hi = (mid, hi) if np.linalg.norm(zl(mid)) > ball else (lo, mid)
                    target = zl(hi)
            step = lr * (target - z)
            n = np.linalg.norm(step)
            if n > radius:
                step *= radius / n
            damp = prior
        else:
            A_use = A
            damp = lam * np.trace(A_use) / k
            delta = -np.linalg.solve(A_use + damp * np.eye(k), b) * lr
            step = U @ delta
            n = np.linalg.norm(step)
            if n > radius:
                step *= radius / n
        if cfg_debug:
            print(f"  it {it} |step| {n:.2f} predicted decrease {b @ np.linalg.solve(A + damp * np.eye(k), b):.2e} "
                  f"L0 {G[0, 0]:.4f} |z| {np.linalg.norm(z):.2f} cond {np.linalg.cond(A):.1e}")
        z = z + step
        if (it + 1) % 2 == 0 or it + 1 == iters:
            hl = objective.population_loss(den, subspace.embeddings_from_z(e0, W, z[None], max_norm), pid, latents,
                                           heldout)[0]
            samples += 32
            if hl < best[0]:
                best = (hl, z.copy())
            if cfg_debug:
                print(f"  it {it + 1} heldout {hl:.5f} |z| {np.linalg.norm(z):.1f}")
        if it + 1 in checkpoints:
            reported = z if os.environ.get("CUR") else best[1]
            out.append((it + 1, samples, subspace.embeddings_from_z(e0, W, reported[None], max_norm)[0]))
    return out, e0, time.perf_counter() - start

if __name__ == "__main__":
    cfg = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    model = edge_ti.open_model("shapes")
    concepts, name_of = ob.draw_concepts(11, cfg.pop("concepts", 2))
    only = cfg.pop("only", None)
    if only is not None:
        concepts = [concepts[i] for i in only]
    seeds = cfg.pop("seeds", [0])
    res = []
    for fixed in concepts:
        for seed in seeds:
            out, e0, secs = gn_run(model, fixed, fixed["shape"], seed, **cfg)
            changes = ob.judge(model, fixed, seed, e0, [e for _, _, e in out])
            for (it, s, _), c in zip(out, changes):
                res.append((name_of(fixed), seed, it, s, c))
                print(f"{name_of(fixed)} s{seed} iter {it} samples {s} judged {c*100:.2f}%  ({secs:.0f}s)", flush=True)
    its = sorted(set(r[2] for r in res))
    for it in its:
        sel = [r for r in res if r[2] == it]
        print(f"ITER {it}: samples {np.mean([r[3] for r in sel]):.0f} judged {np.mean([r[4] for r in sel])*100:.2f}%")

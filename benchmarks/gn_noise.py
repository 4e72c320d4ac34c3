"""Is the gradient noise of gauss-newton's probes what its weighting assumes? (issue 16)

    python benchmarks/gn_noise.py [--concepts 4] [--triples 128] [--k 8] [--h 0.25]

edge_ti/gauss_newton.py sums every generation's local model, gradients g_s = J^T r_0 and curvatures
A_s = J^T J with equal weight: the recursive least squares that is the best linear estimate of the
minimum when the noise of b = J^T r_0 has covariance proportional to A (white residual noise:
Cov(J^T r) = sigma^2 J^T J). Then a prior per direction "from the measured noise" (gauss_newton.md's
open idea) has nothing to add. This measures it: around the init word's embedding (z = 0, the pca
subspace of the trainer's defaults) and k random orthonormal probes at distance h, each triple's
b_i and A_i (from objective.triple_grams) for many triples of the trainer's distribution; then
    C  = Cov_i(b_i)              the gradient's noise covariance per triple (k x k)
    M  = mean_i(s_i^2 A_i)       what white noise predicts, s_i^2 = each triple's mean squared residual
and how far C is from a multiple of M: the best c in C ~ c M (least squares on all entries) and the
relative Frobenius misfit |C - c M| / |C|, with the same misfit for a multiple of the identity
(noise that ignores the curvature) beside it; and the signal-to-noise of the mean gradient per probe,
|mean_i b_i| / (sd_i(b_i) / sqrt(n)), at n = 4 (one generation) and n = all triples.
Concepts: benchmarks/optimizers.py's (--concept-seed 11, none of quality.py's eight).
"""
import argparse
import os
import sys

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


def misfit(C, M):
    """(c, |C - c M|_F / |C|_F) for the least-squares multiple c of M."""
    c = float((C * M).sum() / (M * M).sum())
    return c, float(np.linalg.norm(C - c * M) / np.linalg.norm(C))


def measure(model, fixed, seed, triples_count, k, h):
    rng = np.random.default_rng([seed, 1])
    exclude = tuple(c for c in HELD_OUT if not all(fixed.get(key) == v for key, v in c.items()))
    images = [Image.fromarray(i) for i in concept_images(6, rng, exclude=exclude, **fixed)]
    latents = lat.encode_images(model, lat.load_images(images, model.resolution, flip=True))
    e0 = from_word(model, fixed["shape"])
    dim, _, W, max_norm = search_space(model.token_embeddings, TrainSettings())
    prompts = [t.format("<c>") for t in OBJECT_TEMPLATES]
    prompt_ids = model.tokenize(prompts, {"<c>": e0})
    denoiser = Denoiser(model)
    triples = objective.draw_triples(np.random.default_rng([seed, 7]), triples_count, len(latents), len(prompts),
                                     1000, latents.shape[1:])
    triples.weight = denoiser.eps_weight(triples.timesteps)          # the trainer's epsilon-unit weighting
    U, _ = np.linalg.qr(np.random.default_rng([seed, 3]).standard_normal((dim, k)))
    zs = np.vstack([np.zeros(dim), h * U.T])
    grams = objective.triple_grams(denoiser, subspace.embeddings_from_z(e0, W, zs, max_norm), prompt_ids,
                                   latents, triples)                   # (T, k+1, k+1)
    A = (grams[:, 1:, 1:] - grams[:, 1:, :1] - grams[:, :1, 1:] + grams[:, :1, :1]) / h ** 2   # (T, k, k)
    b = (grams[:, 1:, 0] - grams[:, :1, 0]) / h                                                 # (T, k)
    C = np.cov(b, rowvar=False)                                                                 # (k, k)
    M = (grams[:, 0, 0][:, None, None] * A).mean(axis=0)                                        # (k, k)
    c_white, fit_white = misfit(C, M)
    _, fit_identity = misfit(C, np.eye(k))
    sd = b.std(axis=0, ddof=1)
    snr = lambda n: np.abs(b.mean(axis=0)) / (sd / np.sqrt(n))  # noqa: E731
    return {"fit_white": fit_white, "c_white": c_white, "fit_identity": fit_identity,
            "fit_mean_A": misfit(C, A.mean(axis=0))[1], "snr4": float(np.median(snr(4))),
            "snr_all": float(np.median(snr(len(b)))), "corr_diag": float(np.corrcoef(np.diag(C), np.diag(M))[0, 1])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--triples", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--h", type=float, default=0.25)
    args = parser.parse_args()
    model = edge_ti.open_model("shapes")
    concepts, name_of = ob.draw_concepts(11, args.concepts)
    print(f"# {' '.join(sys.argv)}")
    print("| concept | seed | misfit to c x mean(s^2 A) (white noise) | c | misfit to c x mean(A) "
          "| misfit to c x I | corr. of diagonals | median SNR per probe, 4 triples | ..., all |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for fixed in concepts:
        for seed in args.seeds:
            r = measure(model, fixed, seed, args.triples, args.k, args.h)
            rows.append(r)
            print(f"| {name_of(fixed)} | {seed} | {r['fit_white']:.2f} | {r['c_white']:.2f} | {r['fit_mean_A']:.2f} "
                  f"| {r['fit_identity']:.2f} | {r['corr_diag']:.2f} | {r['snr4']:.2f} | {r['snr_all']:.2f} |",
                  flush=True)
    mean = {key: np.mean([r[key] for r in rows]) for key in rows[0]}
    print(f"| mean | | {mean['fit_white']:.2f} | {mean['c_white']:.2f} | {mean['fit_mean_A']:.2f} "
          f"| {mean['fit_identity']:.2f} | {mean['corr_diag']:.2f} | {mean['snr4']:.2f} | {mean['snr_all']:.2f} |")


if __name__ == "__main__":
    main()

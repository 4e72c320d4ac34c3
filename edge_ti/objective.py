"""The textual-inversion loss of a population of candidate embeddings, forward passes only.

For a triple (latent x0, prompt c, timestep t, noise eps), diffusers' textual_inversion.py computes
    x_t    = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps          (DDPM, Ho et al. 2020 eq. 4)
    target = eps                                                      (epsilon prediction)
           | sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0         (v prediction, Salimans & Ho 2022 sec. 4)
    loss   = mean((unet(x_t, t, text_encoder(c with the token)) - target)^2)
           x weight (1 = the model's own loss, as diffusers; Denoiser.eps_weight puts a v model's
             loss in epsilon units, the weighting edge-ti's search was measured and tuned with)
Common random numbers: every candidate of a generation is scored on the same triples, so the
ranking reflects the embedding, not the noise. The networks and the schedule come from a
denoiser (edge_ti.denoiser), which also writes q(x_t | x0) and the target.
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class Triples:
    """The common random numbers of one generation (or of the held-out set); all indexed by i."""
    latent_index: np.ndarray   # (T,) int: which concept latent
    prompt_index: np.ndarray   # (T,) int: which prompt template
    timesteps: np.ndarray      # (T,) int in [0, num_train_timesteps)
    noise: np.ndarray          # (T, C, h, w) float32
    weight: np.ndarray = None  # (T,) float: each triple's loss multiplier; None = 1


def draw_triples(rng, count, n_latents, n_prompts, num_train_timesteps, latent_shape, timestep_p=None):
    """Uniform latents, prompts and timesteps, standard normal noise (as diffusers' TI script draws);
    timestep_p [num_train_timesteps]: draw t from it instead (the caller weighs the losses to match)."""
    latent_index, prompt_index = rng.integers(0, n_latents, count), rng.integers(0, n_prompts, count)
    timesteps = (rng.integers(0, num_train_timesteps, count) if timestep_p is None else
                 rng.choice(num_train_timesteps, count, p=timestep_p))
    return Triples(latent_index=latent_index, prompt_index=prompt_index, timesteps=timesteps,
                   noise=rng.standard_normal((count, *latent_shape), dtype=np.float32))


def importance_timesteps(weight):
    """weight [T]: the objective's weight of each t relative to the epsilon loss -> (q [T], factor [T]).

    Drawing t ~ q = weight / sum(weight) and multiplying each triple's loss by factor = mean(weight) / weight
    leaves the objective's expectation (the mean over uniform t) unchanged, while the samples go where it
    weighs most (importance sampling; for a v model's own loss, weight = 1 / alpha_bar_t, so q puts 60% of the
    samples at t >= 900 and the weighted losses are epsilon losses times a constant).
    """
    weight = np.asarray(weight, np.float64)
    return weight / weight.sum(), weight.mean() / weight


def population_loss(denoiser, candidates, prompt_ids, latents, triples, max_batch=None):
    """candidates [P, n, D] -> loss [P]: each candidate's mean squared error over the same triples.

    The text encoder runs once for all candidates x the prompts the triples use; the UNet runs
    once per distinct timestep with the whole population's samples, which Denoiser.unet splits
    into calls of at most max_batch (default: the denoiser's cap for this latent size).
    """
    squared_error = np.zeros(candidates.shape[0], dtype=np.float64)
    for _, residual, weight in _residuals(denoiser, candidates, prompt_ids, latents, triples, max_batch):
        squared_error += weight * (residual ** 2).mean(axis=(1, 2, 3))                      # (P,)
    return squared_error / len(triples.timesteps)                                          # mean over triples


def population_gram(denoiser, candidates, prompt_ids, latents, triples, max_batch=None):
    """candidates [P, n, D] -> G [P, P]: G[a, b] = the mean over triples of weight x mean(r_a * r_b),
    r_a = unet(x_t, t, text(a)) - target, the residual of candidate a on the triple.

    Its diagonal is population_loss; the rest says how the candidates' predictions differ on the
    same samples, which a loss alone does not: G[a, a] - 2 G[a, b] + G[b, b] = the mean squared
    difference of a's and b's predictions (edge_ti.gauss_newton builds its Jacobian from it).
    """
    return mean_gram(triple_grams(denoiser, candidates, prompt_ids, latents, triples, max_batch))


def triple_grams(denoiser, candidates, prompt_ids, latents, triples, max_batch=None):
    """candidates [P, n, D] -> [T, P, P]: each triple's weighted Gram matrix of the residuals, in the
    triples' order (a scorer may compute them in parts: each depends on its own triple only)."""
    P = candidates.shape[0]
    grams = np.zeros((len(triples.timesteps), P, P), dtype=np.float64)
    for i, residual, weight in _residuals(denoiser, candidates, prompt_ids, latents, triples, max_batch):
        flat = residual.reshape(P, -1).astype(np.float64)                                  # (P, C*h*w)
        grams[i] = weight * (flat @ flat.T) / flat.shape[1]
    return grams


def mean_gram(grams):
    """[T, P, P] -> [P, P], the mean over triples (one summation order wherever the parts were computed)."""
    return grams.sum(axis=0) / len(grams)


def subset(triples, rows):
    """The triples at ROWS (a slice or indices), as a Triples."""
    return Triples(triples.latent_index[rows], triples.prompt_index[rows], triples.timesteps[rows],
                   triples.noise[rows], None if triples.weight is None else triples.weight[rows])


def _residuals(denoiser, candidates, prompt_ids, latents, triples, max_batch):
    """Yield (i, residual [P, C, h, w], weight) per triple i: every candidate's prediction minus the target."""
    P = candidates.shape[0]
    used = np.unique(triples.prompt_index)                                # prompts this set needs
    hidden, pooled = denoiser.encode_population(prompt_ids[used], candidates)   # (P, K_used, L, D'), (P, K_used, D_g)
    row_of_prompt = {int(k): r for r, k in enumerate(used)}
    x0 = latents[triples.latent_index]                                   # (T, C, h, w)
    x_t = denoiser.add_noise(x0, triples.timesteps, triples.noise)       # (T, C, h, w)
    target = denoiser.target(x0, triples.timesteps, triples.noise)       # (T, C, h, w)
    for t in np.unique(triples.timesteps):
        rows = np.flatnonzero(triples.timesteps == t)                     # triples at this timestep
        # every (candidate, triple) pair at timestep t, candidate-major
        sample = np.repeat(x_t[rows][None], P, axis=0).reshape(P * len(rows), *x_t.shape[1:])   # (B, C, h, w)
        prompt_rows = [row_of_prompt[int(triples.prompt_index[i])] for i in rows]
        states = hidden[:, prompt_rows]                                                             # (P, R, L, D')
        pooled_rows = None if pooled is None else pooled[:, prompt_rows].reshape(P * len(rows), -1)  # (B, D_g)
        pred = denoiser.unet(sample, float(t), states.reshape(P * len(rows), *states.shape[2:]), max_batch,
                             pooled_rows)
        pred = pred.reshape(P, len(rows), *pred.shape[1:])                                        # (P, R, C, h, w)
        for r, i in enumerate(rows):
            weight = np.float64(1.0 if triples.weight is None else triples.weight[i])
            yield i, pred[:, r] - target[i], weight

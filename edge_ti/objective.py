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


def draw_triples(rng, count, n_latents, n_prompts, num_train_timesteps, latent_shape):
    """Uniform latents, prompts and timesteps, standard normal noise (as diffusers' TI script draws)."""
    return Triples(latent_index=rng.integers(0, n_latents, count),
                   prompt_index=rng.integers(0, n_prompts, count),
                   timesteps=rng.integers(0, num_train_timesteps, count),
                   noise=rng.standard_normal((count, *latent_shape), dtype=np.float32))


def population_loss(denoiser, candidates, prompt_ids, latents, triples, max_batch=None):
    """candidates [P, n, D] -> loss [P]: each candidate's mean squared error over the same triples.

    The text encoder runs once for all candidates x the prompts the triples use; the UNet runs
    once per distinct timestep with the whole population's samples, which Denoiser.unet splits
    into calls of at most max_batch (default: the denoiser's cap for this latent size).
    """
    P = candidates.shape[0]
    used = np.unique(triples.prompt_index)                                # prompts this set needs
    hidden = denoiser.encode_population(prompt_ids[used], candidates)   # (P, K_used, L, D)
    row_of_prompt = {int(k): r for r, k in enumerate(used)}
    x0 = latents[triples.latent_index]                                   # (T, C, h, w)
    x_t = denoiser.add_noise(x0, triples.timesteps, triples.noise)       # (T, C, h, w)
    target = denoiser.target(x0, triples.timesteps, triples.noise)       # (T, C, h, w)
    squared_error = np.zeros(P, dtype=np.float64)
    for t in np.unique(triples.timesteps):
        rows = np.flatnonzero(triples.timesteps == t)                     # triples at this timestep
        # every (candidate, triple) pair at timestep t, candidate-major
        pairs = [(p, i) for p in range(P) for i in rows]
        sample = np.stack([x_t[i] for _, i in pairs])                                 # (B, C, h, w)
        states = np.stack([hidden[p, row_of_prompt[int(triples.prompt_index[i])]] for p, i in pairs])  # (B, L, D)
        pred = denoiser.unet(sample, float(t), states, max_batch)                     # (B, C, h, w)
        err = ((pred - np.stack([target[i] for _, i in pairs])) ** 2).mean(axis=(1, 2, 3))
        if triples.weight is not None:
            err = err * triples.weight[[i for _, i in pairs]]
        for (p, _), e in zip(pairs, err):
            squared_error[p] += e
    return (squared_error / len(triples.timesteps)).astype(np.float64)  # mean over triples

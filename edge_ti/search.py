"""The CMA-ES loop over z: ask a population, score it, tell, keep the best held-out, checkpoint.

    state = new_state(dim, sigma, popsize, seed)
    while not finished(state, ...):
        step(state, population_loss_of_z, heldout_loss_of_z, settings)
        save_checkpoint(path, state)

The whole state (the `cma` optimizer, numpy's global generator that `cma` samples from, the
generation, the best held-out candidate, the history) is written atomically after every
generation; `--resume` reads it back and continues to the same result as an uninterrupted run.
Per-generation randomness of our own (the common random numbers) is a function of (seed,
generation), so it needs no saved state.

Early stop: every `eval_every` generations the optimizer's mean and the generation's best are
re-scored on the fixed held-out triples; the run stops when the best held-out loss is no more
than `min_improvement` (relative) below what it was `patience` checks earlier.
"""
import pickle
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

with warnings.catch_warnings():  # cma warns that matplotlib (for its own plots) is missing
    warnings.simplefilter("ignore")
    import cma

from .errors import EdgeTIError
from .files import atomic_path

CHECKPOINT_VERSION = 1


@dataclass
class SearchState:
    es: object                        # cma.CMAEvolutionStrategy
    numpy_random_state: tuple         # np.random's global state, which cma samples from
    settings_key: str                 # a resume must use the same settings
    generation: int = 0
    evaluations: int = 0              # candidate evaluations (one candidate on one generation's triples)
    heldout_evaluations: int = 0      # candidate evaluations on the held-out triples
    elapsed: float = 0.0              # seconds of search, summed over resumed runs
    best_z: np.ndarray = None         # the candidate with the lowest held-out loss so far
    best_heldout: float = np.inf
    init_heldout: float = np.inf      # held-out loss of z = 0 (the initial embedding)
    heldout_bests: list = field(default_factory=list)  # best_heldout after each check
    history: list = field(default_factory=list)
    stop_reason: str = ""


def new_state(dim, sigma, popsize, seed, settings_key):
    np.random.seed(seed)  # cma draws its samples from numpy's global generator
    es = cma.CMAEvolutionStrategy(np.zeros(dim), sigma, {"popsize": popsize, "seed": seed + 1,
                                                         "verbose": -9, "CMA_diagonal": dim > 1000})
    return SearchState(es=es, numpy_random_state=np.random.get_state(), settings_key=settings_key,
                       best_z=np.zeros(dim))


def step(state, population_loss_of_z, heldout_loss_of_z, eval_every):
    """One generation: ask, score on this generation's common random numbers, tell, maybe re-score."""
    start = time.perf_counter()
    np.random.set_state(state.numpy_random_state)
    zs = np.array(state.es.ask())                                       # (P, dim)
    state.numpy_random_state = np.random.get_state()
    losses = population_loss_of_z(zs, state.generation)                 # (P,)
    state.es.tell(list(zs), [float(x) for x in losses])
    state.generation += 1
    state.evaluations += len(zs)
    record = {"generation": state.generation, "evaluations": state.evaluations,
              "best_loss": float(np.min(losses)), "mean_loss": float(np.mean(losses)),
              "sigma": float(state.es.sigma)}
    if state.generation % eval_every == 0:
        # the optimizer's mean and this generation's best, re-scored on the fixed held-out triples
        contenders = np.stack([state.es.result.xfavorite, zs[int(np.argmin(losses))]])
        heldout = heldout_loss_of_z(contenders)
        state.heldout_evaluations += len(contenders)
        i = int(np.argmin(heldout))
        if heldout[i] < state.best_heldout:
            state.best_heldout, state.best_z = float(heldout[i]), contenders[i].copy()
        state.heldout_bests.append(state.best_heldout)
        record["heldout_loss"] = float(heldout[i])
    state.elapsed += time.perf_counter() - start
    record["best_heldout"] = state.best_heldout
    record["elapsed"] = round(state.elapsed, 3)
    state.history.append(record)
    return record


def finished(state, budget, max_time, patience, min_improvement):
    """The reason to stop, or '' to go on."""
    if budget and state.evaluations >= budget:
        return f"budget of {budget} evaluations used"
    if max_time and state.elapsed >= max_time:
        return f"time limit of {max_time:.0f} s reached"
    bests = state.heldout_bests
    if patience and len(bests) > patience and bests[-1] > bests[-1 - patience] * (1.0 - min_improvement):
        return f"held-out loss improved by less than {min_improvement:g} in {patience} checks"
    stop = state.es.stop()
    if stop:
        return "cma: " + ", ".join(stop)
    return ""


def save_checkpoint(path, state):
    """Atomic: a temp file renamed over the old checkpoint, so a kill never leaves half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump({"version": CHECKPOINT_VERSION, "state": state}, f)


def load_checkpoint(path, settings_key):
    """Our own checkpoint (a pickle this program wrote), checked against the run's settings."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
        state = data["state"]
    except FileNotFoundError:
        raise EdgeTIError(f"{path}: no checkpoint to resume from") from None
    except Exception as err:  # pickle raises many types for a damaged file
        raise EdgeTIError(f"{path}: unreadable checkpoint ({err.__class__.__name__})") from None
    if data.get("version") != CHECKPOINT_VERSION or not isinstance(state, SearchState):
        raise EdgeTIError(f"{path}: checkpoint from another edge-ti version")
    if state.settings_key != settings_key:
        raise EdgeTIError(f"{path}: checkpoint was made with other settings, images or model; "
                          "rerun without --resume or with the same options")
    return state

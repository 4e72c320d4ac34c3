"""The search over z: ask a population, score it, tell, keep the best held-out candidate.

    state = SearchState(settings_key, dim, sigma0, popsize, seed)        # or load_checkpoint(path, key)
    run(state, population_loss_of_z, heldout_loss_of_z, Limits(budget=5000), checkpoint=path)

The optimizer is CMA-ES (`cma`), zo-adam (edge_ti.zo_adam) or gauss-newton (edge_ti.gauss_newton,
which is told each population's Gram matrix, population_gram_of_z, instead of its losses).

The state is data: numbers, lists and arrays, written after a generation (every few seconds at most) as a
safetensors file (arrays) with a JSON header (the rest); nothing in it is code, and reading it back never
unpickles. The optimizer itself is not stored: it is a pure function of its seed and of the
losses (gauss-newton: Gram matrices) it was told, so loading a checkpoint makes a new optimizer
and tells it every recorded generation's losses again (a second or two per thousand generations).
A digest of every population it asks must equal the one recorded, or the checkpoint is refused
(another `cma` or numpy would replay differently). Per-generation randomness of our own (the common random
numbers) is a function of (seed, generation), so it needs no saved state; `cma` samples from
its own numpy generator (its `randn` option), never numpy's global one.

Early stop: every `eval_every` generations the optimizer's mean and the generation's best
(gauss-newton: its point alone) are re-scored on the fixed held-out triples; the run stops when the
best held-out loss is no more than `min_improvement` (relative) below what it was `patience`
checks earlier. When a limit (budget, time) stops the search between two checks, the optimizer's mean is
scored once more (`last_check`): the written token may be it, but the state, and so a resumed run, never is.
"""
import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import numpy as np
from safetensors.numpy import save

with warnings.catch_warnings():  # cma warns that matplotlib (for its own plots) is missing
    warnings.simplefilter("ignore")
    import cma

from .embeddings import read_safetensors
from .errors import EdgeTIError
from .files import atomic_path
from .gauss_newton import GaussNewton
from .zo_adam import ZerothOrderAdam

CHECKPOINT_VERSION = 2  # 1 was a pickle: refused


@dataclass
class Limits:
    budget: int = 5000               # candidate evaluations; 0: no limit
    max_time: float = None           # seconds of search; None: no limit
    patience: int = 10               # held-out checks without min_improvement before stopping; 0: never
    min_improvement: float = 1e-4    # relative


@dataclass
class SearchState:
    settings_key: str                 # a resume must use the same settings, images and model
    dim: int                          # of z
    sigma0: float                     # CMA-ES's initial step; zo-adam's smoothing radius; gauss-newton's probe distance
    popsize: int
    seed: int
    optimizer: str = "cma"            # cma | zo-adam (edge_ti.zo_adam) | gauss-newton (edge_ti.gauss_newton)
    lr: float = 0.0                   # zo-adam's Adam step size in z
    prior: float = 0.0                # gauss-newton's pull toward the init (its lambda over the first curvature)
    generation: int = 0
    evaluations: int = 0              # candidate evaluations (one candidate on one generation's triples)
    heldout_evaluations: int = 0      # candidate evaluations on the held-out triples
    elapsed: float = 0.0              # seconds of search, summed over resumed runs
    best_z: np.ndarray = None         # the candidate with the lowest held-out loss so far (z = 0: the init)
    best_heldout: float = np.inf
    init_heldout: float = np.inf      # held-out loss of z = 0 (the initial embedding)
    heldout_bests: list = field(default_factory=list)  # best_heldout after each check
    history: list = field(default_factory=list)        # one record per generation (the log)
    losses: list = field(default_factory=list)         # each generation's losses as told to cma, float64 (P,)
    grams: list = field(default_factory=list)          # gauss-newton: each generation's Gram matrix as told (P, P)
    asked_digest: str = ""            # sha256 chain over the populations cma asked
    stop_reason: str = ""
    # not saved: the optimizer's mean and its held-out loss, scored after the last generation when that was not a
    # check (a run of a few generations would otherwise write its start); a resumed run goes on from the state above
    last_check: tuple = None          # (z [dim], held-out loss) or None

    def __post_init__(self):
        if self.best_z is None:
            self.best_z = np.zeros(self.dim)


def _chain(digest, zs):
    return hashlib.sha256(digest.encode() + np.ascontiguousarray(zs, np.float64).tobytes()).hexdigest()


def new_optimizer(state):
    """A fresh optimizer (cma, zo-adam or gauss-newton) for STATE's dimension, step size, population and seed."""
    if state.optimizer == "zo-adam":
        return ZerothOrderAdam(state.dim, state.sigma0, state.lr, state.popsize, state.seed)
    if state.optimizer == "gauss-newton":
        return GaussNewton(state.dim, state.popsize - 1, state.sigma0, state.prior, state.seed)
    # seed + 1: the stream earlier versions drew (cma seeded numpy's global generator with it)
    randn = np.random.RandomState(state.seed + 1).randn
    return cma.CMAEvolutionStrategy(np.zeros(state.dim), state.sigma0, {
        "popsize": state.popsize, "seed": np.nan, "randn": randn, "verbose": -9,
        "CMA_diagonal": state.dim > 1000})


def replay(state, source="checkpoint"):
    """The optimizer after STATE's generations: a new one told the recorded losses again."""
    es, digest = new_optimizer(state), ""
    for generation, losses in enumerate(state.losses):
        zs = np.array(es.ask())                                          # (P, dim)
        digest = _chain(digest, zs)
        es.tell(list(zs), state.grams[generation] if tells_gram(es) else [float(x) for x in losses])
    if digest != state.asked_digest:
        raise EdgeTIError(f"{source}: does not replay with this version of cma/numpy; --restart to start over")
    return es


def tells_gram(es):
    """Whether ES is told each population's Gram matrix (objective.population_gram), not its losses."""
    return getattr(es, "tells", "losses") == "gram"


def step(state, es, population_loss_of_z, heldout_loss_of_z, eval_every, population_gram_of_z=None):
    """One generation: ask, score on this generation's common random numbers, tell, maybe re-score.

    STATE changes only once the population is scored, so an interrupt during scoring leaves it
    at the previous generation (what the checkpoint holds).
    """
    start = time.perf_counter()
    zs = np.array(es.ask())                                              # (P, dim)
    if tells_gram(es):
        gram = np.asarray(population_gram_of_z(zs, state.generation), np.float64)     # (P, P)
        losses = np.diag(gram).copy()                                    # (P,): the Gram's diagonal
    else:
        losses = np.asarray(population_loss_of_z(zs, state.generation), np.float64)  # (P,)
    if not np.all(np.isfinite(losses)) or (tells_gram(es) and not np.all(np.isfinite(gram))):
        raise EdgeTIError("the model gave NaN or infinite losses: check the model folder's weights and "
                          "scheduler_config.json")
    es.tell(list(zs), gram if tells_gram(es) else [float(x) for x in losses])
    record = {"generation": state.generation + 1, "evaluations": state.evaluations + len(zs),
              "best_loss": float(np.min(losses)), "mean_loss": float(np.mean(losses)), "sigma": float(es.sigma)}
    best_heldout, best_z, checked = state.best_heldout, state.best_z, None
    if record["generation"] % eval_every == 0:
        # the optimizer's mean and this generation's best, re-scored on the fixed held-out triples (gauss-newton:
        # its point alone; its probes' losses on one generation's few triples say little about them)
        contenders = np.stack([es.result.xfavorite] + ([] if tells_gram(es) else [zs[int(np.argmin(losses))]]))
        heldout = heldout_loss_of_z(contenders)
        i = int(np.argmin(heldout))
        record["heldout_loss"] = checked = float(heldout[i])
        if heldout[i] < best_heldout:
            best_heldout, best_z = float(heldout[i]), contenders[i].copy()
    elapsed = state.elapsed + time.perf_counter() - start
    record["best_heldout"] = best_heldout
    record["elapsed"] = round(elapsed, 3)
    # commit
    state.asked_digest = _chain(state.asked_digest, zs)
    state.losses.append(losses)
    if tells_gram(es):
        state.grams.append(gram)
    state.generation, state.evaluations, state.elapsed = record["generation"], record["evaluations"], elapsed
    if checked is not None:
        state.heldout_evaluations += len(contenders)
        state.best_heldout, state.best_z = best_heldout, best_z
        state.heldout_bests.append(best_heldout)
    state.history.append(record)
    return record


def finished(state, es, limits):
    """The reason to stop, or '' to go on."""
    if limits.budget and state.evaluations >= limits.budget:
        return f"budget of {limits.budget} evaluations used"
    if limits.max_time and state.elapsed >= limits.max_time:
        return f"time limit of {limits.max_time:.0f} s reached"
    bests, patience = state.heldout_bests, limits.patience
    if patience and len(bests) > patience and bests[-1] > bests[-1 - patience] * (1.0 - limits.min_improvement):
        return f"held-out loss improved by less than {limits.min_improvement:g} in {patience} checks"
    stop = es.stop()
    if stop:
        return "cma: " + ", ".join(stop)
    return ""


def run(state, population_loss_of_z, heldout_loss_of_z, limits, eval_every=5, checkpoint=None,
        on_generation=None, population_gram_of_z=None, checkpoint_every=0.0):
    """Search until a limit stops it; after every generation call on_generation(record, state) and save the
    checkpoint, at most every checkpoint_every seconds and after the last generation (a checkpoint holds the
    whole history, so writing it after each of thousands of small generations costs O(generations^2); a kill
    loses at most those seconds, and a resume from any checkpoint ends where the uninterrupted run does).
    Returns STATE with its stop_reason (resumed states continue).
    population_gram_of_z(zs, generation) -> [P, P] scores the populations of gauss-newton."""
    es = replay(state, source=checkpoint or "checkpoint")
    if tells_gram(es) and population_gram_of_z is None:
        raise EdgeTIError(f"the {state.optimizer} search needs population_gram_of_z")
    saved_at, saved = time.monotonic(), True
    try:
        while not (reason := finished(state, es, limits)):
            record = step(state, es, population_loss_of_z, heldout_loss_of_z, eval_every, population_gram_of_z)
            saved = False
            if checkpoint and time.monotonic() - saved_at >= checkpoint_every:
                save_checkpoint(checkpoint, state)
                saved_at, saved = time.monotonic(), True
            if on_generation:
                on_generation(record, state)
    finally:  # the last generations too, on Ctrl-C or an error (STATE is whole between generations)
        if checkpoint and not saved:
            save_checkpoint(checkpoint, state)
    state.stop_reason = reason
    if state.generation % eval_every:  # the generations since the last check would be lost to the result
        z = np.array(es.result.xfavorite, np.float64)                    # (dim,): cma's mean, gauss-newton's point
        state.last_check = (z, float(heldout_loss_of_z(z[None])[0]))
    return state


def written_z(state):
    """(z, held-out loss) of the token to write: the best checked candidate, or the last check's mean if better."""
    if state.last_check is not None and state.last_check[1] < state.best_heldout:
        return state.last_check
    return state.best_z, state.best_heldout


# ---- the checkpoint file: safetensors arrays + the rest as JSON in its metadata ----
_ARRAYS = ("best_z", "losses")
_OPTIONAL_ARRAYS = ("grams",)       # written when not empty (gauss-newton)


def save_checkpoint(path, state):
    """Atomic: a temp file renamed over the old checkpoint, so a kill never leaves half a file."""
    fields_ = {k: v for k, v in asdict(state).items() if k not in _ARRAYS + _OPTIONAL_ARRAYS + ("last_check",)}
    losses = (np.stack(state.losses) if state.losses else np.zeros((0, state.popsize))).astype(np.float64)
    arrays = {"best_z": np.ascontiguousarray(state.best_z, np.float64), "losses": losses}
    if state.grams:
        arrays["grams"] = np.stack(state.grams).astype(np.float64)
    header = json.dumps({"version": CHECKPOINT_VERSION, **fields_})
    data = save(arrays, metadata={"edge_ti.checkpoint": header})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # Python's write: a full disk is an OSError
        f.write(data)


def _bad(path, why):
    return EdgeTIError(f"{path}: not a usable edge-ti checkpoint ({why}); --restart to discard it")


# the JSON fields and their types, checked before any is used
_TYPES = {"settings_key": str, "dim": int, "sigma0": float, "popsize": int, "seed": int, "generation": int,
          "evaluations": int, "heldout_evaluations": int, "elapsed": float, "best_heldout": float,
          "init_heldout": float, "heldout_bests": list, "history": list, "asked_digest": str, "stop_reason": str,
          "optimizer": str, "lr": float, "prior": float}
# fields added after CHECKPOINT_VERSION 2 was first written: absent in those files, they take these values
_ADDED = {"optimizer": "cma", "lr": 0.0, "prior": 0.0}
OPTIMIZERS = ("cma", "zo-adam", "gauss-newton")


def load_checkpoint(path, settings_key):
    """A checkpoint written by save_checkpoint, every field checked, and for the run's settings."""
    state = read_checkpoint(path)
    if state.settings_key != settings_key:
        raise EdgeTIError(f"{path}: checkpoint of a run with other settings, images or model; rerun with its "
                          "options to continue it, or --restart to discard it")
    return state


def read_checkpoint(path):
    """A checkpoint written by save_checkpoint, every field checked before it is used."""
    try:
        with open(path, "rb") as f:
            start = f.read(9) if os.path.isfile(path) else b""
    except OSError:
        start = b""
    # edge-ti < 0.2 pickled its checkpoints; a safetensors file has its JSON header's "{" at byte 8
    # (its first byte, the header length's lowest, may well be 0x80)
    if start[8:9] != b"{" and (start[:1] == b"\x80" or start[:4] == b"PK\x03\x04"):
        raise _bad(path, "a pickle, which edge-ti never loads")
    try:
        arrays, metadata = read_safetensors(path, dtypes=("F64",))
    except EdgeTIError as err:
        raise _bad(path, str(err).split(": ", 1)[-1]) from None
    try:
        header = json.loads(metadata.get("edge_ti.checkpoint", ""))
    except (json.JSONDecodeError, RecursionError):
        raise _bad(path, "no readable edge_ti.checkpoint header") from None
    if not isinstance(header, dict) or header.get("version") != CHECKPOINT_VERSION:
        raise _bad(path, "written by another edge-ti version")
    header = {**_ADDED, **header}
    if header["optimizer"] not in OPTIMIZERS:
        raise _bad(path, f"unknown optimizer {str(header['optimizer'])[:30]!r}")
    for name, kind in _TYPES.items():
        value = header.get(name)
        ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
        if not ok or (kind is int and value < 0):
            raise _bad(path, f"field {name!r} is {str(value)[:30]}")
    if header["optimizer"] == "gauss-newton" and not (0 < header["sigma0"] < np.inf and 0 < header["prior"] < np.inf
                                                      and 2 <= header["popsize"] <= header["dim"] + 1):
        raise _bad(path, "gauss-newton settings out of range")
    wants_grams = header["optimizer"] == "gauss-newton" and header["generation"] > 0
    if set(arrays) != set(_ARRAYS) | ({"grams"} if wants_grams else set()):
        raise _bad(path, f"arrays {sorted(arrays)}")
    generation, popsize, dim = header["generation"], header["popsize"], header["dim"]
    if arrays["losses"].shape != (generation, popsize) or arrays["best_z"].shape != (dim,):
        raise _bad(path, "array shapes do not match its generations")
    grams = arrays.get("grams", np.zeros((0, popsize, popsize)))
    if wants_grams and (grams.shape != (generation, popsize, popsize) or not np.all(np.isfinite(grams))):
        raise _bad(path, "Gram matrices do not match its generations")
    if not (all(isinstance(x, (int, float)) for x in header["heldout_bests"])
            and all(isinstance(r, dict) for r in header["history"]) and len(header["history"]) == generation):
        raise _bad(path, "malformed history")
    values = {f.name: header[f.name] for f in fields(SearchState) if f.name in _TYPES}
    return SearchState(**values, best_z=np.array(arrays["best_z"]), losses=list(np.array(arrays["losses"])),
                       grams=list(np.array(grams)))

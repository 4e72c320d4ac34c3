"""zo-adam: forward-only gradient estimates from antithetic pairs, fed to Adam (edge_ti/zo_adam.py)."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edge_ti import search
from edge_ti.errors import EdgeTIError
from edge_ti.train import TrainSettings, check_settings
from edge_ti.zo_adam import ZerothOrderAdam

TARGET = np.linspace(-1.0, 1.0, 6)


def _noisy_quadratic(zs, generation):
    """|z - TARGET|^2 plus noise that every candidate of a generation shares (the common random numbers)
    and a smaller part of its own: what the denoising loss of one generation's triples looks like."""
    rng = np.random.default_rng(generation)
    offset = rng.normal(0, 5.0)                      # large, the same for all: cancels in a pair's difference
    tilt = rng.normal(0, 0.3, zs.shape[1])           # a random slope this generation's triples add
    own = rng.normal(0, 0.01, len(zs))               # each candidate's own rounding-size noise
    return np.sum((zs - TARGET) ** 2, axis=1) + offset + zs @ tilt + own


def test_the_estimate_is_the_gradient_and_adam_walks_to_the_minimum():
    opt = ZerothOrderAdam(dim=6, radius=0.05, lr=0.05, popsize=20, seed=0)
    for generation in range(300):
        zs = np.array(opt.ask())
        # pairs: candidate 2i is z + c u_i, 2i + 1 is z - c u_i
        assert np.allclose(zs[0::2] + zs[1::2], 2 * opt.z)
        opt.tell(list(zs), _noisy_quadratic(zs, generation))
    assert np.abs(opt.result.xfavorite - TARGET).max() < 0.15


def test_a_single_pair_on_a_linear_loss_gives_its_directional_derivative():
    opt = ZerothOrderAdam(dim=3, radius=0.1, lr=0.01, popsize=2, seed=1)
    zs = np.array(opt.ask())
    u = (zs[0] - zs[1]) / (2 * 0.1)
    slope = np.array([1.0, -2.0, 0.5])
    opt.tell(list(zs), zs @ slope)
    g = (u @ slope) * u                                    # the one-direction estimate
    assert np.allclose(opt.m, 0.1 * g) and np.allclose(opt.v, 0.001 * g * g)
    assert np.allclose(opt.z, -0.01 * np.sign(g), atol=1e-6)  # Adam's first step: lr * sign


def test_search_runs_zo_adam_and_a_checkpoint_replays_it(tmp_path):
    state = search.SearchState("key", 6, 0.05, 10, 3, optimizer="zo-adam", lr=0.05)
    path = str(tmp_path / "c.ckpt")
    loss = lambda zs, g: _noisy_quadratic(zs, g)  # noqa: E731
    heldout = lambda zs: np.sum((zs - TARGET) ** 2, axis=1)  # noqa: E731
    search.run(state, loss, heldout, search.Limits(budget=400, patience=0), eval_every=5, checkpoint=path)
    assert state.evaluations == 400 and state.best_heldout < np.sum(TARGET ** 2) / 4
    loaded = search.load_checkpoint(path, "key")
    assert (loaded.optimizer, loaded.lr) == ("zo-adam", 0.05)
    replayed, again = search.replay(loaded), search.replay(state)
    assert np.array_equal(replayed.z, again.z) and np.array_equal(np.array(replayed.ask()), np.array(again.ask()))
    # the same run resumed halfway ends where the uninterrupted one did
    half = search.SearchState("key", 6, 0.05, 10, 3, optimizer="zo-adam", lr=0.05)
    search.run(half, loss, heldout, search.Limits(budget=200, patience=0), eval_every=5, checkpoint=path)
    resumed = search.load_checkpoint(path, "key")
    search.run(resumed, loss, heldout, search.Limits(budget=400, patience=0), eval_every=5, checkpoint=path)
    assert np.array_equal(resumed.best_z, state.best_z) and resumed.asked_digest == state.asked_digest


def test_checkpoints_without_the_optimizer_fields_are_cma_and_unknown_ones_are_refused(tmp_path):
    state = search.SearchState("key", 3, 0.5, 4, 0)
    path = str(tmp_path / "c.ckpt")
    search.save_checkpoint(path, state)
    arrays = load_file(path)
    from safetensors import safe_open
    with safe_open(path, "np") as f:
        header = json.loads(f.metadata()["edge_ti.checkpoint"])
    for edit, ok in (({"optimizer": None, "lr": None}, True), ({"optimizer": "sgd"}, False),
                     ({"optimizer": ["zo-adam"]}, False), ({"lr": "fast"}, False)):
        changed = {k: v for k, v in {**header, **edit}.items() if v is not None}
        save_file(arrays, path, metadata={"edge_ti.checkpoint": json.dumps(changed)})
        if ok:
            assert search.load_checkpoint(path, "key").optimizer == "cma"
        else:
            with pytest.raises(EdgeTIError, match="not a usable edge-ti checkpoint"):
                search.load_checkpoint(path, "key")


@pytest.mark.parametrize("changes, message", [
    ({"optimizer": "adam"}, "unknown optimizer 'adam'"),
    ({"optimizer": "zo-adam", "popsize": 7}, "popsize must be even for zo-adam"),
    ({"popsize": 2}, "popsize must be at least 3 for cma"),   # pycma fails in generation 2 (SDXL's 512-dim z)
    ({"lr": 0.0}, "lr must be a positive number"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"lr": "0.1"}, "lr must be a number"),
])
def test_bad_optimizer_settings_are_one_line_errors(changes, message):
    with pytest.raises(EdgeTIError, match=message):
        check_settings(TrainSettings(**changes))


def test_odd_population_is_refused_by_the_optimizer_itself():
    with pytest.raises(ValueError, match="even"):
        ZerothOrderAdam(dim=2, radius=0.1, lr=0.1, popsize=5, seed=0)


def test_the_norm_cap_shortens_only_vectors_longer_than_the_longest_row():
    from edge_ti import subspace
    table = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    cap = subspace.max_row_norm(table)
    e0, W = table[:2], subspace.pca_basis(table, 4)
    z = np.array([np.zeros(8), np.full(8, 0.1), np.full(8, 40.0)])        # (3, 2 vectors * 4)
    free, capped = subspace.embeddings_from_z(e0, W, z), subspace.embeddings_from_z(e0, W, z, cap)
    norms = np.linalg.norm(capped, axis=-1)
    assert np.all(norms <= cap * (1 + 1e-6)) and np.linalg.norm(free[2], axis=-1).min() > cap
    short = np.linalg.norm(free, axis=-1) <= cap
    assert np.array_equal(capped[short], free[short])                  # the init and small steps untouched
    cos = np.sum(capped[2] * free[2], axis=-1) / (norms[2] * np.linalg.norm(free[2], axis=-1))
    assert np.allclose(cos, 1.0, atol=1e-6)                              # the direction kept
    with pytest.raises(EdgeTIError, match="norm_cap must be true or false"):
        check_settings(TrainSettings(norm_cap="yes"))

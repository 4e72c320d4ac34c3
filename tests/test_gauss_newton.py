"""gauss-newton: each generation's predictions summed into one quadratic model (edge_ti/gauss_newton.py),
scored by objective.population_gram."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edge_ti import objective, search
from edge_ti.errors import EdgeTIError
from edge_ti.gauss_newton import GaussNewton
from edge_ti.train import TrainSettings, check_settings

RNG = np.random.default_rng(0)
J = RNG.normal(size=(40, 6))              # the residuals' Jacobian: 40 outputs, z of dimension 6
R0 = RNG.normal(size=40)                  # the residuals at z = 0
OPTIMUM = np.linalg.lstsq(J, -R0, rcond=None)[0]


def _gram(zs, generation=None, noise=0.0):
    """The Gram matrix of linear residuals r(z) = R0 + J z (+ a noise vector this generation's
    candidates share, as one generation's triples add to every candidate's residual alike)."""
    shared = np.random.default_rng(generation).normal(0, noise, len(R0)) if noise else 0.0
    r = R0 + np.asarray(zs) @ J.T + shared                                  # (P, 40)
    return r @ r.T / r.shape[1]


def test_with_a_probe_along_every_direction_one_generation_is_the_ridge_least_squares_step():
    opt = GaussNewton(dim=6, directions=6, step=0.3, prior=1e-3, seed=0)
    zs = np.array(opt.ask())
    assert np.allclose(zs[0], 0) and np.allclose(np.linalg.norm(zs[1:], axis=1), 0.3)
    opt.tell(list(zs), _gram(zs))
    A, b = J.T @ J / 40, J.T @ R0 / 40
    ridge = 1e-3 * np.trace(A) / 6                                          # prior x the mean curvature
    assert np.allclose(opt.result.xfavorite, -np.linalg.solve(A + ridge * np.eye(6), b), rtol=1e-8)


def test_fewer_probes_than_dimensions_and_noisy_generations_still_reach_the_minimum():
    opt = GaussNewton(dim=6, directions=2, step=0.1, prior=1e-3, seed=1)
    for generation in range(300):
        zs = np.array(opt.ask())
        opt.tell(list(zs), _gram(zs, generation, noise=0.5))      # noise larger than the residuals' change
    assert np.abs(opt.result.xfavorite - OPTIMUM).max() < 0.1 * np.abs(OPTIMUM).max()


def test_the_gram_diagonal_is_population_loss_and_its_rest_the_prediction_differences():
    import edge_ti
    from edge_ti.denoiser import Denoiser
    from edge_ti.init import from_word
    model = edge_ti.open_model("shapes")
    rng = np.random.default_rng(0)
    e0 = from_word(model, "star")
    candidates = np.stack([e0 + 0.3 * rng.standard_normal(e0.shape).astype(np.float32) for _ in range(4)])
    prompt_ids = model.tokenize(["a photo of a <c>", "a <c>"], {"<c>": e0})
    latents = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    triples = objective.draw_triples(rng, 5, 3, 2, 1000, (4, 8, 8))
    triples.weight = rng.random(5)
    denoiser = Denoiser(model)
    gram = objective.population_gram(denoiser, candidates, prompt_ids, latents, triples)
    losses = objective.population_loss(denoiser, candidates, prompt_ids, latents, triples)
    assert np.allclose(np.diag(gram), losses, rtol=1e-6) and np.allclose(gram, gram.T)
    # a and b's predictions on each triple, directly
    hidden, _ = denoiser.encode_population(prompt_ids, candidates)               # (P, 2, 77, D)
    x_t = denoiser.add_noise(latents[triples.latent_index], triples.timesteps, triples.noise)
    diff = 0.0
    for i, t in enumerate(triples.timesteps):
        states = hidden[:2, triples.prompt_index[i]]                             # candidates 0 and 1
        pred = denoiser.unet(np.repeat(x_t[i:i + 1], 2, axis=0), float(t), states)
        diff += triples.weight[i] * np.mean((pred[0].astype(np.float64) - pred[1]) ** 2)
    assert np.isclose(gram[0, 0] - 2 * gram[0, 1] + gram[1, 1], diff / 5, rtol=1e-4)
    assert diff > 0


def state_loss(z):
    return float(np.diag(_gram(z[None]))[0])


def _run(state, path, budget):
    loss = lambda zs, g: np.diag(_gram(zs, g, noise=0.5))        # noqa: E731  (unused: gauss-newton is told Grams)
    gram = lambda zs, g: _gram(zs, g, noise=0.5)                 # noqa: E731
    heldout = lambda zs: np.diag(_gram(zs))                      # noqa: E731
    return search.run(state, loss, heldout, search.Limits(budget=budget, patience=0), eval_every=3,
                      checkpoint=path, population_gram_of_z=gram)


def test_search_runs_gauss_newton_and_a_checkpoint_resumed_halfway_ends_where_the_whole_run_does(tmp_path):
    path = str(tmp_path / "c.ckpt")
    state = _run(search.SearchState("key", 6, 0.1, 3, 5, optimizer="gauss-newton", prior=1e-3), path, 300)
    assert state.evaluations == 300 and len(state.grams) == 100
    start, best = state_loss(np.zeros(6)), state_loss(OPTIMUM)
    assert state.best_heldout - best < 0.05 * (start - best)                 # 95% of the way
    loaded = search.load_checkpoint(path, "key")
    assert (loaded.optimizer, loaded.prior) == ("gauss-newton", 1e-3)
    assert np.array_equal(search.replay(loaded).z, search.replay(state).z)
    half = _run(search.SearchState("key", 6, 0.1, 3, 5, optimizer="gauss-newton", prior=1e-3), path, 150)
    assert half.generation == 50
    resumed = _run(search.load_checkpoint(path, "key"), path, 300)
    assert np.array_equal(resumed.best_z, state.best_z) and resumed.asked_digest == state.asked_digest


def test_a_search_that_tells_grams_without_a_gram_scorer_is_refused():
    state = search.SearchState("key", 6, 0.1, 3, 5, optimizer="gauss-newton", prior=1e-3)
    with pytest.raises(EdgeTIError, match="needs population_gram_of_z"):
        search.run(state, lambda zs, g: np.zeros(len(zs)), lambda zs: np.zeros(len(zs)), search.Limits(budget=9))


def _edit_checkpoint(path, header_edit=None, arrays_edit=None):
    from safetensors import safe_open
    arrays = load_file(path)
    with safe_open(path, "np") as f:
        header = json.loads(f.metadata()["edge_ti.checkpoint"])
    header.update(header_edit or {})
    arrays.update(arrays_edit or {})
    arrays = {k: v for k, v in arrays.items() if v is not None}
    save_file(arrays, path, metadata={"edge_ti.checkpoint": json.dumps(header)})


@pytest.mark.parametrize("header_edit, arrays_edit, message", [
    (None, {"grams": None}, "arrays"),                                          # the Grams lost
    (None, {"grams": np.zeros((4, 3, 3))}, "Gram matrices do not match"),       # one generation short
    (None, {"grams": np.full((5, 3, 3), np.nan)}, "Gram matrices do not match"),
    ({"prior": 0.0}, None, "gauss-newton settings out of range"),
    ({"popsize": 8}, None, "gauss-newton settings out of range"),               # more probes than dimensions
    ({"sigma0": -0.1}, None, "gauss-newton settings out of range"),
])
def test_damaged_gauss_newton_checkpoints_are_refused_in_one_line(tmp_path, header_edit, arrays_edit, message):
    path = str(tmp_path / "c.ckpt")
    state = search.SearchState("key", 6, 0.1, 3, 5, optimizer="gauss-newton", prior=1e-3)
    _run(state, path, 15)
    if header_edit and "popsize" in header_edit:   # keep the arrays' shapes consistent with the edited popsize
        arrays_edit = {"losses": np.zeros((5, 8)), "grams": np.zeros((5, 8, 8))}
    _edit_checkpoint(path, header_edit, arrays_edit)
    with pytest.raises(EdgeTIError, match=message):
        search.load_checkpoint(path, "key")


@pytest.mark.parametrize("changes, message", [
    ({"prior": 0.0}, "prior must be a positive number"),
    ({"prior": float("inf")}, "prior must be a positive number"),
    ({"prior": "0.1"}, "prior must be a number"),
    ({"optimizer": "newton"}, "unknown optimizer 'newton': choose cma, zo-adam, gauss-newton"),
    ({"optimizer": ["gauss-newton"]}, "unknown optimizer"),                    # not a name: refused, not a crash
])
def test_bad_gauss_newton_settings_are_one_line_errors(changes, message):
    with pytest.raises(EdgeTIError, match=message):
        check_settings(TrainSettings(**changes))


def test_more_probes_than_dimensions_is_refused_by_the_optimizer_itself():
    with pytest.raises(ValueError, match="directions"):
        GaussNewton(dim=2, directions=3, step=0.1, prior=0.1, seed=0)


# ---- in the trainer and the CLI ----

def test_defaults_follow_the_optimizer_and_cma_runs_keep_their_checkpoint_key(tiny_sd):
    import edge_ti
    from edge_ti.train import _settings_key
    assert (TrainSettings().popsize, TrainSettings().triples, TrainSettings().eval_every) == (10, 2, 20)
    gn = TrainSettings(optimizer="gauss-newton")
    assert (gn.popsize, gn.triples, gn.eval_every) == (9, 4, 5)
    assert TrainSettings(optimizer="gauss-newton", popsize=5).popsize == 5
    model = edge_ti.open_model(tiny_sd[1])
    latents, e0 = np.zeros((1, 4, 4, 4), np.float32), np.zeros((1, 32), np.float32)
    key = lambda s: _settings_key(model, s, latents, e0, "<c>")  # noqa: E731
    # prior is gauss-newton's: it cannot change a cma run, so it is not in a cma run's key (earlier ones match)
    assert key(TrainSettings(prior=0.5)) == key(TrainSettings())
    assert key(TrainSettings(optimizer="gauss-newton", prior=0.5)) != key(TrainSettings(optimizer="gauss-newton"))
    assert key(TrainSettings(optimizer="gauss-newton", popsize=20, triples=4)) != key(TrainSettings())


def test_train_with_gauss_newton_resumes_to_the_same_token(tiny_sd, concept_dir, tmp_path):
    import edge_ti
    from edge_ti.train import train
    model = edge_ti.open_model(tiny_sd[1])
    settings = dict(optimizer="gauss-newton", popsize=4, triples=2, heldout_triples=4, eval_every=2, patience=0,
                    dim=8, seed=2)
    whole = train(model, [concept_dir], "<c>", str(tmp_path / "whole.safetensors"), init_word="cat",
                  settings=TrainSettings(budget=40, **settings))
    assert whole.generations == 10 and whole.best_heldout <= whole.init_heldout
    out = str(tmp_path / "half.safetensors")
    train(model, [concept_dir], "<c>", out, init_word="cat", settings=TrainSettings(budget=20, **settings))
    resumed = train(model, [concept_dir], "<c>", out, init_word="cat", settings=TrainSettings(budget=40, **settings))
    np.testing.assert_array_equal(resumed.embedding["<c>"], whole.embedding["<c>"])
    # a cma checkpoint is another run's: refused, not replayed as gauss-newton
    with pytest.raises(EdgeTIError, match="checkpoint of a run with other settings"):
        train(model, [concept_dir], "<c>", out, init_word="cat",
              settings=TrainSettings(budget=60, **{**settings, "optimizer": "cma"}))


def test_gauss_newton_refuses_more_probes_than_dimensions_and_scorers_without_predictions(tiny_sd, concept_dir,
                                                                                        tmp_path):
    import edge_ti
    from edge_ti.train import train
    from edge_ti.workers import InProcess
    model = edge_ti.open_model(tiny_sd[1])
    with pytest.raises(EdgeTIError, match="popsize 6 is more than gauss-newton can use: the point and at most 4"):
        train(model, [concept_dir], "<c>", str(tmp_path / "a.safetensors"), init_word="cat",
              settings=TrainSettings(optimizer="gauss-newton", dim=4, popsize=6))

    class LossesOnly:                               # what a Ray pool gives: losses, no Gram matrices
        def __init__(self, *args):
            self.inner = InProcess(*args)

        def population_loss(self, candidates, triples):
            return self.inner.population_loss(candidates, triples)

        def close(self):
            pass
    with pytest.raises(EdgeTIError, match=r"needs each population's Gram matrix \(population_gram\), which LossesOnly"):
        train(model, [concept_dir], "<c>", str(tmp_path / "b.safetensors"), init_word="cat",
              settings=TrainSettings(optimizer="gauss-newton", budget=9), make_scorer=LossesOnly)
    assert not os.path.exists(tmp_path / "b.safetensors")


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "newton"], "Invalid value for '--optimizer'"),
    (["--prior", "0"], "Invalid value for '--prior'"),
    (["--prior", "nan"], "Invalid value for '--prior'"),
    (["--optimizer", "gauss-newton", "--dim", "3", "--popsize", "5"], "popsize 5 is more than gauss-newton can use"),
])
def test_bad_gauss_newton_options_are_one_line_errors(tiny_sd, concept_dir, tmp_path, args, message):
    from test_safe_by_default import invoke
    out = str(tmp_path / "c.safetensors")
    rc, err = invoke("train", tiny_sd[1], concept_dir, "--token", "<c>", "--init-word", "cat", *args, "--out", out)
    assert rc != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)


def test_cli_trains_with_gauss_newton(tiny_sd, concept_dir, tmp_path):
    from test_safe_by_default import invoke
    out = str(tmp_path / "c.safetensors")
    rc, err = invoke("train", tiny_sd[1], concept_dir, "--token", "<c>", "--init-word", "cat", "--optimizer",
                     "gauss-newton", "--dim", "8", "--budget", "18", "--triples", "2", "--heldout-triples", "4",
                     "--out", out)
    assert rc == 0, err
    checkpoint = search.read_checkpoint(out[:-len(".safetensors")] + ".ckpt")
    settings = (checkpoint.optimizer, checkpoint.popsize, checkpoint.sigma0, checkpoint.prior)
    assert settings == ("gauss-newton", 9, 0.25, TrainSettings.prior)
    assert checkpoint.generation == 2 and len(checkpoint.grams) == 2

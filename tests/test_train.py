"""The forward-only trainer: subspace, common random numbers, a real run, resume after a kill, no torch."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import edge_ti
import edge_ti.workers
from edge_ti import latents as lat, objective, subspace
from edge_ti.denoiser import Denoiser
from edge_ti.errors import EdgeTIError
from edge_ti.train import TrainSettings, _settings_key, check_settings, prompt_templates, train

HERE = os.path.dirname(os.path.abspath(__file__))


def test_subspace_maps_zero_to_e0_and_pca_is_ordered():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(500, 16)).astype(np.float32) * np.linspace(2, 0.1, 16, dtype=np.float32)
    e0 = rng.normal(size=(2, 16)).astype(np.float32)
    for kind in ("pca", "prior", "full"):
        W = subspace.basis(kind, table, 8 if kind != "full" else 16, sigma=0.5)
        z = np.zeros((3, 2 * W.shape[1]))
        assert np.array_equal(subspace.embeddings_from_z(e0, W, z), np.tile(e0[None], (3, 1, 1)))
    W = subspace.pca_basis(table, 8)
    norms = np.linalg.norm(W, axis=0)
    assert np.all(np.diff(norms) <= 0)  # largest variance first
    gram = (W / norms).T @ (W / norms)
    assert np.allclose(gram, np.eye(8), atol=1e-4)  # orthogonal directions
    # each column's norm is the table's standard deviation along it
    assert np.allclose(norms[0], np.std((table - table.mean(0)) @ (W[:, 0] / norms[0]), ddof=1), rtol=1e-3)
    # vector j of a candidate uses its own block of z
    z = np.zeros((1, 16))
    z[0, 8] = 1.0
    cand = subspace.embeddings_from_z(e0, W, z)
    assert np.array_equal(cand[0, 0], e0[0]) and np.allclose(cand[0, 1], e0[1] + W[:, 0])


def test_common_random_numbers_and_batching(tiny_sd):
    model = edge_ti.open_model(tiny_sd[1])
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 4, 16, 16)).astype(np.float32)
    prompt_ids = model.tokenize(["a photo of <t>", "a <t> on a table"], {"<t>": np.zeros((1, 32))})
    triples = objective.draw_triples(rng, 5, 2, 2, 1000, (4, 16, 16))
    same = np.tile(rng.normal(0, 0.05, (1, 1, 32)).astype(np.float32), (4, 1, 1))
    losses = objective.population_loss(Denoiser(model), same, prompt_ids, latents, triples)
    assert np.ptp(losses) == 0  # identical candidates, identical numbers: identical losses
    mixed = rng.normal(0, 0.05, (4, 1, 32)).astype(np.float32)
    together = objective.population_loss(Denoiser(model), mixed, prompt_ids, latents, triples, max_batch=20)
    alone = [objective.population_loss(Denoiser(model), mixed[p:p + 1], prompt_ids, latents, triples, max_batch=1)[0]
             for p in range(4)]
    assert np.array_equal(together, alone)  # bitwise: a scorer may split a population any way


def test_train_run_lowers_heldout_loss(tiny_sd, concept_dir, tmp_path):
    model = edge_ti.open_model(tiny_sd[1])
    out = str(tmp_path / "c.safetensors")
    settings = TrainSettings(vectors=2, budget=300, popsize=10, eval_every=2, patience=0, seed=0,
                             triples=2, heldout_triples=8)  # fewer triples: a quarter of the time
    result = train(model, [concept_dir], "<c>", out, init_word="cat", settings=settings)
    assert result.best_heldout < result.init_heldout
    emb = edge_ti.load_embedding(out)
    assert emb["<c>"].shape == (3, 32)  # 2 searched vectors + the anchor ("cat")
    lines = open(result.paths["log"]).read().splitlines()
    assert len(lines) == result.generations == 30
    assert json.loads(lines[-1])["evaluations"] == 300
    assert Image.open(result.paths["curve"]).size == (720, 480)
    assert not np.allclose(emb["<c>"][:2], model.token_embeddings[model.tokenizer.token_ids("cat")].mean(0))
    # the norm cap (on by default): no vector longer than the vocabulary's longest row
    assert np.linalg.norm(emb["<c>"], axis=-1).max() <= np.linalg.norm(model.token_embeddings, axis=1).max() * (1 + 1e-6)
    # the written embedding is the held-out winner, re-scored: it reproduces best_heldout. The held-out
    # triples, as train() draws them: from default_rng([seed, 1, 0]), over the latents of the images
    # and their mirrors and the object templates
    latents = lat.encode_images(model, lat.load_images([concept_dir], model.resolution, flip=True))
    prompts = [t.format("<c>") for t in prompt_templates("object")]
    heldout = objective.draw_triples(np.random.default_rng([0, 1, 0]), settings.heldout_triples, len(latents),
                                     len(prompts), 1000, latents.shape[1:])
    rescored = objective.population_loss(Denoiser(model), emb["<c>"][None], model.tokenize(prompts, emb), latents,
                                         heldout)
    assert float(rescored[0]) == result.best_heldout


def test_anchor_is_the_init_words_embedding_kept_last(tiny_sd, concept_dir, tmp_path):
    """The default with --init-word and object prompts: the token's last vector is the word's embedding, never
    searched; the held-out loss recorded is the whole token's. Off, or with style prompts: no anchor."""
    model = edge_ti.open_model(tiny_sd[1])
    word = model.token_embeddings[model.tokenizer.token_ids("cat")].mean(0)                 # (D,)
    common = dict(budget=40, popsize=8, eval_every=2, patience=0, triples=2, heldout_triples=8)
    runs = {}
    for name, extra in (("auto", {}), ("off", {"anchor": False}), ("style", {"template": "style"}),
                        ("style-on", {"template": "style", "anchor": True})):
        out = str(tmp_path / f"{name}.safetensors")
        runs[name] = train(model, [concept_dir], "<c>", out, init_word="cat", settings=TrainSettings(**common, **extra))
        assert np.array_equal(edge_ti.load_embedding(out)["<c>"], runs[name].embedding["<c>"])
    for name in ("auto", "style-on"):
        token = runs[name].embedding["<c>"]
        assert token.shape == (2, 32) and np.array_equal(token[1], word.astype(np.float32))
        assert np.array_equal(runs[name].anchor[0], token[1])
    for name in ("off", "style"):
        assert runs[name].embedding["<c>"].shape == (1, 32) and runs[name].anchor is None
    # the recorded held-out loss is the written two-vector token's, re-scored as train() draws the held-out set
    latents = lat.encode_images(model, lat.load_images([concept_dir], model.resolution, flip=True))
    prompts = [t.format("<c>") for t in prompt_templates("object")]
    heldout = objective.draw_triples(np.random.default_rng([0, 1, 0]), 8, len(latents), len(prompts), 1000,
                                     latents.shape[1:])
    emb = runs["auto"].embedding
    rescored = objective.population_loss(Denoiser(model), emb["<c>"][None], model.tokenize(prompts, emb), latents,
                                         heldout)
    assert float(rescored[0]) == runs["auto"].best_heldout
    # the init recorded beside it (edge-ti evaluate compares with it) is the whole token at the start: word, word
    from edge_ti.evaluate import load_for_evaluation
    _, init, recorded = load_for_evaluation(model, str(tmp_path / "auto.safetensors"))
    assert recorded == "cat" and np.allclose(init, np.tile(word, (2, 1)))
    # a checkpoint of an anchored run is not resumed without it
    e0 = np.zeros((1, 32), np.float32)
    keys = {a: _settings_key(model, TrainSettings(anchor=a), latents, e0, "<c>") for a in (True, "word", "images", False)}
    assert keys[True] == keys["word"]     # "word" is what True was: an anchored run of before still resumes
    assert len({keys["word"], keys["images"], keys[False]}) == 3


def test_anchor_bad_settings(tiny_sd, concept_dir, tmp_path):
    for value in ("yes", "on", 1, None):
        with pytest.raises(EdgeTIError, match="anchor must be auto, word, images or false"):
            check_settings(TrainSettings(anchor=value))
    for value in (True, "word", "images"):
        with pytest.raises(EdgeTIError, match="no room for the anchor"):
            check_settings(TrainSettings(anchor=value, vectors=75))
    model = edge_ti.open_model(tiny_sd[1])
    out = tmp_path / "o.safetensors"
    for value in (True, "word"):
        with pytest.raises(EdgeTIError, match="anchor word needs an init word"):
            train(model, [concept_dir], "<c>", str(out), init_embedding=np.zeros((1, 32), np.float32),
                  settings=TrainSettings(anchor=value, budget=8))
    with pytest.raises(EdgeTIError, match="no clip/ folder"):   # the images' CLIP init needs the model's CLIP
        train(model, [concept_dir], "<c>", str(out), init_word="cat", settings=TrainSettings(anchor="images", budget=8))
    assert not out.exists()


def test_loss_weighting(tiny_sd, tiny_sd_v, concept_dir, tmp_path):
    """eps scores a v model by alpha_bar_t x its v loss; an epsilon model is scored the same either way, so its
    checkpoints and results do not change. auto (the default) is eps with object prompts, the model's own with style
    prompts: the same runs as saying so."""
    runs = {}
    for which, folder in (("eps-model", tiny_sd[1]), ("v-model", tiny_sd_v[1])):
        model = edge_ti.open_model(folder)
        for template in ("object", "style"):
            for weighting in ("eps", "model", "auto"):
                out = str(tmp_path / f"{which}-{template}-{weighting}.safetensors")
                settings = TrainSettings(budget=24, popsize=6, eval_every=2, patience=0, triples=2, heldout_triples=8,
                                         loss_weighting=weighting, template=template)
                runs[which, template, weighting] = train(model, [concept_dir], "<c>", out, init_word="cat",
                                                         settings=settings)
    for template in ("object", "style"):
        same = runs["eps-model", template, "eps"], runs["eps-model", template, "model"]
        v = runs["v-model", template, "eps"], runs["v-model", template, "model"]
        assert same[0].init_heldout == same[1].init_heldout
        np.testing.assert_array_equal(same[0].embedding["<c>"], same[1].embedding["<c>"])
        assert v[0].init_heldout < v[1].init_heldout  # every weight alpha_bar_t < 1
        auto = runs["v-model", template, "auto"]
        chosen = runs["v-model", template, {"object": "eps", "style": "model"}[template]]
        assert auto.init_heldout == chosen.init_heldout
        np.testing.assert_array_equal(auto.embedding["<c>"], chosen.embedding["<c>"])
    # checkpoints: an epsilon model's key ignores the setting; a v model's tells the two losses apart (auto is
    # resolved before the key is made)
    latents, e0 = np.zeros((1, 4, 4, 4), np.float32), np.zeros((1, 32), np.float32)
    for folder, differ in ((tiny_sd[1], False), (tiny_sd_v[1], True)):
        model = edge_ti.open_model(folder)
        keys = {w: _settings_key(model, TrainSettings(loss_weighting=w), latents, e0, "<c>") for w in ("eps", "model")}
        assert (keys["eps"] != keys["model"]) == differ
    with pytest.raises(EdgeTIError, match="unknown loss_weighting 'v'"):
        check_settings(TrainSettings(loss_weighting="v"))


def test_importance_timesteps_keep_the_objective():
    """t drawn from q with each loss times factor estimates the mean over uniform t: exactly, summed over t."""
    rng = np.random.default_rng(0)
    weight = 1.0 / np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)   # a v model's, SD's betas
    q, factor = objective.importance_timesteps(weight)
    assert q.sum() == pytest.approx(1.0) and np.all(q > 0) and q[-1] > 100 * q[0]
    loss = rng.uniform(0.5, 2.0, 1000) * weight                          # any per-t loss in the weighted objective
    assert np.sum(q * factor * loss) == pytest.approx(loss.mean(), rel=1e-12)
    drawn = objective.draw_triples(np.random.default_rng(1), 20000, 3, 5, 1000, (4, 2, 2), timestep_p=q).timesteps
    assert abs(np.mean(drawn >= 900) - q[900:].sum()) < 0.02             # the draw follows q (0.6 of the weight)
    uniform = objective.draw_triples(np.random.default_rng(1), 20000, 3, 5, 1000, (4, 2, 2)).timesteps
    assert abs(np.mean(uniform >= 900) - 0.1) < 0.01


def test_weighted_timesteps(tiny_sd, tiny_sd_v, concept_dir, tmp_path):
    """--timesteps weighted (the default) on a v model's own loss (a style's, by default): every triple, the held-out
    set's too, drawn from q ~ 1 / alpha_bar_t and weighed by alpha_bar_t mean(1 / alpha_bar). Where the loss weighs t
    evenly (an epsilon model, or the eps loss: objects by default) it is the uniform run, with the uniform run's
    checkpoint key, so those checkpoints still match; on a v model's own loss the key tells the two apart."""
    seen = []

    class Recording(edge_ti.workers.InProcess):
        def population_loss(self, candidates, triples):
            seen.append(triples)
            return super().population_loss(candidates, triples)

    def run(folder, name, **kw):
        settings = TrainSettings(budget=24, popsize=6, eval_every=2, patience=0, triples=2, heldout_triples=8,
                                 template="style", **kw)
        seen.clear()
        result = train(edge_ti.open_model(folder), [concept_dir], "<c>", str(tmp_path / f"{name}.safetensors"),
                       init_word="cat", settings=settings, make_scorer=Recording)
        return result, list(seen)

    for folder, weighting in ((tiny_sd[1], "auto"), (tiny_sd_v[1], "eps")):   # both weigh t evenly
        (a, _), (b, _) = (run(folder, f"{w}-{weighting}", timesteps=w, loss_weighting=weighting)
                          for w in ("uniform", "weighted"))
        np.testing.assert_array_equal(a.embedding["<c>"], b.embedding["<c>"])
        assert a.init_heldout == b.init_heldout
    uniform, uniform_triples = run(tiny_sd_v[1], "uniform", timesteps="uniform")
    weighted, weighted_triples = run(tiny_sd_v[1], "weighted")
    alphas_bar = Denoiser(edge_ti.open_model(tiny_sd_v[1])).alphas_bar
    for triples in weighted_triples:
        np.testing.assert_allclose(triples.weight, alphas_bar[triples.timesteps] * np.mean(1.0 / alphas_bar))
    assert all(t.weight is None for t in uniform_triples)
    t_weighted = np.concatenate([t.timesteps for t in weighted_triples])
    t_uniform = np.concatenate([t.timesteps for t in uniform_triples])
    assert np.median(t_weighted) > np.median(t_uniform)
    latents, e0 = np.zeros((1, 4, 4, 4), np.float32), np.zeros((1, 32), np.float32)

    def key(folder, **kw):
        return _settings_key(edge_ti.open_model(folder), TrainSettings(**kw), latents, e0, "<c>")
    assert key(tiny_sd_v[1], loss_weighting="model", timesteps="uniform") != key(tiny_sd_v[1], loss_weighting="model")
    assert key(tiny_sd_v[1], loss_weighting="eps", timesteps="uniform") == key(tiny_sd_v[1], loss_weighting="eps")
    assert key(tiny_sd[1], loss_weighting="model", timesteps="uniform") == key(tiny_sd[1], loss_weighting="model")
    with pytest.raises(EdgeTIError, match="unknown timesteps 'importance'"):
        check_settings(TrainSettings(timesteps="importance"))


def test_early_stop(tiny_sd, concept_dir, tmp_path):
    model = edge_ti.open_model(tiny_sd[1])
    result = train(model, [concept_dir], "<c>", str(tmp_path / "c.safetensors"), init_word="cat",
                   settings=TrainSettings(budget=100000, popsize=6, eval_every=1, patience=3, min_improvement=0.5,
                                          triples=2, heldout_triples=8))  # nothing improves by half: stop after 4 checks
    assert result.generations == 4 and "improved by less than 0.5 in 3 checks" in result.stop_reason



def test_resume_after_kill_matches_uninterrupted(tiny_sd, concept_dir, tmp_path):
    # 20 generations of 8 (fewer triples than the defaults: cheaper, checked the same), killed after 4
    # or more, resumed to the end
    common = [tiny_sd[1], concept_dir, "--token", "<c>", "--init-word", "cat", "--budget", "160",
              "--triples", "2", "--heldout-triples", "8", "--popsize", "8", "--seed", "3"]
    from test_safe_by_default import invoke  # the uninterrupted run and the refusal in this process
    whole = str(tmp_path / "whole.safetensors")
    rc, err = invoke("train", *common, "--out", whole)
    assert rc == 0, err

    killed = str(tmp_path / "killed.safetensors")
    log = str(tmp_path / "killed.log.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "edge_ti", "train", *common, "--out", killed],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and len(open(log).read().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(killed)  # killed mid-run: no embedding yet
    done = len(open(log).read().splitlines())
    assert 4 <= done < 20
    proc = subprocess.run([sys.executable, "-m", "edge_ti", "train", *common, "--out", killed, "--resume"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(edge_ti.load_embedding(killed)["<c>"], edge_ti.load_embedding(whole)["<c>"])
    assert open(log).read() != "" and len(open(log).read().splitlines()) == 20
    # resuming with other settings is refused with one line
    rc, err = invoke("train", *common[:-2], "--seed", "4", "--out", killed, "--resume")
    assert rc == 1 and "other settings" in err and "Traceback" not in err


def test_train_cli_without_torch(tiny_sd, concept_dir, tmp_path):
    out = str(tmp_path / "e.safetensors")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "without_torch.py"), "edge_ti", "train", tiny_sd[1],
                           concept_dir, "--token", "<c>", "--init-word", "cat", "--budget", "60", "--resolution", "16",
                           "--out", out],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "held-out loss: init" in proc.stdout
    assert edge_ti.load_embedding(out)["<c>"].shape == (2, 32)  # the searched vector and the anchor
    assert "2 vectors; its last is 'cat'" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--init-word", "cat", "EMPTY"], "no images in this folder"),
    (["--init-word", "cat", "NOTIMAGE"], "not a readable image"),
    (["IMAGES"], "--init-word"),
    (["--init-word", "cat", "--max-time", "soon", "IMAGES"], "--max-time"),
    (["--init-word", "cat", "--resolution", "33", "IMAGES"], "not a multiple of the VAE's scale factor 2"),
    (["--init-word", "cat", "--anchor", "yes", "IMAGES"], "'--anchor'"),
    (["--init-word", "cat", "--anchor", "images", "IMAGES"], "no clip/ folder"),
])
def test_train_bad_input(tiny_sd, concept_dir, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "note.png").write_text("not an image")
    subst = {"EMPTY": str(tmp_path / "empty"), "NOTIMAGE": str(tmp_path / "note.png"), "IMAGES": concept_dir}
    args = [subst.get(a, a) for a in args]
    out = tmp_path / "o.safetensors"
    proc = subprocess.run([sys.executable, "-m", "edge_ti", "train", tiny_sd[1], "--token", "<c>", "--budget", "20",
                           "--out", str(out), *args], capture_output=True, text=True)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_vae_encoder_released_after_encoding(tiny_sd, concept_dir):
    # used once per image set: its weights and arena must not sit beside the UNet's during training
    from edge_ti import latents as lat
    model = edge_ti.open_model(tiny_sd[1])
    pixels = lat.load_images([concept_dir], model.resolution)
    latents = lat.encode_images(model, pixels, sample=True, seed=987654)  # a key no other test caches
    assert latents.shape == (3, 4, 16, 16)
    assert "vae_encoder" not in model.loaded_parts
    again = lat.encode_images(model, pixels, sample=True, seed=987654)    # from the cache now
    np.testing.assert_array_equal(again, latents)

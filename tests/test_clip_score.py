"""CLIP scores of candidate tokens (edge_ti.clip_score) equal transformers' CLIP; the refinement before the search."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

import edge_ti
from edge_ti import clip_score, shapes, subspace
from edge_ti.errors import EdgeTIError
from edge_ti.train import TrainSettings, search_space, train
from edge_ti.workers import InProcess

HERE = os.path.dirname(os.path.abspath(__file__))
VAE = os.path.join(os.path.dirname(HERE), "export", "shapes_diffusers", "vae")


@pytest.fixture(scope="module")
def clip_conditioned(tmp_path_factory):
    """A few steps of shapes_train --text-encoder clip: a model whose text encoder is its CLIP's text tower."""
    from edge_ti_export import shapes_train
    out = str(tmp_path_factory.mktemp("clip-conditioned"))
    cfg = shapes_train.TrainConfig(n_images=200, unet_steps=2, clip_steps=2, text_encoder="clip",
                                   prediction_type="v_prediction")
    onnx_dir = shapes_train.train(out, cfg, vae_dir=VAE)
    return out, onnx_dir


def _images(n=4, seed=0):
    return [Image.fromarray(i) for i in shapes.concept_images(n, np.random.default_rng(seed), shape="star", color="red")]


def test_clip_text_encoder_is_the_clip_text_tower(clip_conditioned):
    out, onnx_dir = clip_conditioned
    with open(os.path.join(out, "diffusers", "text_encoder", "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 2  # the tiny CLIP's, not the own encoder's 3
    clip = CLIPModel.from_pretrained(os.path.join(out, "clip"))
    model = edge_ti.open_model(onnx_dir)
    np.testing.assert_array_equal(model.token_embeddings,
                                  clip.text_model.embeddings.token_embedding.weight.detach().numpy())


def test_scores_equal_transformers(clip_conditioned):
    out, onnx_dir = clip_conditioned
    model = edge_ti.open_model(onnx_dir)
    images = _images()
    prompts = ["a photo of a <t>", "a rendering of a <t> on the left"]
    rng = np.random.default_rng(0)
    e0 = model.token_embeddings[model.tokenizer.token_ids("star")].mean(axis=0)
    candidates = (e0[None, None] + 0.5 * rng.standard_normal((3, 1, e0.shape[0]))).astype(np.float32)
    score = clip_score.ClipScore(model, images, model.tokenize(prompts, {"<t>": candidates[0]}))
    got = score(candidates)
    # transformers: the candidate as a new row of the token table, its id in the prompts
    clip = CLIPModel.from_pretrained(os.path.join(out, "clip")).eval()
    processor = CLIPImageProcessor.from_pretrained(os.path.join(out, "clip"))
    with torch.no_grad():
        image = torch.nn.functional.normalize(clip.get_image_features(
            pixel_values=processor(images=images, return_tensors="pt").pixel_values), dim=-1)
        want = []
        V = model.vocab_size
        ids = torch.from_numpy(model.tokenize(prompts, {"<t>": candidates[0]}))
        for candidate in candidates:
            table = clip.text_model.embeddings.token_embedding.weight
            clip.text_model.embeddings.token_embedding = torch.nn.Embedding.from_pretrained(
                torch.cat([table[:V], torch.from_numpy(candidate)]))
            text = torch.nn.functional.normalize(clip.get_text_features(input_ids=ids), dim=-1)
            want.append(float((text @ image.T).mean()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert score.evaluations == 3


def test_refine_raises_the_score_within_the_norm_cap(clip_conditioned):
    model = edge_ti.open_model(clip_conditioned[1])
    e0 = model.token_embeddings[model.tokenizer.token_ids("star")].mean(axis=0)[None]      # (1, D)
    _, sigma, W, max_norm = search_space(model.token_embeddings, TrainSettings())
    score = clip_score.ClipScore(model, _images(), model.tokenize(["a photo of a <t>"], {"<t>": e0}))
    z, record = clip_score.refine(score, e0, W, max_norm, 200, sigma=sigma)
    refined = subspace.embeddings_from_z(e0, W, z[None], max_norm)
    assert record["clip_score"] > record["clip_score_init"]
    assert record["clip_evaluations"] >= 200
    np.testing.assert_allclose(score(refined)[0], record["clip_score"], rtol=1e-5)
    assert np.linalg.norm(refined) <= max_norm * (1 + 1e-5)


def test_train_starts_where_the_refinement_ended(clip_conditioned, tmp_path, caplog):
    model = edge_ti.open_model(clip_conditioned[1])
    images = _images()
    settings = TrainSettings(clip_refine=100, budget=40, heldout_triples=4)
    result = train(model, images, "<t>", str(tmp_path / "t.safetensors"), init_word="star", settings=settings)
    word = model.token_embeddings[model.tokenizer.token_ids("star")].mean(axis=0)[None]
    # the search began where the refinement ended, unless the held-out loss refused it (said in the log);
    # which of the two happens depends on the fixture's two-step weights
    refused = "the search starts from the init" in caplog.text
    assert "CLIP refinement: score" in caplog.text
    assert np.allclose(result.start, word) == refused
    # the same run again (a resume) continues it: the refinement is deterministic
    again = train(model, images, "<t>", str(tmp_path / "t.safetensors"), init_word="star",
                  settings=TrainSettings(clip_refine=100, budget=80, heldout_triples=4))
    assert again.evaluations == 80 and np.array_equal(again.start, result.start)


def test_a_clip_of_another_text_encoder_is_refused(tiny_sd, tmp_path):
    """The tests' tiny SD with a tiny CLIP beside it: two different text towers, one line naming clip/."""
    import shutil
    from edge_ti_export.clip_export import export_clip
    from edge_ti_export.tiny_clip import tiny_clip
    model_dir = str(tmp_path / "onnx")
    shutil.copytree(tiny_sd[1], model_dir)
    export_clip(tiny_clip(str(tmp_path / "clip-src")), model_dir)
    model = edge_ti.open_model(model_dir)
    with pytest.raises(EdgeTIError, match=r"clip: its text tower is not .*'s text encoder \(token tables") as err:
        train(model, _images(), "<t>", str(tmp_path / "t.safetensors"), init_word="cat",
              settings=TrainSettings(clip_refine=10, budget=20))
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "t.safetensors")
    with pytest.raises(EdgeTIError, match="no clip/ folder"):
        train(edge_ti.open_model(tiny_sd[1]), _images(), "<t>", str(tmp_path / "u.safetensors"), init_word="cat",
              settings=TrainSettings(clip_refine=10, budget=20))


def test_bad_clip_refine_is_one_line(tiny_sd, tmp_path):
    from test_safe_by_default import invoke
    for bad in (-1, "always", 2.5, True):
        with pytest.raises(EdgeTIError, match="clip_refine must be auto, 0 \\(none\\) or more evaluations, got "):
            train(edge_ti.open_model(tiny_sd[1]), _images(), "<t>", str(tmp_path / "t.safetensors"), init_word="cat",
                  settings=TrainSettings(clip_refine=bad))
    for bad in ("-5", "sometimes", "1.5", "", "\u00b2"):  # "²" is a digit to str.isdigit, not to int()
        rc, err = invoke("train", tiny_sd[1], tiny_sd[1], "--token", "<t>", "--out", str(tmp_path / "t.safetensors"),
                         "--clip-refine", bad)
        assert rc != 0 and "Invalid value for '--clip-refine'" in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []


def test_auto_refines_where_the_clip_scores_the_tokens(clip_conditioned, tiny_sd, tmp_path, caplog):
    """The default clip_refine "auto": REFINE_AUTO evaluations on a model whose clip/ text tower is its text
    encoder; none, said in the log, on a model without a clip/ (the same run as clip_refine=0)."""
    import logging
    caplog.set_level(logging.INFO, logger="edge_ti")
    model = edge_ti.open_model(clip_conditioned[1])
    assert clip_score.why_not(model) is None
    result = train(model, _images(), "<t>", str(tmp_path / "a.safetensors"), init_word="star",
                   settings=TrainSettings(budget=20, heldout_triples=4))
    evaluations = clip_score.path_evaluations(clip_score.REFINE_AUTO, 6)  # the path's (no line by default)
    assert evaluations == 6 * 16 * 20
    assert f"{evaluations} CLIP-score evaluations (text passes only) on a CLIP path of 6 stages before the search" \
        in caplog.text
    assert f"in {evaluations} evaluations" in caplog.text or "the search starts from the init" in caplog.text
    explicit = train(model, _images(), "<t>", str(tmp_path / "b.safetensors"), init_word="star",
                     settings=TrainSettings(budget=20, heldout_triples=4, clip_refine=clip_score.REFINE_AUTO))
    np.testing.assert_array_equal(result.start, explicit.start)
    np.testing.assert_array_equal(result.embedding["<t>"], explicit.embedding["<t>"])
    # style prompts: none by default (quality.md, stop 48), said in the log; the same run as clip_refine=0
    caplog.clear()
    style = [train(model, _images(), "<t>", str(tmp_path / f"s{refine}.safetensors"), init_word="star",
                   settings=TrainSettings(budget=20, heldout_triples=4, template="style", clip_refine=refine))
             for refine in ("auto", 0)]
    assert "no CLIP refinement before the search: style prompts" in caplog.text
    assert "CLIP-score evaluations" not in caplog.text and not style[0].clip_refined
    np.testing.assert_array_equal(style[0].embedding["<t>"], style[1].embedding["<t>"])

    caplog.clear()
    bare = edge_ti.open_model(tiny_sd[1])
    assert "no clip/ folder" in clip_score.why_not(bare)
    auto = train(bare, _images(), "<t>", str(tmp_path / "c.safetensors"), init_word="cat",
                 settings=TrainSettings(budget=20, heldout_triples=4))
    assert "no CLIP refinement before the search" in caplog.text and "CLIP refinement: score" not in caplog.text
    none = train(bare, _images(), "<t>", str(tmp_path / "d.safetensors"), init_word="cat",
                 settings=TrainSettings(budget=20, heldout_triples=4, clip_refine=0))
    np.testing.assert_array_equal(auto.embedding["<t>"], none.embedding["<t>"])


def test_a_refinement_the_denoising_loss_disagrees_with_is_dropped(clip_conditioned, tmp_path, monkeypatch, caplog):
    """The guard: a refined token whose held-out loss is higher than the init's is not where the search starts."""
    model = edge_ti.open_model(clip_conditioned[1])
    settings = TrainSettings(clip_refine=20, budget=20, heldout_triples=4, clip_line=5)

    def far_away(score, e0, W, max_norm, evaluations, sigma, seed, anchor):  # a token the UNet reads as something else
        return np.full(W.shape[1], 50.0), {"clip_score_init": 0.1, "clip_score": 0.9, "clip_evaluations": 20,
                                            "clip_seconds": 0.0}
    monkeypatch.setattr(clip_score, "refine", far_away)
    word = model.token_embeddings[model.tokenizer.token_ids("star")].mean(axis=0)[None]

    class FarIsWorse(InProcess):  # two training steps of a UNet barely read the text: make the loss say so
        def population_loss(self, candidates, triples):
            far = np.linalg.norm(candidates - word[None], axis=(1, 2))
            return super().population_loss(candidates, triples) + far
    result = train(model, _images(), "<t>", str(tmp_path / "t.safetensors"), init_word="star", settings=settings,
                   make_scorer=FarIsWorse)
    np.testing.assert_array_equal(result.start, word)
    assert "but the held-out loss rose" in caplog.text


def test_the_held_out_loss_along_the_line_chooses_the_start(clip_conditioned, tmp_path, monkeypatch, caplog):
    """clip_line=5: of the init, the refined token and the three points between, the one with the lowest held-out
    loss is where the search starts; bad point counts are refused before anything runs."""
    model = edge_ti.open_model(clip_conditioned[1])
    settings = TrainSettings(clip_refine=20, budget=20, heldout_triples=4, clip_line=5, clip_path=0)
    _, _, W, max_norm = search_space(model.token_embeddings, settings)
    z = np.full(W.shape[1], 2.0)
    monkeypatch.setattr(clip_score, "refine", lambda score, e0, W, max_norm, evaluations, sigma, seed, anchor: (
        z, {"clip_score_init": 0.1, "clip_score": 0.9, "clip_evaluations": 20, "clip_seconds": 0.0}))
    word = model.token_embeddings[model.tokenizer.token_ids("star")].mean(axis=0)[None]
    quarter = subspace.embeddings_from_z(word, W, 0.25 * z[None], max_norm)[0]      # (1, D)

    class QuarterIsBest(InProcess):  # the UNet of a two-step fixture barely reads the text: make the loss say where
        def population_loss(self, candidates, triples):
            return super().population_loss(candidates, triples) + 10 * np.linalg.norm(candidates[:, :1] - quarter,
                                                                                      axis=(1, 2))
    result = train(model, _images(), "<t>", str(tmp_path / "t.safetensors"), init_word="star", settings=settings,
                   make_scorer=QuarterIsBest)
    np.testing.assert_allclose(result.start, quarter, rtol=1e-6)
    assert result.clip_refined and "at 0.25 of the way to the refined token" in caplog.text
    for bad in (1, -3, True, 2.5, "3"):
        with pytest.raises(EdgeTIError, match="clip_line must be 0 \\(no line\\) or 2 or more points, got "):
            train(model, _images(), "<t>", str(tmp_path / "bad.safetensors"), init_word="star",
                  settings=TrainSettings(clip_line=bad))
    assert not os.path.exists(tmp_path / "bad.safetensors")


def test_the_clip_path_stays_in_its_growing_balls_and_climbs(clip_conditioned):
    """clip_score.path: stage k's token lies within k/stages of PATH_REACH sqrt(dim) of the init, and the CLIP score
    of the stages' tokens rises from the init's (the ball only grows, and one CMA-ES run goes on through it)."""
    model = edge_ti.open_model(clip_conditioned[1])
    images, settings = _images(), TrainSettings()
    _, sigma, W, max_norm = search_space(model.token_embeddings, settings)
    e0 = model.token_embeddings[model.tokenizer.token_ids("star")].mean(axis=0)[None]
    score = clip_score.ClipScore(model, images, model.tokenize(["a photo of a <t>", "a rendering of a <t>"],
                                                               {"<t>": e0}))
    zs, record = clip_score.path(score, e0, W, max_norm, 700, 3, sigma=sigma, seed=0)
    assert zs.shape == (3, W.shape[1]) and record["clip_path_evaluations"] == 660  # 11 generations of 20 per stage
    assert clip_score.path_evaluations(700, 3) == 660 and clip_score.path_evaluations(20, 6) == 120
    radii = clip_score.PATH_REACH * np.sqrt(W.shape[1]) * np.arange(1, 4) / 3
    assert np.all(np.linalg.norm(zs, axis=1) <= radii * (1 + 1e-6))
    scores = score(subspace.embeddings_from_z(e0, W, np.concatenate([np.zeros((1, W.shape[1])), zs]), max_norm))
    assert scores[1] > scores[0] and scores[3] >= scores[1] - 0.02, scores  # each stage's best, not each generation's


def test_the_held_out_loss_chooses_a_point_of_the_clip_path(clip_conditioned, tmp_path, monkeypatch, caplog):
    """With the path (the default), its stages' tokens join the line's points, and the one with the lowest held-out
    loss is where the search starts; clip_path=0 never runs it; bad stage counts are refused before any work."""
    import logging
    caplog.set_level(logging.WARNING, logger="edge_ti")
    model = edge_ti.open_model(clip_conditioned[1])
    settings = TrainSettings(clip_refine=20, budget=20, heldout_triples=4, clip_line=5)
    assert settings.clip_path == 6 and TrainSettings().clip_line == 0
    _, _, W, max_norm = search_space(model.token_embeddings, settings)
    z = np.full(W.shape[1], 2.0)
    monkeypatch.setattr(clip_score, "refine", lambda score, e0, W, max_norm, evaluations, sigma, seed, anchor: (
        z, {"clip_score_init": 0.1, "clip_score": 0.9, "clip_evaluations": 20, "clip_seconds": 0.0}))
    stages = np.random.default_rng(0).standard_normal((6, W.shape[1]))
    calls = []

    def fake_path(score, e0, W, max_norm, evaluations, stages_asked, sigma, seed, anchor):
        calls.append((evaluations, stages_asked))
        return stages, {"clip_path_evaluations": 120, "clip_path_seconds": 0.0}
    monkeypatch.setattr(clip_score, "path", fake_path)
    word = model.token_embeddings[model.tokenizer.token_ids("star")].mean(axis=0)[None]
    third = subspace.embeddings_from_z(word, W, stages[2:3], max_norm)[0]            # (1, D)

    class ThirdStageIsBest(InProcess):  # the two-step fixture's UNet barely reads the text: make the loss say where
        def population_loss(self, candidates, triples):
            return super().population_loss(candidates, triples) + 10 * np.linalg.norm(candidates[:, :1] - third,
                                                                                      axis=(1, 2))
    result = train(model, _images(), "<t>", str(tmp_path / "t.safetensors"), init_word="star", settings=settings,
                   make_scorer=ThirdStageIsBest)
    assert calls == [(20, 6)]
    np.testing.assert_allclose(result.start, third, rtol=1e-6)
    assert result.clip_refined and "in 140 evaluations" in caplog.text and "at stage 3 of 6 of the CLIP path" in caplog.text

    calls.clear()
    train(model, _images(), "<t>", str(tmp_path / "u.safetensors"), init_word="star",
          settings=TrainSettings(clip_refine=20, budget=20, heldout_triples=4, clip_line=5, clip_path=0),
          make_scorer=ThirdStageIsBest)
    assert calls == []

    # clip_line=0 (the default): no refinement run, no line: the init and the path's stages
    def no_refine(*args, **kwargs):
        raise AssertionError("clip_line=0 ran the refinement")
    monkeypatch.setattr(clip_score, "refine", no_refine)
    monkeypatch.setattr(clip_score, "path", lambda *args, **kwargs: (
        fake_path(*args, **kwargs)[0], {"clip_path_evaluations": 120, "clip_path_seconds": 0.0,
                                        "clip_score_init": 0.1, "clip_score": 0.8}))
    caplog.clear()
    result = train(model, _images(), "<t>", str(tmp_path / "v.safetensors"), init_word="star",
                   settings=TrainSettings(clip_refine=20, budget=20, heldout_triples=4),
                   make_scorer=ThirdStageIsBest)
    assert calls == [(20, 6)]
    np.testing.assert_allclose(result.start, third, rtol=1e-6)
    assert result.start_heldout < result.init_heldout       # the chosen stage's held-out loss starts the search
    assert "0.1000 -> 0.8000 in 120 evaluations" in caplog.text and "at stage 3 of 6 of the CLIP path" in caplog.text
    with pytest.raises(EdgeTIError, match="clip_path 0 \\(no path\\) with clip_line 0 \\(no line, the default\\) "
                                          "leaves the CLIP refinement nothing to do: give clip_line 5"):
        train(model, _images(), "<t>", str(tmp_path / "bad.safetensors"), init_word="star",
              settings=TrainSettings(clip_path=0))
    for bad in (-1, True, 2.5, "3", None):
        with pytest.raises(EdgeTIError, match="clip_path must be 0 \\(none\\) or more stages, got "):
            train(model, _images(), "<t>", str(tmp_path / "bad.safetensors"), init_word="star",
                  settings=TrainSettings(clip_path=bad))
    assert not os.path.exists(tmp_path / "bad.safetensors")


def test_the_init_is_reported_as_the_init_when_the_refinement_is_kept(clip_conditioned, tmp_path, monkeypatch):
    """With the refined token kept, the result and the file's metadata still give the init's held-out loss and
    embedding (not the refined token's, where the search started); when it is dropped the two are the same."""
    from edge_ti.embeddings import read_safetensors
    model = edge_ti.open_model(clip_conditioned[1])
    word = model.token_embeddings[model.tokenizer.token_ids("star")].mean(axis=0)[None]
    monkeypatch.setattr(clip_score, "refine", lambda score, e0, W, max_norm, evaluations, sigma, seed, anchor: (
        np.full(W.shape[1], 0.5), {"clip_score_init": 0.1, "clip_score": 0.9, "clip_evaluations": 20, "clip_seconds": 0.0}))

    def scorer(sign):
        class Distance(InProcess):  # the UNet of a two-step fixture barely reads the text: make the loss say which way
            def population_loss(self, candidates, triples):
                far = np.linalg.norm(candidates - word[None], axis=(1, 2))
                return super().population_loss(candidates, triples) + sign * far
        return Distance
    settings = TrainSettings(clip_refine=20, budget=20, heldout_triples=4, clip_line=5)
    kept = train(model, _images(), "<t>", str(tmp_path / "kept.safetensors"), init_word="star", settings=settings,
                 make_scorer=scorer(-1.0))
    assert kept.clip_refined and not np.allclose(kept.start, word)
    assert kept.init_heldout > kept.start_heldout >= kept.best_heldout
    _, metadata = read_safetensors(str(tmp_path / "kept.safetensors"))
    np.testing.assert_allclose(json.loads(metadata["edge_ti.init"]), np.tile(word, (2, 1)), rtol=1e-6)  # + anchor
    assert metadata["edge_ti.init_heldout_loss"] == f"{kept.init_heldout:.6g}"

    dropped = train(model, _images(), "<t>", str(tmp_path / "dropped.safetensors"), init_word="star",
                    settings=settings, make_scorer=scorer(+1.0))
    assert not dropped.clip_refined and dropped.init_heldout == dropped.start_heldout
    np.testing.assert_array_equal(dropped.start, word)


def test_the_cli_names_the_refined_start(clip_conditioned, tmp_path, monkeypatch):
    import importlib
    from click.testing import CliRunner
    from edge_ti.cli import cli
    training = importlib.import_module("edge_ti.train")  # the module: edge_ti.train is also the package's function
    result = training.TrainResult(embedding={}, init_heldout=0.3, best_heldout=0.1, generations=1, evaluations=20,
                                  heldout_evaluations=2, elapsed=1.0, stop_reason="done", paths={},
                                  start_heldout=0.2, clip_refined=True)
    monkeypatch.setattr(training, "train", lambda *args, **kwargs: result)
    images = tmp_path / "images"
    images.mkdir()
    _images(1)[0].save(images / "a.png")
    out = CliRunner().invoke(cli, ["train", clip_conditioned[1], str(images), "--token", "<t>", "--init-word", "star",
                                   "--out", str(tmp_path / "t.safetensors")])
    assert "held-out loss: init 0.300000 -> CLIP-refined 0.200000 -> learned 0.100000" in out.output, out.output
    result.clip_refined = False
    out = CliRunner().invoke(cli, ["train", clip_conditioned[1], str(images), "--token", "<t>", "--init-word", "star",
                                   "--out", str(tmp_path / "u.safetensors")])
    assert "held-out loss: init 0.300000 -> learned 0.100000" in out.output, out.output


def test_sdxl_is_refused_in_one_line(tiny_sdxl, tmp_path):
    model = edge_ti.open_model(tiny_sdxl[1])
    with pytest.raises(EdgeTIError, match=r"CLIP scores of candidates need one text encoder \(SD 1.x / 2.x\), not "
                                          r"sdxl's two"):
        train(model, _images(), "<t>", str(tmp_path / "t.safetensors"), init_word="cat",
              settings=TrainSettings(clip_refine=10, budget=20))
    assert not os.path.exists(tmp_path / "t.safetensors")


def test_the_clip_climbs_take_cma_default_step_whatever_the_search_takes(clip_conditioned, tmp_path, monkeypatch):
    """--sigma and --optimizer are the search's: the CLIP path (and refinement) climb with CMA-ES's default step in
    the same units, so a search setting does not move the start; such runs' checkpoints say so in their key."""
    model = edge_ti.open_model(clip_conditioned[1])
    asked = []

    def recording_path(score, e0, W, max_norm, evaluations, stages, sigma, seed, anchor):
        asked.append(sigma)
        return np.zeros((stages, W.shape[1])), {"clip_path_evaluations": 0, "clip_path_seconds": 0.0,
                                                 "clip_score_init": 0.1, "clip_score": 0.1}
    monkeypatch.setattr(clip_score, "path", recording_path)
    for k, extra in enumerate(({}, {"sigma": 0.1}, {"optimizer": "zo-adam", "popsize": 4})):
        train(model, _images(), "<t>", str(tmp_path / f"{k}.safetensors"), init_word="star",
              settings=TrainSettings(clip_refine=20, budget=8, heldout_triples=4, **extra))
    assert asked == [0.5, 0.5, 0.5]

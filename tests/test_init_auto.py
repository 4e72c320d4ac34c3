"""CLIP on onnxruntime equals transformers' CLIPModel; init from images; CLIP-I / CLIP-T; no torch needed."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

import edge_ti
from edge_ti import init, metrics
from edge_ti.clip import ClipModel, clip_model, preprocess
from edge_ti.errors import EdgeTIError
from edge_ti.train import TrainSettings, train
from edge_ti_export.clip_export import export_clip
from edge_ti_export.tiny_clip import tiny_clip

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["a photo of a cat", "a red mug on the table", "dog", "a painting in the style of a blue cat",
           "big bright green painting", "nice"]


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _entropy(p):
    return -(p * np.log(np.maximum(p, 1e-30))).sum(axis=-1)


def _concept_images(n=3, seed=0):
    """A red square on white at jittered places: a concept, unlike noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = np.full((48 + 8 * i, 40, 3), 255, np.uint8)
        y, x = rng.integers(4, 12, 2)
        image[y:y + 24, x:x + 20] = (220, 30, 30)
        out.append(image)
    return out


def _noise_images(n=3, seed=1):
    return list(np.random.default_rng(seed).integers(0, 256, (n, 40, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip_sd(tiny_sd, tmp_path_factory):
    """(CLIP source folder, ONNX model folder with clip/) from the tiny pipeline and a tiny CLIP."""
    base = tmp_path_factory.mktemp("clip-sd")
    model_dir = str(base / "onnx")
    shutil.copytree(tiny_sd[1], model_dir)
    source = tiny_clip(str(base / "clip-src"), seed=0)
    export_clip(source, model_dir)
    return source, model_dir


@pytest.fixture(scope="module")
def torch_clip(clip_sd):
    source = clip_sd[0]
    return (CLIPModel.from_pretrained(source).eval(), CLIPTokenizer.from_pretrained(source),
            CLIPImageProcessor.from_pretrained(source))


def _torch_unit(x):
    return torch.nn.functional.normalize(x, dim=-1).numpy()


# ---- (1) parity with transformers ----
def test_export_layout(clip_sd):
    clip = clip_model(edge_ti.open_model(clip_sd[1]))
    names = set(os.listdir(clip.path))
    assert {"text_model.onnx", "vision_model.onnx", "clip_config.json", "vocab.json", "merges.txt",
            "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"} <= names
    assert not [n for n in os.listdir(clip_sd[1]) if n.startswith(".tmp")]  # nothing left behind
    want = float(CLIPModel.from_pretrained(clip_sd[0]).logit_scale.exp())
    assert abs(clip.logit_scale - want) <= 1e-6 * want


def test_text_features_match_transformers(clip_sd, torch_clip):
    model, tokenizer, _ = torch_clip
    clip = clip_model(edge_ti.open_model(clip_sd[1]))
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert np.array_equal(clip.tokenizer(PROMPTS), ids.numpy())
    with torch.no_grad():
        want = _torch_unit(model.get_text_features(input_ids=ids))
    # batch=4: two calls, each cut after its own last EOS
    assert _rel_err(clip.text_features(PROMPTS, batch=4), want) <= 1e-4
    # batches are made of prompts of similar length (sorted): each row still comes back in its place
    got = clip.text_features(PROMPTS, batch=3)
    assert len({int(n) for n in (ids == tokenizer.eos_token_id).int().argmax(dim=1)}) > 2  # lengths differ
    assert max(_rel_err(got[i], want[i]) for i in range(len(PROMPTS))) <= 1e-4
    # the exported graph is the projected, unnormalized text_embeds at any length
    with torch.no_grad():
        raw = model.get_text_features(input_ids=ids).numpy()
    assert _rel_err(clip.text_session.run(None, {"input_ids": ids.numpy()})[0], raw) <= 1e-4


def test_image_features_match_transformers(clip_sd, torch_clip):
    model, _, processor = torch_clip
    clip = clip_model(edge_ti.open_model(clip_sd[1]))
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),            # wide
              rng.integers(0, 256, (75, 33, 3), dtype=np.uint8),            # tall, odd sizes
              Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), "RGBA"),  # upscaled
              Image.fromarray(rng.integers(0, 256, (50, 41), dtype=np.uint8), "L")]        # grayscale
    want_pixels = processor(images=images, return_tensors="np").pixel_values
    got_pixels = preprocess(images, clip.config)
    assert got_pixels.shape == want_pixels.shape == (4, 3, 32, 32)
    assert _rel_err(got_pixels, want_pixels) <= 1e-4
    with torch.no_grad():
        want = _torch_unit(model.get_image_features(pixel_values=torch.from_numpy(want_pixels)))
    assert _rel_err(clip.image_features(images, batch=3), want) <= 1e-4
    # a uint8 batch [N, H, W, 3] is the same as its list of images
    batch = np.stack(images[:1] * 2)
    assert np.array_equal(clip.image_features(batch), clip.image_features(list(batch)))


# ---- (2) initialization from images ----
def test_from_images(clip_sd, tmp_path):
    model = edge_ti.open_model(clip_sd[1])
    images = _concept_images()
    e0, top = init.from_images(model, images, vectors=2, show=None)
    words = init.vocabulary(model)
    assert "photo" in words and "cat" in words and all(len(w) >= 3 and w.isalpha() for w in words)
    assert e0.shape == (2, model.hidden_size) and e0.dtype == np.float32
    assert np.array_equal(e0[0], e0[1])
    # weights: a distribution over the words, listed largest first
    assert sorted(w for w, _ in top) == sorted(words)
    weights = np.array([w for _, w in top])
    assert abs(weights.sum() - 1) <= 1e-5 and np.all(np.diff(weights) <= 0)
    # scale: the median row norm of the token table (the reference code gives norm 1)
    norms = np.linalg.norm(model.token_embeddings, axis=1)
    assert norms.min() <= np.linalg.norm(e0[0]) <= norms.max()
    assert abs(np.linalg.norm(e0[0]) - np.median(norms)) <= 1e-5 * np.median(norms)
    # deterministic
    e0_again, top_again = init.from_images(model, images, vectors=2, show=None)
    assert np.array_equal(e0, e0_again) and top == top_again
    assert len(init.from_images(model, images)[1]) == 10
    # image files (as `edge-ti train --init auto` passes them) give the same
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    assert np.array_equal(init.from_images(model, paths, vectors=2)[0], e0)


def test_from_images_is_cross_attention(clip_sd):
    model = edge_ti.open_model(clip_sd[1])
    clip = clip_model(model)
    median = np.median(np.linalg.norm(model.token_embeddings, axis=1))
    # one word: all weight on it, e0 is its token row at the median norm
    e0, top = init.from_images(model, _concept_images(), words=["mug"])
    row = model.token_embeddings[model.tokenizer.token_ids("mug")].mean(axis=0)
    assert top == [("mug", 1.0)]
    assert _rel_err(e0[0], row * median / np.linalg.norm(row)) <= 1e-5
    # top_k=1 and one image: the best word's row
    words = init.vocabulary(model)
    image = _concept_images(1)
    s = init.sentence_features(clip, words, model.cache_dir("clip_vocab"))
    best = int(np.argmax(clip.image_features(image) @ s.T))
    e0, top = init.from_images(model, image, top_k=1)
    row = init.token_features(model, [words[best]])[0]
    assert top[0] == (words[best], 1.0) and top[1][1] == 0.0
    assert _rel_err(e0[0], row * median / np.linalg.norm(row)) <= 1e-5


def test_logit_scale_sharpens_the_weights(clip_sd):
    """The fix: CLIP's logit scale, not raw cosines, in the softmax (the reference code's weights are ~uniform)."""
    model = edge_ti.open_model(clip_sd[1])
    clip = clip_model(model)
    words = init.vocabulary(model)
    s = init.sentence_features(clip, words, model.cache_dir("clip_vocab"))   # (K, P)
    q = clip.image_features(_concept_images() + _noise_images())             # (N, P)
    ours = init.attention_weights(q, s, clip.logit_scale)
    reference = init.attention_weights(q, s, 1.0)
    assert np.allclose(ours.sum(axis=1), 1, atol=1e-6) and np.allclose(reference.sum(axis=1), 1, atol=1e-6)
    uniform = np.log(len(words))
    assert np.all(_entropy(reference) > 0.99 * uniform)        # the flaw: nearly uniform
    assert np.all(_entropy(ours) < _entropy(reference) - 0.03 * uniform)
    assert np.all(ours.max(axis=1) > 1.5 * reference.max(axis=1))


def test_vocabulary_features_are_cached(clip_sd, monkeypatch):
    model = edge_ti.open_model(clip_sd[1])
    words = ["cat", "dog", "mug", "table", "painting"]  # a key of its own
    cache = model.cache_dir("clip_vocab")
    calls = []
    text_features = ClipModel.text_features
    monkeypatch.setattr(ClipModel, "text_features", lambda self, *a, **k: calls.append(1) or text_features(self, *a, **k))
    before = set(os.listdir(cache))
    first = init.from_images(model, _concept_images(), words=words)
    new = set(os.listdir(cache)) - before
    assert len(new) == 1 and calls == [1]
    path = os.path.join(cache, new.pop())
    mtime = os.stat(path).st_mtime_ns
    second = init.from_images(model, _concept_images(), words=words)
    assert calls == [1] and os.stat(path).st_mtime_ns == mtime
    assert np.array_equal(first[0], second[0])
    assert not [n for n in os.listdir(cache) if not n.endswith(".npy") or n.startswith(".tmp")]


# ---- (3) metrics ----
def test_metrics(clip_sd, torch_clip):
    model = edge_ti.open_model(clip_sd[1])
    concept, noise = _concept_images(), _noise_images()
    same, other = metrics.clip_i(model, concept, concept), metrics.clip_i(model, noise, concept)
    assert -1 <= other < same <= 1
    clip = clip_model(model)
    q = clip.image_features(concept)
    assert abs(same - float((q @ q.T).mean())) <= 1e-6

    prompts = ["a red square", "a photo of a mug", "green painting"]
    score = metrics.clip_t(model, concept, prompts)
    torch_model, tokenizer, processor = torch_clip
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    pixels = processor(images=concept, return_tensors="pt").pixel_values
    with torch.no_grad():
        t = _torch_unit(torch_model.get_text_features(input_ids=ids))
        g = _torch_unit(torch_model.get_image_features(pixel_values=pixels))
    assert -1 <= score <= 1
    assert abs(score - float(np.sum(g * t, axis=1).mean())) <= 1e-5
    one = metrics.clip_t(model, np.stack(concept[:1] * 2), "a red square")
    assert abs(one - float(g[0] @ t[0])) <= 1e-5
    with pytest.raises(EdgeTIError, match="3 images but 2 prompts"):
        metrics.clip_t(model, concept, prompts[:2])


# ---- (4) errors ----
def _one_line(err):
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_clip_folder(tiny_sd):
    model = edge_ti.open_model(tiny_sd[1])  # exported without --clip
    with pytest.raises(EdgeTIError) as err:
        init.from_images(model, _concept_images())
    assert "no clip/ folder" in _one_line(err) and "--clip" in _one_line(err)
    with pytest.raises(EdgeTIError, match="no clip/ folder"):
        metrics.clip_i(model, _concept_images(), _concept_images())


def test_broken_clip_folder_and_bad_export(clip_sd, tiny_sd, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(clip_sd[1], folder)
    os.remove(folder / "clip" / "vision_model.onnx")
    with pytest.raises(EdgeTIError) as err:
        ClipModel(edge_ti.open_model(str(folder)))
    assert "missing vision_model.onnx" in _one_line(err)
    with pytest.raises(EdgeTIError) as err:
        export_clip(clip_sd[0], str(folder))  # clip/ is there already
    assert "already exists" in _one_line(err)
    with pytest.raises(EdgeTIError) as err:
        export_clip(str(tmp_path), str(folder))
    assert "no config.json" in _one_line(err)
    text_only = tmp_path / "text-only"
    shutil.copytree(os.path.join(tiny_sd[0], "text_encoder"), text_only)
    shutil.copy(os.path.join(clip_sd[0], "preprocessor_config.json"), text_only)
    with pytest.raises(EdgeTIError) as err:
        export_clip(str(text_only), str(tmp_path / "elsewhere"))
    assert "not 'clip'" in _one_line(err)
    with pytest.raises(EdgeTIError, match="uint8"):
        clip_model(edge_ti.open_model(clip_sd[1])).image_features([np.zeros((8, 8, 3), np.float32)])


def test_failed_export_leaves_nothing(clip_sd, tiny_sd, tmp_path, monkeypatch):
    from edge_ti_export import clip_export
    folder = tmp_path / "m"
    shutil.copytree(tiny_sd[1], folder)
    monkeypatch.setattr(clip_export, "TOLERANCE", -1.0)  # no export can pass its check now
    with pytest.raises(EdgeTIError) as err:
        export_clip(clip_sd[0], str(folder))
    assert "differs from torch" in _one_line(err)
    assert sorted(os.listdir(folder)) == sorted(os.listdir(tiny_sd[1]))  # no clip/, no temp folder


# ---- (5) without torch ----
NO_TORCH = r'''
import sys
import numpy as np
import edge_ti
from edge_ti import init, metrics
model = edge_ti.open_model(sys.argv[1])
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
e0, top = init.from_images(model, images, vectors=1)
i = metrics.clip_i(model, images, images[::-1])
t = metrics.clip_t(model, images, "a photo of a cat")
for name in ("torch", "diffusers", "transformers", "optimum"):
    assert name not in sys.modules, name
np.save(sys.argv[2], e0)
print("clip ok", top[0][0], round(i, 6), round(t, 6))
'''


def test_without_torch(clip_sd, tmp_path):
    script = tmp_path / "s.py"
    script.write_text(NO_TORCH)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "without_torch.py"), str(script), clip_sd[1],
                           str(tmp_path / "e0.npy")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "clip ok" in proc.stdout
    model = edge_ti.open_model(clip_sd[1])
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    assert np.array_equal(np.load(tmp_path / "e0.npy"), init.from_images(model, images)[0])


def test_cli_export_with_clip_and_train_init_auto(tiny_sd, tmp_path):
    """`edge-ti export SOURCE OUT --clip CLIP` then `edge-ti train --init auto` prints the top words."""
    source = tiny_clip(str(tmp_path / "clip-src"), seed=0)
    out = str(tmp_path / "onnx")
    from test_safe_by_default import invoke  # the CLI in this process: torch is already loaded
    rc, err = invoke("export", tiny_sd[0], out, "--clip", source)
    assert rc == 0, err
    assert os.path.isfile(os.path.join(out, "clip", "text_model.onnx"))
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(_concept_images()):
        Image.fromarray(image).save(images / f"{i}.png")
    emb = str(tmp_path / "auto.safetensors")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "without_torch.py"), "edge_ti", "train", out,
                           str(images), "--token", "<r>", "--init", "auto", "--budget", "40", "--out", emb],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "init from images: " in proc.stderr  # before training starts (a log line)
    assert edge_ti.load_embedding(emb)["<r>"].shape == (1, 32)   # object prompts without a word: no anchor
    # style prompts: --anchor images keeps the images' CLIP init as the token's last vector, and says so (auto: none)
    for extra, shape in (([], (1, 32)), (["--anchor", "images"], (2, 32))):
        proc = subprocess.run([sys.executable, os.path.join(HERE, "without_torch.py"), "edge_ti", "train", out,
                               str(images), "--token", "<r>", "--init", "auto", "--template", "style", "--budget", "40",
                               "--restart", "--out", emb, *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert edge_ti.load_embedding(emb)["<r>"].shape == shape
        assert ("2 vectors; its last is the images' CLIP init (" in proc.stdout) == bool(extra), proc.stdout


def test_images_anchor(clip_sd, tmp_path):
    """--anchor images (auto with style prompts in stops 34-48): the token's last vector is init.from_images'
    embedding of the images, kept; the searched one starts as before. auto: none with style prompts."""
    model = edge_ti.open_model(clip_sd[1])
    images = [Image.fromarray(i) for i in _concept_images()]
    e_images, top = init.from_images(model, images, 1)
    word = init.from_word(model, "cat")
    common = dict(budget=16, popsize=8, eval_every=1, patience=0, triples=2, heldout_triples=4)
    runs = {}
    for name, settings, kwargs in (
            ("style", TrainSettings(template="style", anchor="images", **common), {"init_word": "cat"}),
            ("style-auto", TrainSettings(template="style", **common), {"init_word": "cat"}),
            ("style-word", TrainSettings(template="style", anchor="word", **common), {"init_word": "cat"}),
            ("object-images", TrainSettings(anchor="images", **common), {"init_word": "cat"}),
            ("auto-init", TrainSettings(template="style", anchor="images", **common), {"init": "auto"}),
            ("auto-init-object", TrainSettings(**common), {"init": "auto"}),
            ("style-off", TrainSettings(template="style", anchor=False, **common), {"init_word": "cat"})):
        out = str(tmp_path / f"{name}.safetensors")
        runs[name] = train(model, images, "<r>", out, settings=settings, **kwargs)
        assert np.array_equal(edge_ti.load_embedding(out)["<r>"], runs[name].embedding["<r>"])
    for name in ("style", "object-images", "auto-init"):
        token = runs[name].embedding["<r>"]
        assert token.shape == (2, 32) and np.array_equal(token[1], e_images[0])
        assert runs[name].anchor_from == "images" and runs[name].anchor_words[:3] == top[:3]
    assert np.array_equal(runs["style-word"].embedding["<r>"][1], word[0]) and runs["style-word"].anchor_from == "word"
    for name in ("style-off", "style-auto", "auto-init-object"):   # off; auto; object prompts without a word: none
        assert runs[name].embedding["<r>"].shape == (1, 32) and runs[name].anchor_from is None
    # the searched vector started where it did without the anchor: the word, or (--init auto) the images' init
    assert np.array_equal(runs["style"].start, word) and np.array_equal(runs["auto-init"].start, e_images)


def test_cli_export_bad_clip_source_fails_fast(tiny_sd, tmp_path):
    from test_safe_by_default import invoke  # the CLI in this process: torch is already loaded
    out = tmp_path / "onnx"
    rc, err = invoke("export", tiny_sd[0], str(out), "--clip", str(tmp_path))
    assert rc == 1 and "config.json" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_evaluate_reports_learned_and_init(clip_sd, torch_clip, tmp_path):
    """`edge-ti evaluate` (no torch): a table and JSON of CLIP-I / CLIP-T for the learned and the init
    embedding, the numbers transformers' CLIPModel gives on the same generations."""
    import json
    images = tmp_path / "images"
    images.mkdir()
    concept = _concept_images()
    for i, image in enumerate(concept):
        Image.fromarray(image).save(images / f"{i}.png")
    emb = str(tmp_path / "e.safetensors")
    run = [sys.executable, os.path.join(HERE, "without_torch.py"), "edge_ti"]
    proc = subprocess.run(run + ["train", clip_sd[1], str(images), "--token", "<r>", "--init-word", "cat",
                                 "--budget", "100", "--popsize", "10", "--out", emb], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out_json = str(tmp_path / "eval.json")
    proc = subprocess.run(run + ["evaluate", clip_sd[1], "--embedding", emb, "--images", str(images), "--n", "2",
                                 "--steps", "3", "--json", out_json], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["embedding", "CLIP-I", "CLIP-T"]
    assert lines[1].startswith("init") and lines[2].startswith("learned")
    results = json.load(open(out_json))
    assert results["class_word"] == "cat" and len(results["prompts"]) == 4
    # the recorded init is the whole token at the start: the word's embedding, and the anchor (the word again);
    # the learned one differs from it
    from edge_ti.evaluate import init_from_file
    model = edge_ti.open_model(clip_sd[1])
    recorded = init_from_file(emb, "<r>", 32)
    assert recorded.shape == (2, 32) and np.allclose(recorded, np.tile(init.from_word(model, "cat"), (2, 1)))
    assert results["init"] != results["learned"]
    # the same generations (prompt k: seed k, as evaluate draws them) scored by transformers' CLIPModel:
    # CLIP-I the mean cosine over (generated, concept) pairs, CLIP-T each image with its prompt, <r> -> cat
    torch_model, tokenizer, processor = torch_clip

    def features(images):
        with torch.no_grad():
            return _torch_unit(torch_model.get_image_features(**processor(images=list(images), return_tensors="pt")))

    c = features(concept)
    texts = [p.replace("<r>", "cat") for p in results["prompts"] for _ in range(2)]
    with torch.no_grad():
        t = _torch_unit(torch_model.get_text_features(**tokenizer(texts, padding="max_length", max_length=77,
                                                                  return_tensors="pt")))
    for name, embedding in (("init", recorded), ("learned", edge_ti.load_embedding(emb)["<r>"])):
        generated = np.concatenate([edge_ti.generate(model, prompt, {"<r>": embedding}, steps=3, seed=k, n=2)
                                    for k, prompt in enumerate(results["prompts"])])
        g = features(generated)
        assert abs(results[name]["clip_i"] - float((g @ c.T).mean())) <= 1e-5, name
        assert abs(results[name]["clip_t"] - float(np.sum(g * t, axis=1).mean())) <= 1e-5, name


def test_vocabulary_encoding_shows_progress_without_verbose(tmp_path, caplog):
    """The first --init auto encodes tens of thousands of prompts: progress lines at WARNING (shown by
    default), at most ~20 of them, the last one complete."""
    import logging

    from edge_ti.init import sentence_features

    class FakeClip:
        text_key = "fake"

        def text_features(self, prompts):
            return np.ones((len(prompts), 4), np.float32)
    words = [f"w{i}" for i in range(9000)]
    with caplog.at_level(logging.WARNING, logger="edge_ti.init"):
        s = sentence_features(FakeClip(), words, str(tmp_path))
    assert s.shape == (9000, 4)
    progress = [r.getMessage() for r in caplog.records if "prompts," in r.getMessage()]
    assert 2 <= len(progress) <= 21 and progress[-1].startswith("CLIP: 36000 / 36000 prompts"), progress

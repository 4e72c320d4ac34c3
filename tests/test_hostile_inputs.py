"""Files and options from others are hostile: each bad one gets one line naming it, or a warning.

Images (every PIL mode to 8-bit RGB, FIFOs, decompression bombs, truncated files, what was used),
tokens (vocabulary words, empty or spaced tokens), evaluate's prompts and metadata, and the
silent mistakes that get a warning (unused tokens, an init word of several tokens).
"""
import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import edge_ti
from edge_ti import latents as lat
from edge_ti.errors import EdgeTIError
from edge_ti.evaluate import evaluate, init_from_file, load_for_evaluation, read_prompts

from test_cli import _one_line_error
from test_safe_by_default import invoke  # the CLI in this process

WIDTH = 32  # the tiny model's embedding width


# ---- images: every mode to 8-bit RGB ----
def _gradient16():
    """A 16-bit gray gradient [48, 64] over the whole 0..65535 range, and its 8-bit version."""
    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).round().astype(np.uint16)
    return values, np.round(values / 257).astype(np.uint8)


def test_16bit_png_loads_like_its_8bit_version(tmp_path):
    values, eight = _gradient16()
    Image.fromarray(values).save(tmp_path / "g16.png")
    Image.fromarray(eight).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    for size in (48, 32):  # as it is, and resized
        got = lat.load_image(str(tmp_path / "g16.png"), size)
        want = lat.load_image(str(tmp_path / "g8.png"), size)
        assert np.abs(got - want).max() <= 2 / 255 + 1e-6  # 1/255 of the range [-1, 1] is 2/255
    # PIL's own convert("RGB") clips it to white (all but its darkest 1/257): the bug this replaces
    assert (np.asarray(Image.open(tmp_path / "g16.png").convert("RGB")) == 255).mean() > 0.99


@pytest.mark.parametrize("mode, scale", [("I", 65535), ("F", 1.0), ("F", 255.0), ("I", 255)])
def test_wide_gray_modes_scale_to_8bit(mode, scale):
    values, eight = _gradient16()
    data = values / 65535 * scale
    image = Image.fromarray(data.astype(np.int32 if mode == "I" else np.float32), mode)
    rgb = np.asarray(lat.to_rgb(image))                                        # (48, 64, 3)
    assert rgb.shape == (48, 64, 3)
    assert np.abs(rgb.astype(int) - eight[..., None]).max() <= 1


@pytest.mark.parametrize("values", [[-1.0, 0.5], [0.0, 70000.0], [0.0, np.nan]])
def test_float_image_off_every_scale_is_an_error(values):
    image = Image.fromarray(np.array([values], np.float32), "F")
    with pytest.raises(EdgeTIError, match="pixel values"):
        lat.to_rgb(image)


def test_transparency_is_composited_on_white():
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8)  # clear, opaque, half
    got = np.asarray(lat.to_rgb(Image.fromarray(rgba, "RGBA")))
    assert got.tolist() == [[[255, 255, 255], [0, 0, 255], [127, 127, 127]]]
    la = Image.fromarray(np.array([[[0, 0], [40, 255]]], np.uint8), "LA")
    assert np.asarray(lat.to_rgb(la)).tolist() == [[[255] * 3, [40] * 3]]
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.info["transparency"] = 0
    assert np.asarray(lat.to_rgb(palette)).tolist() == [[[255] * 3, [10, 20, 30]]]


def test_other_modes_convert_as_pil_does():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 0, 0))
    bilevel = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    for image in (cmyk, bilevel):
        assert np.array_equal(np.asarray(lat.to_rgb(image)), np.asarray(image.convert("RGB")))


# ---- images: what is a file, what is too large, what is broken ----
def _png(path, size=(8, 8)):
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)
    return str(path)


def test_fifo_in_a_folder_is_skipped(tmp_path, caplog):
    good = _png(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    with caplog.at_level(logging.WARNING, logger="edge_ti"):
        assert lat.image_paths([str(tmp_path)]) == [good]
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 'b.png'}: skipped, not a regular file"]


def test_a_folder_of_fifos_only_is_an_error(tmp_path):
    os.mkfifo(tmp_path / "b.png")
    with pytest.raises(EdgeTIError, match="no images in this folder"):
        lat.image_paths([str(tmp_path)])


def test_fifo_given_by_name_is_an_error(tmp_path):
    fifo = str(tmp_path / "pipe.png")
    os.mkfifo(fifo)
    for call in (lambda: lat.image_paths([fifo]), lambda: lat.read_image(fifo), lambda: lat.load_image(fifo, 8)):
        with pytest.raises(EdgeTIError, match=f"^{fifo}: not a regular file$"):
            call()


def _claiming_png(path, width, height):
    """A tiny 1-bit PNG whose header says width x height (the pixel data is never reached)."""
    Image.new("1", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", width, height)                          # IHDR width, height
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))          # IHDR's CRC
    path.write_bytes(bytes(raw))
    return str(path)


@pytest.mark.parametrize("side", [9000, 10000, 20000])  # ours; PIL's warning; PIL's error
def test_decompression_bomb_is_an_error(tmp_path, side):
    path = _claiming_png(tmp_path / "bomb.png", side, side)
    assert os.path.getsize(path) < 100
    with pytest.raises(EdgeTIError, match=f"^{path}: .*too large") as err:
        lat.read_image(path)
    assert "\n" not in str(err.value)


def test_pixel_limit_lets_a_normal_header_through(tmp_path):
    path = _claiming_png(tmp_path / "one.png", 1, 1)
    assert lat.read_image(path).size == (1, 1)  # the header rewrite is sound: only the size refuses


@pytest.mark.parametrize("name, keep", [("t.png", -30), ("t.jpg", 300), ("e.png", 0)])
def test_truncated_image_is_an_error(tmp_path, name, keep):
    path = tmp_path / name
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(EdgeTIError, match=f"^{path}: not a readable image"):
        lat.read_image(str(path))


def test_images_used_and_resized_are_reported(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "wide.png", (12, 8))
    _png(folder / "square.png", (8, 8))
    with caplog.at_level(logging.INFO, logger="edge_ti"):
        assert lat.load_images([str(folder)], 8, flip=True).shape == (4, 3, 8, 8)
        lat.load_images([str(folder / "square.png")], 8)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "using 2 images (1 center-cropped to a square), plus their mirror images"),
        ("INFO", "using 1 image")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edge_ti"):
        lat.load_images([str(folder)], 16)
    assert caplog.records[0].getMessage() == "using 2 images (1 center-cropped to a square, 2 resized to 16 px)"


def test_clip_reads_files_like_training(tmp_path):
    from edge_ti.clip import load_image as clip_load_image
    values, eight = _gradient16()
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert np.abs(np.asarray(clip_load_image(str(tmp_path / "g16.png"))).astype(int) - eight[..., None]).max() <= 1
    path = _claiming_png(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(EdgeTIError, match="too large"):
        clip_load_image(path)


def _train_cli(model_dir, out, *args):
    rc, err = invoke("train", model_dir, "--init-word", "cat", "--budget", "20", "--out", str(out), *args)
    return rc, "", err


def _hostile_images(folder):
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)
    truncated = folder / "cut.png"
    truncated.write_bytes(open(_png(folder / "whole.png", (64, 64)), "rb").read()[:60])
    os.remove(folder / "whole.png")
    return [(str(fifo), "not a regular file"), (_claiming_png(folder / "bomb.png", 20000, 20000), "too large"),
            (str(truncated), "not a readable image")]


def test_train_refuses_hostile_images(tiny_sd, tmp_path):
    from edge_ti.train import train
    model = edge_ti.open_model(tiny_sd[1])
    out = tmp_path / "out" / "o.safetensors"
    for image, problem in _hostile_images(tmp_path):
        with pytest.raises(EdgeTIError, match=f"^{image}: {problem}"):
            train(model, [image], "<c>", str(out), init_word="cat")
    assert not (tmp_path / "out").exists()


def test_evaluate_cli_refuses_hostile_images(tiny_sd, tmp_path):
    emb = str(tmp_path / "t.safetensors")
    edge_ti.save_embedding(emb, {"<t>": np.zeros((1, WIDTH), np.float32)}, metadata={"edge_ti.init_word": "mug"})
    out = tmp_path / "out" / "r.json"
    for image, problem in _hostile_images(tmp_path):
        rc, err = invoke("evaluate", tiny_sd[1], "--embedding", emb, "--images", image, "--json", str(out))
        _one_line_error(rc, err, image, problem)
    assert not (tmp_path / "out").exists()


# ---- tokens ----
def test_train_refuses_a_vocabulary_word_before_any_work(tiny_sd, tmp_path):
    from edge_ti.train import train
    model = edge_ti.open_model(tiny_sd[1])
    missing = str(tmp_path / "missing")
    with pytest.raises(EdgeTIError, match="'cat' is already in the tokenizer's vocabulary"):
        train(model, [missing], "cat", str(tmp_path / "o.safetensors"), init_word="dog")
    with pytest.raises(EdgeTIError, match="no such image file or folder"):  # allowed: on to the images
        train(model, [missing], "cat", str(tmp_path / "o.safetensors"), init_word="dog",
              allow_vocabulary_token=True)
    for token in ("", "my mug"):
        with pytest.raises(EdgeTIError, match="token"):
            train(model, [missing], token, str(tmp_path / "o.safetensors"), init_word="dog")
    assert os.listdir(tmp_path) == []


def test_train_cli_vocabulary_token(tiny_sd, concept_dir, tmp_path):
    out = tmp_path / "o.safetensors"
    rc, _, err = _train_cli(tiny_sd[1], out, concept_dir, "--token", "cat")
    _one_line_error(rc, err, "'cat'", "vocabulary", "--allow-vocabulary-token")
    assert os.listdir(tmp_path) == []
    rc, _, err = _train_cli(tiny_sd[1], out, concept_dir, "--token", "cat", "--allow-vocabulary-token",
                            "--budget", "8", "--popsize", "4", "--resolution", "16", "--heldout-triples", "2")
    assert rc == 0, err
    assert list(edge_ti.load_embedding(str(out))) == ["cat"]


@pytest.mark.parametrize("token, problem", [("", "non-empty"), ("my mug", "whitespace"), ("a\tb", "whitespace")])
def test_empty_or_spaced_token_is_refused(tiny_sd, token, problem):
    model = edge_ti.open_model(tiny_sd[1])
    with pytest.raises(EdgeTIError, match=problem):
        model.tokenize(["a photo"], {token: np.zeros((1, WIDTH), np.float32)})


def test_tokenize_cli_spaced_token(tiny_sd, tmp_path):
    path = str(tmp_path / "my mug.safetensors")
    edge_ti.save_embedding(path, {"my mug": np.ones((1, WIDTH), np.float32)})
    rc, err = invoke("tokenize", tiny_sd[1], "a my mug", "--embedding", path)
    _one_line_error(rc, err, "'my mug'", "whitespace")


# ---- init word and unused tokens: warnings ----
def test_init_word_of_several_tokens_warns(tiny_sd, caplog):
    from edge_ti.init import from_word
    model = edge_ti.open_model(tiny_sd[1])
    with caplog.at_level(logging.WARNING, logger="edge_ti"):
        e0 = from_word(model, "xyz")
        from_word(model, "cat")
    assert [r.getMessage() for r in caplog.records] == [
        "init word 'xyz' is 3 tokens (x, y, z): using the mean of their embeddings"]
    ids = model.tokenizer.token_ids("xyz")
    assert np.allclose(e0[0], model.token_embeddings[ids].mean(axis=0))
    for word in ("", "  \t"):
        with pytest.raises(EdgeTIError, match="has no tokens"):
            from_word(model, word)


def _generate_warnings(model, caplog, prompt, embeddings, **kwargs):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge_ti"):
        edge_ti.generate(model, prompt, embeddings, steps=1, n=1, size=8, **kwargs)
    return [r.getMessage() for r in caplog.records]


def test_generate_warns_about_unused_tokens(tiny_sd, caplog):
    model = edge_ti.open_model(tiny_sd[1])
    vec = np.full((1, WIDTH), 0.1, np.float32)
    both = {"<t>": vec, "<u>": vec}
    assert _generate_warnings(model, caplog, "a photo of <t> and <u>", both) == []
    assert _generate_warnings(model, caplog, "a photo of <t>", both) == [
        "the prompt never names the loaded token(s) <u> in its first 77 tokens"]
    none = "the prompt names none of the loaded tokens (<t>, <u>) in its first 77 tokens: the embeddings change nothing"
    assert _generate_warnings(model, caplog, "a photo of a <tt>", both) == [none]
    assert _generate_warnings(model, caplog, "a photo" + " of" * 80 + " <t> <u>", both) == [none]
    # the negative prompt counts where guidance uses it
    assert _generate_warnings(model, caplog, "a photo of <t>", both, negative_prompt="<u>") == []
    assert len(_generate_warnings(model, caplog, "a photo of <t>", both, negative_prompt="<u>", guidance=1)) == 1
    assert _generate_warnings(model, caplog, "a photo", None) == []


def test_token_as_a_word_is_not_matched_inside_words(tiny_sd, caplog):
    model = edge_ti.open_model(tiny_sd[1])
    vec = np.full((1, WIDTH), 0.1, np.float32)
    assert len(_generate_warnings(model, caplog, "a catalog", {"cat": vec})) == 1
    assert _generate_warnings(model, caplog, "a cat", {"cat": vec}) == []


# ---- evaluate: prompts and the recorded init ----
def test_read_prompts_names_the_line_without_the_token(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of <t>\n\n  a {} on a table \n")
    assert read_prompts(str(path), "<t>") == ["a photo of <t>", "a {} on a table"]
    path.write_text("a photo of <t>\n\na photo of a mug\n")
    with pytest.raises(EdgeTIError, match=f"^{path}: line 3 has neither <t> nor {{}}: 'a photo of a mug'$"):
        read_prompts(str(path), "<t>")
    path.write_text("a catalog\n")  # the token as a word, not inside one
    with pytest.raises(EdgeTIError, match="line 1 has neither cat"):
        read_prompts(str(path), "cat")
    path.write_text("\n \n")
    with pytest.raises(EdgeTIError, match="no prompts"):
        read_prompts(str(path), "<t>")
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(EdgeTIError, match="cannot read prompts"):
        read_prompts(str(path), "<t>")


def test_evaluate_refuses_a_prompt_without_the_token(tiny_sd):
    model = edge_ti.open_model(tiny_sd[1])
    embedding = {"<t>": np.zeros((1, WIDTH), np.float32)}
    with pytest.raises(EdgeTIError, match="'a photo of a mug' has neither <t> nor"):
        evaluate(model, embedding, [], "mug", prompts=["a photo of {}", "a photo of a mug"])


def test_evaluate_cli_bad_prompt_line(tiny_sd, concept_dir, tmp_path):
    emb = str(tmp_path / "t.safetensors")
    edge_ti.save_embedding(emb, {"<t>": np.zeros((1, WIDTH), np.float32)}, metadata={"edge_ti.init_word": "mug"})
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of <t>\na {brace} without it\n")
    out = tmp_path / "r.json"
    rc, err = invoke("evaluate", tiny_sd[1], "--embedding", emb, "--images", concept_dir,
                     "--prompts", str(prompts), "--json", str(out))
    _one_line_error(rc, err, str(prompts), "line 2")
    assert not out.exists()


def _embedding_with_metadata(path, metadata):
    """A safetensors embedding whose __metadata__ holds anything JSON can (save_file takes only str)."""
    header = json.dumps({"<t>": {"dtype": "F32", "shape": [1, WIDTH], "data_offsets": [0, 4 * WIDTH]},
                         "__metadata__": metadata}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.zeros(WIDTH, np.float32).tobytes())
    return str(path)


@pytest.mark.parametrize("recorded", ["not json", "[1, 2]", "{}", '[["a"]]', "[[1], [2, 3]]", "[[NaN]]",
                                      json.dumps([[0.0] * (WIDTH + 1)])])
def test_bad_recorded_init_is_ignored_with_a_warning(tmp_path, caplog, recorded):
    path = _embedding_with_metadata(tmp_path / "t.safetensors", {"edge_ti.init": recorded})
    with caplog.at_level(logging.WARNING, logger="edge_ti"):
        assert init_from_file(path, "<t>", WIDTH) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: metadata edge_ti.init is not a [n, {WIDTH}] list of finite numbers; ignoring it"]


def test_good_recorded_init_is_read(tmp_path):
    init = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
    path = _embedding_with_metadata(tmp_path / "t.safetensors", {"edge_ti.init": json.dumps(init.tolist())})
    assert np.array_equal(init_from_file(path, "<t>", WIDTH), init)


def test_load_for_evaluation_ignores_bad_metadata(tiny_sd, tmp_path, caplog):
    model = edge_ti.open_model(tiny_sd[1])
    path = _embedding_with_metadata(tmp_path / "t.safetensors", {"edge_ti.init": "{"})
    with caplog.at_level(logging.WARNING, logger="edge_ti"):
        embedding, init, word = load_for_evaluation(model, path)
    assert list(embedding) == ["<t>"] and init is None and word == ""
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith(path)
    # the safetensors format allows only strings there (safetensors itself refuses such a file)
    for metadata in ({"edge_ti.init_word": 5}, ["a", "list"]):
        path = _embedding_with_metadata(tmp_path / "l.safetensors", metadata)
        with pytest.raises(EdgeTIError, match="__metadata__ must map strings to strings"):
            load_for_evaluation(model, path)

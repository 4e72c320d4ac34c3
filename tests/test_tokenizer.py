"""Token ids equal transformers' CLIPTokenizer, as the diffusers pipeline calls it."""
import gzip
import importlib.util
import json
import os
import random

import numpy as np
import pytest
from transformers import CLIPTokenizer

from edge_ti.tokenizer import ClipTokenizer, placeholder_ids

CORPUS = [
    "", " ", "a photo of a cat", "A PHOTO OF A CAT", "a Photo Of a CaT",
    "an oil painting, by greg rutkowski; trending on artstation!!!",
    "it's a dog's life, they're here, we've got it, I'm sure, we'll see, he'd go",
    "numbers 1234567890 3.14159 1,000,000 2nd 3rd 10x 007",
    "  lots   of\twhite\nspace\r\n and  tabs\t\t ",
    "punctuation: !?.,;:'\"()[]{}<>@#$%^&*-_=+~`|\\/",
    "unicode: café naïve résumé Ærøskøbing straße ÇA İstanbul ǅ",
    "emoji 🐱🐶 🎨 and ✨ sparkles ✨", "CJK: 猫の写真 一只猫 고양이 사진", "mixed漢字and english",
    "arabic القط and hebrew חתול and thai แมว", "greek ΑΒΓ δεζ and cyrillic Кошка",
    "control\x00chars\x07here\u200bzero\u200dwidth\ufeffbom", "non\u00a0breaking\u2003spaces\u3000ideographic",
    "line\u2028separator and para\u2029graph", "combining e\u0301 vs \u00e9",
    "<|startoftext|> special <|endoftext|> tokens in text",
    "(masterpiece:1.2), [[best quality]], {{detailed}}, ((ultra-detailed))",
    "highly detailed " * 40,
    "a photo of a cat " * 30 + "tail end",
]


def _random_corpus(n=200, seed=0):
    rng = random.Random(seed)
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
                " \t\n.,!?'-:;()[]éüßçñøÅ漢字猫😀\u00a0\u200b'sllve")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(n)]


def _reference_ids(ref, prompts):
    # StableDiffusionPipeline.encode_prompt's call
    return np.array(ref(prompts, padding="max_length", max_length=ref.model_max_length,
                        truncation=True).input_ids, dtype=np.int64)


def _check(tokenizer_dir, prompts):
    ref = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ours = ClipTokenizer(tokenizer_dir)
    expected = _reference_ids(ref, prompts)
    got = ours(prompts)
    bad = [p for p, e, g in zip(prompts, expected, got) if not np.array_equal(e, g)]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[0]!r}: {ours([bad[0]])[0].tolist()} != {_reference_ids(ref, [bad[0]])[0].tolist()}"


def test_tiny_vocab_matches_transformers(tiny_sd):
    source, onnx_dir = tiny_sd
    _check(os.path.join(onnx_dir, "tokenizer"), CORPUS + _random_corpus())


@pytest.fixture(scope="module")
def real_clip_tokenizer_dir(tmp_path_factory):
    """The real CLIP vocab/merges (SD 1.x), rebuilt offline from open_clip's BPE file like openai/CLIP does."""
    spec = importlib.util.find_spec("open_clip")  # found, never imported: only its data file is read
    if spec is None:
        # not in the `test` extra: open_clip_torch's torchvision does not load beside the CPU torch
        why = "CLIP's BPE file comes from open_clip_torch: pip install --no-deps open_clip_torch"
        if os.environ.get("CI"):  # .ci/run installs it: there a missing file is a failure
            pytest.fail(why)
        pytest.skip(why)
    bpe = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    from edge_ti_export.tiny import bytes_to_unicode
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = tmp_path_factory.mktemp("clip-tokenizer")
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77).save_pretrained(str(out))
    return str(out)


def test_real_clip_vocab_matches_transformers(real_clip_tokenizer_dir):
    assert len(json.load(open(os.path.join(real_clip_tokenizer_dir, "vocab.json")))) == 49408
    _check(real_clip_tokenizer_dir, CORPUS + _random_corpus(400, seed=1))


def test_tokenizer_json_only(real_clip_tokenizer_dir, tmp_path):
    # a folder with only tokenizer.json (as some exports have) tokenizes the same
    from transformers import CLIPTokenizerFast
    fast = CLIPTokenizerFast.from_pretrained(real_clip_tokenizer_dir)
    fast.save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        os.remove(tmp_path / name)
    assert np.array_equal(ClipTokenizer(str(tmp_path))(CORPUS), ClipTokenizer(real_clip_tokenizer_dir)(CORPUS))


def test_sd2_style_pad_token(real_clip_tokenizer_dir, tmp_path):
    # SD 2.x pads with "!" (id 0), not <|endoftext|>
    CLIPTokenizer.from_pretrained(real_clip_tokenizer_dir, pad_token="!").save_pretrained(str(tmp_path))
    ids = ClipTokenizer(str(tmp_path))(["a photo"])
    assert ids[0, -1] == 0
    _check(str(tmp_path), CORPUS[:6])


def test_placeholders_match_diffusers_expansion(real_clip_tokenizer_dir):
    # diffusers: add_tokens(["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]) and maybe_convert_prompt
    ref = CLIPTokenizer.from_pretrained(real_clip_tokenizer_dir)
    names = ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2", "<x>"]
    ref.add_tokens(names)
    ours = ClipTokenizer(real_clip_tokenizer_dir)
    placeholders = placeholder_ids({"<cat-toy>": np.zeros((3, 4)), "<x>": np.zeros((1, 4))}, 49408)
    prompts = ["a photo of <cat-toy>", "<cat-toy>,on a beach", "a<cat-toy>b and <x>", "<cat-toy>_1 only",
               "<x><x> twice, <cat-toy>" + " word" * 80]
    expanded = [p.replace("<cat-toy>_1", "\0").replace("<cat-toy>", "<cat-toy> <cat-toy>_1 <cat-toy>_2")
                .replace("\0", "<cat-toy>_1") for p in prompts]
    assert np.array_equal(ours(prompts, placeholders), _reference_ids(ref, expanded))
    assert ref.convert_tokens_to_ids(names) == [49408, 49409, 49410, 49411]


def test_word_placeholder_matches_whole_words_only(real_clip_tokenizer_dir):
    # a placeholder whose ends are letters or digits is not found inside words ("<cat>alog")
    ours = ClipTokenizer(real_clip_tokenizer_dir)
    cat = {"cat": [49408]}
    assert ours.token_ids("a catalog of cats, bobcat", cat) == ours.token_ids("a catalog of cats, bobcat")
    assert ours.token_ids("a cat, (cat) cat.", cat).count(49408) == 3
    assert ours.token_ids("cat", cat) == [49408]
    # one end a letter/digit, the other punctuation: only the letter/digit end must stand free
    mixed = {"<tok1": [49408]}
    assert ours.token_ids("a <tok1 and x<tok1!", mixed).count(49408) == 2
    assert 49408 not in ours.token_ids("a <tok12", mixed)
    # the longest placeholder wins, also with whole-word ends
    assert ours.token_ids("sks_1 sks", {"sks": [49408], "sks_1": [49409]}) == [49409, 49408]


def test_names_and_replaces_tokens_as_token_ids_finds_them():
    from edge_ti.tokenizer import names_token, replace_token
    assert replace_token("a cat on a catalog, cat.", "cat", "mug") == "a mug on a catalog, mug."
    assert replace_token("a<t>b", "<t>", "mug") == "amugb"  # punctuation ends match literally
    assert names_token("a cat", "cat") and not names_token("a catalog", "cat")


@pytest.mark.parametrize("token, problem", [("", "non-empty"), ("my mug", "whitespace"), ("a\nb", "whitespace")])
def test_empty_or_spaced_placeholder_is_refused(real_clip_tokenizer_dir, token, problem):
    from edge_ti.errors import EdgeTIError
    ours = ClipTokenizer(real_clip_tokenizer_dir)
    with pytest.raises(EdgeTIError, match=problem):
        ours.token_ids("a photo", {token: [49408]})


def test_check_new_token_refuses_vocabulary_words(real_clip_tokenizer_dir):
    from edge_ti.errors import EdgeTIError
    from edge_ti.tokenizer import check_new_token
    ours = ClipTokenizer(real_clip_tokenizer_dir)
    for token, form in (("star", "star</w>"), ("Star", "star</w>"), ("!", "!</w>")):
        with pytest.raises(EdgeTIError, match=f"{token!r} is already in the tokenizer's vocabulary.*{form}"):
            check_new_token(ours, token)
        check_new_token(ours, token, allow_vocabulary_word=True)
    for token in ("<star>", "<my-mug>", "sks-mug"):
        check_new_token(ours, token)
    for token, problem in (("<|endoftext|>", "special"), ("", "non-empty"), ("my star", "whitespace")):
        with pytest.raises(EdgeTIError, match=problem):
            check_new_token(ours, token, allow_vocabulary_word=True)

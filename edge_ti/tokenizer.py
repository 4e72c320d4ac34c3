"""CLIP's byte-level BPE through the `tokenizers` library, with placeholder tokens.

Ids equal transformers' (slow) `CLIPTokenizer` as Stable Diffusion pipelines call it:
`tokenizer(prompts, padding="max_length", max_length=77, truncation=True)`. The slow tokenizer
(without ftfy) cleans text with BERT's BasicTokenizer before BPE; `_basic_clean` repeats those
steps exactly, then `tokenizers` does the BPE.

New tokens follow diffusers' textual inversion: `<tok>` with n vectors stands for
`<tok> <tok>_1 ... <tok>_{n-1}`, and its ids come after the text encoder's vocabulary.

Where a prompt names a new token: diffusers (`maybe_convert_prompt`, a plain `str.replace`) and
transformers' added-token trie find it anywhere, so a token `cat` would turn "a catalog" into
"<cat>alog". Here an end of the token that is a letter or digit must not be glued to a letter or
digit in the prompt: `cat` matches in "a cat, cats" once, not in "catalog". An end that is
punctuation matches literally, as in diffusers, so `<tok>` (both ends punctuation, the usual case)
gets exactly diffusers' ids, also in "a<tok>b".
"""
import json
import os
import re
import unicodedata

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import EdgeTIError

# CLIP's pre-tokenization split (transformers CLIPTokenizer.pat / convert_slow_tokenizer.CLIPConverter)
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# the slow tokenizer reads only this many merges (CLIPTokenizer.__init__: 49152 - 256 - 2)
_MAX_MERGES = 49152 - 256 - 2


def _is_cjk(cp):
    # BasicTokenizer._is_chinese_char: the CJK Unified Ideographs blocks
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _basic_clean(text):
    """BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize, joined by spaces."""
    chars = []
    for ch in text:
        cp = ord(ch)
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            chars.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
            continue  # control and format characters are dropped
        elif _is_cjk(cp):
            chars.append(f" {ch} ")  # each CJK ideograph is its own word
        else:
            chars.append(ch)
    text = unicodedata.normalize("NFC", "".join(chars))
    return " ".join(word.lower() for word in text.split())


def _bpe_from_vocab_merges(vocab_path, merges_path):
    """The fast CLIP tokenizer as transformers' CLIPConverter builds it from vocab + merges."""
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        lines = f.read().strip().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_MAX_MERGES + 1]]  # line 0 is "#version"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<|endoftext|>",
                               continuing_subword_prefix="", end_of_word_suffix="</w>",
                               fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_config(path):
    """special_tokens_map.json or tokenizer_config.json as a dict, or a one-line error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise EdgeTIError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(config, dict):
        raise EdgeTIError(f"{path}: not a JSON object")
    return config


def _special_token(value):
    # special_tokens_map.json holds either "<|endoftext|>" or {"content": "<|endoftext|>", ...}
    return value["content"] if isinstance(value, dict) else value


class ClipTokenizer:
    """Prompts -> int64 [B, max_length] ids, as the diffusers pipeline feeds the text encoder."""

    def __init__(self, tokenizer_dir):
        json_path = os.path.join(tokenizer_dir, "tokenizer.json")
        vocab_path = os.path.join(tokenizer_dir, "vocab.json")
        merges_path = os.path.join(tokenizer_dir, "merges.txt")
        try:
            if os.path.exists(vocab_path) and os.path.exists(merges_path):
                self.bpe = _bpe_from_vocab_merges(vocab_path, merges_path)
            elif os.path.exists(json_path):
                self.bpe = Tokenizer.from_file(json_path)
            else:
                raise EdgeTIError(f"{tokenizer_dir}: no tokenizer.json or vocab.json + merges.txt")
        except (ValueError, OSError, json.JSONDecodeError, Exception) as err:
            if isinstance(err, EdgeTIError):
                raise
            raise EdgeTIError(f"{tokenizer_dir}: cannot read the tokenizer ({err})") from None
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(tokenizer_dir, name)
            if os.path.exists(path):
                config.update({k: v for k, v in _read_config(path).items() if v is not None})
        self.bos_token = _special_token(config.get("bos_token", "<|startoftext|>"))
        self.eos_token = _special_token(config.get("eos_token", "<|endoftext|>"))
        self.pad_token = _special_token(config.get("pad_token", self.eos_token))
        try:
            self.max_length = min(int(config.get("model_max_length", 77)), 77)
        except (TypeError, ValueError, OverflowError):
            raise EdgeTIError(f"{tokenizer_dir}: model_max_length is {config['model_max_length']!r}, "
                              "but must be a number") from None
        self.bos_id = self._id(self.bos_token)
        self.eos_id = self._id(self.eos_token)
        self.pad_id = self._id(self.pad_token)
        # the slow tokenizer matches its special and added tokens literally inside the text
        # (an SD 2.x prompt "wow!!!" gives three "!" pad tokens, not the BPE token "!!!</w>")
        self.special_ids = {self.bos_token: [self.bos_id], self.eos_token: [self.eos_id],
                            self.pad_token: [self.pad_id]}
        for token_id, added in config.get("added_tokens_decoder", {}).items():
            self.special_ids.setdefault(_special_token(added), [int(token_id)])

    def vocabulary_forms(self, token):
        """The vocabulary entries TOKEN already is: itself, or the whole word it is once cleaned."""
        vocab = self.bpe.get_vocab()
        word = _basic_clean(token)
        return [form for form in dict.fromkeys((token, word + "</w>")) if form in vocab]

    def _id(self, token):
        token_id = self.bpe.token_to_id(token)
        if token_id is None:
            raise EdgeTIError(f"tokenizer: special token {token!r} is not in the vocabulary")
        return token_id

    def _bpe_ids(self, text):
        text = _basic_clean(text)
        return self.bpe.encode(text, add_special_tokens=False).ids if text else []

    def token_ids(self, prompt, placeholders=None):
        """One prompt -> its ids without BOS/EOS; placeholders: {token string: [ids]}.

        Special tokens match anywhere (as transformers'); placeholders as the module docstring says.
        """
        placeholders = placeholders or {}
        literal = {**self.special_ids, **placeholders}
        ids, start = [], 0
        for match in _token_pattern(self.special_ids, placeholders).finditer(prompt):
            ids.extend(self._bpe_ids(prompt[start:match.start()]))
            ids.extend(literal[match.group()])
            start = match.end()
        ids.extend(self._bpe_ids(prompt[start:]))
        return ids

    def __call__(self, prompts, placeholders=None):
        """prompts -> int64 [B, max_length]: BOS, ids truncated to max_length-2, EOS, padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids = [self.bos_id] + self.token_ids(prompt, placeholders)[: self.max_length - 2] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out


def _token_pattern(special, placeholders):
    """A regex finding the special tokens anywhere and the placeholders as whole tokens."""
    alternatives = {re.escape(token): len(token) for token in special}
    for token in placeholders:
        check_token(token)  # an empty token would match between any two characters
        before = r"(?<![^\W_])" if token[0].isalnum() else ""  # [^\W_]: a letter or digit
        after = r"(?![^\W_])" if token[-1].isalnum() else ""
        alternatives[before + re.escape(token) + after] = len(token)
    # longest first, as transformers' added-token trie matches the longest token
    return re.compile("|".join(sorted(alternatives, key=alternatives.get, reverse=True)))


def names_token(prompt, token):
    """Whether PROMPT names the new TOKEN where ClipTokenizer.token_ids would find it."""
    return _token_pattern({}, [token]).search(prompt) is not None


def replace_token(prompt, token, text):
    """PROMPT with the new TOKEN, where ClipTokenizer.token_ids would find it, replaced by TEXT."""
    return _token_pattern({}, [token]).sub(lambda match: text, prompt)


def check_token(token, source=None):
    """An error (naming SOURCE, e.g. the file) unless TOKEN can be named in a prompt: not empty, no whitespace."""
    where = f"{source}: " if source else ""
    if not isinstance(token, str) or not token:
        raise EdgeTIError(f"{where}a token must be a non-empty string, got {token!r}")
    if any(ch.isspace() for ch in token):
        raise EdgeTIError(f"{where}token {token!r} contains whitespace; a token must be one word")


def check_new_token(tokenizer, token, allow_vocabulary_word=False):
    """An error unless TOKEN can be a new token: check_token, and not a word the tokenizer has.

    A vocabulary word as the token takes over that word in every prompt (diffusers'
    load_textual_inversion refuses it: "Token star already in tokenizer vocabulary");
    allow_vocabulary_word permits it, but never a special token such as <|endoftext|>.
    """
    check_token(token)
    if token in tokenizer.special_ids:
        raise EdgeTIError(f"token {token!r} is one of the tokenizer's special tokens; choose another")
    forms = tokenizer.vocabulary_forms(token)
    if forms and not allow_vocabulary_word:
        raise EdgeTIError(f"token {token!r} is already in the tokenizer's vocabulary ({', '.join(forms)}): "
                          f"prompts that use the word would get the new embedding; choose e.g. "
                          f"'<{token}>', or allow it with --allow-vocabulary-token")


def placeholder_ids(embeddings, first_id):
    """{token: [n, D]} -> {string: [ids]}: `<tok>` expands to its n ids, `<tok>_j` names vector j.

    Ids are given in insertion order starting at first_id (the text encoder's vocabulary size),
    so the extra embedding rows are the tokens' vectors concatenated in the same order.
    """
    strings, next_id = {}, first_id
    for token, vectors in embeddings.items():
        n = len(vectors)
        ids = list(range(next_id, next_id + n))
        strings[token] = ids
        for j in range(1, n):
            strings[f"{token}_{j}"] = [ids[j]]  # diffusers' names for the extra vectors
        next_id += n
    return strings

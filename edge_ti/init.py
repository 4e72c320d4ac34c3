"""Where the search starts: e0, the initial embedding of the new token.

`from_word`: the word's token embeddings (several BPE tokens are averaged), as diffusers'
textual-inversion script initializes from `--initializer_token`.

`from_images`: the paper's initialization by "non-parametric cross-attention" (Fei, Fan, Huang
2023, arXiv 2304.05818; its reference code, initialize_inversion.py): the concept images
attend over a vocabulary of words, CLIP image features as queries, CLIP features of template
sentences about each word as keys, the words' token embeddings as values:

    s_k   = normalize(mean_t normalize(CLIP_text(template_t(word_k))))     keys      (K, P)
    v_k   = mean of word_k's token-embedding rows                          values    (K, D)
    q_i   = normalize(CLIP_image(image_i))                                 queries   (N, P)
    a_i   = softmax(tau * q_i . s)       tau = CLIP's logit scale           weights   (N, K)
    e0    = mean_i (a_i . v) * m / |mean_i (a_i . v)|,  m = median row norm of the table

Two fixes to the reference code, both marked below: it takes the softmax of raw cosines (tau = 1:
over K words in -1..1 the weights are nearly uniform, and e0 tends to the vocabulary mean), and it
L2-normalizes e0 to norm 1, whatever the scale of the table's rows.
"""
import hashlib
import logging
import os
import time

import numpy as np

from .clip import clip_model
from .errors import EdgeTIError
from .files import atomic_path

log = logging.getLogger(__name__)

# sentence templates, from textual inversion's imagenet_templates_small (the keys average over them);
# few and short, since each costs one CLIP pass per word: SD 1.x has 32,230 whole words, and
# 4 x 32,230 prompts take about 19 minutes on 2 CPU cores for CLIP ViT-L/14, once (then cached;
# benchmarks/results/init_speed.md: what an int8 text tower or one template would save)
TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "a good photo of a {}",
)
PROGRESS_EVERY = 64 * 20  # prompts between progress lines at least (at most ~20 lines in all)
MIN_LETTERS = 3  # shorter whole words are mostly abbreviations and word pieces ("ab", "th")


def from_word(model, word, vectors=1):
    """e0 [vectors, D]: the mean of WORD's token-embedding rows, repeated for each vector.

    A word of several tokens is allowed (diffusers' script refuses it) with a warning: the mean of
    unrelated pieces ("xyz": x, y, z) may be far from what the word means.
    """
    tokenizer = model.tokenizer
    ids = tokenizer.token_ids(word)
    if not ids:
        raise EdgeTIError(f"--init-word {word!r} has no tokens")
    if len(ids) > 1:
        pieces = ", ".join(tokenizer.bpe.decode([i]).replace("</w>", "").strip() for i in ids)
        log.warning("init word %r is %d tokens (%s): using the mean of their embeddings", word, len(ids), pieces)
    e0 = model.token_embeddings[ids].mean(axis=0)          # (D,)
    return np.tile(e0[None], (vectors, 1)).astype(np.float32)  # (n, D)


def vocabulary(model):
    """The Stable Diffusion tokenizer's whole words: tokens "word</w>" of 3+ ASCII letters, by id."""
    words = []
    for token, token_id in model.tokenizer.bpe.get_vocab().items():
        word = token[:-4]
        if token.endswith("</w>") and len(word) >= MIN_LETTERS and word.isascii() and word.isalpha():
            words.append((token_id, word))
    return [word for _, word in sorted(words)]


def sentence_features(clip, words, cache_dir, templates=TEMPLATES):
    """Keys s [K, P]: each word's template sentences through CLIP, cached by content on disk."""
    digest = hashlib.sha256(clip.text_key.encode())
    digest.update("\n".join(templates).encode() + b"\0" + "\n".join(words).encode())
    path = os.path.join(cache_dir, digest.hexdigest()[:24] + ".npy")
    if os.path.isfile(path):
        return np.load(path)
    K, T = len(words), len(templates)
    log.warning("CLIP: encoding %d words x %d templates, once for this CLIP (cached in %s)", K, T, cache_dir)
    prompts = [template.format(word) for word in words for template in templates]
    f = []
    every = max(PROGRESS_EVERY, -(-len(prompts) // 20))
    began = time.perf_counter()
    for start in range(0, len(prompts), every):
        f.append(clip.text_features(prompts[start:start + every]))  # (b, P), unit rows
        done, seconds = min(start + every, len(prompts)), time.perf_counter() - began
        # shown without --verbose: the first run on SD 1.x is minutes of otherwise silent work
        log.warning("CLIP: %d / %d prompts, %.0f s, about %.0f s left", done, len(prompts), seconds,
                    seconds / done * (len(prompts) - done))
    f = np.concatenate(f).reshape(K, T, -1)                      # (K, T, P)
    s = f.mean(axis=1)                                           # (K, P)
    s = (s / np.linalg.norm(s, axis=1, keepdims=True)).astype(np.float32)
    with atomic_path(path) as tmp:  # readers see the whole file or none
        np.save(tmp, s)
    return s


def token_features(model, words):
    """Values v [K, D]: the mean of each word's token-embedding rows in the Stable Diffusion table."""
    rows = []
    for word in words:
        ids = model.tokenizer.token_ids(word)
        if not ids:
            raise EdgeTIError(f"init word {word!r} has no tokens")
        rows.append(model.token_embeddings[ids].mean(axis=0))    # (D,)
    return np.stack(rows).astype(np.float32)                     # (K, D)


def attention_weights(q, s, logit_scale, top_k=None):
    """a = softmax(logit_scale * q . s^T) over the K words, [N, K]; top_k keeps each row's k best."""
    logits = logit_scale * (q @ s.T)                             # (N, K)
    if top_k is not None and top_k < logits.shape[1]:
        kth = np.partition(logits, -top_k, axis=1)[:, -top_k:].min(axis=1, keepdims=True)  # (N, 1)
        logits = np.where(logits >= kth, logits, -np.inf)
    logits = logits - logits.max(axis=1, keepdims=True)
    a = np.exp(logits)
    return a / a.sum(axis=1, keepdims=True)                      # (N, K), rows sum to 1


def from_images(model, images, vectors=1, words=None, top_k=None, show=10, templates=TEMPLATES):
    """e0 [vectors, D] from concept IMAGES by cross-attention over WORDS (default: the SD vocabulary),
    each word's key the mean of its TEMPLATES sentences' CLIP features.

    Returns (e0, top): top lists the `show` words of largest mean weight over the images,
    as (word, weight), largest first (show=None lists every word).
    """
    if top_k is not None and top_k < 1:
        raise EdgeTIError(f"top_k must be at least 1, got {top_k}")
    clip = clip_model(model)
    words = vocabulary(model) if words is None else [str(w) for w in words]
    if not words:
        raise EdgeTIError("no words to initialize from")
    # 1. keys, values and queries
    s = sentence_features(clip, words, model.cache_dir("clip_vocab"), templates)  # (K, P)
    v = token_features(model, words)                                    # (K, D)
    q = clip.image_features(images)                                     # (N, P)
    # 2. attention weights; fix 1: with CLIP's logit scale, as CLIP itself turns cosines into
    #    probabilities (the reference code's softmax of raw cosines is nearly uniform)
    a = attention_weights(q, s, clip.logit_scale, top_k)                # (N, K)
    # 3. each image's embedding a_i . v, averaged over the images
    e = (a @ v).mean(axis=0)                                            # (D,)
    # 4. fix 2: scale to the median row norm of the token table (the reference code uses norm 1)
    m = np.median(np.linalg.norm(model.token_embeddings, axis=1))
    e0 = e * (m / np.linalg.norm(e))                                    # (D,)
    weight = a.mean(axis=0)                                             # (K,)
    order = np.argsort(-weight, kind="stable")[:show]
    top = [(words[k], float(weight[k])) for k in order]
    return np.tile(e0[None], (vectors, 1)).astype(np.float32), top     # (n, D)

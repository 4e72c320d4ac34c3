"""What a token learned, measured: CLIP-I and CLIP-T of its generations, next to its init's.

For each prompt (containing the token) n images are generated with the learned embedding and
with the initial one (same seeds); CLIP-I compares them with the concept images, CLIP-T with the
prompt where the token is replaced by its class word (CLIP does not know the token).
"""
import json
import logging

import numpy as np

from . import metrics
from .embeddings import load_embedding, read_metadata
from .errors import EdgeTIError
from .generate import generate
from .tokenizer import check_token, names_token, replace_token

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["a photo of {}", "a rendering of {}", "a close-up photo of {}", "a photo of {} on a table"]


def _metadata(path):
    metadata = read_metadata(path)
    if not isinstance(metadata, dict):
        raise EdgeTIError(f"{path}: unreadable metadata")
    return metadata


def init_from_file(path, token, width):
    """The init embedding edge-ti recorded in the file's metadata, or None."""
    return _recorded_init(path, _metadata(path).get("edge_ti.init"), width)


def _recorded_init(path, recorded, width):
    """The metadata's edge_ti.init (JSON [n, width] numbers) -> float32 [n, width]; else a warning and None.

    The file may come from anyone: other writers use the key for other things, or break it.
    """
    if not recorded:
        return None
    try:
        init = np.asarray(json.loads(recorded), dtype=np.float32)
    except (TypeError, ValueError):  # not a str, not JSON, ragged or non-numeric lists
        init = None
    if init is None or init.ndim != 2 or init.shape[1] != width or not init.size or not np.isfinite(init).all():
        log.warning("%s: metadata edge_ti.init is not a [n, %d] list of finite numbers; ignoring it", path, width)
        return None
    return init


def read_prompts(path, token):
    """A prompts file -> its non-empty lines; each must name TOKEN or have {} for it, else an error naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EdgeTIError(f"{path}: cannot read prompts ({err})") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        prompt = line.strip()
        if prompt and "{}" not in prompt and not names_token(prompt, token):
            raise EdgeTIError(f"{path}: line {number} has neither {token} nor {{}}: {prompt!r}")
        if prompt:
            prompts.append(prompt)
    if not prompts:
        raise EdgeTIError(f"{path}: no prompts")
    return prompts


def evaluate(model, embedding, concept_images, class_word, prompts=None, init_embedding=None, n=8, steps=30,
             guidance=7.5, sampler="ddim", seed=0, progress=None):
    """embedding {token: [n, D]} -> {"learned": {"clip_i", "clip_t"}, "init": {...} (if given), "prompts"}.

    progress(done, total) is called after every sampler step, counted over all generations."""
    (token, vectors), = model.check_embeddings(embedding, source="embedding").items()
    prompts = [p.replace("{}", token) for p in (prompts or DEFAULT_PROMPTS)]
    unnamed = [p for p in prompts if not names_token(p, token)]
    if unnamed:  # it would measure the model without the token
        raise EdgeTIError(f"prompt {unnamed[0]!r} has neither {token} nor {{}}")
    variants = {"learned": vectors}
    if init_embedding is not None:
        variants["init"] = model.check_embeddings({token: init_embedding}, source="init")[token]
    results = {"prompts": prompts, "class_word": class_word, "n": n}
    total, done = steps * len(prompts) * len(variants), [0]

    def step_done(i, steps_of_one):
        done[0] += 1
        if progress is not None:
            progress(done[0], total)
    for name, vecs in variants.items():
        images, texts = [], []
        for k, prompt in enumerate(prompts):
            images.append(generate(model, prompt, {token: vecs}, steps=steps, guidance=guidance, sampler=sampler,
                                   seed=seed + k, n=n, progress=step_done))      # (n, H, W, 3)
            texts += [replace_token(prompt, token, class_word)] * n
        images = np.concatenate(images)                                          # (len(prompts) n, H, W, 3)
        results[name] = {"clip_i": metrics.clip_i(model, images, concept_images),
                         "clip_t": metrics.clip_t(model, images, texts)}
    return results


def load_for_evaluation(model, path):
    """(embedding {token: [n, D]}, recorded init or None, recorded init word or '') of a file."""
    embedding = model.check_embeddings(load_embedding(path), source=path)
    (token, vectors), = embedding.items()
    check_token(token, source=path)
    metadata = _metadata(path)
    init_word = metadata.get("edge_ti.init_word", "")
    if not isinstance(init_word, str):
        log.warning("%s: metadata edge_ti.init_word is not a string; ignoring it", path)
        init_word = ""
    return embedding, _recorded_init(path, metadata.get("edge_ti.init"), vectors.shape[1]), init_word

"""What a token learned, measured: CLIP-I and CLIP-T of its generations, next to its init's.

For each prompt (containing the token) n images are generated with the learned embedding and
with the initial one (same seeds); CLIP-I compares them with the concept images, CLIP-T with the
prompt where the token is replaced by its class word (CLIP does not know the token).
"""
import json

import numpy as np

from . import metrics
from .embeddings import load_embedding, read_metadata
from .errors import EdgeTIError
from .generate import generate

DEFAULT_PROMPTS = ["a photo of {}", "a rendering of {}", "a close-up photo of {}", "a photo of {} on a table"]


def init_from_file(path, token, width):
    """The init embedding edge-ti recorded in the file's metadata, or None."""
    recorded = read_metadata(path).get("edge_ti.init")
    if not recorded:
        return None
    init = np.asarray(json.loads(recorded), dtype=np.float32)
    return init if init.ndim == 2 and init.shape[1] == width else None


def evaluate(model, embedding, concept_images, class_word, prompts=None, init_embedding=None, n=8, steps=30,
             guidance=7.5, sampler="ddim", seed=0, progress=None):
    """embedding {token: [n, D]} -> {"learned": {"clip_i", "clip_t"}, "init": {...} (if given), "prompts"}."""
    (token, vectors), = model.check_embeddings(embedding, source="embedding").items()
    prompts = [p if token in p else p.format(token) for p in (prompts or DEFAULT_PROMPTS)]
    variants = {"learned": vectors}
    if init_embedding is not None:
        variants["init"] = model.check_embeddings({token: init_embedding}, source="init")[token]
    results = {"prompts": prompts, "class_word": class_word, "n": n}
    for name, vecs in variants.items():
        images, texts = [], []
        for k, prompt in enumerate(prompts):
            images.append(generate(model, prompt, {token: vecs}, steps=steps, guidance=guidance, sampler=sampler,
                                   seed=seed + k, n=n, progress=progress))       # (n, H, W, 3)
            texts += [prompt.replace(token, class_word)] * n
        images = np.concatenate(images)                                          # (len(prompts) n, H, W, 3)
        results[name] = {"clip_i": metrics.clip_i(model, images, concept_images),
                         "clip_t": metrics.clip_t(model, images, texts)}
    return results


def load_for_evaluation(model, path):
    """(embedding {token: [n, D]}, recorded init or None, recorded init word or '') of a file."""
    embedding = model.check_embeddings(load_embedding(path), source=path)
    (token, vectors), = embedding.items()
    metadata = read_metadata(path)
    if not isinstance(metadata, dict):
        raise EdgeTIError(f"{path}: unreadable metadata")
    return embedding, init_from_file(path, token, vectors.shape[1]), metadata.get("edge_ti.init_word", "")

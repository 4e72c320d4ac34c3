"""CLIP score of candidate tokens: what a candidate says about the concept images, without a UNet sample.

On SD 1.x the text encoder *is* CLIP ViT-L/14's text tower (SD 2.x: OpenCLIP ViT-H's). With that
CLIP's image tower in MODEL_DIR/clip/, a candidate token e has a CLIP text feature, its prompts through
the text tower and its projection, at the cost of text passes only, and

    score(e) = mean_t,i  cos(CLIP_text(template_t(e)), CLIP_image(image_i))

says how well the token describes the concept images (CLIPScore, Hessel et al. 2021, without its
clipping; the objective PEZ optimizes hard prompts for, Wen et al. 2023). Unlike the denoising loss it
is deterministic: no timestep, no noise, so a search can rank candidates on it without sampling error.

`path` uses it before the denoising search: CMA-ES over z in the search's own subspace (e0 + W z, the
same norm cap), maximizing the score, held inside a ball around the init that grows in stages: the best
token of each stage is the CLIP optimum at that distance; the denoising search then starts at the init or
the stage whose held-out denoising loss is lowest (edge_ti.train). `refine` is the same search without
the ball: its optimum (|z| 60-104 on the shapes model, where the score has saturated) is often past what
the UNet reads as the concept, and the straight line to it passes through tokens the UNet reads otherwise;
points of that line (TrainSettings.clip_line) join the choice where asked (the default of stops 39-46).
Both need a clip/ whose text tower is the model's text encoder (same token table), which `ClipScore` checks.
"""
import os
import time

import numpy as np

from . import subspace
from . import text_encoder as te
from .clip import clip_model
from .errors import EdgeTIError

TEMPLATES = 4  # the first prompt templates of the training's: each costs one text pass per candidate
MATCH_TOLERANCE = 1e-4  # largest |difference| between the two token tables, relative to their largest entry


PATH_REACH = 3.25  # the path's last ball, in units of sqrt(dim) (a vocabulary row's z has about that norm):
                   # gradient TI's tokens end 2.8-3.7 sqrt(dim) from the init word on the shapes model (run 17's
                   # objects; styles 1.8-3.2)
REFINE_AUTO = 2000  # TrainSettings(clip_refine="auto") where the model's clip/ can score its tokens (clip_score.md)


def _patched_text_tower(model):
    """The folder of MODEL's clip/ text tower patched to take a token's embedding (edge_ti.text_encoder),
    after checking that it is the model's text encoder; raises EdgeTIError saying why not."""
    if model.family != "sd":
        raise EdgeTIError(f"{model.path}: CLIP scores of candidates need one text encoder (SD 1.x / 2.x), "
                          f"not {model.family}'s two")
    clip = clip_model(model)
    patched = model.patched_graph(os.path.join(clip.path, "text_model.onnx"), f"clip-{clip.text_key}",
                                  needs_hidden_state=False)
    table = np.load(os.path.join(patched, "token_embeddings.npy"))
    ours = model.token_embeddings
    if table.shape != ours.shape or np.abs(table - ours).max() > MATCH_TOLERANCE * np.abs(ours).max():
        raise EdgeTIError(f"{clip.path}: its text tower is not {model.path}'s text encoder (token tables "
                          f"{list(table.shape)} and {list(ours.shape)} differ), so it cannot score the model's "
                          f"tokens; give a clip/ of the CLIP the text encoder comes from (SD 1.x: "
                          f"openai/clip-vit-large-patch14)")
    return clip, patched


def why_not(model):
    """None if MODEL's clip/ can score its tokens (ClipScore works), else the reason in one line."""
    try:
        _patched_text_tower(model)
    except EdgeTIError as error:
        return str(error)
    return None


class ClipScore:
    """score(candidates [P, n, D]) -> [P]: CLIP cosine of each candidate's prompts with the images."""

    def __init__(self, model, images, prompts):
        self.clip, patched = _patched_text_tower(model)
        self.session = model.open_session(os.path.join(patched, "model.onnx"))
        self.vocab_size = model.vocab_size
        self.prompt_ids = np.asarray(prompts, np.int64)                         # (K, 77), the token from V on
        # the text tower pools at the end-of-text token: later positions change nothing
        eos = np.array([np.flatnonzero(row == model.tokenizer.eos_id)[0] for row in self.prompt_ids])
        self.prompt_ids = self.prompt_ids[:, :int(eos.max()) + 1]
        self.image_features = self.clip.image_features(images)                  # (N, P), unit rows
        self.evaluations = 0

    def __call__(self, candidates):
        P, n, _ = candidates.shape
        K = len(self.prompt_ids)
        ids = te.population_ids(self.prompt_ids, self.vocab_size, n, P)           # (P*K, L)
        feeds = {"input_ids": ids, te.EXTRA_INPUT: np.ascontiguousarray(candidates.reshape(P * n, -1), np.float32)}
        f = self.session.run(None, feeds)[0]                                     # (P*K, F), projected
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        self.evaluations += P
        return (f @ self.image_features.T).reshape(P, K, -1).mean(axis=(1, 2))   # (P,)


def _climb(es, score, e0, W, max_norm, anchor, generations, best, best_z, radius=None):
    """GENERATIONS of ES (pycma) maximizing score(e0 + W z), each z asked pulled into the ball of RADIUS around
    the init first if one is given (ES is told the score of the point it became); -> (best, best_z, evaluations),
    the best over BEST and every candidate scored."""
    done = 0
    for _ in range(generations):
        zs = asked = np.asarray(es.ask())                                       # (P, dim)
        if radius is not None:
            zs = asked * np.minimum(1.0, radius / np.maximum(np.linalg.norm(asked, axis=1, keepdims=True), 1e-30))
        scores = score(subspace.embeddings_from_z(e0, W, zs, max_norm, anchor))  # (P,)
        es.tell(list(asked), (-scores).tolist())                                # cma minimizes
        done += len(zs)
        if scores.max() > best:
            best, best_z = float(scores.max()), zs[int(scores.argmax())].copy()
    return best, best_z, done


def refine(score, e0, W, max_norm, evaluations, sigma=0.5, popsize=20, seed=0, anchor=None):
    """z* after EVALUATIONS candidates of CMA-ES maximizing score(e0 + W z) from z = 0; -> (z*, record):
    the score at e0 and at z*, the evaluations made and their seconds. anchor: the token's kept last
    vector (subspace.with_anchor), scored with every candidate.

    Returns z = 0 unless a candidate scored above e0 itself."""
    import cma
    dim = e0.shape[0] * W.shape[1]
    began = time.perf_counter()
    start = float(score(subspace.embeddings_from_z(e0, W, np.zeros((1, dim)), max_norm, anchor))[0])
    es = cma.CMAEvolutionStrategy(np.zeros(dim), sigma, {"popsize": popsize, "seed": seed + 1, "verbose": -9})
    best, best_z, done = _climb(es, score, e0, W, max_norm, anchor, -(-evaluations // popsize), start, np.zeros(dim))
    record = {"clip_score_init": start, "clip_score": best, "clip_evaluations": done,
              "clip_seconds": time.perf_counter() - began}
    return best_z, record


def path_evaluations(evaluations, stages, popsize=20):
    """What path(.., EVALUATIONS, STAGES) spends: whole generations of POPSIZE, the same number in every stage
    (at least one)."""
    return max(1, evaluations // (stages * popsize)) * stages * popsize


def path(score, e0, W, max_norm, evaluations, stages, sigma=0.5, popsize=20, seed=0, anchor=None):
    """zs [STAGES, dim]: the CLIP path, the best candidate of each stage of one CMA-ES run that maximizes
    score(e0 + W z) with z held in a ball around the init whose radius grows stage by stage up to
    PATH_REACH sqrt(dim) (a candidate outside is pulled onto the sphere, and CMA-ES told the score of the
    point it became); -> (zs, record), as refine's (the init's score one evaluation more, not counted)."""
    import cma
    dim = e0.shape[0] * W.shape[1]
    began = time.perf_counter()
    start = float(score(subspace.embeddings_from_z(e0, W, np.zeros((1, dim)), max_norm, anchor))[0])
    es = cma.CMAEvolutionStrategy(np.zeros(dim), sigma, {"popsize": popsize, "seed": seed + 2, "verbose": -9})
    generations = path_evaluations(evaluations, stages, popsize) // (stages * popsize)  # per stage
    zs, done, top = [], 0, start
    for radius in PATH_REACH * np.sqrt(dim) * np.arange(1, stages + 1) / stages:
        best, best_z, spent = _climb(es, score, e0, W, max_norm, anchor, generations, -np.inf, None, radius)
        zs.append(best_z)
        done += spent
        top = max(top, best)
    return np.stack(zs), {"clip_path_evaluations": done, "clip_path_seconds": time.perf_counter() - began,
                          "clip_score_init": start, "clip_score": top}

"""Learn a token from a few images with forward passes only (Fei, Fan, Huang 2023).

    images -> latents (once) -> e0 (init) -> W (subspace) -> CMA-ES over z, each generation's
    candidates e0 + W z scored on the same common random numbers -> the best held-out candidate
    -> an embedding file.
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
import string
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import clip_score
from . import init as initialization
from . import latents as lat
from . import objective, search, subspace
from .clip import clip_model
from .denoiser import Denoiser
from .embeddings import MAX_VECTORS, save_embedding
from .errors import EdgeTIError
from .files import FileLock, atomic_path, check_output_path
from .plot import loss_curve
from .tokenizer import check_new_token
from .workers import InProcess

log = logging.getLogger(__name__)

# diffusers examples/textual_inversion/textual_inversion.py: imagenet_templates_small
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]
# ... and imagenet_style_templates_small
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}",
    "a dirty painting in the style of {}", "a dark painting in the style of {}",
    "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
]
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


@dataclass
class TrainSettings:
    vectors: int = 1              # vectors per token; 1 as in the paper and diffusers' default
    template: object = "object"   # "object", "style", or a list of templates with one {}
    subspace: str = "pca"         # pca | prior | full (see subspace.py)
    dim: int = 256                # intrinsic dimension per vector: the paper's 256 (capped at D)
    popsize: int = None           # None: the optimizer's (OPTIMIZER_DEFAULTS; cma: 10, the paper's was 20)
    sigma: float = None           # CMA-ES step size in z; None: 0.5 for pca/prior, 0.5*std(table) for full (the
                                  # search's only: the CLIP climbs before it take the cma default, _clip_sigma)
                                  # (gauss-newton: its probes' distance, 0.25)
    optimizer: str = "cma"        # cma | zo-adam: gradient estimates from antithetic pairs + Adam (zo_adam.py);
                                  # for zo-adam, sigma is the pairs' radius and popsize must be even
                                  # | gauss-newton: the point and popsize - 1 probes at distance sigma, each
                                  # generation's predictions summed into one quadratic model (gauss_newton.py)
    lr: float = 0.05              # zo-adam's Adam step size in z (pca z ~ N(0, I) spans the vocabulary)
    prior: float = 30.0           # gauss-newton's pull toward the init, in units of the first generation's curvature
    norm_cap: bool = True         # shorten candidates longer than the vocabulary's longest row: a search
                                  # never leaves the norms the text encoder was trained on (measured: no loss)
    loss_weighting: str = "auto"  # eps: score in epsilon-loss units whatever the model predicts; model: the
                                  # model's own loss (diffusers' TI loss; for v models it weighs t ~ T up to
                                  # ~200x more, and kept less of the demo concept's shape: models.md); auto: the
                                  # model's own with the style templates (a style's background is decided at
                                  # large t: quality.md, stop 48), eps otherwise
    timesteps: str = "weighted"   # how each triple's t is drawn: "weighted": in proportion to the weight the scoring
                                  # loss gives t against the epsilon loss, each loss weighed back so the objective is
                                  # the same (objective.importance_timesteps; only a v model's own loss, a style's by
                                  # default, weighs t unevenly: elsewhere it is uniform t; quality.md, stop 50);
                                  # "uniform": uniform t, as diffusers draws (the default before stop 50)
    budget: int = 5000            # candidate evaluations: the paper's 5000; 0: no limit (time or patience stop)
    max_time: float = None        # seconds; None for no limit
    seed: int = 0
    triples: int = None           # (latent, prompt, timestep, noise) per generation, shared by all candidates;
                                  # None: the optimizer's (cma: 2)
    crn: str = "redraw"           # redraw the common random numbers each generation, or keep them fixed
    heldout_triples: int = 32     # the fixed held-out set that picks the result and decides early stop
    eval_every: int = None        # generations between held-out checks; None: the optimizer's (cma: 20, a check
                                  # every 400 UNet samples)
    patience: int = 10            # stop when 10 held-out checks gained less than min_improvement; 0 never
    min_improvement: float = 1e-4  # relative: the denoising loss is mostly irreducible noise, gains are small
    flip: bool = True             # add mirror images of the concept images (diffusers flips at random)
    latent_sample: bool = False   # VAE latent: the distribution's mean (False) or a seeded sample
    max_batch: int = None         # UNet samples per call; None: the memory cap, edge_ti.denoiser.auto_max_batch
    resolution: int = None        # training images' size in pixels; None: the model's (SD 1.5: 512)
    clip_refine: object = "auto"  # CLIP-score evaluations before the search, on the CLIP path and on the line
                                  # each (needs a clip/ whose text tower is the text encoder); 0: none; "auto":
                                  # clip_score.REFINE_AUTO where the model's clip/ can score its tokens and the
                                  # prompts are not the style templates (no path point draws a style's
                                  # background: quality.md, stop 48), else none
    clip_line: int = 0            # points on the line from the init to the CLIP-refined token (clip_score.refine),
                                  # both ends included, whose held-out losses join the choice of where the search
                                  # starts: 0, 1/4, .., 1 at 5 (the default of stops 39-46); 2: one end or the
                                  # other, as before stop 39; 0: no line and no refinement run (quality.md, run 19:
                                  # the line's points started 6 of 40 runs and cost half the time before the search)
    clip_path: int = 6            # stages of the CLIP path (clip_score.path: the CLIP optimum at 1..6 sixths of
                                  # 3.25 sqrt(dim) from the init) whose points and the init are the held-out loss's
                                  # choice of the start; 0: none, as before stop 46 (then clip_line must be 2+)
    anchor: object = "auto"       # one more, last vector of the token, kept as it is while the others are searched:
                                  # "word": the init word's embedding (the class noun of "a photo of [V] dog": the
                                  # token says "a <learned> cross"); "images": the images' CLIP init (init.from_images,
                                  # the paper's init; needs the model's clip/); "auto": the word with a word init and
                                  # object prompts (quality.md, run 11), else none (the images' init, kept for styles
                                  # in stops 34-48, held their background back: quality.md, stop 48); False: none.
                                  # True is "word"

    def __post_init__(self):
        defaults = optimizer_defaults(self.optimizer)
        self.popsize = defaults["popsize"] if self.popsize is None else self.popsize
        self.triples = defaults["triples"] if self.triples is None else self.triples
        self.eval_every = defaults["eval_every"] if self.eval_every is None else self.eval_every


# what popsize, triples, sigma and eval_every default to for each optimizer (benchmarks/results/optimizers.md;
# cma's popsize and triples: quality.md, run 15: half the candidates on half the triples, twice the generations)
OPTIMIZER_DEFAULTS = {
    "cma": {"popsize": 10, "triples": 2, "sigma": 0.5, "eval_every": 20},
    "zo-adam": {"popsize": 20, "triples": 4, "sigma": 0.5, "eval_every": 5},
    "gauss-newton": {"popsize": 9, "triples": 4, "sigma": 0.25, "eval_every": 5},  # the point + 8 probes, 4 triples
}


def optimizer_defaults(optimizer):
    """OPTIMIZER_DEFAULTS of OPTIMIZER (cma's for a name check_settings will refuse)."""
    return OPTIMIZER_DEFAULTS.get(optimizer if isinstance(optimizer, str) else "cma", OPTIMIZER_DEFAULTS["cma"])


@dataclass
class TrainResult:
    embedding: dict               # {token: float32 [n, D]}
    init_heldout: float           # held-out loss of the initial embedding (the word's or --init auto's)
    best_heldout: float           # held-out loss of the written embedding
    generations: int
    evaluations: int
    heldout_evaluations: int
    elapsed: float
    stop_reason: str
    paths: dict                   # embedding, log, curve, checkpoint, lock
    init_words: list = dataclasses.field(default_factory=list)  # init="auto": (word, weight), largest first
    start: np.ndarray = None      # e0 [n, D], where the search started (after clip_refine, if any): the
                                  # searched vectors of a state's z (the token's: with anchor, below)
    start_heldout: float = None   # held-out loss at start: init_heldout, or the CLIP-refined token's
    clip_refined: bool = False    # whether the search started from the CLIP-refined token (not the init)
    anchor: np.ndarray = None     # [1, D], the token's kept last vector (settings.anchor), or None: a state's
                                  # token is subspace.embeddings_from_z(start, W, z, max_norm, anchor)
    anchor_from: str = None       # "word" or "images": what the anchor is (None: no anchor)
    anchor_words: list = dataclasses.field(default_factory=list)  # an "images" anchor: (word, weight), largest first


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM in the CLI) during the search: the best embedding so far was written."""

    def __init__(self, result):
        super().__init__(result.stop_reason)
        self.result = result


# every setting's valid range, checked before any work: (test, what the message says it must be)
_RANGES = {
    "vectors": (lambda v: 1 <= v <= MAX_VECTORS, f"1 to {MAX_VECTORS}"),
    "dim": (lambda v: v >= 1, "at least 1"),
    "popsize": (lambda v: v >= 2, "at least 2 (CMA-ES ranks candidates against each other)"),
    "sigma": (lambda v: v is None or (math.isfinite(v) and v > 0), "a positive number"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a positive number"),
    "prior": (lambda v: math.isfinite(v) and v > 0, "a positive number"),
    "budget": (lambda v: v >= 0, "0 (no limit) or more"),
    "max_time": (lambda v: v is None or (math.isfinite(v) and v > 0), "a positive duration"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "0 to 2**32 - 1"),
    "triples": (lambda v: v >= 1, "at least 1"),
    "heldout_triples": (lambda v: v >= 1, "at least 1"),
    "eval_every": (lambda v: v >= 1, "at least 1"),
    "patience": (lambda v: v >= 0, "0 (never stop early) or more"),
    "min_improvement": (lambda v: math.isfinite(v) and 0 <= v < 1, "in [0, 1)"),
    "max_batch": (lambda v: v is None or v >= 1, "at least 1"),
    "resolution": (lambda v: v is None or 8 <= v <= 4096, "8 to 4096 pixels"),
}


def check_settings(settings):
    """A one-line error for the first setting out of range (the CLI checks the same at parse time)."""
    for name, (valid, what) in _RANGES.items():
        value = getattr(settings, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise EdgeTIError(f"{name} must be a number, got {value!r}")
        if not valid(value):
            raise EdgeTIError(f"{name} must be {what}, got {value!r}")
    refine = settings.clip_refine
    if refine != "auto" and (isinstance(refine, bool) or not isinstance(refine, int) or refine < 0):
        raise EdgeTIError(f"clip_refine must be auto, 0 (none) or more evaluations, got {refine!r}")
    if (isinstance(settings.clip_line, bool) or not isinstance(settings.clip_line, int) or settings.clip_line < 0
            or settings.clip_line == 1):
        raise EdgeTIError(f"clip_line must be 0 (no line) or 2 or more points, got {settings.clip_line!r}")
    if isinstance(settings.clip_path, bool) or not isinstance(settings.clip_path, int) or settings.clip_path < 0:
        raise EdgeTIError(f"clip_path must be 0 (none) or more stages, got {settings.clip_path!r}")
    if settings.clip_line == 0 and not settings.clip_path and settings.clip_refine:
        raise EdgeTIError("clip_path 0 (no path) with clip_line 0 (no line, the default) leaves the CLIP refinement "
                          "nothing to do: give clip_line 5 (the line of stops 39-46) or clip_refine 0 (none)")
    if settings.anchor not in ANCHORS or not isinstance(settings.anchor, (str, bool)):
        raise EdgeTIError(f"anchor must be auto, word, images or false, got {settings.anchor!r}")
    if settings.anchor not in ("auto", False) and settings.vectors >= MAX_VECTORS:
        raise EdgeTIError(f"vectors {settings.vectors} leaves no room for the anchor: at most {MAX_VECTORS} in all")
    if settings.crn not in ("redraw", "fixed"):
        raise EdgeTIError(f"unknown crn {settings.crn!r}: choose redraw or fixed")
    if settings.subspace not in ("pca", "prior", "full"):
        raise EdgeTIError(f"unknown subspace {settings.subspace!r}: choose pca, prior or full")
    if not isinstance(settings.norm_cap, bool):
        raise EdgeTIError(f"norm_cap must be true or false, got {settings.norm_cap!r}")
    if settings.timesteps not in ("uniform", "weighted"):
        raise EdgeTIError(f"unknown timesteps {settings.timesteps!r}: choose uniform or weighted")
    if settings.loss_weighting not in ("auto", "eps", "model"):
        raise EdgeTIError(f"unknown loss_weighting {settings.loss_weighting!r}: choose auto, eps or model")
    if settings.optimizer not in search.OPTIMIZERS:
        raise EdgeTIError(f"unknown optimizer {settings.optimizer!r}: choose {', '.join(search.OPTIMIZERS)}")
    if settings.optimizer == "zo-adam" and settings.popsize % 2:
        raise EdgeTIError(f"popsize must be even for zo-adam (two candidates per direction), got {settings.popsize}")
    if settings.optimizer == "cma" and settings.popsize < 3:
        # pycma's mirrored sampling (on below 6) fails in its second generation with 2 candidates in a
        # z of a few hundred dimensions ("Found unused injected direction/solutions"): found on SDXL
        raise EdgeTIError(f"popsize must be at least 3 for cma, got {settings.popsize}")
    return prompt_templates(settings.template)


ANCHORS = ("auto", "word", "images", True, False)   # True: "word" (as the option was first written)


def prompt_templates(template):
    """"object" | "style" | templates (each with one {} and no other field) -> the list of templates."""
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise EdgeTIError(f"unknown template {template!r}: choose object, style or give templates")
        return TEMPLATES[template]
    templates = list(template)

    def fields(t):
        try:
            return [name for _, name, _, _ in string.Formatter().parse(t) if name is not None]
        except ValueError:  # a lone { or }
            return None
    bad = [t for t in templates if not isinstance(t, str) or fields(t) != [""]]
    if not templates or bad:
        raise EdgeTIError(f"each prompt template needs exactly one {{}} for the token and no other braces "
                          f"(write {{{{ }}}} for literal ones): {bad[:3] or 'none given'}")
    return templates


def output_paths(out):
    stem = out[:-len(".safetensors")] if out.endswith(".safetensors") else out
    return {"embedding": out, "log": stem + ".log.jsonl", "curve": stem + ".loss.png", "checkpoint": stem + ".ckpt",
            "lock": stem + ".lock"}


def _settings_key(model, settings, latents, e0, token):
    digest = hashlib.sha256()
    # what cannot change the result of a generation: limits (a resume may extend them) and batching
    fields = {k: v for k, v in dataclasses.asdict(settings).items()
              if k not in ("budget", "max_time", "patience", "max_batch")}
    if settings.optimizer != "zo-adam":  # lr is zo-adam's, prior gauss-newton's: others cannot change the run
        del fields["lr"]
    if settings.optimizer != "gauss-newton":
        del fields["prior"]
    if settings.optimizer == "cma":  # as before the option existed: earlier checkpoints still match
        del fields["optimizer"]
    if not settings.clip_refine:  # likewise
        del fields["clip_refine"]
    if settings.clip_line == 2 or not settings.clip_refine:  # likewise
        del fields["clip_line"]
    if not settings.clip_path or not settings.clip_refine:  # likewise
        del fields["clip_path"]
    if settings.clip_refine and (settings.sigma is not None or settings.optimizer != "cma"):
        fields["clip_sigma"] = "cma"  # before stop 47 the CLIP climbs took the search's step: not those checkpoints
    if not settings.anchor:  # likewise
        del fields["anchor"]
    elif settings.anchor == "word":  # as it was written when the word was the only anchor: those checkpoints match
        fields["anchor"] = True
    if settings.timesteps == "uniform" or not _weighs_t_unevenly(model, settings):  # as before the option (or
        del fields["timesteps"]                                                        # the same run): they match
    if settings.loss_weighting == "model" or model.prediction_type == "epsilon":
        del fields["loss_weighting"]  # the loss of before the option: earlier checkpoints still match
    digest.update(json.dumps(fields, sort_keys=True).encode())
    digest.update(f"{model.text_encoder_key}{token}".encode())
    if model.family == "sdxl":
        digest.update(model.text_encoder_2_key.encode())
    digest.update(latents.tobytes())
    digest.update(e0.tobytes())
    return digest.hexdigest()


def _write_log(path, history):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in history)


def _append_log(path, record):
    """One generation's line added to the log _write_log wrote (rewriting it all each time costs O(generations^2));
    anything but the regular file it wrote is left alone, and the whole log is written again at the end."""
    if os.path.isfile(path) and not os.path.islink(path):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


RESUME_MODES = ("auto", "require", "restart")
CURVE_EVERY = 30.0  # seconds between redraws of the loss curve during a run
CHECKPOINT_EVERY = 5.0  # seconds between checkpoint writes during a run (and after its last generation; Ctrl-C
                        # writes one too): a kill loses at most this much of the search


def train(model, images, token, out, init_word=None, init_embedding=None, settings=None, resume="auto",
          on_generation=None, make_scorer=InProcess, allow_vocabulary_token=False, init="word", init_top_k=None):
    """Learn TOKEN from IMAGES (files, folders or PIL images); write the embedding to OUT.

    The initial embedding comes from init_embedding ([n, D]), init_word, or with init="auto" from
    the images through CLIP (init.from_images; init_top_k: each image attends to its k best
    words; the words that weigh most are logged and returned in the result). on_generation(record,
    state) is called after every generation (the CLI draws its progress from it).
    make_scorer(model, prompt_ids, latents, max_batch) gives the object that scores populations
    (edge_ti.workers: in this process by default). A TOKEN that is already a vocabulary word is
    refused unless allow_vocabulary_token (tokenizer.check_new_token).

    resume: "auto" continues OUT's checkpoint when it was made with the same settings, images and
    model, starts afresh when there is none, and refuses otherwise (another run's checkpoint, or
    an OUT without a checkpoint); "require" insists on continuing; "restart" discards both.
    Ctrl-C writes the best embedding so far and raises Interrupted (a KeyboardInterrupt).
    """
    check_new_token(model.tokenizer, token, allow_vocabulary_word=allow_vocabulary_token)
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]   # one file, folder or image, not the characters of a name
    settings = settings or TrainSettings()
    templates = check_settings(settings)
    if init not in ("word", "auto"):
        raise EdgeTIError(f"init must be word or auto, got {init!r}")
    if init == "word" and init_embedding is None and not init_word:
        raise EdgeTIError("give an initialization: --init-word WORD or --init auto")
    if settings.anchor in (True, "word") and (init != "word" or init_embedding is not None or not init_word):
        raise EdgeTIError("anchor word needs an init word (--init-word): the anchor is that word's embedding")
    if settings.anchor == "images":
        clip_model(model)  # no clip/: a one-line error now, not after encoding the images
    if init_top_k is not None and init_top_k < 1:
        raise EdgeTIError(f"init_top_k must be at least 1, got {init_top_k}")
    dim = subspace_dim(settings, [p.columns.stop - p.columns.start for p in model.text_parts])
    if settings.optimizer == "gauss-newton" and settings.popsize - 1 > settings.vectors * dim:
        raise EdgeTIError(f"popsize {settings.popsize} is more than gauss-newton can use: the point and at most "
                          f"{settings.vectors * dim} probes (one per dimension of z)")
    if resume not in RESUME_MODES:
        raise EdgeTIError(f"resume must be one of {', '.join(RESUME_MODES)}, got {resume!r}")
    paths = output_paths(out)
    for path in paths.values():  # before any work: a bad --out is found now, not after hours
        check_output_path(path)
    with FileLock(paths["lock"], f"the output {out}"):
        if resume == "require" and not os.path.exists(paths["checkpoint"]):
            raise EdgeTIError(f"{paths['checkpoint']}: no checkpoint to resume from")
        if resume != "restart" and os.path.lexists(paths["checkpoint"]):
            search.read_checkpoint(paths["checkpoint"])  # a damaged or foreign file: refused now, not after encoding
        if resume == "auto" and os.path.exists(out) and not os.path.exists(paths["checkpoint"]):
            raise EdgeTIError(f"{out}: already exists and has no checkpoint beside it; choose another output "
                              "or --restart to overwrite it")
        return _train(model, images, token, paths, init_word, init_embedding, init, init_top_k, settings, templates,
                      resume, on_generation, make_scorer)


def subspace_dim(settings, widths):
    """The dimension of z per vector: --dim, at most the embedding width for pca, the width for full;
    per text encoder of WIDTHS (an int: one encoder; SDXL: both encoders' widths), summed."""
    widths = [widths] if isinstance(widths, int) else widths
    if settings.subspace == "full":
        return sum(widths)
    return sum(min(settings.dim, w) if settings.subspace == "pca" else settings.dim for w in widths)


def search_space(table, settings, parts=None):
    """(dim, sigma, W [D, dim], max_norm) of e = e0 + W z for the vocabulary table [V, D]: what turns a
    search point z into an embedding (subspace.embeddings_from_z(e0, W, z, max_norm)). parts: the
    columns of each text encoder (Model.text_parts); several (SDXL) get a subspace and a cap each."""
    parts = parts or [slice(0, table.shape[1])]
    widths = [cols.stop - cols.start for cols in parts]
    dim = subspace_dim(settings, widths)
    if settings.subspace == "pca" and settings.dim > min(widths):
        log.info("--dim %d is more than the embedding width %s: using at most the width",
                 settings.dim, " and ".join(map(str, widths)))
    sigma = settings.sigma or _default_step(table, settings.subspace, settings.optimizer)
    if len(parts) == 1:
        W = subspace.basis(settings.subspace, table, dim, sigma, seed=settings.seed)  # (D, dim)
        max_norm = subspace.max_row_norm(table) if settings.norm_cap else None
    else:
        dims = [subspace_dim(settings, w) for w in widths]
        W = subspace.part_basis(settings.subspace, table, dims, sigma, parts, seed=settings.seed)  # (D, dim)
        max_norm = [(cols, subspace.max_row_norm(table[:, cols])) for cols in parts] if settings.norm_cap else None
    return dim, sigma, W, max_norm


def _train(model, images, token, paths, init_word, init_embedding, init, init_top_k, settings, templates, resume,
           on_generation, make_scorer):
    table = model.token_embeddings                                      # (V, D)

    # 1. the concept latents, encoded once (cached on disk)
    resolution = settings.resolution or model.resolution
    if resolution % model.vae_scale_factor:
        raise EdgeTIError(f"resolution {resolution} is not a multiple of the VAE's scale factor "
                          f"{model.vae_scale_factor}")
    pixels = lat.load_images(images, resolution, flip=settings.flip)
    latents = lat.encode_images(model, pixels, sample=settings.latent_sample, seed=settings.seed)  # (N, C, h, w)

    # 2. e0 and the subspace e = e0 + W z
    init_words = []
    images = images if all(isinstance(i, Image.Image) for i in images) else lat.image_paths(images)  # for CLIP
    if init == "auto":
        init_embedding, init_words = initialization.from_images(model, images, settings.vectors, top_k=init_top_k)
        log.warning("init from images: %s", ", ".join(f"{w} {x:.3f}" for w, x in init_words))
    if init_embedding is not None:
        e0 = model.check_embeddings({token: init_embedding}, source="init")[token]
        e0 = np.tile(e0[:1], (settings.vectors, 1)) if len(e0) != settings.vectors else e0
    else:
        e0 = initialization.from_word(model, init_word, settings.vectors)
    dim, sigma, W, max_norm = search_space(table, settings, [p.columns for p in model.text_parts])
    prompts = [t.format(token) for t in templates]
    settings = _resolve_loss_weighting(model, settings)
    settings = _resolve_clip_refine(model, settings)
    settings = _resolve_anchor(model, settings, init_word if init == "word" and init_embedding is None else None)
    anchor, anchor_words = None, []                                     # (1, D) or None
    if settings.anchor == "word":
        anchor = initialization.from_word(model, init_word, 1)
    elif settings.anchor == "images":  # --init auto's own embedding, or computed for the anchor alone
        anchor, anchor_words = ((init_embedding[:1], init_words) if init == "auto" else
                                initialization.from_images(model, images, 1, top_k=init_top_k))
        log.warning("the token's last vector is the images' CLIP init, kept: %s",
                    ", ".join(f"{w} {x:.3f}" for w, x in anchor_words[:5]))
    token_e = subspace.with_anchor(e0[None], anchor)[0]               # the token's vectors at the init
    key = _settings_key(model, settings, latents, e0, token)
    clip = None
    if settings.clip_refine:  # its checks now, before a scorer (maybe Ray) starts
        clip = clip_score.ClipScore(model, images, model.tokenize(prompts[:clip_score.TEMPLATES],
                                                                                 {token: token_e}))

    # 3. prompts and the common random numbers
    prompt_ids = model.tokenize(prompts, {token: token_e})             # (K, 77), token ids from V on
    cut = [p for p, ids in zip(prompts, prompt_ids) if np.count_nonzero(ids >= model.vocab_size) != len(token_e)]
    if cut:
        raise EdgeTIError(f"the prompt {cut[0]!r} is too long for {len(token_e)} vectors: its token would be "
                          "cut at 77 tokens; use fewer --vectors or shorter templates")
    T_train = int(model.scheduler_config.get("num_train_timesteps", 1000))

    in_eps_units = settings.loss_weighting == "eps" and model.prediction_type == "v_prediction"
    eps_weight = Denoiser(model).eps_weight(np.arange(T_train))          # (T,): the model's loss -> the eps loss
    loss_weight = eps_weight if in_eps_units else np.ones(T_train)      # (T,): what each triple's loss is multiplied by
    timestep_p = None                                                   # uniform t
    if settings.timesteps == "weighted" and _weighs_t_unevenly(model, settings):
        timestep_p, factor = objective.importance_timesteps(loss_weight / eps_weight)   # the objective's weight of t
        loss_weight = loss_weight * factor

    def triples_for(*key, count):
        rng = np.random.default_rng([settings.seed, *key])
        triples = objective.draw_triples(rng, count, len(latents), len(prompts), T_train, latents.shape[1:],
                                         timestep_p)
        if in_eps_units or timestep_p is not None:
            triples.weight = loss_weight[triples.timesteps]
        return triples

    heldout = triples_for(1, 0, count=settings.heldout_triples)
    scorer = make_scorer(model, prompt_ids, latents, settings.max_batch)
    if settings.optimizer == "gauss-newton" and not hasattr(scorer, "population_gram"):
        scorer.close()
        raise EdgeTIError(f"the gauss-newton search needs each population's Gram matrix (population_gram), which "
                          f"{type(scorer).__name__} does not give; use optimizer cma with it")
    init_e, init_heldout, refine_seconds = e0, None, 0.0   # the initial embedding and, once measured, its held-out loss
    start_heldout = None                                   # the search's start's held-out loss, where already measured
    if clip is not None:  # e0 moved to where the CLIP score is best (deterministic: a resume redoes it)
        try:
            e0, refine_seconds, init_heldout, start_heldout = _clip_refined(clip, e0, W, max_norm,
                                                                            _clip_sigma(table, settings), settings,
                                                                            scorer, heldout, anchor)
        except BaseException:
            scorer.close()
            raise

    def generation_triples(generation):
        return triples_for(0, 0 if settings.crn == "fixed" else generation, count=settings.triples)

    def population_loss_of_z(zs, generation):
        candidates = subspace.embeddings_from_z(e0, W, zs, max_norm, anchor)          # (P, n, D)
        return scorer.population_loss(candidates, generation_triples(generation))     # (P,)

    def population_gram_of_z(zs, generation):
        candidates = subspace.embeddings_from_z(e0, W, zs, max_norm, anchor)
        return scorer.population_gram(candidates, generation_triples(generation))     # (P, P)

    def heldout_loss_of_z(zs):
        return scorer.population_loss(subspace.embeddings_from_z(e0, W, zs, max_norm, anchor), heldout)

    # 4. the search: resumed from the checkpoint, or new
    max_time = settings.max_time and max(settings.max_time - refine_seconds, 1e-3)  # the refinement counts too
    limits = search.Limits(budget=settings.budget, max_time=max_time, patience=settings.patience,
                           min_improvement=settings.min_improvement)
    state, curve_written = None, [time.monotonic()]

    def after_generation(record, state):
        _append_log(paths["log"], record)
        if time.monotonic() - curve_written[0] >= CURVE_EVERY:
            loss_curve(state.history, paths["curve"])
            curve_written[0] = time.monotonic()
        if on_generation:
            on_generation(record, state)

    try:
        if resume != "restart" and os.path.exists(paths["checkpoint"]):
            state = search.load_checkpoint(paths["checkpoint"], key)
            log.warning("resuming %s at generation %d (%d evaluations)", paths["checkpoint"], state.generation,
                        state.evaluations)
        else:
            fresh = search.SearchState(key, settings.vectors * dim, sigma, settings.popsize, settings.seed,
                                       optimizer=settings.optimizer, lr=settings.lr, prior=settings.prior)
            if start_heldout is None:
                start_heldout = float(heldout_loss_of_z(np.zeros((1, fresh.dim)))[0])
                fresh.heldout_evaluations += 1
            fresh.init_heldout = fresh.best_heldout = start_heldout
            search.save_checkpoint(paths["checkpoint"], fresh)
            state = fresh
        _write_log(paths["log"], state.history)  # a resumed run's generations so far; each new one is appended
        search.run(state, population_loss_of_z, heldout_loss_of_z, limits, settings.eval_every,
                   checkpoint=paths["checkpoint"], on_generation=after_generation, checkpoint_every=CHECKPOINT_EVERY,
                   population_gram_of_z=population_gram_of_z)
    except KeyboardInterrupt:
        if state is None:
            raise
        state.stop_reason = f"interrupted at generation {state.generation}"
        result = _finish(model, state, e0, W, max_norm, token, init_word, init_words, paths, init_e, init_heldout,
                         anchor, settings.anchor, anchor_words)
        raise Interrupted(result) from None
    finally:
        scorer.close()

    # 5. the result: the best held-out candidate, the log and the curve (on Ctrl-C too, above)
    return _finish(model, state, e0, W, max_norm, token, init_word, init_words, paths, init_e, init_heldout, anchor,
                   settings.anchor, anchor_words)


def _weighs_t_unevenly(model, settings):
    """Whether the scoring loss (loss_weighting resolved) weighs t otherwise than the epsilon loss does: a v model's own
    loss, the one case where --timesteps weighted draws t otherwise than uniformly."""
    return settings.loss_weighting != "eps" and model.prediction_type == "v_prediction"


def _resolve_loss_weighting(model, settings):
    """SETTINGS with loss_weighting "auto" made "model" with the style templates, else "eps". For a style the model's
    own loss is the one that learns its background: on a v model it weighs large t, where a generation decides the
    background, up to ~200x more than the epsilon loss does (quality.md, stop 48); for objects it measured no
    better (+0.009 +- 0.024 on the benchmark's, +0.019 +- 0.012 on eight drawn: run 20) and the epsilon loss kept
    the demo concept's shape (models.md)."""
    if settings.loss_weighting != "auto":
        return settings
    weighting = "model" if settings.template == "style" else "eps"
    if model.prediction_type == "v_prediction":
        log.info("candidates scored by %s (--loss-weighting auto: the model's own with style prompts, else eps)",
                 {"model": "the model's own (v) loss", "eps": "the epsilon loss"}[weighting])
    return dataclasses.replace(settings, loss_weighting=weighting)


def _resolve_clip_refine(model, settings):
    """SETTINGS with clip_refine "auto" made a number: clip_score.REFINE_AUTO where the model's clip/ can
    score its tokens (its text tower is the text encoder, as SD 1.x's CLIP ViT-L/14), else 0; and 0 with the style
    templates, whose tokens the path held back (no point of it draws a style's background: quality.md, stop 48)."""
    if settings.clip_refine != "auto":
        return settings
    if settings.template == "style":
        log.info("no CLIP refinement before the search: style prompts (--clip-refine N to have one)")
        return dataclasses.replace(settings, clip_refine=0)
    reason = clip_score.why_not(model)
    if reason is None:
        log.info("the model's clip/ scores its tokens: %d CLIP-score evaluations before the search "
                 "(--clip-refine 0: none)", clip_score.REFINE_AUTO)
        return dataclasses.replace(settings, clip_refine=clip_score.REFINE_AUTO)
    log.info("no CLIP refinement before the search: %s", reason)
    return dataclasses.replace(settings, clip_refine=0)


def _resolve_anchor(model, settings, word):
    """SETTINGS with anchor "auto" (or True) made "word", "images" or False: the word where the init is a WORD
    (None: an embedding or --init auto) and the prompts are the object templates, whose token is a thing of that
    word's class; else none (an object's images anchor measured no better than none: clip_score.md, round 4; a
    style's, the default of stops 34-48, kept its background out of the token: quality.md, stop 48)."""
    if settings.anchor is True:
        return dataclasses.replace(settings, anchor="word")
    if settings.anchor != "auto":
        return settings
    if settings.vectors >= MAX_VECTORS:
        anchor = False
    elif word and settings.template == "object":
        anchor = "word"
    else:
        anchor = False
    log.info("the token's last vector is %s", {
        "word": f"{word!r}'s embedding, kept (--anchor off: none)",
        False: "not an anchor (auto: the word with --init-word and object prompts)"}[anchor])
    return dataclasses.replace(settings, anchor=anchor)


def _default_step(table, subspace_kind, optimizer):
    """OPTIMIZER's default step in z: its sigma, times the table's std where z is the embedding itself (full)."""
    default = optimizer_defaults(optimizer)["sigma"]
    return default * float(table.std()) if subspace_kind == "full" else default


def _clip_sigma(table, settings):
    """The CLIP climbs' CMA-ES step in z: CMA-ES's default, whatever step (--sigma) or optimizer the search itself
    takes (the climbs and the path's reach were measured at it)."""
    return _default_step(table, settings.subspace, "cma")


def _clip_refined(score, e0, W, max_norm, sigma, settings, scorer, heldout, anchor):
    """(the start, seconds, e0's held-out loss, the start's held-out loss): of settings.clip_line points of the
    line from e0 to where clip_score.refine moved it (none at clip_line 0: e0 alone) and the settings.clip_path
    points of the CLIP path (clip_score.path), the one with the lowest held-out denoising loss (a CLIP score can
    rise on tokens the UNet reads otherwise, and its optimum is often past what the UNet reads as the concept:
    quality.md, runs 16 and 18)."""
    path_evaluations = settings.clip_path and clip_score.path_evaluations(settings.clip_refine, settings.clip_path)
    line_evaluations = settings.clip_refine if settings.clip_line else 0
    if not line_evaluations:                    # the path alone (check_settings refuses neither line nor path)
        where = f" on a CLIP path of {settings.clip_path} stages"
    elif settings.clip_path:
        where = f", {path_evaluations} of them on a path of {settings.clip_path} stages"
    else:
        where = ""
    log.warning("CLIP refinement: %d CLIP-score evaluations (text passes only)%s before the search...",
                line_evaluations + path_evaluations, where)  # about a minute per 2000 on SD 1.5 on 2 cores: say so
    zs, names, seconds, evaluations, scores = np.zeros((1, W.shape[1] * e0.shape[0])), ["the init"], 0.0, 0, None
    if settings.clip_line:
        z, record = clip_score.refine(score, e0, W, max_norm, settings.clip_refine, sigma=sigma, seed=settings.seed,
                                      anchor=anchor)
        fractions = np.linspace(0.0, 1.0, settings.clip_line)               # 0: the init, 1: the refined token
        zs = fractions[:, None] * z[None]                                   # (clip_line, dim)
        names += [f"{f:.2f} of the way to the refined token" for f in fractions[1:-1]] + ["the refined token"]
        seconds, evaluations = record["clip_seconds"], record["clip_evaluations"]
        scores = record["clip_score_init"], record["clip_score"]
    if settings.clip_path:
        path_zs, path_record = clip_score.path(score, e0, W, max_norm, settings.clip_refine, settings.clip_path,
                                               sigma=sigma, seed=settings.seed, anchor=anchor)
        zs = np.concatenate([zs, path_zs])
        names += [f"stage {k + 1} of {settings.clip_path} of the CLIP path" for k in range(settings.clip_path)]
        seconds += path_record["clip_path_seconds"]
        evaluations += path_record["clip_path_evaluations"]
        scores = scores or (path_record["clip_score_init"], path_record["clip_score"])
    points = subspace.embeddings_from_z(e0, W, zs, max_norm)
    losses = scorer.population_loss(subspace.with_anchor(points, anchor), heldout)
    best = len(losses) - 1 - int(np.argmin(losses[::-1]))                  # a tie goes to the later point
    before, after = losses[0], losses[best]
    if best == 0:
        log.warning("CLIP refinement: score %.4f -> %.4f, but the held-out loss rose %.5f -> %.5f: the search "
                    "starts from the init", *scores, before, min(losses[1:]))
        return e0, seconds, float(before), float(before)
    log.warning("CLIP refinement: score %.4f -> %.4f in %d evaluations (%.1f s); held-out loss %.5f -> %.5f%s",
                *scores, evaluations, seconds, before, after,
                "" if names[best] == "the refined token" else f" at {names[best]}")
    return points[best], seconds, float(before), float(after)


def _finish(model, state, e0, W, max_norm, token, init_word, init_words, paths, init_e, init_heldout, anchor,
            anchor_from, anchor_words):
    """Write the best held-out candidate (z = 0, where the search started, if nothing beat it), the log, the
    curve. init_e: the initial embedding; init_heldout: its held-out loss, None when the search started at it;
    anchor: the token's kept last vector, or None; anchor_from: "word", "images" or False; anchor_words: an
    images anchor's words."""
    best_z, best_heldout = search.written_z(state)    # the best checked candidate, or the last check's mean
    embedding = {token: subspace.embeddings_from_z(e0, W, best_z[None], max_norm, anchor)[0]}
    clip_refined = not np.array_equal(e0, init_e)
    init_e = subspace.with_anchor(init_e[None], anchor)[0]                       # the whole token at the init
    init_heldout = state.init_heldout if init_heldout is None else init_heldout
    save_embedding(paths["embedding"], {token: model.file_parts(embedding[token])}, metadata={
        "edge_ti.init": json.dumps(init_e.tolist()), "edge_ti.init_word": init_word or "",
        "edge_ti.heldout_loss": f"{best_heldout:.6g}", "edge_ti.init_heldout_loss": f"{init_heldout:.6g}"})
    _write_log(paths["log"], state.history)
    loss_curve(state.history, paths["curve"])
    search.save_checkpoint(paths["checkpoint"], state)
    return TrainResult(embedding=embedding, init_heldout=init_heldout, best_heldout=best_heldout,
                       generations=state.generation, evaluations=state.evaluations,
                       heldout_evaluations=state.heldout_evaluations + (state.last_check is not None),
                       elapsed=state.elapsed,
                       stop_reason=state.stop_reason, paths=paths, init_words=init_words, start=e0,
                       start_heldout=state.init_heldout, clip_refined=clip_refined, anchor=anchor,
                       anchor_from=anchor_from or None, anchor_words=anchor_words)

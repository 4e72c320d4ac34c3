"""The ONNX model folder: optimum's Stable Diffusion layout, read-only, plus a cache beside it.

    MODEL_DIR/model_index.json, text_encoder/ unet/ vae_encoder/ vae_decoder/ tokenizer/ scheduler/
    (each with model.onnx, external data where large; exactly what `optimum-cli export onnx
    --task text-to-image` writes). edge-ti never writes into MODEL_DIR: what it derives (the
    patched text encoder, the token table, latents) goes to the cache, keyed by content.

Two families (Model.family): "sd" (SD 1.x and 2.x: one text encoder, whose last hidden state the
UNet reads) and "sdxl" (text_encoder_2/ and tokenizer_2/ beside them: the UNet reads both encoders'
penultimate hidden states side by side, plus text_encoder_2's pooled `text_embeds` and `time_ids`).
A token of an SDXL model is one array [n, D_l + D_g]: its CLIP-L vectors, then its CLIP-G vectors
(Model.text_parts says which columns each encoder reads); files hold the two parts apart
(`{"clip_l": ..., "clip_g": ...}`, edge_ti.embeddings).
"""
import functools
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from . import text_encoder as te
from .cache import cache_error, cache_root, fingerprint
from .denoiser import Denoiser
from .embeddings import check_vectors
from .errors import EdgeTIError
from .runtime import openvino_provider, providers_for
from .session import SessionSettings, create_session
from .tokenizer import ClipTokenizer, check_token, placeholder_ids

log = logging.getLogger(__name__)

QUANTIZATION_RECORD = "edge_ti_quantization.json"  # what edge-ti quantize did, in the folder it wrote

# onnxruntime's input types -> numpy: fp16 exports take float16 samples, old exports int64 timesteps
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}

def _is_number(value):
    # JSON's true/false are Python ints, and json reads NaN and Infinity: none is a usable number
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value, least):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_beta(value):
    # a noise variance: 1 - beta is a factor of alpha_bar, and sqrt(beta) is taken (negative: black images)
    return _is_number(value) and 0 < value < 1


# the config values edge-ti reads, {key: (test, what it must be)}; an absent key takes its default
SCHEDULER_KEYS = {
    "num_train_timesteps": (lambda v: _is_whole(v, 1), "a whole number >= 1"),
    "beta_start": (_is_beta, "a number between 0 and 1"),
    "beta_end": (_is_beta, "a number between 0 and 1"),
    "trained_betas": (lambda v: v is None or (isinstance(v, list) and v and all(map(_is_beta, v))),
                      "null or a list of numbers between 0 and 1"),
    "beta_schedule": (lambda v: v in ("linear", "scaled_linear", "squaredcos_cap_v2"),
                      "linear, scaled_linear or squaredcos_cap_v2"),
    "prediction_type": (lambda v: v in ("epsilon", "v_prediction"), "epsilon or v_prediction"),
    "timestep_spacing": (lambda v: v in ("leading", "trailing", "linspace"), "leading, trailing or linspace"),
    "steps_offset": (lambda v: _is_whole(v, 0), "a whole number >= 0"),
    "clip_sample_range": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "lambda_min_clipped": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v),
                           "a number (or -Infinity)"),
    "sigma_min": (lambda v: v is None or (_is_number(v) and v > 0), "null or a positive number"),
    "sigma_max": (lambda v: v is None or (_is_number(v) and v > 0), "null or a positive number"),
}
UNET_KEYS = {"sample_size": (lambda v: _is_whole(v, 1), "a whole number >= 1"),
             "in_channels": (lambda v: _is_whole(v, 1), "a whole number >= 1")}
VAE_KEYS = {"block_out_channels": (lambda v: isinstance(v, list) and v and all(_is_whole(c, 1) for c in v),
                                   "a non-empty list of whole numbers >= 1"),
            "scaling_factor": (lambda v: _is_number(v) and v > 0, "a positive number")}


def _read_config(path, keys):
    """A model config as a dict ({} when absent), its KEYS checked: one line naming the file and key."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EdgeTIError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise EdgeTIError(f"{path}: cannot read it ({err.strerror})") from None
    if not isinstance(config, dict):
        raise EdgeTIError(f"{path}: not a JSON object")
    for key, (valid, what) in keys.items():
        if key in config and not valid(config[key]):
            raise EdgeTIError(f"{path}: {key} is {json.dumps(config[key])[:40]}, but must be {what}")
    return config


@dataclass(frozen=True)
class TextPart:
    """One text encoder of a model folder and what edge-ti reads from it."""
    name: str             # text_encoder | text_encoder_2: its folder
    file_key: str         # its part's name in SDXL embedding files: clip_l | clip_g
    columns: slice        # its columns of a token's vectors [n, D] (SDXL: clip_l's, then clip_g's)
    penultimate: bool     # the UNet reads the penultimate layer's hidden state (SDXL), not the last


# what a patched text encoder cached under an older edge-ti lacks: bump when the patch changes
PATCH_VERSION = "2"   # 2: new ids hidden from the end-of-text ArgMax (text_encoder.py)

# each part's use, for the error when a folder lacks it
PART_USES = {"unet": "training and generating need the UNet", "vae_encoder": "training needs the VAE encoder",
             "vae_decoder": "generating images needs the VAE decoder"}
# the built-in shapes-world model's short name for open_model (so also for the CLI's MODEL_DIR)
SHAPES = "shapes"


class Model:
    """An ONNX Stable Diffusion folder with sessions created on first use."""

    def __init__(self, path, device="cpu", threads=None, session_settings=None):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise EdgeTIError(f"{path}: no such model folder")
        self.text_encoder_path = os.path.join(self.path, "text_encoder", "model.onnx")
        if not os.path.isfile(self.text_encoder_path):
            raise EdgeTIError(f"{path}: no text_encoder/model.onnx (is this an ONNX Stable Diffusion folder?)")
        if not os.path.isdir(os.path.join(self.path, "tokenizer")):
            raise EdgeTIError(f"{path}: no tokenizer/ folder")
        has_second = os.path.isfile(os.path.join(self.path, "text_encoder_2", "model.onnx"))
        self.family = "sdxl" if has_second else "sd"
        if has_second and not os.path.isdir(os.path.join(self.path, "tokenizer_2")):
            raise EdgeTIError(f"{path}: text_encoder_2/ (SDXL) but no tokenizer_2/ folder")
        self.device = device
        self.providers = providers_for(device)
        self.threads = threads
        # the optimized-graph cache: CPU only (measured there; a graph optimized for CUDA or DirectML
        # may hold provider-specific nodes), off with EDGE_TI_SESSION_CACHE=0 (a copy of each part on disk)
        cache = device == "cpu" and os.environ.get("EDGE_TI_SESSION_CACHE", "1") != "0"
        settings = session_settings or SessionSettings(cache=cache)
        # threads given here win over the settings' own (the CLI's --threads); the cache is CPU-only whoever asks
        self.session_settings = SessionSettings(**{**vars(settings), "threads": threads or settings.threads,
                                                   "cache": settings.cache and device == "cpu"})
        if device == "openvino":
            self.providers = [openvino_provider(settings.precision, self.session_settings.threads),
                              *self.providers[1:]]
        elif settings.precision != "auto":
            raise EdgeTIError(f"precision {settings.precision!r} is OpenVINO's setting: it needs --device openvino")

    # ---- configs, read once ----
    @functools.cached_property
    def scheduler_config(self):
        return _read_config(os.path.join(self.path, "scheduler", "scheduler_config.json"), SCHEDULER_KEYS)

    @functools.cached_property
    def vae_config(self):
        for part in ("vae_decoder", "vae_encoder", "vae"):
            config = _read_config(os.path.join(self.path, part, "config.json"), VAE_KEYS)
            if config:
                return config
        return {}

    @functools.cached_property
    def unet_config(self):
        return _read_config(os.path.join(self.path, "unet", "config.json"), UNET_KEYS)

    @property
    def prediction_type(self):
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self):
        # diffusers: 2 ** (len(vae.config.block_out_channels) - 1)
        return 2 ** (len(self.vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)

    @property
    def scaling_factor(self):
        return float(self.vae_config.get("scaling_factor", 0.18215))

    @property
    def resolution(self):
        """Default image size in pixels: unet sample_size x VAE scale factor (diffusers' default)."""
        return int(self.unet_config.get("sample_size", 64)) * self.vae_scale_factor

    @functools.cached_property
    def tokenizer(self):
        return ClipTokenizer(os.path.join(self.path, "tokenizer"))

    @functools.cached_property
    def tokenizer_2(self):
        """SDXL's second tokenizer: the first one's vocabulary (checked), its own padding ("!")."""
        if self.family != "sdxl":
            raise EdgeTIError(f"{self.path}: an SD 1.x/2.x folder has one tokenizer")
        second = ClipTokenizer(os.path.join(self.path, "tokenizer_2"))
        first = self.tokenizer
        if (second.bpe.get_vocab() != first.bpe.get_vocab() or (second.bos_id, second.eos_id, second.max_length)
                != (first.bos_id, first.eos_id, first.max_length)):
            raise EdgeTIError(f"{self.path}: tokenizer/ and tokenizer_2/ differ in vocabulary or special tokens; "
                              "edge-ti needs SDXL's two tokenizers to share CLIP's vocabulary")
        return second

    def tokenizer_of(self, part):
        return self.tokenizer_2 if part.name == "text_encoder_2" else self.tokenizer

    @functools.cached_property
    def force_zeros_for_empty_prompt(self):
        """SDXL: an empty negative prompt is all zeros, not the encoded "" (model_index.json, default true)."""
        config = _read_config(os.path.join(self.path, "model_index.json"), {})
        return self.family == "sdxl" and config.get("force_zeros_for_empty_prompt", True) is not False

    # ---- cache ----
    @functools.cached_property
    def text_encoder_key(self):
        return fingerprint(self.text_encoder_path)[:24]

    def part_path(self, part):
        """MODEL_DIR/part/model.onnx, or a one-line error saying what needs the missing part."""
        path = os.path.join(self.path, part, "model.onnx")
        if not os.path.isfile(path):
            raise EdgeTIError(f"{self.path}: no {part}/model.onnx: {PART_USES[part]}")
        return path

    def part_fingerprint(self, part):
        """The content key of a part (model.onnx and its weight files), for caches of what it computes."""
        return fingerprint(self.part_path(part))

    def cache_dir(self, *parts):
        path = os.path.join(cache_root(), *parts)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise cache_error(path, err) from None
        return path

    @functools.cached_property
    def text_encoder_2_key(self):
        return fingerprint(os.path.join(self.path, "text_encoder_2", "model.onnx"))[:24]

    def patched_dir(self, name):
        """The text encoder NAME with the extra_embeddings input, patched once and cached."""
        key = self.text_encoder_key if name == "text_encoder" else self.text_encoder_2_key
        return self.patched_graph(os.path.join(self.path, name, "model.onnx"), key)

    def patched_graph(self, source, key, needs_hidden_state=True):
        """The cache folder of SOURCE (content key KEY) patched for token injection (text_encoder.py), made once:
        model.onnx and token_embeddings.npy. needs_hidden_state=False: CLIP's text tower (clip_score.py)."""
        out = os.path.join(self.cache_dir("text_encoders"), f"{key}-p{PATCH_VERSION}")
        if not os.path.isfile(os.path.join(out, "model.onnx")):
            log.info("patching %s for token injection (once) -> %s", source, out)
            try:
                te.patch_text_encoder(source, out, needs_hidden_state=needs_hidden_state)
            except OSError as err:
                raise cache_error(os.path.dirname(out), err) from None
        return out

    @property
    def patched_text_encoder_dir(self):
        return self.patched_dir("text_encoder")

    @functools.cached_property
    def token_tables(self):
        """Each text encoder's token-embedding table, float32 [V, D_part], in text_parts' order."""
        tables = [np.load(os.path.join(self.patched_dir(name), "token_embeddings.npy"))
                  for name in (("text_encoder",) if self.family == "sd" else ("text_encoder", "text_encoder_2"))]
        if len({len(t) for t in tables}) != 1:
            raise EdgeTIError(f"{self.path}: the two text encoders' vocabularies differ in size "
                              f"({', '.join(str(len(t)) for t in tables)})")
        return tables

    @functools.cached_property
    def token_embeddings(self):
        """The token-embedding table, float32 [V, D]; SDXL: both encoders' rows side by side [V, D_l + D_g]."""
        tables = self.token_tables
        return tables[0] if len(tables) == 1 else np.concatenate(tables, axis=1)

    @functools.cached_property
    def text_parts(self):
        """The text encoders, each with the columns of a token's vectors it reads (TextPart)."""
        if self.family == "sd":
            return (TextPart("text_encoder", "clip_l", slice(0, self.hidden_size), False),)
        D_l, D_g = (t.shape[1] for t in self.token_tables)
        return (TextPart("text_encoder", "clip_l", slice(0, D_l), True),
                TextPart("text_encoder_2", "clip_g", slice(D_l, D_l + D_g), True))

    @property
    def vocab_size(self):
        return self.token_embeddings.shape[0]

    @property
    def hidden_size(self):
        """The width of a token's vector: the text encoder's (SDXL: both encoders' widths summed)."""
        return self.token_embeddings.shape[1]

    # ---- sessions ----
    def open_session(self, path):
        """A session of the graph at PATH (a part of this folder) through edge_ti.session: tuned
        options, this model's providers, the optimized graph cached on disk."""
        cache = self.cache_dir("sessions")
        try:
            return create_session(path, self.providers, self.session_settings, cache)
        except EdgeTIError:  # the cache's own errors name the cache folder
            raise
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            hint = ""
            if (self.device == "openvino" and self.session_settings.precision != "f32"
                    and os.path.isfile(os.path.join(self.path, QUANTIZATION_RECORD))):
                # measured (onnxruntime-openvino 1.24, Zen 4 and Sapphire Rapids): SD 1.5's int8 MatMuls do
                # not compile in bf16 (they do in f32, and in f16 on Sapphire Rapids)
                hint = (f"; OpenVINO could not compile this int8 folder at --precision "
                        f"{self.session_settings.precision}: use --precision f32, or give it the float folder, "
                        "which it computes in bf16 itself where the CPU has it")
            raise EdgeTIError(f"{path}: onnxruntime cannot load it ({str(err).splitlines()[0]}){hint}") from None

    @functools.cached_property
    def text_encoder(self):
        return self.open_session(os.path.join(self.patched_dir("text_encoder"), "model.onnx"))

    def text_session(self, name):
        """The patched text encoder NAME's session, created on first use."""
        if name == "text_encoder":
            return self.text_encoder
        cached = self.__dict__.setdefault("_text_sessions", {})
        if name not in cached:
            cached[name] = self.open_session(os.path.join(self.patched_dir(name), "model.onnx"))
        return cached[name]

    def session(self, part):
        """unet, vae_encoder or vae_decoder, created on first use."""
        cached = self.__dict__.setdefault("_sessions", {})
        if part not in cached:
            cached[part] = self.open_session(self.part_path(part))
        return cached[part]

    @property
    def loaded_parts(self):
        """The parts whose sessions are alive (the text encoder not counted)."""
        return sorted(self.__dict__.get("_sessions", {}))

    def release(self, part):
        """Drop a part's session (its weights and memory arena): for parts used once, like the VAE
        encoder before training, so their memory does not add to the UNet's."""
        self.__dict__.get("_sessions", {}).pop(part, None)
        self.__dict__.get("_input_types", {}).pop(part, None)

    def input_types(self, part):
        """{input name: (numpy dtype, shape)} of a part's session; a shape's named dims are strings."""
        cached = self.__dict__.setdefault("_input_types", {})
        if part not in cached:
            cached[part] = {i.name: (ORT_DTYPES.get(i.type, np.float32), i.shape)
                            for i in self.session(part).get_inputs()}
        return cached[part]

    # ---- the public text path ----
    def check_embeddings(self, embeddings, source="embedding"):
        """{token: [n, D] or {"clip_l": [n, D_l], "clip_g": [n, D_g]}} -> {token: float32 [n, D]}, or
        an error naming SOURCE and the token: a name a prompt can hold, 1 to 75 finite vectors of this
        model's width. An SD 1.x/2.x model reads an SDXL token's clip_l part (as ComfyUI does); an SDXL
        model needs both parts."""
        checked = {}
        for token, vectors in (embeddings or {}).items():
            check_token(token, source)
            if isinstance(vectors, dict):
                vectors = self._join_parts(token, vectors, source)
            elif self.family == "sdxl" and np.shape(vectors)[-1:] != (self.hidden_size,):
                raise EdgeTIError(f"{source}: token {token!r} is an SD 1.x/2.x embedding (width "
                                  f"{np.shape(vectors)[-1] if np.ndim(vectors) else 0}); this SDXL model needs "
                                  f"both text encoders' vectors (clip_l [n, {self.text_parts[0].columns.stop}] "
                                  f"and clip_g [n, {self.hidden_size - self.text_parts[0].columns.stop}])")
            checked[token] = check_vectors(token, vectors, source, width=self.hidden_size)
        return checked

    def _join_parts(self, token, parts, source):
        """{"clip_l": [n, D_l], "clip_g": [n, D_g]} -> [n, D] for this model (SD: clip_l alone)."""
        if self.family == "sd":
            if "clip_l" not in parts:
                raise EdgeTIError(f"{source}: token {token!r} has no clip_l part for this SD 1.x/2.x model")
            return parts["clip_l"]
        missing = [p.file_key for p in self.text_parts if p.file_key not in parts]
        if missing:
            raise EdgeTIError(f"{source}: token {token!r} has no {' or '.join(missing)} part; SDXL needs both")
        arrays = []
        for part in self.text_parts:
            width = part.columns.stop - part.columns.start
            vectors = check_vectors(f"{token}:{part.file_key}", parts[part.file_key], source, width=width)
            arrays.append(vectors)
        if arrays[0].shape[0] != arrays[1].shape[0]:
            raise EdgeTIError(f"{source}: token {token!r} has {arrays[0].shape[0]} clip_l vectors but "
                              f"{arrays[1].shape[0]} clip_g vectors")
        return np.concatenate(arrays, axis=1)

    def file_parts(self, vectors):
        """A token's vectors [n, D] as its embedding file holds them: the array (SD), or
        {"clip_l": [n, D_l], "clip_g": [n, D_g]} (SDXL, as AUTOMATIC1111 and ComfyUI write them)."""
        if self.family == "sd":
            return vectors
        return {part.file_key: vectors[:, part.columns] for part in self.text_parts}

    def tokenize(self, prompts, embeddings=None):
        """prompts -> int64 [B, 77]; tokens of `embeddings` get ids from vocab_size on."""
        embeddings = self.check_embeddings(embeddings)
        return self.tokenizer(prompts, placeholder_ids(embeddings, self.vocab_size))

    def encode_text(self, prompts, embeddings=None):
        """prompts -> float32 [B, 77, D]: what the UNet receives as encoder_hidden_states, with
        `embeddings` injected (SD: the last hidden state; SDXL: both encoders' penultimate hidden
        states side by side, as diffusers' encode_prompt gives them). The public API of
        edge_ti.denoiser.Denoiser.encode_text."""
        return Denoiser(self).encode_text(prompts, embeddings)

    def encode_pooled(self, prompts, embeddings=None):
        """SDXL: prompts -> float32 [B, D_g], the UNet's `text_embeds` (text_encoder_2's projected
        state at the end-of-text token), with `embeddings` injected."""
        return Denoiser(self).encode_pooled(prompts, embeddings)


def open_model(path, device="cpu", threads=None, session_settings=None):
    """Open an ONNX Stable Diffusion folder (optimum layout) on cpu, cuda or directml.

    PATH `shapes` opens the built-in shapes-world model (edge_ti.shapes.model_dir()), unless the
    current directory has a folder called shapes: a real folder wins.
    """
    if os.fspath(path) == SHAPES and not os.path.isdir(path):
        from . import shapes
        path = shapes.model_dir()
    return Model(path, device=device, threads=threads, session_settings=session_settings)

"""The ONNX model folder: optimum's Stable Diffusion layout, read-only, plus a cache beside it.

    MODEL_DIR/model_index.json, text_encoder/ unet/ vae_encoder/ vae_decoder/ tokenizer/ scheduler/
    (each with model.onnx, external data where large; exactly what `optimum-cli export onnx
    --task text-to-image` writes). edge-ti never writes into MODEL_DIR: what it derives (the
    patched text encoder, the token table, latents) goes to the cache, keyed by content.
"""
import functools
import hashlib
import json
import logging
import os

import numpy as np
import onnxruntime as ort

from . import text_encoder as te
from .errors import EdgeTIError
from .session import SessionSettings, create_session, session_options
from .tokenizer import ClipTokenizer, placeholder_ids

log = logging.getLogger(__name__)

# onnxruntime's input types -> numpy: fp16 exports take float16 samples, old exports int64 timesteps
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "directml": "DmlExecutionProvider"}


def cache_root():
    """EDGE_TI_CACHE, else ~/.cache/edge-ti."""
    return os.environ.get("EDGE_TI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edge-ti")


def file_fingerprint(path, chunk=1 << 22):
    """sha256 of a file's size, first and last 4 MiB: content-keyed, and fast for a 3 GB UNet."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            digest.update(f.read(chunk))
    return digest.hexdigest()


def providers_for(device):
    """--device cpu|cuda|directml -> onnxruntime providers, or a one-line error naming what exists."""
    if device not in PROVIDERS:
        raise EdgeTIError(f"unknown device {device!r}: choose one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    wanted = PROVIDERS[device]
    if wanted not in available:
        raise EdgeTIError(f"device {device!r} needs {wanted}, but this onnxruntime has only: {', '.join(available)}")
    return [wanted] if device == "cpu" else [wanted, "CPUExecutionProvider"]


# UNet activation memory grows with batch x latent pixels: calls are capped at this many latent
# pixels, i.e. batch 4 at 32x32 (256 px; SD 1.5 peaks there at 4.9 GB fp32, 3.6 GB int8), 1 at
# 64x64, 64 at 8x8 (benchmarks/results/speed.md: larger batches were not faster on SD 1.5)
UNET_PIXELS_PER_CALL = 4096


def auto_max_batch(latent_shape):
    """The UNet batch cap for latents of shape [..., h, w]: at least 1."""
    h, w = latent_shape[-2:]
    return max(1, UNET_PIXELS_PER_CALL // (h * w))


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EdgeTIError(f"{path}: not valid JSON ({err})") from None


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
        self.device = device
        self.providers = providers_for(device)
        self.threads = threads
        # the optimized-graph cache: CPU only (measured there; a graph optimized for CUDA or DirectML
        # may hold provider-specific nodes), off with EDGE_TI_SESSION_CACHE=0 (a copy of each part on disk)
        cache = device == "cpu" and os.environ.get("EDGE_TI_SESSION_CACHE", "1") != "0"
        settings = session_settings or SessionSettings(cache=cache)
        # threads given here win over the settings' own (the CLI's --threads)
        self.session_settings = SessionSettings(**{**vars(settings), "threads": threads or settings.threads})

    # ---- configs, read once ----
    @functools.cached_property
    def scheduler_config(self):
        return _read_json(os.path.join(self.path, "scheduler", "scheduler_config.json"))

    @functools.cached_property
    def vae_config(self):
        for part in ("vae_decoder", "vae_encoder", "vae"):
            config = _read_json(os.path.join(self.path, part, "config.json"))
            if config:
                return config
        return {}

    @functools.cached_property
    def unet_config(self):
        return _read_json(os.path.join(self.path, "unet", "config.json"))

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

    # ---- cache ----
    @functools.cached_property
    def text_encoder_key(self):
        return file_fingerprint(self.text_encoder_path)[:24]

    def cache_dir(self, *parts):
        path = os.path.join(cache_root(), *parts)
        os.makedirs(path, exist_ok=True)
        return path

    @functools.cached_property
    def patched_text_encoder_dir(self):
        """The text encoder with the extra_embeddings input, patched once and cached."""
        out = os.path.join(self.cache_dir("text_encoders"), self.text_encoder_key)
        if not os.path.isfile(os.path.join(out, "model.onnx")):
            log.info("patching %s for token injection (once) -> %s", self.text_encoder_path, out)
            te.patch_text_encoder(self.text_encoder_path, out)
        return out

    @functools.cached_property
    def token_embeddings(self):
        """The text encoder's token-embedding table, float32 [V, D]."""
        return np.load(os.path.join(self.patched_text_encoder_dir, "token_embeddings.npy"))

    @property
    def vocab_size(self):
        return self.token_embeddings.shape[0]

    @property
    def hidden_size(self):
        return self.token_embeddings.shape[1]

    # ---- sessions ----
    def session_options(self):
        return session_options(self.session_settings)

    def _session(self, path):
        """A session through edge_ti.session: tuned options, the optimized graph cached on disk."""
        if not os.path.isfile(path):
            raise EdgeTIError(f"{self.path}: missing {os.path.relpath(path, self.path)}")
        try:
            return create_session(path, self.providers, self.session_settings, self.cache_dir("sessions"))
        except OSError as err:
            raise EdgeTIError(f"{path}: {err.strerror or err}") from None
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EdgeTIError(f"{path}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None

    @functools.cached_property
    def text_encoder(self):
        return self._session(os.path.join(self.patched_text_encoder_dir, "model.onnx"))

    def session(self, part):
        """unet, vae_encoder or vae_decoder, created on first use."""
        cached = self.__dict__.setdefault("_sessions", {})
        if part not in cached:
            cached[part] = self._session(os.path.join(self.path, part, "model.onnx"))
        return cached[part]

    def release(self, part):
        """Drop a part's session (its weights and memory arena): for parts used once, like the VAE
        encoder before training, so their memory does not add to the UNet's."""
        self.__dict__.get("_sessions", {}).pop(part, None)
        self.__dict__.get("_input_types", {}).pop(part, None)

    def input_types(self, part):
        """{input name: (numpy dtype, rank)} of a part's session."""
        cached = self.__dict__.setdefault("_input_types", {})
        if part not in cached:
            cached[part] = {i.name: (ORT_DTYPES.get(i.type, np.float32), len(i.shape))
                            for i in self.session(part).get_inputs()}
        return cached[part]

    def unet(self, sample, timestep, hidden, max_batch=None):
        """UNet at one timestep: sample [B, C, h, w], hidden [B, 77, D] -> float32 [B, C, h, w],
        in calls of at most max_batch samples (default: auto_max_batch, the memory cap)."""
        max_batch = max_batch or auto_max_batch(sample.shape)
        if len(sample) > max_batch:
            return np.concatenate([self.unet(sample[i:i + max_batch], timestep, hidden[i:i + max_batch], max_batch)
                                   for i in range(0, len(sample), max_batch)])
        inputs = self.input_types("unet")
        t_dtype, t_rank = inputs["timestep"]
        t = np.asarray(timestep, dtype=t_dtype)                               # [] (optimum's export)
        if t_rank == 1:
            t = np.full(sample.shape[:1], t, dtype=t_dtype)                   # [B] (older exports)
        feed = {"sample": sample.astype(inputs["sample"][0]), "timestep": t,
                "encoder_hidden_states": hidden.astype(inputs["encoder_hidden_states"][0])}
        return self.session("unet").run(None, feed)[0].astype(np.float32)

    # ---- the public text path ----
    def check_embeddings(self, embeddings, source="embedding"):
        """{token: [n, D]} -> float32 arrays, or an error naming the token whose width is wrong."""
        checked = {}
        for token, vectors in (embeddings or {}).items():
            vectors = np.asarray(vectors, dtype=np.float32)
            if vectors.ndim == 1:
                vectors = vectors[None]
            if vectors.ndim != 2 or vectors.shape[1] != self.hidden_size:
                raise EdgeTIError(f"{source}: token {token!r} has shape {list(vectors.shape)}, "
                                  f"but this model's text encoder needs [n, {self.hidden_size}]")
            checked[token] = vectors
        return checked

    def tokenize(self, prompts, embeddings=None):
        """prompts -> int64 [B, 77]; tokens of `embeddings` get ids from vocab_size on."""
        embeddings = self.check_embeddings(embeddings)
        return self.tokenizer(prompts, placeholder_ids(embeddings, self.vocab_size))

    def encode_text(self, prompts, embeddings=None):
        """prompts -> float32 [B, 77, D] last hidden state, with `embeddings` injected."""
        embeddings = self.check_embeddings(embeddings)
        ids = self.tokenizer(prompts, placeholder_ids(embeddings, self.vocab_size))
        extra = (np.concatenate(list(embeddings.values())) if embeddings
                 else np.zeros((0, self.hidden_size), np.float32))
        hidden, _ = te.encode(self.text_encoder, ids, extra)
        return hidden


def open_model(path, device="cpu", threads=None, session_settings=None):
    """Open an ONNX Stable Diffusion folder (optimum layout) on cpu, cuda or directml."""
    return Model(path, device=device, threads=threads, session_settings=session_settings)

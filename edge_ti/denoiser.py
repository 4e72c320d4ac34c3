"""The denoiser: the two networks that training and sampling run, and the schedule that ties them.

    denoiser = Denoiser(model)                                  # the model folder's sessions
    hidden, pooled = denoiser.encode_population(prompt_ids, candidates)  # [P, K, 77, D'], SDXL: [P, K, D_g]
    x_t = denoiser.add_noise(x0, timesteps, eps)                # DDPM q(x_t | x0)
    out = denoiser.unet(x_t, t, states, pooled=rows)            # eps or v: [B, C, h, w]

One object shared by the objective, generation, the workers and int8 calibration: the text
encoder with token injection, the UNet in calls of at most max_batch samples (the memory cap),
the training schedule's alpha_bar and the model's prediction type. The Model describes the
folder and opens its sessions; this is what runs them.

SDXL (diffusers' StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids): each text encoder
reads its own columns of the tokens' vectors, the UNet reads both penultimate hidden states side
by side as encoder_hidden_states, text_encoder_2's pooled output as text_embeds, and time_ids
(original size, crop top-left, target size) = (H, W, 0, 0, H, W) of the image being denoised.
"""
import functools
import os

import numpy as np

from . import schedulers
from . import text_encoder as te
from .errors import EdgeTIError
from .tokenizer import placeholder_ids

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
SDXL_UNET_INPUTS = ("text_embeds", "time_ids")

# UNet activation memory grows with batch x latent pixels: calls are capped at this many latent
# pixels, i.e. batch 4 at 32x32 (256 px; SD 1.5 peaks there at 4.9 GB fp32, 3.6 GB int8), 1 at
# 64x64, 64 at 8x8 (benchmarks/results/speed.md: larger batches were not faster on SD 1.5)
UNET_PIXELS_PER_CALL = 4096

# DDPMScheduler's defaults: the training noise schedule, whatever sampler the config was saved for
DDPM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, rescale_betas_zero_snr=False)


def auto_max_batch(latent_shape):
    """The UNet batch cap for latents of shape [..., h, w]: at least 1."""
    h, w = latent_shape[-2:]
    return max(1, UNET_PIXELS_PER_CALL // (h * w))


def alphas_cumprod(config):
    """alpha_bar_t of the training schedule, as DDPMScheduler.from_config(config) computes it."""
    return schedulers.alphas_cumprod(schedulers.read_config(config, DDPM_DEFAULTS))


class Denoiser:
    """The text encoder and UNet of MODEL, with its training schedule; max_batch: the UNet cap."""

    def __init__(self, model, max_batch=None):
        self.model = model
        self.max_batch = max_batch
        self.vocab_size = model.vocab_size
        self.prediction_type = model.prediction_type

    @functools.cached_property
    def alphas_bar(self):
        return alphas_cumprod(self.model.scheduler_config)                   # (T_train,)

    # ---- text ----
    def encode(self, prompts, embeddings=None):
        """prompts -> (encoder_hidden_states float32 [B, 77, D'], pooled [B, D_g] or None (SD 1.x/2.x)),
        with `embeddings` {token: [n, D]} injected; each text encoder tokenizes the prompts itself."""
        embeddings = self.model.check_embeddings(embeddings)
        placeholders = placeholder_ids(embeddings, self.vocab_size)
        extra = (np.concatenate(list(embeddings.values())) if embeddings
                 else np.zeros((0, self.model.hidden_size), np.float32))        # (m, D)
        states, pooled = [], None
        for part in self.model.text_parts:
            ids = self.model.tokenizer_of(part)(prompts, placeholders)          # (B, 77)
            session = self.model.text_session(part.name)
            hidden, pooled = te.encode(session, ids, extra[:, part.columns], self._hidden_output(part, session))
            states.append(hidden)
        return np.concatenate(states, axis=-1), (pooled if self.model.family == "sdxl" else None)

    def encode_text(self, prompts, embeddings=None):
        """prompts -> float32 [B, 77, D']: the UNet's encoder_hidden_states, with `embeddings` injected."""
        return self.encode(prompts, embeddings)[0]

    def encode_pooled(self, prompts, embeddings=None):
        """SDXL: prompts -> float32 [B, D_g], the UNet's text_embeds, with `embeddings` injected."""
        if self.model.family != "sdxl":
            raise EdgeTIError(f"{self.model.path}: an SD 1.x/2.x model has no pooled text input (SDXL has)")
        return self.encode(prompts, embeddings)[1]

    def encode_population(self, prompt_ids, candidates):
        """prompt_ids [K, 77] (model.tokenize's), candidates [P, n, D] -> (hidden [P, K, 77, D'],
        pooled [P, K, D_g] or None), one call per text encoder."""
        states, pooled = [], None
        for part in self.model.text_parts:
            session = self.model.text_session(part.name)
            ids = self._part_ids(part, prompt_ids)
            hidden, pooled = te.encode_population(session, ids, np.ascontiguousarray(candidates[..., part.columns]),
                                                  self.vocab_size, self._hidden_output(part, session))
            states.append(hidden)
        return np.concatenate(states, axis=-1), (pooled if self.model.family == "sdxl" else None)

    def _part_ids(self, part, ids):
        """model.tokenize's ids [K, L] as PART's tokenizer gives them: the same vocabulary (Model.tokenizer_2
        checks it), its own padding after the closing end-of-text token (SDXL's tokenizer_2 pads with "!")."""
        tokenizer = self.model.tokenizer_of(part)
        first = self.model.tokenizer
        if tokenizer is first or tokenizer.pad_id == first.pad_id:
            return ids
        # tokenizer 1 pads with end-of-text: the closing token is where the trailing run of them starts
        tail = np.cumprod((ids == first.eos_id)[:, ::-1], axis=1)[:, ::-1].astype(bool)   # (K, L)
        closing = tail & ~np.concatenate([np.zeros_like(tail[:, :1]), tail[:, :-1]], axis=1)
        return np.where(tail & ~closing, tokenizer.pad_id, ids)

    def _hidden_output(self, part, session):
        if not part.penultimate:
            return None
        name = te.penultimate_output(session)
        if name is None:
            raise EdgeTIError(f"{self.model.path}/{part.name}/model.onnx: no hidden_states outputs; SDXL's UNet reads "
                              "the penultimate layer (re-export with optimum, which writes them)")
        return name

    # ---- the forward process and what the UNet is trained to predict ----
    def add_noise(self, x0, timesteps, noise):
        """x0, noise [B, C, h, w], timesteps [B] -> x_t [B, C, h, w]."""
        sqrt_a, sqrt_1ma = self._scales(timesteps)
        return (sqrt_a * x0 + sqrt_1ma * noise).astype(np.float32)         # DDPM q(x_t | x0), Ho et al. eq. 4

    def target(self, x0, timesteps, noise):
        """The regression target at x_t = add_noise(x0, timesteps, noise): eps, or v."""
        if self.prediction_type == "epsilon":
            return noise.astype(np.float32)
        if self.prediction_type == "v_prediction":
            sqrt_a, sqrt_1ma = self._scales(timesteps)
            return (sqrt_a * noise - sqrt_1ma * x0).astype(np.float32)    # v (Salimans & Ho 2022, sec. 4)
        raise EdgeTIError(f"unsupported prediction_type {self.prediction_type!r}")

    def eps_weight(self, timesteps):
        """timesteps [B] -> [B]: the factor that turns this model's loss into the epsilon loss.

        For v: eps_hat - eps = sqrt(alpha_bar_t) (v_hat - v) (insert v = sqrt(a) eps - sqrt(1 - a) x0
        and eps_hat = sqrt(a) v_hat + sqrt(1 - a) x_t), so the eps loss is alpha_bar_t x the v loss,
        which weighs t near T up to 1 / alpha_bar_T (~200x for SD's schedule) more than the eps loss.
        """
        if self.prediction_type == "v_prediction":
            return self.alphas_bar[np.asarray(timesteps)].astype(np.float64)
        return np.ones(len(timesteps))

    def _scales(self, timesteps):
        a = self.alphas_bar[np.asarray(timesteps)][:, None, None, None]       # (B, 1, 1, 1)
        return np.sqrt(a).astype(np.float32), np.sqrt(1.0 - a).astype(np.float32)

    # ---- the UNet ----
    def unet(self, sample, timestep, hidden, max_batch=None, pooled=None):
        """UNet at one timestep: sample [B, C, h, w], hidden [B, 77, D'] (SDXL: pooled [B, D_g] too)
        -> float32 [B, C, h, w], in calls of at most max_batch samples (default: this denoiser's cap,
        else auto_max_batch)."""
        max_batch = max_batch or self.max_batch or auto_max_batch(sample.shape)
        if len(sample) > max_batch:
            return np.concatenate([self.unet(sample[i:i + max_batch], timestep, hidden[i:i + max_batch], max_batch,
                                             None if pooled is None else pooled[i:i + max_batch])
                                   for i in range(0, len(sample), max_batch)])
        feed = self.unet_feed(sample, timestep, hidden, pooled)
        return self.model.session("unet").run(None, feed)[0].astype(np.float32)

    def time_ids(self, sample):
        """SDXL's added time ids for latents [B, C, h, w]: (original H, W, crop top, left, target H, W), the
        image's own size uncropped, as StableDiffusionXLPipeline passes them by default -> [B, 6]."""
        H, W = (d * self.model.vae_scale_factor for d in sample.shape[-2:])
        return np.tile(np.array([H, W, 0, 0, H, W], np.float32), (len(sample), 1))

    def unet_feed(self, sample, timestep, hidden, pooled=None):
        """The UNet's inputs in the dtypes and shapes its export takes (a scalar timestep in optimum's
        export, [B] in older ones; float16 in fp16 exports)."""
        inputs = self._unet_inputs(sample, hidden, pooled)
        t_dtype, t_shape = inputs["timestep"]
        t = np.asarray(timestep, dtype=t_dtype)                               # []
        if len(t_shape) == 1:
            t = np.full(sample.shape[:1], t, dtype=t_dtype)                   # [B]
        feed = {"sample": sample.astype(inputs["sample"][0]), "timestep": t,
                "encoder_hidden_states": hidden.astype(inputs["encoder_hidden_states"][0])}
        if pooled is not None:
            feed["text_embeds"] = pooled.astype(inputs["text_embeds"][0])
            feed["time_ids"] = self.time_ids(sample).astype(inputs["time_ids"][0])
        return feed

    def _unet_inputs(self, sample, hidden, pooled=None):
        """The UNet's input types, once it is checked to be a UNet that takes these latents and text states."""
        inputs = self.model.input_types("unet")
        path = os.path.join(self.model.path, "unet", "model.onnx")
        missing = [name for name in UNET_INPUTS if name not in inputs]
        if missing:
            raise EdgeTIError(f"{path}: not a Stable Diffusion UNet (no input {', '.join(missing)}; "
                              f"its inputs: {', '.join(inputs)})")
        sample_shape, hidden_shape = inputs["sample"][1], inputs["encoder_hidden_states"][1]
        channels = sample_shape[1] if len(sample_shape) == 4 else None        # [B, C, h, w]
        width = hidden_shape[-1] if len(hidden_shape) == 3 else None          # [B, 77, D]
        if isinstance(channels, int) and channels != sample.shape[1]:
            raise EdgeTIError(f"{path}: this UNet takes {channels}-channel latents, but was given "
                              f"{sample.shape[1]} channels (from the VAE, or unet/config.json in_channels)")
        if isinstance(width, int) and width != hidden.shape[-1]:
            raise EdgeTIError(f"{path}: this UNet takes text states of width {width}, but the text encoder "
                              f"gives {hidden.shape[-1]}")
        takes_pooled = all(name in inputs for name in SDXL_UNET_INPUTS)
        if takes_pooled != (pooled is not None):
            raise EdgeTIError(f"{path}: an SDXL UNet (inputs text_embeds, time_ids) in a folder without "
                              "text_encoder_2/" if takes_pooled else
                              f"{path}: not an SDXL UNet (no text_embeds and time_ids inputs), but the folder "
                              "has text_encoder_2/")
        return inputs

"""Numpy samplers for the ONNX UNet: one small module per sampler, driven by scheduler_config.json.

Each module holds a `Sampler` that reads the model folder's scheduler config the way diffusers'
`XScheduler.from_config(config)` does: the keys it knows replace its own defaults, the others are
ignored, so the DDIM config that SD 1.x ships also drives euler, euler-a and dpmpp-2m. Numbers
follow diffusers 0.39 (the parity tests compare final latents against its pipeline).

    sampler = make("euler", model.scheduler_config, steps=30)
    x = rng.standard_normal(shape) * sampler.init_noise_sigma          # [B, 4, h, w]
    for i, t in enumerate(sampler.timesteps):
        model_output = unet(sampler.scale_model_input(x, i), t)        # eps or v, [B, 4, h, w]
        x = sampler.step(model_output, i, x)

A sampler is indexed by step number i, not by timestep value, and keeps its state (DPM-Solver's
previous output) as numpy arrays.
"""
import math

import numpy as np

from ..errors import EdgeTIError


def read_config(config, defaults):
    """`defaults` (a sampler's __init__ arguments in diffusers) with the values `config` gives for them.

    Keys a live diffusers config lists in `_use_default_values` were never set: they are skipped,
    as `from_config` does, so that each sampler falls back to its own default.
    """
    config = config or {}
    unset = set(config.get("_use_default_values", ()))
    merged = dict(defaults)
    merged.update({key: value for key, value in config.items() if key in defaults and key not in unset})
    return merged


def require(config, sampler, **supported):
    """Refuse config options this sampler does not implement, naming the key (value must equal `supported`)."""
    for key, value in supported.items():
        if config.get(key, value) != value:
            raise EdgeTIError(f"scheduler_config.json sets {key}={config[key]!r}, "
                              f"which the {sampler} sampler does not implement")


def require_prediction_type(config, sampler):
    """The UNet predicts eps or v; the samplers have a branch for each."""
    if config["prediction_type"] not in ("epsilon", "v_prediction"):
        raise EdgeTIError(f"scheduler_config.json: prediction_type {config['prediction_type']!r} is not supported "
                          f"by the {sampler} sampler (epsilon, v_prediction)")


def betas_for_alpha_bar(num_train_timesteps, max_beta=0.999):
    """Glide's cosine schedule (Nichol & Dhariwal 2021, eq. 17): beta_t = 1 - alpha_bar(t+1)/alpha_bar(t)."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    T = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)], np.float32)


def rescale_zero_terminal_snr(betas):
    """Betas whose last alpha_bar is 0 (Lin et al. 2023, "Common Diffusion Noise Schedules ...", Algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))                  # [T]
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)  # shift to 0 at T, keep t=0
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo the cumprod
    return (1 - alphas).astype(np.float32)


def alphas_cumprod(config):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float32 [num_train_timesteps], from the config's beta schedule."""
    T, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    schedule = config["beta_schedule"]
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float32)
    elif schedule == "linear":
        betas = np.linspace(start, end, T, dtype=np.float32)
    elif schedule == "scaled_linear":  # latent diffusion's schedule: linear in sqrt(beta)
        betas = np.linspace(start ** 0.5, end ** 0.5, T, dtype=np.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(T)
    else:
        raise EdgeTIError(f"scheduler_config.json: beta_schedule {schedule!r} is not one of "
                          "linear, scaled_linear, squaredcos_cap_v2")
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return np.cumprod(1.0 - betas, dtype=np.float32)                    # [T]


def spaced_timesteps(config, steps):
    """The `steps` training timesteps to visit, descending, float64 [steps].

    The spacings of Lin et al. 2023, Table 2, as DDIM and Euler compute them: "leading" takes
    multiples of T // steps plus steps_offset, "trailing" counts down from T - 1, "linspace" spreads
    steps points over [0, T - 1] (not rounded: DDIM rounds it, Euler interpolates sigma there).
    """
    T, spacing = config["num_train_timesteps"], config["timestep_spacing"]
    if not 1 <= steps <= T:
        raise EdgeTIError(f"steps must be between 1 and {T}, got {steps}")
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps)[::-1].copy()
    if spacing == "leading":
        return np.arange(0, steps)[::-1] * float(T // steps) + config["steps_offset"]
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)) - 1
    raise EdgeTIError(f"scheduler_config.json: timestep_spacing {spacing!r} is not one of leading, trailing, linspace")


def karras_sigmas(sigma_min, sigma_max, steps, rho=7.0):
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    rho = 7 is the paper's choice; i runs over 0..N-1, from sigma_max down to sigma_min.
    """
    ramp = np.linspace(0, 1, steps)                                     # [N]
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas, log_sigmas):
    """Fractional training timesteps whose sigma is `sigmas`: linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))                       # [N]
    dists = log_sigma - log_sigmas[:, None]                             # [T, N]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)  # [N]
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def make(name, config, steps, noise=None):
    """The sampler called `name` for `steps` steps; `noise(shape)` feeds the ancestral samplers."""
    if name not in SAMPLERS:
        raise EdgeTIError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    module = SAMPLERS[name]
    if getattr(module, "STOCHASTIC", False):
        return module.Sampler(config, steps, noise=noise)
    return module.Sampler(config, steps)


# imported last: the modules use the helpers above
from . import ddim, dpmpp_2m, euler, euler_ancestral  # noqa: E402

SAMPLERS = {"ddim": ddim, "euler": euler, "euler-a": euler_ancestral, "dpmpp-2m": dpmpp_2m}

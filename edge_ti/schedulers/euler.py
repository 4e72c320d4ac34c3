"""Euler: Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 2 without churn, as k-diffusion's `sample_euler`.

https://arxiv.org/abs/2206.00364. The noise level is sigma = sqrt((1 - alpha_bar) / alpha_bar) and
the sample lives at x = x0 + sigma * eps (variance-exploding form); the UNet sees
x / sqrt(sigma^2 + 1). One step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma:

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * (x_i - x0_pred) / sigma_i

As diffusers' EulerDiscreteScheduler: sigmas interpolated linearly at the spaced (fractional)
timesteps, then a final 0 (final_sigmas_type "zero") or sigma_min.
"""
import numpy as np

from . import (alphas_cumprod, karras_sigmas, read_config, require, require_prediction_type, sigma_to_t,
               spaced_timesteps)

# EulerDiscreteScheduler.__init__'s defaults (diffusers 0.39): a config without a key gets these
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                trained_betas=None, prediction_type="epsilon", interpolation_type="linear",
                use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                sigma_min=None, sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
                steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero")


def schedule(config, steps):
    """(timesteps float32 [steps], sigmas float32 [steps + 1], init_noise_sigma) of the Euler samplers."""
    alphas_bar = alphas_cumprod(config)                                     # [T]
    if config.get("rescale_betas_zero_snr"):
        alphas_bar[-1] = 2.0 ** -24  # zero terminal SNR, but the first sigma must stay finite
    train_sigmas = ((1 - alphas_bar) / alphas_bar) ** 0.5                   # [T], sigma of each training step
    timesteps = spaced_timesteps(config, steps).astype(np.float32)          # [steps]
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)  # [steps]
    if config.get("use_karras_sigmas"):
        # Karras et al. 2022 eq. 5 between the interpolated ends (or the config's sigma_min/max)
        sigma_min = float(sigmas[-1]) if config.get("sigma_min") is None else config["sigma_min"]
        sigma_max = float(sigmas[0]) if config.get("sigma_max") is None else config["sigma_max"]
        sigmas = karras_sigmas(sigma_min, sigma_max, steps)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas)).astype(np.float32)
    sigma_last = train_sigmas[0] if config.get("final_sigmas_type") == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)      # [steps + 1]
    # x_T ~ N(0, sigma_max^2 (+1 for "leading", whose first timestep is not T - 1))
    sigma_max = float(sigmas.max())
    if config["timestep_spacing"] in ("linspace", "trailing"):
        init_noise_sigma = sigma_max
    else:
        init_noise_sigma = (sigma_max ** 2 + 1) ** 0.5
    return timesteps, sigmas, init_noise_sigma


def predicted_x0(config, model_output, sigma, sample):
    """The denoiser D(x; sigma) of Karras et al. eq. 7: x0 from x at sigma and the UNet's eps or v
    (the only prediction types require_prediction_type lets through)."""
    if config["prediction_type"] == "epsilon":
        return sample - sigma * model_output
    # v: c_out = -sigma / sqrt(sigma^2 + 1), c_skip = 1 / (sigma^2 + 1) (Karras et al. Table 1, v-param.)
    return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)


class Sampler:
    """Euler's method on the probability-flow ODE over `steps` steps."""

    def __init__(self, config, steps):
        self.config = read_config(config, DEFAULTS)
        require_prediction_type(self.config, "euler")
        require(self.config, "euler", interpolation_type="linear", use_exponential_sigmas=False,
                use_beta_sigmas=False, timestep_type="discrete")
        self.timesteps, self.sigmas, self.init_noise_sigma = schedule(self.config, steps)

    def scale_model_input(self, sample, i):
        """x [B, C, h, w] -> x / sqrt(sigma^2 + 1): the UNet was trained on unit-variance inputs."""
        return sample / (self.sigmas[i] ** 2 + 1) ** 0.5

    def step(self, model_output, i, sample):
        """x at sigmas[i] [B, C, h, w] and the UNet's output -> x at sigmas[i + 1] [B, C, h, w]."""
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]

        # 1. compute predicted original sample (x_0), the denoiser D(x; sigma) of Karras et al. eq. 7
        pred_original_sample = predicted_x0(self.config, model_output, sigma, sample)

        # 2. convert to an ODE derivative d = (x - D(x; sigma)) / sigma (Algorithm 2, line 7)
        derivative = (sample - pred_original_sample) / sigma

        # 3. take the Euler step to the next sigma (Algorithm 2, line 8)
        dt = sigma_next - sigma
        return sample + derivative * dt

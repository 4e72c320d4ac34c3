"""Euler ancestral: k-diffusion's `sample_euler_ancestral` (Crowson), on the sigmas of Karras et al. 2022.

https://github.com/crowsonkb/k-diffusion, k_diffusion/sampling.py. Each step goes down with Euler
to sigma_down and adds fresh noise of std sigma_up, so that the marginal at sigma_{i+1} is right
(`get_ancestral_step`, eta = 1):

    sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
    sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
    x_{i+1}    = x_i + (sigma_down - sigma_i) * (x_i - x0_pred) / sigma_i + sigma_up * z,  z ~ N(0, I)

As diffusers' EulerAncestralDiscreteScheduler: the Euler sampler's linear-interpolated sigmas
(no Karras option), and noise drawn at every step, the last one included (where sigma_up = 0).
"""
import numpy as np

from . import read_config, require_prediction_type
from .euler import predicted_x0, schedule

STOCHASTIC = True  # needs noise: make() passes it

# EulerAncestralDiscreteScheduler.__init__'s defaults (diffusers 0.39)
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                trained_betas=None, prediction_type="epsilon", timestep_spacing="linspace",
                steps_offset=0, rescale_betas_zero_snr=False)


class Sampler:
    """Euler ancestral over `steps` steps.

    `noise` is a numpy Generator, or a callable(shape) -> float32 array giving the z of each step
    in order (tests feed it the noise torch drew for diffusers).
    """

    def __init__(self, config, steps, noise=None):
        self.config = read_config(config, DEFAULTS)
        require_prediction_type(self.config, "euler-a")
        self.timesteps, self.sigmas, self.init_noise_sigma = schedule(self.config, steps)
        if noise is None:
            noise = np.random.default_rng(0)
        if isinstance(noise, np.random.Generator):
            generator = noise
            noise = lambda shape: generator.standard_normal(shape, dtype=np.float32)  # noqa: E731
        self.noise = noise

    def scale_model_input(self, sample, i):
        """x [B, C, h, w] -> x / sqrt(sigma^2 + 1): the UNet was trained on unit-variance inputs."""
        return sample / (self.sigmas[i] ** 2 + 1) ** 0.5

    def step(self, model_output, i, sample):
        """x at sigmas[i] [B, C, h, w] and the UNet's output -> x at sigmas[i + 1] [B, C, h, w]."""
        sigma = self.sigmas[i]

        # 1. compute predicted original sample (x_0), the denoiser D(x; sigma)
        pred_original_sample = predicted_x0(self.config, model_output, sigma, sample)

        # 2. split the step into a deterministic part to sigma_down and fresh noise sigma_up (get_ancestral_step)
        sigma_from, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5

        # 3. convert to an ODE derivative d = (x - D(x; sigma)) / sigma
        derivative = (sample - pred_original_sample) / sigma

        # 4. Euler step to sigma_down, then add noise of std sigma_up
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt
        z = np.asarray(self.noise(model_output.shape), dtype=np.float32)  # [B, C, h, w]
        return prev_sample + z * sigma_up

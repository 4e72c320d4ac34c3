"""DDIM, deterministic (eta = 0): Song, Meng, Ermon 2020, "Denoising Diffusion Implicit Models".

https://arxiv.org/abs/2010.02502, eq. 12:

    x_{t-1} = sqrt(alpha_{t-1}) * x0_pred + sqrt(1 - alpha_{t-1}) * eps_pred,
    x0_pred = (x_t - sqrt(1 - alpha_t) * eps_pred) / sqrt(alpha_t)

where alpha_t is the cumulative product alpha_bar_t of DDPM (here `alpha_prod_t`). As diffusers'
DDIMScheduler: integer timesteps; the previous timestep is always t - T // steps, whatever the
spacing; below t = 0, alpha_prod_t_prev is 1 (set_alpha_to_one) or alpha_bar_0.
"""
import numpy as np

from . import alphas_cumprod, read_config, require, require_prediction_type, spaced_timesteps

# DDIMScheduler.__init__'s defaults (diffusers 0.39): a config without a key gets these
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                prediction_type="epsilon", thresholding=False, clip_sample_range=1.0,
                timestep_spacing="leading", rescale_betas_zero_snr=False)


class Sampler:
    """DDIM with eta = 0 over `steps` steps of the config's noise schedule."""

    init_noise_sigma = 1.0  # x_T ~ N(0, I)

    def __init__(self, config, steps):
        self.config = read_config(config, DEFAULTS)
        require_prediction_type(self.config, "ddim")
        require(self.config, "ddim", thresholding=False)
        self.steps = steps
        self.alphas_cumprod = alphas_cumprod(self.config)                   # [T] float32
        # the step past t = 0 lands on alpha = 1 (a clean image) or on alpha_bar_0
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.timesteps = np.round(spaced_timesteps(self.config, steps)).astype(np.int64)  # [steps]

    def scale_model_input(self, sample, i):
        return sample  # DDIM feeds x_t to the UNet unscaled

    def step(self, model_output, i, sample):
        """x_t [B, C, h, w] and the UNet's output at timesteps[i] -> x_{t-1} [B, C, h, w]."""
        cfg = self.config
        t = int(self.timesteps[i])

        # 1. get previous step value (=t-1)
        prev_t = t - cfg["num_train_timesteps"] // self.steps

        # 2. compute alphas, betas
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        # 3. compute predicted original sample and noise: "predicted x_0" of eq. 12
        if cfg["prediction_type"] == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
            pred_epsilon = model_output
        else:  # v_prediction, the only other type __init__ lets through
            # v = sqrt(alpha_t) eps - sqrt(1 - alpha_t) x0 (Salimans & Ho 2022, sec. 4)
            pred_original_sample = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
            pred_epsilon = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample

        # 4. clip "predicted x_0"
        if cfg["clip_sample"]:
            pred_original_sample = np.clip(pred_original_sample, -cfg["clip_sample_range"], cfg["clip_sample_range"])

        # 5. eta = 0: sigma_t of eq. 16 is 0, no noise is added

        # 6. compute "direction pointing to x_t" of eq. 12
        pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * pred_epsilon

        # 7. compute x_{t-1} of eq. 12
        return alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction

"""DPM-Solver++(2M): Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", Algorithm 2 (multistep, second order, data prediction).

https://arxiv.org/abs/2211.01095. With alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t,
the half log-SNR lambda_t = log(alpha_t / sigma_t) and h_i = lambda_{t_i} - lambda_{t_{i-1}}:

    first order (= DDIM):  x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) x0_{i-1}
    second order:          the same with x0_{i-1} replaced by
                           D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},   r_i = h_{i-1} / h_i

As diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++", solver_order 2:
integer timesteps (steps + 1 points, the last dropped), sigmas interpolated there, a final sigma 0
(final_sigmas_type "zero"), the first step first order and the last step first order too
(always when the final sigma is 0; otherwise with lower_order_final under 15 steps).
"""
import numpy as np

from ..errors import EdgeTIError
from . import alphas_cumprod, karras_sigmas, read_config, require, require_prediction_type, sigma_to_t

# DPMSolverMultistepScheduler.__init__'s defaults (diffusers 0.39); algorithm_type and solver_order
# are this sampler's name and are set below whatever the config says
DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
                algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
                final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
                timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False)


def _timesteps(config, steps, lambda_t):
    """DPM-Solver's own spacing, int64 [steps]: steps + 1 points from T - 1 down to 0, the 0 dropped."""
    T, spacing = config["num_train_timesteps"], config["timestep_spacing"]
    # skip the steps whose lambda is below lambda_min_clipped (for cosine schedules)
    clipped = int(np.searchsorted(lambda_t[::-1], config["lambda_min_clipped"]))
    last = T - clipped
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (steps + 1)
        return (np.arange(0, steps + 1) * ratio)[::-1][:-1].astype(np.int64) + config["steps_offset"]
    if spacing == "trailing":
        return np.arange(last, 0, -T / steps).round().astype(np.int64) - 1
    raise EdgeTIError(f"scheduler_config.json: timestep_spacing {spacing!r} is not one of leading, trailing, linspace")


class Sampler:
    """DPM-Solver++(2M) over `steps` steps; keeps the previous step's x0 prediction."""

    init_noise_sigma = 1.0  # x_T ~ N(0, I): this solver works in the variance-preserving form

    def __init__(self, config, steps):
        cfg = self.config = read_config(config, DEFAULTS)
        cfg.update(algorithm_type="dpmsolver++", solver_order=2)
        require(cfg, "dpmpp-2m", thresholding=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                use_lu_lambdas=False, use_flow_sigmas=False, variance_type=None)
        if cfg["solver_type"] not in ("midpoint", "heun"):
            cfg["solver_type"] = "midpoint"  # diffusers maps the UniPC/DEIS names onto midpoint
        require_prediction_type(cfg, "dpmpp-2m")
        if not 1 <= steps <= cfg["num_train_timesteps"]:
            raise EdgeTIError(f"steps must be between 1 and {cfg['num_train_timesteps']}, got {steps}")

        alphas_bar = alphas_cumprod(cfg)                                    # [T]
        if cfg["rescale_betas_zero_snr"]:
            alphas_bar[-1] = 2.0 ** -24  # zero terminal SNR, but the first sigma must stay finite
        lambda_t = np.log(alphas_bar ** 0.5) - np.log((1 - alphas_bar) ** 0.5)  # [T], half log-SNR
        train_sigmas = ((1 - alphas_bar) / alphas_bar) ** 0.5               # [T]

        timesteps = _timesteps(cfg, steps, lambda_t)                        # [steps]
        if cfg["use_karras_sigmas"]:
            # Karras et al. 2022 eq. 5 between the training schedule's ends
            sigmas = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), steps)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        sigma_last = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)  # [steps + 1]
        self.timesteps = timesteps                                          # [steps] int64
        self.prev_x0 = None                                                 # x0 prediction of step i - 1

    def scale_model_input(self, sample, i):
        return sample  # the UNet sees x_t unscaled

    def _alpha_sigma(self, i):
        """(alpha_t, sigma_t) of sigmas[i]: x_t = alpha_t x0 + sigma_t eps."""
        alpha_t = 1 / (self.sigmas[i] ** 2 + 1) ** 0.5
        return alpha_t, self.sigmas[i] * alpha_t

    def _lambda(self, i):
        alpha_t, sigma_t = self._alpha_sigma(i)
        return np.log(alpha_t) - np.log(sigma_t)

    def step(self, model_output, i, sample):
        """x_t at timesteps[i] [B, C, h, w] and the UNet's output -> x at the next sigma [B, C, h, w]."""
        cfg, n = self.config, len(self.timesteps)

        # 1. convert the model output to the data prediction x0 (DPM-Solver++ solves in x0)
        alpha_s0, sigma_s0 = self._alpha_sigma(i)
        if cfg["prediction_type"] == "epsilon":
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        else:  # v_prediction, the only other type __init__ lets through
            x0 = alpha_s0 * sample - sigma_s0 * model_output
        prev_x0, self.prev_x0 = self.prev_x0, x0

        # 2. choose the order: first at the start (no history) and at the end (diffusers' lower_order_final)
        last = i == n - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                               or cfg["final_sigmas_type"] == "zero")
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        if prev_x0 is None or last:
            # 3a. first order (DDIM): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0
            if self.sigmas[i + 1] == 0:
                return x0  # sigma_t = 0: h = inf and the update is the data prediction itself
            h = self._lambda(i + 1) - self._lambda(i)
            return (sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - 1.0)) * x0

        # 3b. second order: h = lambda_t - lambda_s0, r0 = h_0 / h, D1 = (x0 - x0_prev) / r0 (Algorithm 2)
        lambda_t, lambda_s0, lambda_s1 = self._lambda(i + 1), self._lambda(i), self._lambda(i - 1)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = x0, (1.0 / r0) * (x0 - prev_x0)
        if cfg["solver_type"] == "midpoint":  # D = D0 + D1 / 2, the paper's D_i
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - 1.0)) * D0
                    - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * D1)
        return ((sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - 1.0)) * D0  # heun
                + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * D1)

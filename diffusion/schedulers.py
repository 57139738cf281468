"""Noise schedules and the DDPM / DDIM samplers, in the diffusers vocabulary: `alphas_cumprod` is
alpha_bar, `timesteps` run from T-1 down to 0, `set_timesteps` picks the sampling timesteps and
`step` goes from one to the next. Schedules are computed in float64; coefficients become python
floats (or are cast to the sample's dtype) only where they are applied.

DDPM: Ho et al. 2020; DDIM: Song et al. 2021; cosine schedule: Nichol & Dhariwal 2021; sqrt
schedule: Li et al. 2022 (Diffusion-LM); timestep spacings: Lin et al. 2024, table 2.
"""

import math

import numpy as np
import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def make_betas(
    beta_schedule: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if beta_schedule == "cosine":
        # Nichol & Dhariwal 2021, eq. 17; s keeps beta_0 from being vanishingly small, and the
        # 0.999 cap stops the last betas from reaching 1 (alpha_bar(T) = 0 would be singular).
        s = 0.008
        steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64)
        alpha_bar = torch.cos((steps / num_train_timesteps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if beta_schedule == "sqrt":
        # Diffusion-LM (Li et al. 2022): alpha_bar(t) = 1 - sqrt(t/T + s). Noise rises fast at the
        # start, where nearly clean embeddings would otherwise make denoising trivial; alpha_bar(1)
        # is slightly negative, so the cap turns the last betas into 0.999 as with cosine.
        s = 1e-4
        steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64)
        alpha_bar = 1 - torch.sqrt(steps / num_train_timesteps + s)
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"beta_schedule must be 'linear', 'cosine' or 'sqrt', got {beta_schedule!r}")


def posterior_coefficients(alpha_prod_t, alpha_prod_t_prev):
    """q(x_prev | x_t, x0) = N(coef1 * x0 + coef2 * x_t, variance): DDPM eq. 6-7, written with
    beta_t = 1 - alpha_bar_t / alpha_bar_prev so that it holds between any two timesteps (respacing)."""
    beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    coef1 = alpha_prod_t_prev**0.5 * beta_t / (1 - alpha_prod_t)
    coef2 = (1 - beta_t) ** 0.5 * (1 - alpha_prod_t_prev) / (1 - alpha_prod_t)
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * beta_t  # beta_tilde
    return coef1, coef2, variance


def to_original_and_epsilon(
    prediction_type: str, model_output: Tensor, sample: Tensor, alpha_prod_t
) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by the model output at x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
    elif prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return pred_original_sample, pred_epsilon


def _per_example(values: Tensor, timesteps: Tensor, like: Tensor) -> Tensor:
    """values[timesteps] in like's dtype, shaped to broadcast against like: (B, 1, ..., 1) for one
    timestep per example, (B, L, 1, ..., 1) for one per position."""
    picked = values.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    return picked.reshape(*timesteps.shape, *([1] * (like.ndim - timesteps.ndim)))


class NoiseSchedule:
    """The forward process q(x_t | x0) and its posterior q(x_{t-1} | x_t, x0), all in float64."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        self.num_train_timesteps = num_train_timesteps
        self.betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_mean_coef1, self.posterior_mean_coef2, self.posterior_variance = posterior_coefficients(
            self.alphas_cumprod, self.alphas_cumprod_prev
        )

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        alpha_prod_t = _per_example(self.alphas_cumprod, timesteps, original_samples)
        return alpha_prod_t**0.5 * original_samples + (1 - alpha_prod_t) ** 0.5 * noise

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022), `sample` being x0.
        alpha_prod_t = _per_example(self.alphas_cumprod, timesteps, sample)
        return alpha_prod_t**0.5 * noise - (1 - alpha_prod_t) ** 0.5 * sample


class Scheduler(NoiseSchedule):
    """What both samplers share: the timestep list and turning a model output into (x0, eps)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        clip_sample: bool = True,
    ):
        super().__init__(num_train_timesteps, beta_schedule, beta_start, beta_end)
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, timestep_spacing: str = "trailing") -> None:
        """`num_inference_steps` distinct timesteps in [0, T-1], descending: diffusers' DDIMScheduler
        spacings with steps_offset=0 (Lin et al. 2024, table 2), in numpy for its rounding.

        Raises ValueError unless 1 <= num_inference_steps <= num_train_timesteps."""
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
        if timestep_spacing == "leading":
            step_ratio = T // num_inference_steps
            timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1]
        elif timestep_spacing == "trailing":
            # np.arange(T, 0, -T/n) has ceil(T / (T/n)) entries in floating point: n + 1 for some n
            # (61 of 1000), the extra one rounding to timestep -1. Its first n are the right ones.
            step_ratio = T / num_inference_steps
            timesteps = np.round(np.arange(T, 0, -step_ratio)[:num_inference_steps]) - 1
        elif timestep_spacing == "linspace":
            timesteps = np.linspace(0, T - 1, num_inference_steps).round()[::-1]
        else:
            raise ValueError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {timestep_spacing!r}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64).copy())

    def previous_timestep(self, timestep: int) -> int:
        """The next entry of the timestep list (not t - T // n, which is wrong for uneven spacings);
        -1 after the last step."""
        index = self.timesteps.tolist().index(timestep)
        return self.timesteps[index + 1].item() if index + 1 < len(self.timesteps) else -1

    def alpha_prod(self, timestep: int) -> float:
        # set_alpha_to_one: past the last step we are at clean data, alpha_bar = 1.
        return self.alphas_cumprod[timestep].item() if timestep >= 0 else 1.0

    def predict_original_and_epsilon(
        self, model_output: Tensor, alpha_prod_t: float, sample: Tensor
    ) -> tuple[Tensor, Tensor]:
        pred_original_sample, pred_epsilon = to_original_and_epsilon(
            self.prediction_type, model_output, sample, alpha_prod_t
        )
        if self.clip_sample:
            # eps must agree with the clipped x0 (diffusers' use_clipped_model_output); this is
            # also what makes DDIM with eta=1 equal DDPM ancestral sampling.
            pred_original_sample = pred_original_sample.clamp(-1, 1)
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / (1 - alpha_prod_t) ** 0.5
        return pred_original_sample, pred_epsilon


def _noise_like(sample: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the CPU so that a seeded generator gives the same samples on every device.
    return torch.randn(sample.shape, generator=generator, dtype=sample.dtype).to(sample.device)


class DDPMScheduler(Scheduler):
    """Ancestral sampling: x_prev ~ q(x_prev | x_t, x0 = predicted x0), variance beta_tilde."""

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        variance_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        timestep = int(timestep)
        alpha_prod_t = self.alpha_prod(timestep)
        alpha_prod_t_prev = self.alpha_prod(self.previous_timestep(timestep))
        pred_original_sample, _ = self.predict_original_and_epsilon(model_output, alpha_prod_t, sample)
        coef1, coef2, variance = posterior_coefficients(alpha_prod_t, alpha_prod_t_prev)
        prev_sample = coef1 * pred_original_sample + coef2 * sample
        if variance > 0:  # zero on the last step, which returns the predicted x0 itself
            if variance_noise is None:
                variance_noise = _noise_like(sample, generator)
            prev_sample = prev_sample + variance**0.5 * variance_noise
        return prev_sample


class DDIMScheduler(Scheduler):
    """DDIM, eq. 12 of Song et al.: eta=0 is deterministic, eta=1 is DDPM ancestral sampling."""

    def __init__(self, eta: float = 0.0, **schedule_kwargs):
        super().__init__(**schedule_kwargs)
        self.eta = eta

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        variance_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        timestep = int(timestep)
        alpha_prod_t = self.alpha_prod(timestep)
        alpha_prod_t_prev = self.alpha_prod(self.previous_timestep(timestep))
        pred_original_sample, pred_epsilon = self.predict_original_and_epsilon(model_output, alpha_prod_t, sample)
        # sigma_t (DDIM eq. 16) = eta * sqrt(beta_tilde), the DDPM posterior variance between these timesteps.
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = self.eta * variance**0.5
        # max(0, .) only guards float round-off, which can make it about -1e-17 when eta=1.
        direction_coef = max(1 - alpha_prod_t_prev - std_dev_t**2, 0.0) ** 0.5
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + direction_coef * pred_epsilon
        if std_dev_t > 0:
            if variance_noise is None:
                variance_noise = _noise_like(sample, generator)
            prev_sample = prev_sample + std_dev_t * variance_noise
        return prev_sample


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2): the diffusion ODE in
    log-SNR time lambda = log(alpha / sigma), integrated exactly for its linear part, with the data
    prediction x0 extrapolated from the last two steps. Deterministic; 10-25 steps.

    Each step takes one model evaluation. The first step, which has no earlier x0, and the last,
    which lands on clean data (sigma = 0), are first order (DDIM); like diffusers'
    DPMSolverMultistepScheduler with solver_order=2, solver_type="midpoint", final_sigmas_type="zero".
    With clip_sample the predicted x0 is clipped to [-1, 1], as DDPM and DDIM do."""

    def set_timesteps(self, num_inference_steps: int, timestep_spacing: str = "trailing") -> None:
        super().set_timesteps(num_inference_steps, timestep_spacing)
        self.model_outputs: list[Tensor] = []  # the x0 predictions of the steps taken so far
        self.lambdas: list[float] = []  # and their log-SNRs

    def alpha_sigma(self, timestep: int) -> tuple[float, float]:
        """(alpha_t, sigma_t) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)); (1, 0) past the last step."""
        alpha_prod = self.alpha_prod(timestep)
        return alpha_prod**0.5, (1 - alpha_prod) ** 0.5

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        variance_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        timestep = int(timestep)
        alpha_s, sigma_s = self.alpha_sigma(timestep)
        alpha_t, sigma_t = self.alpha_sigma(self.previous_timestep(timestep))
        pred_original_sample, _ = self.predict_original_and_epsilon(model_output, alpha_s**2, sample)
        lambda_s = math.log(alpha_s / sigma_s)
        self.model_outputs = [*self.model_outputs[-1:], pred_original_sample]
        self.lambdas = [*self.lambdas[-1:], lambda_s]
        if sigma_t == 0:  # the last step: exp(-h) = 0, the update is x0 itself
            return pred_original_sample
        h = math.log(alpha_t / sigma_t) - lambda_s
        first_order = (sigma_t / sigma_s) * sample - alpha_t * math.expm1(-h) * pred_original_sample
        if len(self.model_outputs) < 2:
            return first_order
        # Second order (the midpoint rule of the paper's eq. 12 in data-prediction form):
        # D1 = (x0_s0 - x0_s1) / r0 with r0 = h_prev / h.
        r0 = (self.lambdas[-1] - self.lambdas[-2]) / h
        derivative = (self.model_outputs[-1] - self.model_outputs[-2]) / r0
        return first_order - 0.5 * alpha_t * math.expm1(-h) * derivative


SAMPLERS = ("ddpm", "ddim", "dpmsolver++")


def make_scheduler(
    sampler: str,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
    clip_sample: bool = True,
    eta: float = 0.0,
) -> Scheduler:
    """A DDPMScheduler (ancestral), a DDIMScheduler (`eta`: 0 deterministic, 1 ancestral) or a
    DPMSolverMultistepScheduler (DPM-Solver++ 2M) on the given schedule; ValueError for another
    sampler."""
    kwargs = dict(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
    )
    if sampler == "ddpm":
        return DDPMScheduler(**kwargs)
    if sampler == "ddim":
        return DDIMScheduler(eta=eta, **kwargs)
    if sampler == "dpmsolver++":
        return DPMSolverMultistepScheduler(**kwargs)
    raise ValueError(f"sampler must be 'ddpm', 'ddim' or 'dpmsolver++', got {sampler!r}")

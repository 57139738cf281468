"""DDPM (Ho et al. 2020): the noise-prediction loss (eq. 14, or x0 / v targets), sampled with the
DDPM ancestral, the DDIM (Song et al. 2021) or the DPM-Solver++ (Lu et al. 2022) scheduler of
diffusion/schedulers.py.

Classifier-free guidance (diffusion/methods/conditioning.py) mixes eps_uncond + w (eps_cond - eps_uncond).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.config import ModelConfig, RunConfig, SampleConfig, num_classes
from diffusion.data.spec import DataSpec
from diffusion.methods.base import Method, Progress, no_progress, register
from diffusion.methods.conditioning import asked_labels, drop_labels, guided_output
from diffusion.nets import build_denoiser
from diffusion.schedulers import PREDICTION_TYPES, NoiseSchedule, Scheduler, make_scheduler


@register
class DDPM(Method):
    """`model(x, t, class_labels=None)` is any network that maps noisy examples (images, or an
    autoencoder's latents) and (B,) long timesteps to a prediction of the same shape (a UNet or a
    FiLM MLP from diffusion/nets)."""

    name = "ddpm"
    data_kinds = ("image",)

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        clip_sample: bool = True,
        class_conditional: bool = False,
        num_classes: int | None = None,
        label_dropout: float = 0.0,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.schedule_kwargs = dict(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
        )
        self.schedule = NoiseSchedule(**self.schedule_kwargs)
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.class_conditional = class_conditional
        self.num_classes = num_classes  # the null class's index
        self.label_dropout = label_dropout

    @classmethod
    def from_config(cls, config: RunConfig) -> "DDPM":
        fields = {"num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "clip_sample"}
        conditional = config.model.class_conditional
        return cls(
            **config.method.model_dump(include=fields),
            class_conditional=conditional,
            num_classes=num_classes(config.data) if conditional else None,
            label_dropout=config.method.label_dropout if conditional else 0.0,
        )

    def build_model(self, model_config: ModelConfig, data: DataSpec, parent=None) -> nn.Module:
        return build_denoiser(model_config, data.shape, data.num_classes)

    def loss(self, model, batch: dict, shard: slice | None = None) -> Tensor:
        """Mean loss over the batch, or over `shard` of it (data-parallel ranks). The noise and the
        timesteps are drawn for the whole batch either way, so that every rank, and a single
        process, consume the same random numbers."""
        images = batch["images"]
        # From the global RNG (on images' device), which the trainer checkpoints for exact resumes.
        timesteps = torch.randint(0, self.num_train_timesteps, (images.shape[0],), device=images.device)
        noise = torch.randn_like(images)
        class_labels = drop_labels(batch.get("class_labels"), self.label_dropout, self.num_classes)
        if shard is not None:
            images, timesteps, noise = images[shard], timesteps[shard], noise[shard]
            class_labels = class_labels[shard] if class_labels is not None else None
        noisy_images = self.schedule.add_noise(images, noise, timesteps)
        model_output = model(noisy_images, timesteps, class_labels=class_labels)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "sample":
            target = images
        else:
            target = self.schedule.get_velocity(images, noise, timesteps)
        # In float32 even when the model ran under bf16 autocast.
        return F.mse_loss(model_output.float(), target.float())

    def make_scheduler(self, sampler: str, eta: float = 0.0) -> Scheduler:
        return make_scheduler(
            sampler, **self.schedule_kwargs, prediction_type=self.prediction_type, clip_sample=self.clip_sample, eta=eta
        )

    def sample(
        self,
        model: nn.Module,
        num_samples: int,
        data: DataSpec,
        sample: SampleConfig,
        generator: torch.Generator | None,
        device: torch.device | str = "cpu",
        progress: Progress = no_progress,
        stats: dict | None = None,
    ) -> Tensor:
        """In batches of `sample.batch_size` from one generator; a class-conditional model is given
        `class_labels(...)` and guided with `sample.guidance_scale`."""
        labels = self.class_labels(num_samples, data, sample)
        batches = []
        for start in range(0, num_samples, sample.batch_size):
            count = min(sample.batch_size, num_samples - start)
            batches.append(
                self.generate(
                    model,
                    count,
                    data.shape,
                    sampler=sample.sampler,
                    num_inference_steps=sample.num_inference_steps,
                    eta=sample.eta,
                    timestep_spacing=sample.timestep_spacing,
                    generator=generator,
                    class_labels=None if labels is None else labels[start : start + count],
                    device=device,
                    progress=progress,
                    guidance_scale=sample.guidance_scale,
                )
            )
        if stats is not None:
            stats["nfe"] = sample.num_inference_steps  # one network pass per scheduler step
        return torch.cat(batches) if len(batches) > 1 else batches[0]

    def class_labels(self, num_samples: int, data: DataSpec, sample: SampleConfig) -> Tensor | None:
        return asked_labels(num_samples, self.num_classes if self.class_conditional else None, sample)

    def sample_name(self, sample: SampleConfig) -> str:
        eta = f"-eta{sample.eta:g}" if sample.sampler == "ddim" and sample.eta else ""
        guidance = f"-w{sample.guidance_scale:g}" if sample.guidance_scale != 1 else ""
        label = f"-class{sample.class_label}" if sample.class_label is not None else ""
        return f"{sample.sampler}{sample.num_inference_steps}{eta}{guidance}{label}-seed{sample.seed}"

    @torch.no_grad()
    def generate(
        self,
        model,
        num_samples: int,
        shape: tuple[int, ...],
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        eta: float = 0.0,
        timestep_spacing: str = "trailing",
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
        device="cpu",
        progress: Progress = no_progress,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """One batch of `num_samples` images of `shape`, from pure noise through the scheduler's
        timesteps; with `class_labels`, guided with `guidance_scale`."""
        scheduler = self.make_scheduler(sampler, eta)
        scheduler.set_timesteps(num_inference_steps, timestep_spacing)
        # On the CPU from `generator`, like the variance noise, so samples do not depend on the device.
        sample = torch.randn((num_samples, *shape), generator=generator).to(device)
        if class_labels is not None:
            class_labels = class_labels.to(device)
        for timestep in progress(scheduler.timesteps.tolist(), f"{sampler} sampling"):
            timesteps = torch.full((num_samples,), timestep, dtype=torch.long, device=device)
            model_output = guided_output(model, sample, timesteps, class_labels, guidance_scale, self.num_classes)
            sample = scheduler.step(model_output, timestep, sample, generator=generator)
        # The last step (alpha_bar_prev = 1) returns the predicted x0 itself, so with clip_sample
        # the samples are in [-1, 1] already; without it they are left as the model made them.
        return sample

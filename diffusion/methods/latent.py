"""Latent diffusion (Rombach et al. 2022): a Gaussian-diffusion method run on the latents of a
frozen, trained autoencoder (method.autoencoder names its run), whose decoder turns the samples
into images.

The latents are divided by their standard deviation, measured once on the trainer's fixed
training examples (the first 256) before the first step (Rombach et al.'s scale factor; `latent_std`, kept in the weights
and logged), so that the schedule's unit-variance noise suits them. The network holds the
autoencoder too, so that a checkpoint alone resumes and samples: the autoencoder's run may be gone.
"""

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from diffusion.config import ConfigError, ModelConfig, SampleConfig, describe_error
from diffusion.data.spec import DataSpec
from diffusion.methods.base import Method, Parent, Progress, no_progress
from diffusion.nets import build_autoencoder


class LatentModel(nn.Module):
    """The denoiser of scaled latents (its forward is the denoiser's) with the frozen autoencoder."""

    def __init__(self, denoiser: nn.Module, autoencoder: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.autoencoder = autoencoder.requires_grad_(False)
        self.register_buffer("latent_std", torch.ones(()))

    def forward(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, second_time: Tensor | None = None
    ) -> Tensor:
        return self.denoiser(x, t, class_labels=class_labels, second_time=second_time)

    def train(self, mode: bool = True) -> "LatentModel":
        super().train(mode)
        self.autoencoder.eval()  # frozen: no dropout or batch statistics of its own while the denoiser trains
        return self

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> latents of unit scale."""
        return self.autoencoder.encode(images) / self.latent_std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents of unit scale -> images in [-1, 1]."""
        return self.autoencoder.decode(latents * self.latent_std) * 2 - 1


class Latent(Method):
    """`inner` (a Gaussian-diffusion method) on the latents of the autoencoder run `reference`."""

    data_kinds = ("image",)
    parent_key = "method.autoencoder"

    def __init__(self, inner: Method, reference: str, autoencoder_model: dict | None = None):
        self.inner = inner
        self.name = inner.name
        self.parent_reference = reference
        self.autoencoder_model = autoencoder_model  # settings that override the checkpoint's

    def latent_data(self, autoencoder: nn.Module, data: DataSpec) -> DataSpec:
        return DataSpec("image", tuple(autoencoder.latent_shape), num_classes=data.num_classes)

    def build_model(self, model_config: ModelConfig, data: DataSpec, parent: Parent | None = None) -> nn.Module:
        """The autoencoder as `parent`'s checkpoint records it (with method.autoencoder_model's
        settings over it) and the inner method's denoiser for its latents. ConfigError (one line)
        when `parent` is not an autoencoder of images like `data`, or its weights do not fit."""
        reference = self.parent_reference
        override = self.autoencoder_model or {}
        if parent is not None and parent.config is None:  # bare weights: the override says what they are
            if "name" not in override:
                raise ConfigError(
                    f"method.autoencoder: {reference!r} is not allowed without method.autoencoder_model: it holds "
                    "bare weights and no config; say which autoencoder they are, e.g. "
                    "{name: mlp_autoencoder, latent_dim: 16, hidden_dim: 512, num_layers: 2}"
                )
            settings = self.autoencoder_settings(override)
        elif parent is None or parent.config.method.name != "autoencoder":
            what = "nothing" if parent is None else f"a {parent.config.method.name!r} run"
            raise ConfigError(
                f"method.autoencoder: {reference!r} is not allowed: it is {what}, not an autoencoder "
                "(method.name 'autoencoder')"
            )
        elif tuple(parent.data.shape) != tuple(data.shape):
            raise ConfigError(
                f"method.autoencoder: {reference!r} is not allowed: it encodes {tuple(parent.data.shape)} images "
                f"({parent.config.data.dataset}), and this run trains on {tuple(data.shape)} ({data.kind})"
            )
        else:
            settings = self.autoencoder_settings(parent.config.model.model_dump() | override)
        autoencoder = build_autoencoder(settings, data.shape)
        if parent.weights is not None:
            try:  # assign: also on the meta device (the trainer's memory check)
                autoencoder.load_state_dict(parent.weights, assign=True)
                autoencoder.float()  # weights saved in half precision from elsewhere
            except RuntimeError as exc:
                problem = " ".join(str(exc).split())
                raise ConfigError(
                    f"method.autoencoder: {reference!r} is not allowed: its weights do not fit a "
                    f"{settings.name} with these settings{' (method.autoencoder_model)' if override else ''}: "
                    f"{problem[:200]}"
                ) from None
        denoiser = self.inner.build_model(model_config, self.latent_data(autoencoder, data))
        return LatentModel(denoiser, autoencoder)

    def autoencoder_settings(self, settings: dict) -> ModelConfig:
        """The autoencoder's model section: its checkpoint's with method.autoencoder_model over it."""
        try:
            return ModelConfig.model_validate(settings)
        except ValidationError as exc:
            raise ConfigError(
                f"method.autoencoder_model: {self.autoencoder_model} is not allowed with the autoencoder of "
                f"{self.parent_reference!r}: {describe_error(exc.errors()[0], ModelConfig)}"
            ) from None

    @torch.no_grad()
    def initialize(self, model: nn.Module, examples: dict[str, Tensor]) -> None:
        latents = model.autoencoder.encode(examples["images"]).float()
        std = latents.std() if latents.numel() > 1 else torch.tensor(float("nan"))
        if not torch.isfinite(std) or std == 0:
            raise ConfigError(
                f"method.autoencoder: {self.parent_reference!r} is not allowed: the latents of the first "
                f"{len(latents)} training examples have standard deviation {std.item():g}, which cannot scale "
                "them (train on more examples, or check the autoencoder)"
            )
        model.latent_std.fill_(std)

    def training_batch(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return batch | {"images": model.encode(batch["images"])}

    def loss(self, model: nn.Module, batch: dict[str, Tensor], shard: slice | None = None) -> Tensor:
        return self.inner.loss(model, batch, shard)

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
        latents = self.inner.sample(
            model, num_samples, self.latent_data(model.autoencoder, data), sample, generator, device, progress, stats
        )
        return torch.cat([model.decode(chunk) for chunk in latents.split(sample.batch_size)])

    def class_labels(self, num_samples: int, data: DataSpec, sample: SampleConfig) -> Tensor | None:
        return self.inner.class_labels(num_samples, data, sample)

    def training_metrics(self, model: nn.Module) -> dict[str, float]:
        return {"latent_std": model.latent_std.item()}

    def sample_name(self, sample: SampleConfig) -> str:
        return f"latent-{self.inner.sample_name(sample)}"

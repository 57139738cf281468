"""An autoencoder of images: the encoder's latents are what a latent diffusion run
(method.autoencoder) models, and the decoder turns its samples back into images.

Loss: the reconstruction of images x in [-1, 1] as targets (x + 1) / 2 in [0, 1] by the decoder's
sigmoid output: binary cross-entropy on its logits (`reconstruction_loss: bce`, the usual choice
for MNIST's nearly binary pixels) or squared error (`mse`), averaged over pixels.

It draws no new images: a training run shows reconstructions (originals and their
reconstructions in alternate rows) and pictures the latent space (`encode`).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.config import ModelConfig, RunConfig, SampleConfig
from diffusion.data.spec import DataSpec
from diffusion.methods.base import Method, register
from diffusion.nets import build_autoencoder


@register
class Autoencoder(Method):
    """`model(images)` gives the decoder's logits; `model.encode(images)` the latents and
    `model.decode(latents)` images in [0, 1] (an autoencoder from diffusion/nets)."""

    name = "autoencoder"
    data_kinds = ("image",)
    learns_latents = True

    def __init__(self, reconstruction_loss: str = "bce"):
        self.reconstruction_loss = reconstruction_loss

    @classmethod
    def from_config(cls, config: RunConfig) -> "Autoencoder":
        return cls(config.method.reconstruction_loss)

    def build_model(self, model_config: ModelConfig, data: DataSpec, parent=None) -> nn.Module:
        return build_autoencoder(model_config, data.shape)

    def loss(self, model: nn.Module, batch: dict[str, Tensor], shard: slice | None = None) -> Tensor:
        images = batch["images"] if shard is None else batch["images"][shard]
        target = (images.float() + 1) / 2
        logits = model(images).float()
        if self.reconstruction_loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.mse_loss(torch.sigmoid(logits), target)

    def sample(self, model, num_samples, data, sample, generator, device="cpu", progress=None, stats=None) -> Tensor:
        # Validation refuses sample and eval tasks of an autoencoder (config.sampling_conflicts).
        raise NotImplementedError("an autoencoder draws no new images; it reconstructs (preview) and encodes")

    @torch.no_grad()
    def preview(
        self,
        model: nn.Module,
        num_samples: int,
        data: DataSpec,
        sample: SampleConfig,
        generator: torch.Generator | None,
        device: torch.device | str,
        examples: dict[str, Tensor],
    ) -> Tensor:
        """A square grid of images in [-1, 1]: rows of originals, each followed by a row of their
        reconstructions; an even side of at most sqrt(num_samples) (at least 2), so that
        write_samples' square grid keeps the pairs of rows."""
        side = max(2, math.isqrt(num_samples) // 2 * 2)
        while side > 2 and side * side // 2 > len(examples["images"]):
            side -= 2
        originals = examples["images"][: side * side // 2].to(device)
        reconstructions = model.decode(model.encode(originals)) * 2 - 1
        rows = []
        for start in range(0, len(originals), side):
            rows += [originals[start : start + side], reconstructions[start : start + side]]
        return torch.cat(rows).float()

    @torch.no_grad()
    def encode(self, model: nn.Module, images: Tensor) -> Tensor:
        """(N, D) the latents of images (N, C, H, W), flattened."""
        return model.encode(images).flatten(1).float()

    def sample_name(self, sample: SampleConfig) -> str:
        return "reconstructions"

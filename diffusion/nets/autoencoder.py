"""Autoencoders: images (B, C, H, W) in [-1, 1] to latents and back to images in [0, 1].

`encode(images)` gives the latents, `decode(latents)` the images (a sigmoid output), and
`forward(images)` the decoder's logits, so that a reconstruction loss can be taken on logits
(binary cross-entropy) or on the sigmoid (squared error) without saturating.

- MLPAutoencoder: flatten, `num_layers` hidden layers of `hidden_dim` each side, latents
  (B, latent_dim).
- ConvAutoencoder: a stride-2 convolution per entry of `channel_mults` (28 -> 14 -> 7 for two),
  latents (B, latent_channels, H / 2^L, W / 2^L): images, for a UNet to denoise.
"""

import math

import torch
from torch import Tensor, nn


class MLPAutoencoder(nn.Module):
    def __init__(self, image_shape: tuple[int, ...], latent_dim: int = 16, hidden_dim: int = 512, num_layers: int = 2):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.latent_shape = (latent_dim,)
        pixels = math.prod(image_shape)

        def stack(sizes: list[int]) -> list[nn.Module]:
            layers = []
            for size_in, size_out in zip(sizes[:-1], sizes[1:]):
                layers += [nn.Linear(size_in, size_out), nn.SiLU()]
            return layers[:-1]  # no activation on the latents or the logits

        hidden = [hidden_dim] * num_layers
        self.encoder = nn.Sequential(nn.Flatten(), *stack([pixels, *hidden, latent_dim]))
        self.decoder = nn.Sequential(*stack([latent_dim, *hidden, pixels]), nn.Unflatten(1, self.image_shape))

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def decode(self, latents: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(latents))

    def forward(self, images: Tensor) -> Tensor:
        return self.decoder(self.encoder(images))


class ConvAutoencoder(nn.Module):
    def __init__(
        self,
        image_shape: tuple[int, ...],
        latent_channels: int = 4,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2),
        norm_groups: int = 8,
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        channels, height, width = image_shape
        sizes = [(height, width)]
        for _ in channel_mults:
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
        self.latent_shape = (latent_channels, *sizes[-1])
        widths = [base_channels * mult for mult in channel_mults]

        def conv_block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(norm_groups, cout), nn.SiLU()]

        encoder = conv_block(channels, base_channels)
        for cin, cout in zip([base_channels, *widths[:-1]], widths):
            encoder += conv_block(cin, cout, stride=2) + conv_block(cout, cout)
        self.encoder = nn.Sequential(*encoder, nn.Conv2d(widths[-1], latent_channels, 1))

        decoder = conv_block(latent_channels, widths[-1])
        # Up to the encoder's own sizes, so that odd sizes (7 -> 4 -> 7) come back exactly.
        for cin, cout, size in zip(widths[::-1], [*widths[::-1][1:], base_channels], sizes[-2::-1]):
            decoder += [nn.Upsample(size=size, mode="nearest"), *conv_block(cin, cout), *conv_block(cout, cout)]
        self.decoder = nn.Sequential(*decoder, nn.Conv2d(base_channels, channels, 3, padding=1))

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def decode(self, latents: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(latents))

    def forward(self, images: Tensor) -> Tensor:
        return self.decoder(self.encoder(images))

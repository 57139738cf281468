"""Networks. They know nothing about diffusion: a net maps (x, t, class_labels) to an output."""

from torch import nn

from diffusion.config import ModelConfig


def build_net(config: ModelConfig, in_channels: int, num_classes: int | None) -> nn.Module:
    from diffusion.nets.unet import UNet

    # The config's remaining fields are the UNet's own arguments, by the same names.
    return UNet(
        in_channels=in_channels,
        num_classes=num_classes if config.class_conditional else None,
        **config.model_dump(exclude={"name", "class_conditional"}),
    )

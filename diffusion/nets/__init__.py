"""Networks. They know nothing about diffusion: a net maps (x, t, class_labels) to an output."""

from torch import nn

from diffusion.config import ModelConfig


def build_net(config: ModelConfig, in_channels: int, num_classes: int | None) -> nn.Module:
    from diffusion.nets.unet import UNet

    return UNet(
        in_channels=in_channels,
        base_channels=config.base_channels,
        channel_mults=config.channel_mults,
        num_res_blocks=config.num_res_blocks,
        attention=config.attention,
        attention_heads=config.attention_heads,
        norm_groups=config.norm_groups,
        dropout=config.dropout,
        num_classes=num_classes if config.class_conditional else None,
    )

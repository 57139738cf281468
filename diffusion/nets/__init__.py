"""Networks. They know nothing about diffusion: a net maps (x, t, class_labels) to an output."""

from torch import nn

from diffusion.config import ModelConfig
from diffusion.nets.unet import UNet

# The config's fields that are the UNet's own arguments, by the same names (the rest are the transformer's).
UNET_FIELDS = {
    "base_channels",
    "channel_mults",
    "num_res_blocks",
    "attention",
    "attention_heads",
    "dropout",
    "norm_groups",
    "attention_resolutions",
}


def transformer_options(config: ModelConfig) -> dict:
    """The config's Transformer arguments, by the same names, for every text method's build_model."""
    return {name: getattr(config, name) for name in ("n_layer", "n_head", "n_embd", "dropout", "positions")}


def build_unet(config: ModelConfig, in_channels: int, num_classes: int | None, image_size: int) -> nn.Module:
    """The UNet the model config describes, for `image_size` images of `in_channels` channels;
    conditioned on `num_classes` classes when the config asks for it."""
    return UNet(
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes if config.class_conditional else None,
        **config.model_dump(include=UNET_FIELDS),
    )

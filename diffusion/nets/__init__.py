"""Networks. They know nothing about diffusion: a denoiser maps (x, t, class_labels) to an output of
x's shape, an autoencoder images to latents and back."""

from torch import nn

from diffusion.config import ConfigError, ModelConfig, attention_conflicts, patch_conflicts
from diffusion.nets.autoencoder import ConvAutoencoder, MLPAutoencoder
from diffusion.nets.dit import DIT_SIZES, DiT
from diffusion.nets.mlp import FiLMMLP
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


def build_unet(
    config: ModelConfig, in_channels: int, num_classes: int | None, image_size: int, two_times: bool = False
) -> nn.Module:
    """The UNet the model config describes, for `image_size` images of `in_channels` channels;
    conditioned on `num_classes` classes when the config asks for it."""
    return UNet(
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes if config.class_conditional else None,
        two_times=two_times,
        **config.model_dump(include=UNET_FIELDS),
    )


def build_denoiser(
    config: ModelConfig, shape: tuple[int, ...], num_classes: int | None, two_times: bool = False
) -> nn.Module:
    """The net of a Gaussian-noise method (a denoiser, a velocity field) for examples of `shape`:
    the UNet or the DiT for (C, H, W), the FiLM MLP for vectors (D,) (2-D points, latents);
    conditioned on `num_classes` classes when the config asks for it, and on a second time with
    `two_times` (MeanFlow). ConfigError when the net cannot take that shape (a UNet for an MLP
    autoencoder's vectors: the latents' shape is known only once the autoencoder is read)."""
    classes = num_classes if config.class_conditional else None
    if config.name == "mlp":
        if len(shape) != 1:
            raise ConfigError(
                f"model.name: 'mlp' is not allowed for latents of shape {tuple(shape)}: the FiLM MLP takes "
                "vectors (an mlp_autoencoder's); use unet or dit for a conv_autoencoder's latent grid"
            )
        return FiLMMLP(
            shape[0],
            hidden_dim=config.hidden_dim,
            num_layers=config.num_layers,
            time_embedding_dim=config.time_embedding_dim,
            fourier_features=config.fourier_features,
            fourier_scale=config.fourier_scale,
            num_classes=classes,
            dropout=config.dropout,
            two_times=two_times,
        )
    if len(shape) != 3:
        raise ConfigError(
            f"model.name: {config.name!r} is not allowed for latents of shape {tuple(shape)}: it takes "
            "images (C, H, W); use mlp for an mlp_autoencoder's latent vectors"
        )
    conflicts = patch_conflicts if config.name == "dit" else attention_conflicts
    problem = next(conflicts(config, shape[-1]), None)
    if problem:
        raise ConfigError(f"{problem} (the autoencoder's latents are {'x'.join(map(str, shape))})")
    if config.name == "dit":
        return DiT(
            in_channels=shape[0],
            image_size=shape[-1],
            patch_size=config.patch_size,
            num_classes=classes,
            two_times=two_times,
            dropout=config.dropout,
            **DIT_SIZES[config.dit_size],
        )
    return build_unet(config, in_channels=shape[0], num_classes=num_classes, image_size=shape[-1], two_times=two_times)


def build_autoencoder(config: ModelConfig, image_shape: tuple[int, ...]) -> nn.Module:
    """The autoencoder the model config describes (model.name mlp_autoencoder or conv_autoencoder),
    for images of `image_shape` (C, H, W)."""
    if config.name == "mlp_autoencoder":
        return MLPAutoencoder(
            image_shape, latent_dim=config.latent_dim, hidden_dim=config.hidden_dim, num_layers=config.num_layers
        )
    return ConvAutoencoder(
        image_shape,
        latent_channels=config.latent_channels,
        base_channels=config.base_channels,
        channel_mults=tuple(config.channel_mults),
        norm_groups=config.norm_groups,
    )

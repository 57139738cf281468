"""The methods, each one file implementing `diffusion.methods.base.Method` and registered under
its config name. Importing this package registers them all."""

from diffusion.config import MethodConfig, RunConfig
from diffusion.methods import (  # noqa: F401 (registers them)
    autoencoder,
    autoregressive,
    ddpm,
    embedding,
    flow_matching,
    masked,
    meanflow,
)
from diffusion.methods.base import METHODS, Method, Parent, Progress, no_progress, register
from diffusion.methods.latent import Latent


def build_method(config: RunConfig | MethodConfig) -> Method:
    """The method a run config names; with method.autoencoder, the same in that autoencoder's
    latent space. A MethodConfig alone builds it with the model defaults."""
    if isinstance(config, MethodConfig):
        config = RunConfig(method=config)
    method = METHODS[config.method.name].from_config(config)
    if config.method.autoencoder is not None:
        method = Latent(method, config.method.autoencoder, config.method.autoencoder_model)
    return method


__all__ = ["METHODS", "Method", "Parent", "Progress", "build_method", "no_progress", "register"]

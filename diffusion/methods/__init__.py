"""Methods: small objects with `loss(model, batch)` and `sample(model, n, ...)`."""

from diffusion.config import MethodConfig


def build_method(config: MethodConfig):
    from diffusion.methods.ddpm import DDPM

    # The config's remaining fields are the method's own arguments, by the same names.
    return DDPM(**config.model_dump(exclude={"name"}))

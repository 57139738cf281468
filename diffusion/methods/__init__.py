"""Methods: small objects with `loss(model, batch)` and `sample(model, n, ...)`."""

from diffusion.config import MethodConfig


def build_method(config: MethodConfig):
    from diffusion.methods.ddpm import DDPM

    return DDPM(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.prediction_type,
        clip_sample=config.clip_sample,
    )

"""Methods: small objects with `loss(model, batch)` and `sample(model, n, ...)`."""

from diffusion.config import MethodConfig

# The config's fields that each method takes, as arguments of the same names.
DDPM_FIELDS = {"num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "clip_sample"}
EMBEDDING_FIELDS = {"num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "embedding_dim",
                    "rounding_weight", "init_embeddings", "prefix_fraction"}


def build_method(config: MethodConfig):
    if config.name == "autoregressive":
        from diffusion.methods.autoregressive import Autoregressive

        return Autoregressive()
    if config.name == "masked":
        from diffusion.methods.masked import MaskedDiffusion

        return MaskedDiffusion()
    if config.name == "embedding":
        from diffusion.methods.embedding import EmbeddingDiffusion

        return EmbeddingDiffusion(**config.model_dump(include=EMBEDDING_FIELDS))
    from diffusion.methods.ddpm import DDPM

    return DDPM(**config.model_dump(include=DDPM_FIELDS))

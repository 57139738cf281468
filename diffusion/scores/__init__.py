"""Scores of trained models and their samples: images (FID on offline LeNet features, confident
share, class entropy: images.py), text (held-out bits per character and an autoregressive run's
perplexity: likelihood.py; repetition and collapse: text.py)."""

from diffusion.methods import Method
from diffusion.scores.likelihood import evaluate_text, validation_bits_per_char


def sample_scores(
    method: Method, model, validation, samples: dict, device, seed: int, num_blocks: int, scorer=None
) -> dict | None:
    """Scores of freshly written samples (`write_samples`' record) that need no reference images:
    held-out bits per character and the samples' health for text, whose data has a validation
    split; None for images, which `eval` scores against real ones."""
    if validation is None:
        return None
    return evaluate_text(
        method, model, validation, samples["texts"], device, seed=seed, num_blocks=num_blocks, scorer=scorer
    )


__all__ = ["sample_scores", "validation_bits_per_char"]

"""Scores of trained models and their samples: images (FID on offline LeNet features, confident
share, class entropy: images.py), text (held-out bits per character and an autoregressive run's
perplexity: likelihood.py; repetition and collapse: text.py), 2-D points (the energy distance to
held-out points, beside its real-vs-real floor: points.py)."""

from diffusion.data import PointDataset
from diffusion.methods import Method
from diffusion.scores.likelihood import evaluate_text, validation_bits_per_char
from diffusion.scores.points import energy_distance, point_scores


def sample_scores(
    method: Method, model, validation, samples: dict, device, seed: int, num_blocks: int, scorer=None
) -> dict | None:
    """Scores of freshly written samples (`write_samples`' record) that need no reference images:
    held-out bits per character and the samples' health for text, whose data has a validation
    split; for points, `point_scores` of the sampled values (`samples["values"]`, (N, 2)) against the
    held-out PointDataset; None for images, which `eval` scores against real ones."""
    if validation is None:
        return None
    if isinstance(validation, PointDataset):
        return point_scores(samples["values"], validation.points)
    return evaluate_text(
        method, model, validation, samples["texts"], device, seed=seed, num_blocks=num_blocks, scorer=scorer
    )


__all__ = ["energy_distance", "point_scores", "sample_scores", "validation_bits_per_char"]

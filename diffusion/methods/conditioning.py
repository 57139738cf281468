"""Class conditioning shared by the methods of Gaussian noise (DDPM, flow matching, MeanFlow).

Classifier-free guidance (Ho & Salimans 2022): a class-conditional network is trained with a
`label_dropout` share of its labels replaced by the null class (index num_classes), so that it is
also the unconditional model; sampling mixes the two, out_uncond + w (out_cond - out_uncond), in
one batched pass. w = 1 is the conditional model alone, w = 0 the unconditional one. The output
mixed is whatever the net predicts (noise, a velocity, an average velocity).
"""

import math

import torch
from torch import Tensor

from diffusion.config import SampleConfig


def drop_labels(class_labels: Tensor | None, label_dropout: float, null_class: int | None) -> Tensor | None:
    """`class_labels` (B,) with a `label_dropout` share replaced by `null_class`, drawn from the
    global RNG for the whole batch (so that data-parallel ranks draw alike); None stays None."""
    if class_labels is None or label_dropout == 0:
        return class_labels
    dropped = torch.rand(class_labels.shape[0], device=class_labels.device) < label_dropout
    return torch.where(dropped, null_class, class_labels)


def asked_labels(num_samples: int, num_classes: int | None, sample: SampleConfig) -> Tensor | None:
    """(num_samples,) the classes a sampler asks of a class-conditional model: `sample.class_label`
    for every sample, else the classes in blocks (0, 0, ..., 1, 1, ...): a class per row of a
    grid, and as many of each as can be. None for an unconditional model (num_classes None) and at
    guidance scale 0, which samples the unconditional model (no class is asked for)."""
    if num_classes is None or sample.guidance_scale == 0:
        return None
    if sample.class_label is not None:
        return torch.full((num_samples,), sample.class_label)
    return torch.arange(num_samples) // math.ceil(num_samples / num_classes)


def guided_output(
    model, x: Tensor, t: Tensor, class_labels: Tensor | None, guidance_scale: float, null_class: int | None, **times
) -> Tensor:
    """The model's output at (x, t, **times) guided with `guidance_scale` from one forward pass over
    the batch twice (with the labels, then with the null class). w = 1 and w = 0 take one pass of
    half the size: the conditional and the unconditional model."""
    if class_labels is None or guidance_scale == 1:
        return model(x, t, class_labels=class_labels, **times)
    null = torch.full_like(class_labels, null_class)
    if guidance_scale == 0:
        return model(x, t, class_labels=null, **times)
    doubled = {name: torch.cat([value, value]) for name, value in times.items()}
    both = model(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([class_labels, null]), **doubled)
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)

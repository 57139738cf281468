"""Guided generation: a diffusion language model and an autoregressive one, decoding together.

Left to right, the next token's logits are alpha * log_softmax(diffusion) + (1 - alpha) *
log_softmax(autoregressive): a log-linear product of experts, p ∝ p_diff^alpha * p_ar^(1 - alpha).
Log-probabilities rather than raw logits so that each expert's weight does not depend on its
logits' arbitrary offset and scale; a token either expert rules out stays ruled out.
alpha = 0 is the autoregressive model alone (the diffusion model is not called), alpha = 1 the
diffusion model alone (the autoregressive one is not called).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.methods.autoregressive import sample_from_logits
from diffusion.methods.base import Method, Progress, no_progress


@torch.no_grad()
def guided_sample(
    ar_method: Method,
    ar_model,
    diffusion_method: Method,
    diffusion_model,
    num_samples: int,
    length: int,
    alpha: float,
    generator: torch.Generator | None,
    device="cpu",
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    progress: Progress = no_progress,
) -> Tensor:
    """(num_samples, length) tokens, each from the two methods' `next_token_logits` mixed."""
    tokens = torch.empty((num_samples, 0), dtype=torch.long, device=device)
    for _ in progress(range(length), "guided sampling"):
        if alpha == 0:
            # One expert at weight 1 is that expert: its own logits, so that this is exactly its decoding.
            logits = ar_method.next_token_logits(ar_model, tokens, length, generator)
        elif alpha == 1:
            logits = diffusion_method.next_token_logits(diffusion_model, tokens, length, generator)
        else:
            diffusion_logits = diffusion_method.next_token_logits(diffusion_model, tokens, length, generator)
            ar_logits = ar_method.next_token_logits(ar_model, tokens, length, generator)
            logits = alpha * F.log_softmax(diffusion_logits.float(), dim=-1) + (1 - alpha) * F.log_softmax(
                ar_logits.float(), dim=-1
            )
        next_token = sample_from_logits(logits, generator, temperature, top_k, greedy)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return tokens

"""How well a text model predicts held-out text, and how an autoregressive run rates its samples.

- validation bits per character: the exact NLL for the autoregressive model, and for the two
  diffusion models their variational bound (masked: the continuous-time ELBO; embedding: prior +
  diffusion terms + the rounding decoder), so all three compare directly and a bound can only
  flatter the AR model;
- the samples' perplexity per character under an autoregressive scorer (`eval.scorer_checkpoint`);
- with the string scores of diffusion/scores/text.py and the collapse detector's verdict.
"""

import math

import torch

from diffusion.data.shakespeare import tokenizer_from_json
from diffusion.methods import Method
from diffusion.scores.text import collapse, text_scores


@torch.no_grad()
def validation_bits_per_char(method: Method, model, validation, device, num_blocks: int, seed: int) -> float:
    """Bits per token on the first `num_blocks` validation blocks, over characters per token."""
    generator = torch.Generator().manual_seed(seed)
    tokens = validation.blocks[:num_blocks].to(device)
    model.eval()
    return method.bits_per_token(model, tokens, generator) / validation.chars_per_token


@torch.no_grad()
def scorer_perplexity(scorer, texts: list[str], device) -> float:
    """Perplexity per character of the samples under an autoregressive run (a TrainedModel)."""
    tokenizer = tokenizer_from_json(scorer.data.tokenizer)
    block = scorer.data.block_size
    encoded = [tokenizer.encode(text)[:block] for text in texts]
    length = min(len(ids) for ids in encoded)
    if length < 2:
        return math.inf  # empty samples: as bad as it gets
    tokens = torch.tensor([ids[:length] for ids in encoded], device=device)
    characters = sum(len(tokenizer.decode(ids[:length])) for ids in encoded)
    bits_per_token = scorer.method.bits_per_token(scorer.model, tokens, torch.Generator().manual_seed(0))
    return 2 ** (bits_per_token * tokens.numel() / characters)


def evaluate_text(
    method: Method, model, validation, texts: list[str], device, seed: int = 0, num_blocks: int = 64, scorer=None
) -> dict:
    """The scores of a text model and its samples; `collapsed` lists what looks degenerate."""
    scores = {"val_bits_per_char": validation_bits_per_char(method, model, validation, device, num_blocks, seed)}
    scores |= text_scores(texts)
    if scorer is not None:
        scores["ar_perplexity"] = scorer_perplexity(scorer, texts, device)
    scores["collapsed"] = collapse(scores)
    return scores

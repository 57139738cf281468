"""Autoregressive language modelling: a causal Transformer trained on next-token cross-entropy.

A beginning-of-sequence token (id V, input only) starts every window: the model predicts all L
tokens of a training example, the first one included, from [BOS, x_0 .. x_{L-2}]. So
`bits_per_token` covers the same L tokens as the diffusion methods' bounds, and there are logits
for the first position of a sample (guided generation needs them).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.config import ModelConfig, SampleConfig
from diffusion.data.spec import DataSpec
from diffusion.methods.base import Method, Progress, no_progress, register, text_sample_name
from diffusion.nets import transformer_options
from diffusion.nets.transformer import Transformer


def sample_from_logits(
    logits: Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
) -> Tensor:
    """Token ids (...) from logits (..., V): the argmax, or a draw from softmax(logits / temperature)
    restricted to the top_k likeliest. The draw inverts the CDF at uniforms taken on the CPU from
    `generator`, so a seed gives the same tokens on every device (up to float rounding)."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    # 1 - U is in (0, 1], so a token of probability zero is never picked.
    u = 1 - torch.rand(logits.shape[:-1], generator=generator, dtype=cdf.dtype).to(cdf.device)
    tokens = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
    return tokens.clamp(max=logits.shape[-1] - 1)


@register
class Autoregressive(Method):
    name = "autoregressive"
    data_kinds = ("text",)
    exact_likelihood = True

    def build_model(self, model_config: ModelConfig, data: DataSpec, parent=None) -> nn.Module:
        return Transformer(
            vocab_size=data.vocab_size + 1,  # + BOS
            out_dim=data.vocab_size,
            block_size=data.block_size,
            **transformer_options(model_config),
            causal=True,
        )

    @staticmethod
    def with_bos(tokens: Tensor, vocab_size: int) -> Tensor:
        """[BOS, tokens...]: the model's input for predicting every token of `tokens`."""
        bos = torch.full((tokens.shape[0], 1), vocab_size, dtype=tokens.dtype, device=tokens.device)
        return torch.cat([bos, tokens], dim=1)

    def token_losses(self, model, tokens: Tensor) -> Tensor:
        """(B, L) cross-entropies in nats, position i predicted from BOS and tokens before i."""
        logits = model(self.with_bos(tokens[:, :-1], self.vocab_size_of(model)))
        return F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")

    @staticmethod
    def vocab_size_of(model) -> int:
        # The output size, read from the net (through a DDP wrapper) so that the method needs no state.
        return getattr(model, "module", model).head.out_features

    def loss(self, model, batch: dict, shard: slice | None = None) -> Tensor:
        tokens = batch["tokens"]
        if shard is not None:
            tokens = tokens[shard]
        return self.token_losses(model, tokens).mean()

    @torch.no_grad()
    def bits_per_token(self, model, tokens: Tensor, generator: torch.Generator | None = None) -> float:
        """The exact negative log-likelihood, in bits per token (no randomness: `generator` is unused)."""
        return self.token_losses(model, tokens).mean().item() / math.log(2)

    @torch.no_grad()
    def next_token_logits(self, model, prefix: Tensor, length: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, V) logits for the token after `prefix` (B, P). The window is BOS and the last
        block_size - 1 tokens, just as in training (position 0 always holds BOS)."""
        context = prefix[:, prefix.shape[1] - min(prefix.shape[1], model.block_size - 1) :]
        return model(self.with_bos(context, self.vocab_size_of(model)))[:, -1].float()

    def sample(
        self,
        model: nn.Module,
        num_samples: int,
        data: DataSpec,
        sample: SampleConfig,
        generator: torch.Generator | None,
        device: torch.device | str = "cpu",
        progress: Progress = no_progress,
        stats: dict | None = None,
    ) -> Tensor:
        return self.generate(
            model,
            num_samples,
            sample.length or data.block_size,
            generator,
            device,
            progress,
            temperature=sample.temperature,
            top_k=sample.top_k,
        )

    def sample_name(self, sample: SampleConfig) -> str:
        return text_sample_name(sample, steps=False)

    @torch.no_grad()
    def generate(
        self,
        model,
        num_samples: int,
        length: int,
        generator: torch.Generator | None,
        device="cpu",
        progress: Progress = no_progress,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
    ) -> Tensor:
        """(num_samples, length) tokens, left to right."""
        tokens = torch.empty((num_samples, 0), dtype=torch.long, device=device)
        for _ in progress(range(length), "autoregressive sampling"):
            logits = self.next_token_logits(model, tokens, length, generator)
            next_token = sample_from_logits(logits, generator, temperature, top_k, greedy)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        return tokens

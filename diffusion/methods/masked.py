"""Masked (absorbing-state) diffusion: MDLM (Sahoo et al. 2024).

Forward process: every token independently turns into the mask token (id V, an input-only id) with
probability 1 - alpha_t, where alpha_t = 1 - t (the log-linear schedule) and t runs over (0, 1].

SUBS parameterisation: the model sees the partly masked sequence and gives logits over the V real
tokens only, so it can never predict the mask; unmasked tokens are carried over unchanged, so only
masked positions cost anything. No time conditioning: the number of masks tells the model the noise
level, and MDLM shows that it does not need t.

Loss: the continuous-time NELBO, E_t[-alpha'_t / (1 - alpha_t) * sum over masked positions of
-log p(x_i | z_t)], with weight 1/t for this schedule. For a model that does not see t, like ours,
t can be integrated out exactly: given that k of the L tokens are masked, t's density is
proportional to t^(k-1) (1-t)^(L-k), and integrating the 1/t weight against it gives 1/k. So the
NELBO per token is E over k ~ U{1..L}, and a uniformly random k-subset of masked positions, of the
mean cross-entropy over the masked positions. The identity holds for any schedule alpha_t.

Both the training loss and bits_per_token use that form, k stratified over the batch (MDLM's
low-discrepancy sampler, on k instead of t). Same expectation as sampling t, far lower variance:
a weight of at most 1 per token instead of 1/t, which near t = 0 puts weight 1000 on a single
token and made the early training steps noisy.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.config import ModelConfig, SampleConfig
from diffusion.data.spec import DataSpec
from diffusion.methods.autoregressive import sample_from_logits
from diffusion.methods.base import Method, Progress, no_progress, register, text_sample_name
from diffusion.nets import transformer_options
from diffusion.nets.transformer import Transformer


def vocab_size_of(model) -> int:
    # The number of real tokens, read from the net (through a DDP wrapper): the mask id is this.
    return getattr(model, "module", model).head.out_features


@register
class MaskedDiffusion(Method):
    name = "masked"
    data_kinds = ("text",)

    def build_model(self, model_config: ModelConfig, data: DataSpec, parent=None) -> nn.Module:
        return Transformer(
            vocab_size=data.vocab_size + 1,  # + the mask token
            out_dim=data.vocab_size,  # never the mask
            block_size=data.block_size,
            **transformer_options(model_config),
            causal=False,
        )

    @staticmethod
    def stratified_num_masked(strata: Tensor, L: int) -> Tensor:
        """Numbers of masks k in 1..L, uniform over them, from strata in [0, 1)."""
        return (1 + (strata * L).long()).clamp(max=L)

    @staticmethod
    def random_masks(num_masked: Tensor, L: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, L) booleans: a uniformly random num_masked[b]-subset of the L positions in each row,
        the positions of the smallest uniforms."""
        uniforms = torch.rand((len(num_masked), L), generator=generator).to(num_masked.device)
        return uniforms.argsort(dim=1).argsort(dim=1) < num_masked[:, None]

    def nelbo_per_token(self, model, tokens: Tensor, masked: Tensor) -> Tensor:
        """(B,) the mean cross-entropy over each sequence's masked positions, in nats."""
        logits = model(torch.where(masked, vocab_size_of(model), tokens))
        ce = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")
        return (ce * masked).sum(dim=1) / masked.sum(dim=1)

    def loss(self, model, batch: dict, shard: slice | None = None) -> Tensor:
        """The NELBO per token, averaged over the batch or over `shard` of it. The numbers of masks
        and the masks are drawn for the whole batch from the global RNG either way, as in DDPM.loss."""
        tokens = batch["tokens"]
        B, L = tokens.shape
        offset = torch.rand(())
        num_masked = self.stratified_num_masked((offset + torch.arange(B)) / B, L).to(tokens.device)
        masked = self.random_masks(num_masked, L)
        if shard is not None:
            tokens, masked = tokens[shard], masked[shard]
        return self.nelbo_per_token(model, tokens, masked).mean()

    @torch.no_grad()
    def bits_per_token(self, model, tokens: Tensor, generator: torch.Generator | None, num_draws: int = 16) -> float:
        """The NELBO in bits per token (see the module docstring), from `num_draws` masks per
        sequence, the numbers of masks k stratified over all of them."""
        B, L = tokens.shape
        n = B * num_draws
        strata = (torch.randperm(n, generator=generator) + torch.rand(n, generator=generator, dtype=torch.float64)) / n
        num_masked = self.stratified_num_masked(strata, L).view(num_draws, B).to(tokens.device)
        total = 0.0
        for k in num_masked:
            total += self.nelbo_per_token(model, tokens, self.random_masks(k, L, generator)).sum().item()
        return total / n / math.log(2)

    @torch.no_grad()
    def next_token_logits(self, model, prefix: Tensor, length: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, V) logits at position P = prefix.shape[1], with the prefix given and masks after it up
        to `length`, inside a block_size window that ends as late as it can while starting at or
        before the prefix's last block_size - 1 tokens."""
        B, P = prefix.shape
        start = max(0, P + 1 - model.block_size)
        end = min(length, start + model.block_size)
        masks = torch.full((B, end - P), vocab_size_of(model), dtype=torch.long, device=prefix.device)
        return model(torch.cat([prefix[:, start:], masks], dim=1))[:, P - start].float()

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
            num_inference_steps=sample.num_inference_steps,
            block_length=sample.block_length,
            temperature=sample.temperature,
            top_k=sample.top_k,
        )

    def sample_name(self, sample: SampleConfig) -> str:
        return text_sample_name(sample)

    @torch.no_grad()
    def generate(
        self,
        model,
        num_samples: int,
        length: int,
        generator: torch.Generator | None,
        device="cpu",
        progress: Progress = no_progress,
        num_inference_steps: int = 50,
        block_length: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> Tensor:
        """Ancestral sampling from all-mask. With `block_length`, semi-autoregressively: block by
        block, each conditioned on the last block_size - block_length tokens before it."""
        block_length = block_length or length
        if block_length > model.block_size:
            raise ValueError(
                f"block_length (or length, without one) {block_length} exceeds the model's "
                f"block size {model.block_size}: set sample.block_length"
            )
        tokens = torch.empty((num_samples, 0), dtype=torch.long, device=device)
        while tokens.shape[1] < length:
            n = min(block_length, length - tokens.shape[1])
            context = tokens[:, tokens.shape[1] - min(tokens.shape[1], model.block_size - n) :]
            block = self.sample_block(model, context, n, generator, num_inference_steps, temperature, top_k, progress)
            tokens = torch.cat([tokens, block], dim=1)
        return tokens

    def sample_block(
        self,
        model,
        context: Tensor,
        n: int,
        generator: torch.Generator | None,
        num_inference_steps: int,
        temperature: float,
        top_k: int | None,
        progress: Progress,
    ) -> Tensor:
        """n new tokens after `context` (B, C), from n masks, in num_inference_steps steps."""
        mask_id = vocab_size_of(model)
        masks = torch.full((context.shape[0], n), mask_id, dtype=torch.long, device=context.device)
        x = torch.cat([context, masks], dim=1)
        for i in progress(range(num_inference_steps, 0, -1), "masked sampling"):
            t, s = i / num_inference_steps, (i - 1) / num_inference_steps
            block = x[:, -n:]
            logits = model(x)[:, -n:]
            proposal = sample_from_logits(logits, generator, temperature, top_k)
            # A masked token is revealed between t and s with probability (alpha_s - alpha_t) / (1 - alpha_t)
            # = (t - s) / t: 1 on the last step, so nothing stays masked.
            uniforms = torch.rand(block.shape, generator=generator).to(block.device)
            reveal = (block == mask_id) & (uniforms < (t - s) / t)
            x[:, -n:] = torch.where(reveal, proposal, block)
        return x[:, -n:]

"""Continuous diffusion on token embeddings: Diffusion-LM (Li et al. 2022), with the fixes for the
collapse of the first version (samples of nothing but punctuation, or "from"/"no" repeated).

- Scale anchor: the diffused embeddings are the rows of E L2-normalised to sqrt(embedding_dim),
  a per-dimension RMS of 1 like the noise. Learned unnormalised embeddings shrink, since smaller
  embeddings make the MSE smaller and denoising trivial; normalised ones cannot.
- x0 prediction, and the rounding cross-entropy on the PREDICTED x0: it trains the denoiser to land
  on the right token's embedding, and keeps the embeddings apart (the MSE alone would pull them
  together). On the clean embeddings it only taught the embeddings to be decodable.
- Rounding head tied to E: logits = x0_hat . E^T. With rows of equal norm this is -|x0_hat - E_w|^2 / 2
  up to a constant, i.e. nearest-embedding rounding; it needs no parameters and the sampler's
  clamping step uses the same rule.
- Pretrained embeddings (`init_from`, V x d_pre) enter through a LEARNED projection to
  embedding_dim, not a random one.

Loss: MSE(x0_hat, x0) + rounding_weight * CE(x0_hat . E^T, tokens), timesteps uniform in [0, T).
The schedule is the config's beta_schedule; "sqrt" (Diffusion-LM's) is the one to use.

Continuing a prefix (guided decoding asks for the next token's distribution given the text so
far): a `prefix_fraction` share of the training sequences are given a prefix of uniform length at
timestep 0 and the rest at the drawn timestep, as CDCD trains with conditioning spans; the denoiser
sees one timestep per position. next_token_logits is then one pass, like the masked model's: the
prefix at timestep 0, pure noise after it, and the rounding softmax at the first noisy position,
which the rounding cross-entropy trains to be p(token | prefix). Without it the only way to
condition on a prefix was to inpaint, where the prefix is as noisy as the rest at every step and
the next token is one trajectory's sharp guess: on the 2000-step CPU model that wrote scattered
letters (mean word length 2.3) and left the AR model's logits no say (AR ppl/char 94 at alpha 0.5,
against 9.8 now). The prefix stays in the loss, an honest timestep-0 example. Left out, "timestep
0" came to mean "a given token whose output nobody reads" (given positions outnumber sequences
drawn at timestep 0 by about 2000 to 1): the denoising error at timestep 0 rose 4-fold and the
bound, which weighs low timesteps most, from 7.6 to 13.0 bits/char (7.3 with the prefix kept).

bits_per_token is the variational bound on the tokens' negative log-likelihood: with the chain
tokens -> x_0 = noised E[tokens] (timestep 0) -> ... -> x_{T-1}, the reverse process
p(x_{t-1} | x_t) = N(posterior mean at x0_hat, beta_tilde_t) and the decoder p(w | x_0) = the
rounding softmax at timestep 0, -log p(w) <= KL(q(x_{T-1} | w) || N(0, I))
+ sum_{t >= 1} KL(q(x_{t-1} | x_t, w) || p(x_{t-1} | x_t)) - E log p(w | x_0), where
KL_t = (SNR_{t-1} - SNR_t) / 2 * |E_w - x0_hat|^2. The sum is estimated with t drawn in proportion
to SNR_{t-1} - SNR_t (importance sampling, stratified), so that the estimate is the total weight
times half the mean squared error. Sampling's clamping trick is not part of the bound.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.config import ConfigError, ModelConfig, RunConfig, SampleConfig
from diffusion.data.spec import DataSpec
from diffusion.methods.base import Method, Parent, Progress, no_progress, register, text_sample_name
from diffusion.nets import transformer_options
from diffusion.nets.transformer import Transformer
from diffusion.schedulers import NoiseSchedule, Scheduler, make_scheduler


def unwrap(model) -> nn.Module:
    return getattr(model, "module", model)  # through a DDP wrapper


class EmbeddingDiffusionModel(nn.Module):
    """The token embeddings, the denoiser (a Transformer on vectors) and the tied rounding head."""

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        denoiser: nn.Module,
        init_from: Tensor | None = None,
        normalize: bool = True,
    ):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.block_size = denoiser.block_size
        self.normalize = normalize
        if init_from is None:
            # N(0, 1): rows of norm about sqrt(embedding_dim) from the start, as after normalisation.
            self.embedding = nn.Embedding(vocab_size, embedding_dim)
            self.projection = None
        else:
            self.register_buffer("pretrained", init_from.detach().float().clone())
            self.projection = nn.Linear(init_from.shape[1], embedding_dim, bias=False)
        self.denoiser = denoiser

    def embeddings(self) -> Tensor:
        """(V, embedding_dim): the embeddings that are diffused."""
        weight = self.embedding.weight if self.projection is None else self.projection(self.pretrained)
        if not self.normalize:
            return weight
        return F.normalize(weight, dim=-1) * math.sqrt(self.embedding_dim)

    def denoise(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """x0_hat from x_t (B, L, embedding_dim)."""
        return self.denoiser(x, timesteps)

    @staticmethod
    def round(x: Tensor, embeddings: Tensor) -> Tensor:
        """Rounding logits (B, L, V) of vectors x (B, L, embedding_dim)."""
        return x @ embeddings.t().to(x.dtype)

    def forward(self, tokens: Tensor, timesteps: Tensor, noise: Tensor, add_noise):
        """The training pass, in one call so that DDP sees every parameter used: the clean embeddings
        x0, the prediction x0_hat from x_t = add_noise(x0, noise, timesteps) (the method's forward
        process), and the rounding logits of x0_hat. timesteps are (B,), one per example, or (B, L),
        one per position."""
        embeddings = self.embeddings()
        x0 = embeddings[tokens]
        pred_x0 = self.denoise(add_noise(x0, noise, timesteps), timesteps)
        return x0, pred_x0, self.round(pred_x0, embeddings)


@register
class EmbeddingDiffusion(Method):
    name = "embedding"
    data_kinds = ("text",)

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "sqrt",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        embedding_dim: int = 64,
        rounding_weight: float = 1.0,
        init_embeddings: str | None = None,
        normalize_embeddings: bool = True,
        prefix_fraction: float = 0.25,
    ):
        self.schedule_kwargs = dict(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
        )
        self.schedule = NoiseSchedule(**self.schedule_kwargs)
        self.num_train_timesteps = num_train_timesteps
        self.embedding_dim = embedding_dim
        self.rounding_weight = rounding_weight
        self.normalize_embeddings = normalize_embeddings  # False only to show the collapse it prevents
        self.init_embeddings = init_embeddings
        self.prefix_fraction = prefix_fraction
        # The run whose token embeddings (V, d_pre) start these: the caller loads it.
        self.parent_reference = init_embeddings
        self.parent_key = "method.init_embeddings"

    @classmethod
    def from_config(cls, config: RunConfig) -> "EmbeddingDiffusion":
        fields = {
            "num_train_timesteps",
            "beta_schedule",
            "beta_start",
            "beta_end",
            "embedding_dim",
            "rounding_weight",
            "init_embeddings",
            "prefix_fraction",
        }
        return cls(**config.method.model_dump(include=fields))

    def build_model(self, model_config: ModelConfig, data: DataSpec, parent: Parent | None = None) -> nn.Module:
        """With `parent` (method.init_embeddings), its (V, d_pre) token embeddings enter through a
        learned projection; ConfigError when it has other tokens or no token table."""
        pretrained = None if parent is None else self.token_table(parent, data)
        denoiser = Transformer(
            vocab_size=None,
            in_dim=self.embedding_dim,
            out_dim=self.embedding_dim,
            block_size=data.block_size,
            **transformer_options(model_config),
            time_conditioning=True,
        )
        return EmbeddingDiffusionModel(
            data.vocab_size, self.embedding_dim, denoiser, pretrained, self.normalize_embeddings
        )

    def token_table(self, parent: Parent, data: DataSpec) -> Tensor:
        """(V, d_pre) the parent run's token embeddings: its EMA weights, or zeros of their shape
        when the network will be loaded from a checkpoint that holds them."""
        reference = self.parent_reference
        if parent.config is None or parent.data.tokenizer != data.tokenizer:
            raise ConfigError(
                f"method.init_embeddings: {reference!r} is not allowed: it was trained with another "
                "tokenizer (or is not a text run); give a run with the same data settings"
            )
        if parent.config.method.name not in ("autoregressive", "masked"):
            raise ConfigError(f"method.init_embeddings: {reference!r} is not allowed: it has no token embedding table")
        if parent.weights is None:
            return torch.zeros(data.vocab_size, parent.config.model.n_embd)
        # The token table of an autoregressive or masked run's Transformer; its extra row is the
        # start (AR) or mask (masked) token.
        return parent.weights["wte.weight"][: data.vocab_size]

    def given_prefixes(self, B: int, L: int) -> Tensor:
        """(B, L) booleans, True on the prefix a sequence is given: a prefix_fraction share of the
        sequences get one, of a length uniform in 1..L-1. From the global RNG."""
        if not self.prefix_fraction:
            return torch.zeros((B, L), dtype=torch.bool)
        lengths = torch.randint(1, L, (B,)) * (torch.rand(B) < self.prefix_fraction)
        return torch.arange(L)[None, :] < lengths[:, None]

    def loss_terms(self, model, batch: dict, shard: slice | None = None) -> dict[str, Tensor]:
        """{"mse": ..., "rounding": ...}, means over the batch or over `shard` of it. Timesteps, noise
        and given prefixes are drawn for the whole batch from the global RNG either way, as in DDPM.loss."""
        tokens = batch["tokens"]
        B, L = tokens.shape
        timesteps = torch.randint(0, self.num_train_timesteps, (B,), device=tokens.device)
        noise = torch.randn((B, L, unwrap(model).embedding_dim), device=tokens.device)
        given = self.given_prefixes(B, L).to(tokens.device)
        if shard is not None:
            tokens, timesteps, noise, given = tokens[shard], timesteps[shard], noise[shard], given[shard]
        if self.prefix_fraction:  # from the config, not given.any(): no device sync on every step
            timesteps = torch.where(given, 0, timesteps[:, None])  # one per position
        x0, pred_x0, logits = model(tokens, timesteps, noise, self.schedule.add_noise)
        # In float32 even when the model ran under bf16 autocast.
        return {
            "mse": F.mse_loss(pred_x0.float(), x0.float()),
            "rounding": F.cross_entropy(logits.float().transpose(1, 2), tokens),
        }

    def loss(self, model, batch: dict, shard: slice | None = None) -> Tensor:
        terms = self.loss_terms(model, batch, shard)
        return terms["mse"] + self.rounding_weight * terms["rounding"]

    def training_metrics(self, model) -> dict[str, float]:
        """The collapse this method is prone to, as it happens: the embeddings' scale, and their
        spread (0: all tokens alike)."""
        return {"embedding_norm": self.embedding_norm(model), "embedding_spread": self.embedding_spread(model)}

    @torch.no_grad()
    def embedding_norm(self, model) -> float:
        """Mean L2 norm of the diffused embeddings' rows (sqrt(embedding_dim) when normalised)."""
        return unwrap(model).embeddings().norm(dim=-1).mean().item()

    @torch.no_grad()
    def embedding_spread(self, model) -> float:
        """Mean distance between two rows of the embeddings, over their mean norm: sqrt(2) for
        orthogonal rows, 0 when they have collapsed onto one point, the failure that normalisation
        alone does not prevent (the rounding loss does)."""
        embeddings = unwrap(model).embeddings().float()
        V = embeddings.shape[0]
        return (torch.cdist(embeddings, embeddings).sum() / (V * (V - 1)) / embeddings.norm(dim=-1).mean()).item()

    @torch.no_grad()
    def bits_per_token(self, model, tokens: Tensor, generator: torch.Generator | None, num_draws: int = 16) -> float:
        """The variational bound on -log p(tokens) in bits per token (see the module docstring),
        from num_draws timesteps per sequence for the diffusion terms."""
        B, L = tokens.shape
        d = model.embedding_dim
        alphas_cumprod = self.schedule.alphas_cumprod
        embeddings = model.embeddings()
        x0 = embeddings[tokens]

        # Prior: KL(N(sqrt(a) x0, (1 - a) I) || N(0, I)) at the last timestep, per token.
        a = alphas_cumprod[-1].item()
        prior = 0.5 * (a * x0.float().pow(2).sum(dim=-1) + d * (-a - math.log(1 - a)))

        # Decoder: -log p(w | x_0), rounding x0_hat at timestep 0.
        zero = torch.zeros(B, dtype=torch.long, device=tokens.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        logits = model.round(model.denoise(self.schedule.add_noise(x0, noise, zero), zero), embeddings)
        decoder = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")

        # Diffusion terms, t >= 1: sum_t w_t |x0 - x0_hat|^2 / 2 with w_t = SNR_{t-1} - SNR_t,
        # t drawn with probability w_t / sum(w).
        snr = alphas_cumprod / (1 - alphas_cumprod)
        weights = snr[:-1] - snr[1:]  # weights[i] belongs to timestep i + 1
        cdf = weights.cumsum(0) / weights.sum()
        n = B * num_draws
        strata = (torch.randperm(n, generator=generator) + torch.rand(n, generator=generator, dtype=torch.float64)) / n
        draws = (1 + torch.searchsorted(cdf, strata).clamp(max=len(weights) - 1)).view(num_draws, B)
        squared_error = 0.0
        for timesteps in draws:
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            timesteps = timesteps.to(tokens.device)
            pred_x0 = model.denoise(self.schedule.add_noise(x0, noise, timesteps), timesteps)
            squared_error += (pred_x0.float() - x0.float()).pow(2).sum(dim=-1).mean().item()
        diffusion = 0.5 * weights.sum().item() * squared_error / num_draws

        return ((prior + decoder).mean().item() + diffusion) / math.log(2)

    def make_scheduler(self, sampler: str, eta: float = 0.0) -> Scheduler:
        # x0 prediction; no clipping: embeddings are not confined to [-1, 1].
        return make_scheduler(sampler, **self.schedule_kwargs, prediction_type="sample", clip_sample=False, eta=eta)

    @staticmethod
    def clamp_to_embeddings(pred_x0: Tensor, embeddings: Tensor) -> Tensor:
        """The clamping trick: each predicted vector replaced by its nearest token's embedding."""
        return embeddings[EmbeddingDiffusionModel.round(pred_x0, embeddings).argmax(dim=-1)].to(pred_x0.dtype)

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
            sampler=sample.sampler,
            num_inference_steps=sample.num_inference_steps,
            eta=sample.eta,
            timestep_spacing=sample.timestep_spacing,
            clamp=sample.clamp,
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
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        eta: float = 0.0,
        timestep_spacing: str = "trailing",
        clamp: bool = True,
    ) -> Tensor:
        scheduler = self.make_scheduler(sampler, eta)
        scheduler.set_timesteps(num_inference_steps, timestep_spacing)
        embeddings = model.embeddings()
        # On the CPU from `generator`, like the schedulers' variance noise: the same samples on every device.
        x = torch.randn((num_samples, length, model.embedding_dim), generator=generator).to(device)
        for timestep in progress(scheduler.timesteps.tolist(), f"{sampler} sampling"):
            pred_x0 = model.denoise(x, torch.full((num_samples,), timestep, dtype=torch.long, device=device))
            if clamp:
                pred_x0 = self.clamp_to_embeddings(pred_x0, embeddings)
            x = scheduler.step(pred_x0, timestep, x, generator=generator)
        # The last step returns the (clamped) predicted x0 itself; round it.
        return model.round(x, embeddings).argmax(dim=-1)

    @torch.no_grad()
    def next_token_logits(self, model, prefix: Tensor, length: int, generator: torch.Generator | None) -> Tensor:
        """(B, V) rounding logits at position P = prefix.shape[1]: one pass with the prefix at
        timestep 0 and pure noise (the last timestep) after it, inside a block_size window as in
        MaskedDiffusion.next_token_logits. Needs a model trained with prefix_fraction > 0."""
        if not self.prefix_fraction:
            raise ConfigError(
                "method.prefix_fraction: 0 is not allowed for guided decoding: this embedding model "
                "never learned to continue a given prefix; train it with a share in (0, 1], e.g. 0.25"
            )
        B, P = prefix.shape
        start = max(0, P + 1 - model.block_size)
        end = min(length, start + model.block_size)
        given = prefix[:, start:]
        K = given.shape[1]
        embeddings = model.embeddings()
        # On the CPU from `generator`, as in sample: the same logits on every device.
        noise = torch.randn((B, end - start, model.embedding_dim), generator=generator).to(prefix.device)
        timesteps = torch.full((B, end - start), self.num_train_timesteps - 1, dtype=torch.long, device=prefix.device)
        timesteps[:, :K] = 0
        x0 = torch.zeros_like(noise)
        x0[:, :K] = embeddings[given].to(noise)
        pred_x0 = model.denoise(self.schedule.add_noise(x0, noise, timesteps), timesteps)
        return model.round(pred_x0[:, P - start], embeddings).float()

"""The interface every method implements, and the only one the trainer, the tasks and the scores
call. A method is one file: a `Method` subclass, registered under its config name with
`@register`. It builds its network from the model config and the data's `DataSpec`, computes the
training loss and generates samples; it knows nothing of the trainer, the tasks, checkpoints or
engines, and takes its progress display from the caller (so no method imports `rich`).

A method's state is its config (a schedule, loss weights): never weights, which live in the
network it builds, nor anything learnt from a batch.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion.config import METHOD_KINDS, ModelConfig, RunConfig, SampleConfig
from diffusion.data.spec import DataSpec

# progress(steps, description) -> the same steps, shown as a bar while they are taken.
Progress = Callable[[Iterable, str], Iterable]


def no_progress(steps: Iterable, description: str) -> Iterable:
    return steps


class Method(ABC):
    name: str  # method.name in the config
    data_kinds: tuple[str, ...]  # the DataSpec kinds it models: "image", "text", "points"
    # Its validation score is the exact negative log-likelihood (not a bound): such a run can score
    # other runs' text samples and guide their decoding (`next_token_logits`).
    exact_likelihood: bool = False

    @classmethod
    def from_config(cls, config: RunConfig) -> "Method":
        """The method as the run config describes it (each method reads its own fields)."""
        return cls()

    # Another run this method builds on (a run dir or .pt file), or None, and the config key that
    # names it. The caller loads it and hands it to build_model as a Parent: methods load no checkpoints.
    parent_reference: str | None = None
    parent_key: str = ""
    # It learns a representation of its data: `encode` gives it, and a run pictures it.
    learns_latents: bool = False

    @abstractmethod
    def build_model(self, model_config: ModelConfig, data: DataSpec, parent: "Parent | None" = None) -> nn.Module:
        """The network for this method on `data` (a net from diffusion/nets, maybe wrapped), with
        `parent` the run of `parent_reference` when there is one. ConfigError (naming
        `parent_key`) when that run will not do."""

    def initialize(self, model: nn.Module, examples: dict[str, Tensor]) -> None:
        """Data-dependent set-up of a freshly built network (a scale measured on `examples`, fixed
        training examples), before its first step; a resumed network has it in its weights. It
        draws no random numbers."""

    def training_batch(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch `loss` trains on, made from the data's batch with `model` (the network itself,
        not a data-parallel wrapper): the data's batch unless the method models something else."""
        return batch

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Tensor], shard: slice | None = None) -> Tensor:
        """The scalar training loss on `batch` (see DataSpec for its keys), averaged over `shard` of
        it on a data-parallel rank. Its random draws are made for the whole batch, from the global
        RNG (which the trainer checkpoints), so that every rank and a single process draw alike."""

    @abstractmethod
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
        """`num_samples` new examples: images (N, C, H, W) in [-1, 1], points (N, 2) or tokens (N, L),
        drawn from `generator` on the CPU (the same samples on every device) with the `sample`
        settings this method reads. `stats`, when given, gets what the sampling cost: "nfe", the
        network evaluations per batch (a guided pass of the doubled batch counts once; the mean
        over batches for an adaptive solver)."""

    def preview(
        self,
        model: nn.Module,
        num_samples: int,
        data: DataSpec,
        sample: SampleConfig,
        generator: torch.Generator | None,
        device: torch.device | str,
        examples: dict[str, Tensor],
    ) -> Tensor:
        """What a training run shows of its model: `num_samples` samples (the default), or for a
        method that draws none, what it makes of `examples` (that many fixed training examples)."""
        return self.sample(model, num_samples, data, sample, generator, device)

    def trajectory(
        self,
        model: nn.Module,
        num_samples: int,
        data: DataSpec,
        sample: SampleConfig,
        generator: torch.Generator | None,
        device: torch.device | str,
    ) -> tuple[Tensor, Tensor] | None:
        """The way `num_samples` samples go from noise to data: (times (K,), states (K, N, *shape)),
        first noise, last the samples, for a picture of the flow; None for a method that draws no
        such path (the default)."""
        return None

    def encode(self, model: nn.Module, images: Tensor) -> Tensor:
        """(N, D) the representation that a method which `learns_latents` gives `images`."""
        raise NotImplementedError(f"{self.name} learns no latents")

    @abstractmethod
    def sample_name(self, sample: SampleConfig) -> str:
        """The file stem of samples drawn with these settings, e.g. ddim50-seed0."""

    def class_labels(self, num_samples: int, data: DataSpec, sample: SampleConfig) -> Tensor | None:
        """(num_samples,) the classes `sample` asks of a class-conditional model (the scores check
        the samples against them), or None: the samples have no asked-for class."""
        return None

    def training_metrics(self, model: nn.Module) -> dict[str, float]:
        """Extra numbers to log with the loss (e.g. a collapse this method is prone to)."""
        return {}

    def bits_per_token(self, model: nn.Module, tokens: Tensor, generator: torch.Generator | None) -> float:
        """Validation score of held-out text (B, L): the negative log-likelihood, or a bound on it, in
        bits per token. Only methods of text implement it."""
        raise NotImplementedError(f"{self.name} has no likelihood of text")

    def next_token_logits(
        self, model: nn.Module, prefix: Tensor, length: int, generator: torch.Generator | None
    ) -> Tensor:
        """(B, V) logits of the token after `prefix` (B, P), for guided decoding. Text methods only."""
        raise NotImplementedError(f"{self.name} does not decode left to right")


@dataclass
class Parent:
    """A trained run that a method builds on (an autoencoder, a run's token embeddings): its
    config, its data and its (EMA) weights; weights None when the network is about to be loaded
    from a checkpoint of the run being built (a resume, a sample task), which holds them already,
    so that the parent run need not exist any more. config and data None: bare weights (a state
    dict from elsewhere), which the method's own settings describe. `record`: what the checkpoint
    keeps of it."""

    config: RunConfig | None
    data: DataSpec | None
    weights: dict[str, Tensor] | None
    record: dict


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` the method of `method.name: cls.name` (and a name the config
    accepts, for the data kind it models)."""
    METHODS[cls.name] = cls
    METHOD_KINDS[cls.name] = cls.data_kinds
    return cls


def text_sample_name(sample: SampleConfig, steps: bool = True) -> str:
    """The file stem of text samples: sampler, steps (for methods that take them), guidance weight
    (when an autoregressive run guides), temperature and seed, e.g. ancestral8-t1-seed0."""
    guide = f"-alpha{sample.guidance_alpha:g}" if sample.guide_checkpoint else ""
    return f"{sample.sampler}{sample.num_inference_steps if steps else ''}{guide}-t{sample.temperature:g}-seed{sample.seed}"

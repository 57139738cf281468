"""Schemas for a run: what to compute. Pure pydantic, no torch, so `ops` can validate cheaply.

A run config has one section per part (data, model, method, train, sample, eval). It can live on
its own in a YAML file, or as the `run:` section of a job spec (`configs/jobs/NAME.yaml`), whose
other top-level keys belong to `ops`.

Every error is one line: where, the key path, the bad value and what is allowed.
"""

import difflib
import importlib.util
import io
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator
from ruamel.yaml import YAML

from diffusion.expectations import problems as expectation_problems
from diffusion.records import atomic_write
from diffusion.yamlfile import ConfigError, parse_yaml  # noqa: F401 (ConfigError is every caller's error type)

# Top-level keys of a job spec that are not ours: ops validates them.
JOB_SPEC_KEYS = {"name", "description", "hypothesis", "expected", "expect", "cpu_variant", "engine", "resources", "run"}


class Section(BaseModel):
    # Every float must be finite: an lr of .inf trains to NaN and would still "succeed".
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Upper bounds on sizes are generous (10-100x the largest spec here), so that a typo such as
# base_channels=1000000 stops at validation instead of allocating terabytes; the trainer checks
# the memory of what remains before it builds the network.


IMAGE_DATASETS = ("mnist", "cifar10")
TEXT_DATASETS = ("shakespeare",)
# 2-D toy distributions, generated from a fixed seed (diffusion/data/toys.py): the kind "points".
TOY_DATASETS = ("moons", "eight_gaussians", "checkerboard", "spirals", "gaussian_mixture")
# Each method's name and the kinds of data it models. diffusion.methods.register adds a method
# defined elsewhere (a test's toy); ops, which never imports the methods, knows those listed here.
METHOD_KINDS = {
    "ddpm": ("image",),
    "flow_matching": ("image", "points"),
    "meanflow": ("image", "points"),
    "autoencoder": ("image",),
    "autoregressive": ("text",),
    "masked": ("text",),
    "embedding": ("text",),
}
# Methods that model a Gaussian-noise path, so that they can also run on an autoencoder's latents.
GAUSSIAN_METHODS = ("ddpm", "flow_matching", "meanflow")
AUTOENCODER_NETS = ("mlp_autoencoder", "conv_autoencoder")
# The nets a kind of data takes (for a method that is not an autoencoder).
KIND_NETS = {"image": ("unet", "dit"), "text": ("transformer",), "points": ("mlp",)}
# Samplers: the Gaussian-diffusion schedulers, the flows' ODE solvers (diffusion/solvers.py; the
# method's own velocity), MeanFlow's average-velocity jumps, and text's ancestral sampling.
SCHEDULER_SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
ODE_SOLVERS = ("euler", "midpoint", "heun", "rk4", "dopri5")
METHOD_SAMPLERS = {
    "ddpm": SCHEDULER_SAMPLERS,
    "embedding": SCHEDULER_SAMPLERS,
    "flow_matching": ODE_SOLVERS,
    "meanflow": ("meanflow", *ODE_SOLVERS),
    "autoregressive": ("ancestral",),
    "masked": ("ancestral",),
}


# The settings that say what a run is, by method and by net: the journal's "Main settings" (the
# whole config.yaml is shown beside them). A method or net not named here shows its name alone.
METHOD_SETTINGS = {
    "ddpm": ("method.num_train_timesteps", "method.beta_schedule", "method.prediction_type", "method.autoencoder"),
    "flow_matching": ("method.time_sampling", "method.coupling", "method.coupling_group_size", "method.autoencoder"),
    "meanflow": (
        "method.time_sampling",
        "method.coupling",
        "method.coupling_group_size",
        "method.logit_normal_mean",
        "method.r_equals_t_share",
        "method.adaptive_weight_power",
        "method.training_guidance_scale",
        "method.autoencoder",
    ),
    "autoencoder": ("method.reconstruction_loss",),
    "embedding": ("method.num_train_timesteps", "method.beta_schedule", "method.embedding_dim"),
}
NET_SETTINGS = {
    "unet": ("model.base_channels", "model.channel_mults"),
    "dit": ("model.dit_size", "model.patch_size"),
    "mlp": ("model.hidden_dim", "model.num_layers"),
    "transformer": ("model.n_layer", "model.n_embd"),
    "mlp_autoencoder": ("model.latent_dim", "model.hidden_dim"),
    "conv_autoencoder": ("model.latent_channels", "model.channel_mults"),
}


def main_settings(method: str | None, net: str | None) -> tuple[str, ...]:
    """The keys (section.key) that say what a run of `method` on `net` is, in reading order."""
    return (
        ("task", "device", "data.dataset", "data.subset", "data.only_digit", "model.name")
        + NET_SETTINGS.get(net, ())
        + ("model.class_conditional", "method.name")
        + METHOD_SETTINGS.get(method, ())
        + ("train.batch_size", "train.epochs", "train.max_steps", "train.max_minutes", "train.lr", "train.seed")
        + ("sample.sampler", "sample.num_inference_steps", "sample.guidance_scale")
    )


def data_kind(dataset: str) -> str:
    """The kind of data a dataset holds: "image", "text" or "points" (the 2-D toys)."""
    return "text" if dataset in TEXT_DATASETS else "points" if dataset in TOY_DATASETS else "image"


def methods_of(kind: str) -> tuple[str, ...]:
    return tuple(name for name, kinds in METHOD_KINDS.items() if kind in kinds)


def quoted_choices(names) -> str:
    """'a', 'b' or 'c': pydantic's way of listing the allowed values."""
    quoted = [repr(name) for name in names]
    return " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)


MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_OT_GROUP = 512  # method.coupling_group_size: an exact assignment takes time as the cube (~0.1 s at 512)
NO_NUL = r"^[^\x00]*$"  # a path with a NUL byte cannot be opened


class DataConfig(Section):
    dataset: Literal[
        "mnist", "cifar10", "shakespeare", "moons", "eight_gaussians", "checkerboard", "spirals", "gaussian_mixture"
    ] = Field("mnist", description="Images: mnist, cifar10; text: shakespeare; 2-D points: the toys.")
    root: str | None = Field(None, pattern=NO_NUL, description="Data root; else $DIFFUSION_DATA_ROOT; else ./data.")
    download: bool = Field(True, description="Download when the files are missing under the root.")
    only_digit: int | None = Field(None, ge=0, le=9, description="Train on one digit only (MNIST).")
    subset: int | None = Field(None, ge=1, description="Use only the first N training examples.")
    limit_per_class: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Images: the first N examples of each "
        "class only: overfit mode, to debug a model (the run reports how near its "
        "samples come to the training images).",
    )
    npz: str | None = Field(
        None,
        pattern=NO_NUL,
        description="CIFAR-10: an .npz holding `images` (N, 32, 32, 3) and "
        "`labels`, under the data root (e.g. cifar10/test.npz), split into train and test by "
        "val_fraction; None: torchvision's CIFAR-10 files.",
    )
    resolution: int | None = Field(
        None,
        ge=8,
        le=512,
        description="Images: upscaled (bilinear) to this size, e.g. "
        "64 or 128; None: the native size (MNIST 28, CIFAR-10 32).",
    )
    tokenizer: Literal["char", "bpe"] = Field("char", description="Text: characters, or BPE trained on the corpus.")
    vocab_size: int = Field(512, ge=64, le=65536, description="Text, bpe: the BPE vocabulary size.")
    block_size: int = Field(256, ge=8, le=65536, description="Text: tokens per training example.")
    block_stride: int | None = Field(
        None,
        ge=1,
        description="Text: a training window starts every this many "
        "tokens (overlapping); None: block_size, no overlap.",
    )
    num_points: int = Field(
        20_000,
        ge=16,
        le=10_000_000,
        description="2-D toys: training points (the held-out split is drawn from another fixed seed).",
    )
    num_components: int = Field(
        8, ge=1, le=1000, description="gaussian_mixture only: its Gaussians (and classes); the other toys ignore it."
    )
    val_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=0.5,
        description="Text: the corpus's last share, held out; "
        "CIFAR-10 from an .npz: the share of each class held out as the test split.",
    )


class ModelConfig(Section):
    name: Literal["unet", "dit", "transformer", "mlp", "mlp_autoencoder", "conv_autoencoder"] = Field(
        "unet",
        description="unet or dit for images, transformer for text; mlp (FiLM) for 2-D points and an "
        "autoencoder's latent vectors (method.autoencoder); mlp_autoencoder or conv_autoencoder for "
        "method.name autoencoder.",
    )
    dit_size: Literal["tiny", "S", "B"] = Field(
        "S", description="dit: tiny (4 blocks of 128, for CPUs), S (12 of 384, DiT-S) or B (12 of 768, DiT-B)."
    )
    patch_size: int = Field(2, ge=1, le=32, description="dit: patch side; must divide the image (or latent grid).")
    base_channels: int = Field(64, ge=8, le=2048)
    channel_mults: list[Annotated[int, Field(ge=1, le=16)]] = Field(
        default_factory=lambda: [1, 2, 2], min_length=1, max_length=4
    )
    num_res_blocks: int = Field(2, ge=1, le=16)
    attention: bool = Field(True, description="Self-attention at the lowest resolution.")
    attention_resolutions: list[Annotated[int, Field(ge=1, le=512)]] = Field(
        default_factory=list,
        max_length=8,
        description="Self-attention also after every residual block of the "
        "levels of these sizes, e.g. [16, 8] for 32x32 CIFAR-10.",
    )
    attention_heads: int = Field(4, ge=1, le=128)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm_groups: int = Field(8, ge=1, validate_default=True)  # after the fields its check reads
    class_conditional: bool = Field(False, description="Add a class embedding (with a null class).")
    latent_dim: int = Field(16, ge=1, le=4096, description="mlp_autoencoder: size of the latent vector.")
    latent_channels: int = Field(
        4,
        ge=1,
        le=256,
        description="conv_autoencoder: latent channels, on a grid one stride-2 "
        "convolution per channel_mults entry smaller (MNIST with [1, 2]: 4 x 7 x 7).",
    )
    hidden_dim: int = Field(512, ge=8, le=16384, description="mlp, mlp_autoencoder: width of the hidden layers.")
    time_embedding_dim: int | None = Field(
        None,
        ge=16,
        multiple_of=8,
        le=16384,
        description="mlp: width of the time (and class) embedding that every FiLM block reads; none: "
        "4 x min(hidden_dim, 128). A block's FiLM projection costs 2 x emb x hidden_dim, its two layers "
        "2 x hidden_dim^2: a wider embedding than hidden_dim costs more than the block.",
    )
    num_layers: int = Field(
        3, ge=1, le=64, description="mlp: FiLM residual blocks; mlp_autoencoder: hidden layers on each side."
    )
    fourier_features: int = Field(
        0,
        ge=0,
        le=4096,
        description="mlp: the input x also enters as sin and cos of 2 pi x . b for this many random "
        "frequencies b ~ N(0, fourier_scale^2) per dimension (Tancik et al. 2020, Fourier features), drawn "
        "once and saved with the weights: a map of 2-D points with sharp edges (MeanFlow's one step to "
        "eight modes) is learnt in far fewer steps. 0: x alone.",
    )
    fourier_scale: float = Field(
        1.0,
        gt=0.0,
        le=1000.0,
        description="mlp: standard deviation of each input dimension's Fourier frequency, in cycles per "
        "unit of x (a feature's frequency along x grows as sqrt(D) of it: lower it for wide latents); higher "
        "resolves finer detail and fits noise sooner.",
    )
    n_layer: int = Field(4, ge=1, le=128, description="Transformer: blocks.")
    n_head: int = Field(4, ge=1, le=256, description="Transformer: attention heads.")
    n_embd: int = Field(256, ge=8, le=16384, description="Transformer: width; a multiple of n_head.")
    positions: Literal["rotary", "learned"] = Field(
        "rotary", description="Transformer: rotary (relative, in attention) or learned (a table added to the input)."
    )

    @field_validator("norm_groups")
    @classmethod
    def _groups_divide_channels(cls, norm_groups: int, info: ValidationInfo) -> int:
        channels = [info.data.get("base_channels", 0) * mult for mult in info.data.get("channel_mults", [])]
        if any(c % norm_groups for c in channels):
            raise ValueError(f"must divide every level's channels (base_channels * channel_mults = {channels})")
        return norm_groups


class MethodConfig(Section):
    name: str = Field(
        "ddpm",
        description="ddpm (images); flow_matching, meanflow (images, 2-D points); autoencoder (images); text: "
        "autoregressive, masked (MDLM), embedding (Diffusion-LM).",
    )
    num_train_timesteps: int = Field(1000, ge=2, le=100_000)
    beta_schedule: Literal["linear", "cosine", "sqrt"] = Field("linear", description="sqrt suits embeddings.")
    beta_start: float = Field(1e-4, ge=1e-8, lt=1.0)
    beta_end: float = Field(2e-2, ge=1e-8, lt=1.0)
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    clip_sample: bool = Field(True, description="Clip predicted x0 to [-1, 1] while sampling.")
    embedding_dim: int = Field(64, ge=2, le=4096, description="embedding: size of the diffused token embeddings.")
    rounding_weight: float = Field(1.0, ge=0.0, description="embedding: weight of the rounding cross-entropy.")
    init_embeddings: str | None = Field(
        None,
        pattern=NO_NUL,
        description="embedding: a trained text run (same tokenizer) whose "
        "token embeddings start these, through a learned projection.",
    )

    autoencoder: str | None = Field(
        None,
        pattern=NO_NUL,
        description="Latent diffusion: a trained autoencoder run (a run dir, a "
        "checkpoint, or an ops id) whose frozen encoder's latents this method models; its type and "
        "sizes are read from its checkpoint.",
    )
    autoencoder_model: dict[str, Any] | None = Field(
        None,
        description="Latent diffusion: model settings of the autoencoder "
        "that override those its checkpoint records, e.g. {name: mlp_autoencoder, latent_dim: 16} for a "
        ".pt of bare weights (a state dict), which records none.",
    )
    time_sampling: Literal["uniform", "logit_normal"] = Field(
        "uniform",
        description="flow_matching, meanflow: how training times t in [0, 1] are drawn; logit_normal "
        "(sigmoid of N(logit_normal_mean, logit_normal_std)) trains the middle of the path more.",
    )
    logit_normal_mean: float = Field(0.0, ge=-10.0, le=10.0, description="time_sampling logit_normal: mean.")
    logit_normal_std: float = Field(1.0, gt=0.0, le=10.0, description="time_sampling logit_normal: std.")
    coupling: Literal["independent", "minibatch_ot"] = Field(
        "independent",
        description="flow_matching, meanflow: how a batch's noise is paired with its data: independent draws, "
        "or minibatch_ot, the exact optimal-transport pairing (squared distance) within groups of "
        "coupling_group_size examples (Tong et al. 2023, OT-CFM; paths.py): straighter paths and a target of "
        "less variance; unconditional models only.",
    )
    coupling_group_size: int | None = Field(
        None,
        ge=2,
        le=MAX_OT_GROUP,
        description="coupling minibatch_ot: examples per exact assignment, at most train.batch_size (null: the "
        "whole batch, at most 512; a batch that is not a multiple leaves a last, smaller group). It runs on the "
        "CPU, on every rank, in a time growing as its cube: on the 2-D toy at batch 1024 (2 CPU cores), groups "
        "of 64 cost ~5 ms a step, 128 ~17 ms, 256 ~50 ms, the whole 1024 ~0.7 s.",
    )
    r_equals_t_share: float = Field(
        0.75,
        ge=0.0,
        le=1.0,
        description="meanflow: share of training pairs (r, t) with r = t, where the MeanFlow loss is "
        "flow matching's (the paper's best: 75%).",
    )
    adaptive_weight_power: float = Field(
        1.0,
        ge=0.0,
        le=4.0,
        description="meanflow: p of the adaptive loss weight 1 / (error + adaptive_weight_eps)^p; 0 is plain MSE.",
    )
    adaptive_weight_eps: float = Field(1e-3, gt=0.0, le=1.0, description="meanflow: c of the adaptive loss weight.")
    jvp_tangent: Literal["conditional", "model"] = Field(
        "conditional",
        description="meanflow: the velocity along which du/dt is taken: conditional, v = eps - x_0 (the "
        "paper, eq. 8); model, the net's own instantaneous velocity u(z_t, t, t) without gradient (improved "
        "MeanFlow, iMF: the same expectation, far less variance).",
    )
    training_guidance_scale: float = Field(
        1.0,
        ge=1.0,
        le=20.0,
        description="meanflow, class-conditional: classifier-free guidance folded into the training target "
        "(the paper's omega, eq. 13), so that one step samples the guided model; 1: none.",
    )
    reconstruction_loss: Literal["bce", "mse"] = Field(
        "bce", description="autoencoder: binary cross-entropy on the decoder's logits, or squared error."
    )

    @field_validator("autoencoder_model")
    @classmethod
    def _autoencoder_settings(cls, settings: dict[str, Any] | None) -> dict[str, Any] | None:
        if settings is None:
            return None
        # Each value alone: limits between fields are checked with the checkpoint's settings merged in.
        for key, value in settings.items():
            field = ModelConfig.model_fields.get(key)
            if field is None:
                raise ValueError(describe_error({"type": "extra_forbidden", "loc": (key,)}, ModelConfig))
            try:
                kind = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
                TypeAdapter(kind).validate_python(value)
            except ValidationError as exc:
                error = exc.errors()[0]
                raise ValueError(describe_error(error | {"loc": (key, *error["loc"])}, ModelConfig)) from None
        if settings.get("name", AUTOENCODER_NETS[0]) not in AUTOENCODER_NETS:
            raise ValueError(f"name must be {quoted_choices(AUTOENCODER_NETS)}")
        return settings  # as written: only these override the checkpoint's

    @field_validator("name")
    @classmethod
    def _known_method(cls, name: str) -> str:
        if name not in METHOD_KINDS:
            raise ValueError(f"must be {quoted_choices(METHOD_KINDS)}")
        return name

    label_dropout: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Class-conditional images: share of training "
        "labels replaced by the null class, so that one network is also the unconditional "
        "model that classifier-free guidance needs (unconditional models ignore it).",
    )
    prefix_fraction: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="embedding: share of training sequences given "
        "a clean prefix, so that the model learns to continue text (guided decoding needs it).",
    )


class TrainConfig(Section):
    seed: int = Field(0, ge=0, le=MAX_SEED)
    batch_size: int = Field(128, ge=1, le=65536)
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    max_minutes: float | None = Field(None, gt=0, description="Wall-clock budget; checkpoints and stops.")
    lr: float = Field(2e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0.0, le=1e6)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on CUDA, else fp32.")
    log_every: int = Field(50, ge=1, description="Steps between metrics.jsonl lines.")
    val_every_steps: int | None = Field(
        None,
        ge=1,
        description="Text: steps between validation bits per character "
        "of the EMA weights, logged as val_bits_per_char (a curve to early-stop on).",
    )
    sample_every_epochs: int | None = Field(1, ge=1, description="Epochs between sample grids.")
    checkpoint_every_steps: int | None = Field(1000, ge=1)
    checkpoint_every_minutes: float | None = Field(10.0, gt=0)
    keep_checkpoints: int = Field(3, ge=1, description="Step-numbered checkpoints kept besides latest.pt.")
    progress: Literal["auto", "bar", "lines"] = Field("auto", description="auto: a bar on a terminal.")
    trackers: list[Literal["tensorboard", "trackio"]] | None = Field(
        None,
        description="Mirror metrics and sample grids to TensorBoard (RUN_DIR/tensorboard) and/or trackio; "
        "each needs its extra (pip install -e '.[tensorboard]'). None: the project's (ops.yaml `trackers`, "
        "else off); [] switches the project's off for this run.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the network for training; if compilation fails the run says why and "
        "trains uncompiled.",
    )


TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "trackio": "trackio",
}  # train.trackers: the package (and extra) each needs


def check_trackers_installed(names: list[str] | None) -> None:
    """ConfigError, one line, for a tracker whose package is missing here: checked before a run
    writes anything (the trainer) and before one is submitted (ops), not when a config is
    validated (a stored config is read on machines without them)."""
    for name in names or []:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(
                f"train.trackers: {name!r} needs the {TRACKER_PACKAGES[name]} package: pip install -e '.[{name}]' "
                "(or leave it out: metrics.jsonl and samples/ hold everything)"
            )


SAMPLERS = Literal["ddpm", "ddim", "dpmsolver++", "euler", "midpoint", "heun", "rk4", "dopri5", "meanflow", "ancestral"]


class SampleConfig(Section):
    checkpoint: str | None = Field(
        None, pattern=NO_NUL, description="Run dir or .pt file to sample from (task sample/eval)."
    )
    sampler: SAMPLERS = Field(
        "ddim",
        description="ddpm, ddim, dpmsolver++ (DPM-Solver++ 2M: 10-25 steps) for ddpm and embedding; ODE solvers "
        "euler, midpoint, heun, rk4 (fixed steps) and dopri5 (adaptive) for flow_matching and meanflow; meanflow "
        "(1-2 average-velocity jumps) for meanflow; ancestral for autoregressive and masked.",
    )
    num_inference_steps: int = Field(50, ge=1, le=100_000, description="Steps (dopri5: output frames only).")
    # float32 resolves about 1.2e-7: a tighter tolerance only makes dopri5 step until its step underflows.
    rtol: float = Field(1e-5, ge=1e-7, le=1.0, description="dopri5: relative tolerance.")
    atol: float = Field(1e-5, ge=1e-7, le=1.0, description="dopri5: absolute tolerance.")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM noise: 0 deterministic, 1 equals DDPM.")
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    num_samples: int = Field(64, ge=1, le=1_000_000)
    batch_size: int = Field(256, ge=1, le=65536)
    use_ema: bool = True
    seed: int = Field(0, ge=0, le=MAX_SEED)
    class_label: int | None = Field(None, ge=0, description="Class to sample (class-conditional models).")
    length: int | None = Field(None, ge=1, description="Text: tokens per sample; None: the block size.")
    block_length: int | None = Field(None, ge=1, description="masked: semi-autoregressive blocks of this many tokens.")
    temperature: float = Field(
        1.0,
        ge=0.01,
        le=100.0,
        description="Text: softmax temperature (below 0.01 a softmax underflows; that is greedy decoding).",
    )
    top_k: int | None = Field(None, ge=1, description="Text: sample among the k likeliest tokens.")
    clamp: bool = Field(True, description="embedding: snap predicted x0 to the nearest embedding each step.")
    guide_checkpoint: str | None = Field(
        None, pattern=NO_NUL, description="Text: an autoregressive run to mix logits with."
    )
    guidance_alpha: float = Field(1.0, ge=0.0, le=1.0, description="Weight of the diffusion logits (1: no AR).")
    guidance_scale: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="Classifier-free guidance w: out_uncond + "
        "w (out_cond - out_uncond) of the net's noise or velocity; 1 the conditional model, 0 the unconditional one.",
    )


class EvalConfig(Section):
    after_train: bool = Field(
        False,
        description="When training completes, score the trained model in the same run (images: FID with its "
        "floor, confident share, classes; text and 2-D points are scored at the end of training anyway) into "
        "summary.json.",
    )
    max_minutes: float | None = Field(
        None, gt=0, description="after_train: its own budget; fewer samples are scored (and said so) to keep it."
    )
    sampler: SAMPLERS | None = Field(None, description="after_train: the sampler (default: sample.sampler).")
    num_inference_steps: int | None = Field(
        None, ge=1, le=100_000, description="after_train: its steps (default: sample.num_inference_steps)."
    )
    num_samples: int = Field(1000, ge=2, le=1_000_000)
    confidence: float = Field(0.9, gt=0.0, le=1.0, description="Softmax threshold for a confident sample.")
    classifier_epochs: int = Field(2, ge=1)
    classifier_subset: int | None = Field(None, ge=100, description="Train the classifier on N images.")
    scorer_checkpoint: str | None = Field(
        None, pattern=NO_NUL, description="Text: an autoregressive run that scores samples (their perplexity under it)."
    )
    val_blocks: int = Field(64, ge=1, description="Text: validation blocks for bits per character.")


class RunConfig(Section):
    task: Literal["train", "sample", "eval"] = "train"
    expect: list[str] = Field(
        default_factory=list,
        description="Checks of the result, each METRIC OP VALUE (scores.confident_share >= 0.7): met, missed or "
        "not measured when the run ends (diffusion/expectations.py). In a job spec: top-level, beside expected.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def valid_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """The valid keys at `path` inside `model`, following nested sections."""
    for key in path:
        field = model.model_fields.get(key)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def describe_error(error: dict, model: type[BaseModel], prefix: str = "") -> str:
    """One pydantic error as `key.path: problem`, with the nearest valid key for an unknown one."""
    loc = tuple(str(part) for part in error["loc"])
    key = ".".join((prefix, *loc) if prefix else loc)
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        valid = valid_keys(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1) or [k for k in valid if loc[-1] in k][:1]
        parent = ".".join((prefix, *loc[:-1]) if prefix else loc[:-1])
        hint = (
            f"did you mean '{parent + '.' if parent else ''}{close[0]}'?"
            if close
            else f"valid keys: {', '.join(valid)}"
        )
        return f"{key}: unknown key; {hint}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = (
        error["msg"]
        .removeprefix("Value error, ")
        .replace("Input should be", "must be")
        .replace("String should match pattern", "must match the pattern")
        .replace("String should have", "must have")
    )
    if error["type"] == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == NO_NUL:
        message = "must not contain a NUL byte"
    return f"{key}: {value!r} is not allowed: {message}"


# What the datasets hold, for the limits below (the corpus is checked by its sha256 on download).
NUM_CLASSES = {"mnist": 10, "cifar10": 10, "moons": 2, "eight_gaussians": 8, "checkerboard": 8, "spirals": 2}
NATIVE_SIZE = {"mnist": 28, "cifar10": 32}
NUM_CHANNELS = {"mnist": 1, "cifar10": 3}
CORPUS_CHARACTERS = {"shakespeare": 1_115_394}


def num_classes(data: DataConfig) -> int | None:
    """The classes of a dataset's labels (a toy's modes, squares or arms), None for text."""
    return data.num_components if data.dataset == "gaussian_mixture" else NUM_CLASSES.get(data.dataset)


# alpha_bar must stay inside these: at 0 the samplers divide by zero (and far below 1e-20 an
# unclipped x0 estimate leaves float32), at 1 the first timestep adds no noise.
MIN_ALPHA_BAR, MAX_ALPHA_BAR = 1e-20, 1 - 1e-12


def alpha_bar_range(method: MethodConfig) -> tuple[float, float]:
    """alpha_bar at the first and the last training timestep, in float64, from the same schedules
    as diffusion.methods.ddpm.make_betas (a test holds the two together): a validation-time
    check, written without torch."""
    T, start, end = method.num_train_timesteps, method.beta_start, method.beta_end
    if method.beta_schedule == "linear":
        betas = [start + (end - start) * i / (T - 1) for i in range(T)]
    else:
        if method.beta_schedule == "cosine":

            def level(t: int) -> float:
                return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
        else:  # sqrt

            def level(t: int) -> float:
                return 1 - math.sqrt(t / T + 1e-4)

        betas = [min(1 - level(t + 1) / level(t), 0.999) for t in range(T)]
    log_alpha_bar = sum(math.log1p(-beta) for beta in betas)
    return 1 - betas[0], math.exp(log_alpha_bar)


def conflicts(config: RunConfig):
    """Every setting that cannot work with another, as `key: value is not allowed: why`, first found
    first. Each limit that a method, sampler, net or dataset enforces at run time is checked here,
    so that it stops a run when its config is validated, before any work is done.

    A sample or eval task that reads a checkpoint (sample.checkpoint) samples with the checkpoint's
    method, network and data, not with its own sections: its sample settings are checked against
    the checkpoint's config once that is known (`sampling_conflicts`: by ops at submit for a run
    dir it can read, by the task when it loads the checkpoint)."""
    yield from model_conflicts(config)
    yield from expectation_problems(config.expect, data_kind(config.data.dataset))
    if config.task == "train" or config.sample.checkpoint is None:
        yield from sampling_conflicts(config, config.sample, config.task)
    if config.task == "train" and config.eval.after_train and config.method.name != "autoencoder":
        for problem in sampling_conflicts(config, eval_sample(config), "eval"):
            key = problem.split(":", 1)[0]  # a value that eval's own settings gave: named as theirs
            renamed = {"sample.sampler": "eval.sampler", "sample.num_inference_steps": "eval.num_inference_steps"}
            if key in renamed and getattr(config.eval, key.split(".")[1]) is not None:
                problem = renamed[key] + problem[len(key) :]
            yield problem


def eval_sample(config: RunConfig) -> "SampleConfig":
    """The sample settings of the evaluation after training: sample's, with eval.sampler and
    eval.num_inference_steps where set."""
    chosen = {"sampler": config.eval.sampler, "num_inference_steps": config.eval.num_inference_steps}
    return config.sample.model_copy(update={key: value for key, value in chosen.items() if value is not None})


FLOWS = ("flow_matching", "meanflow")


def yaml_text(value) -> str:
    """A default as a user types it in YAML or a --set: null, true, 0.75, 'uniform'."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def unread_settings(config: RunConfig):
    """Settings moved off their default where nothing reads them (a toy's size on MNIST, MeanFlow's
    share on flow matching, a DDPM schedule on a flow): refused, so that a run never seems to
    test a setting it ignored. Defaults pass everywhere: stored configs write every field out."""
    data, model, method = config.data, config.model, config.method
    flow = method.name in FLOWS
    for key, read, readers in (
        ("data.num_points", data.dataset in TOY_DATASETS, "the 2-D toys"),
        ("data.num_components", data.dataset == "gaussian_mixture", "data.dataset 'gaussian_mixture'"),
        ("model.dit_size", model.name == "dit", "model.name 'dit'"),
        ("model.patch_size", model.name == "dit", "model.name 'dit'"),
        ("model.time_embedding_dim", model.name == "mlp", "model.name 'mlp'"),
        ("model.fourier_features", model.name == "mlp", "model.name 'mlp'"),
        ("model.fourier_scale", model.name == "mlp", "model.name 'mlp'"),
        ("method.time_sampling", flow, "flow_matching and meanflow"),
        ("method.logit_normal_mean", flow, "flow_matching and meanflow"),
        ("method.logit_normal_std", flow, "flow_matching and meanflow"),
        ("method.coupling", flow, "flow_matching and meanflow"),
        ("method.coupling_group_size", method.coupling == "minibatch_ot", "method.coupling 'minibatch_ot'"),
        ("method.r_equals_t_share", method.name == "meanflow", "meanflow"),
        ("method.adaptive_weight_power", method.name == "meanflow", "meanflow"),
        ("method.adaptive_weight_eps", method.name == "meanflow", "meanflow"),
        ("method.jvp_tangent", method.name == "meanflow", "meanflow"),
        ("method.num_train_timesteps", not flow, "the methods of discrete timesteps (not flows)"),
        ("method.beta_schedule", not flow, "the methods of a noise schedule (not flows)"),
        ("method.beta_start", not flow, "the methods of a noise schedule (not flows)"),
        ("method.beta_end", not flow, "the methods of a noise schedule (not flows)"),
        ("method.prediction_type", not flow, "ddpm (flows predict a velocity)"),
    ):
        section, name = key.split(".")
        part = getattr(config, section)
        value, default = getattr(part, name), type(part).model_fields[name].default
        if not read and value != default:
            yield f"{key}: {value!r} is not allowed here: only {readers} read it; leave it at {yaml_text(default)}"


def model_conflicts(config: RunConfig):
    """What cannot be trained: data, network and method that do not go together."""
    yield from unread_settings(config)
    data, model, method = config.data, config.model, config.method
    kind = data_kind(data.dataset)
    text = kind == "text"
    if kind not in METHOD_KINDS[method.name]:
        yield (
            f"method.name: {method.name!r} is not allowed with data.dataset {data.dataset!r}: "
            f"use one of {', '.join(methods_of(kind))}"
        )
    autoencoding = method.name == "autoencoder"
    if autoencoding and kind == "image":
        nets, what = AUTOENCODER_NETS, f"method.name {method.name!r}"
    elif method.autoencoder is not None and kind == "image":
        # The latents' shape is known once the autoencoder's checkpoint is read: vectors or a grid.
        nets, what = ("mlp", "unet", "dit"), "method.autoencoder"
    else:
        nets, what = KIND_NETS[kind], f"data.dataset {data.dataset!r}"
    if model.name in AUTOENCODER_NETS and not autoencoding:
        what = f"method.name {method.name!r}"  # an autoencoder's net, for a method that is not one
    if model.name not in nets:
        hint = " (mlp takes an autoencoder's latent vectors: set method.autoencoder)" if model.name == "mlp" else ""
        yield f"model.name: {model.name!r} is not allowed with {what}: use {quoted_choices(nets)}{hint}"
    if autoencoding and model.class_conditional:
        yield "model.class_conditional: true is not allowed with method.name 'autoencoder': an autoencoder takes no class"
    if autoencoding and data.limit_per_class is not None:
        yield (
            f"data.limit_per_class: {data.limit_per_class} is not allowed with method.name 'autoencoder': overfit "
            "mode measures how near samples come to the training images, and an autoencoder draws none (train on "
            "data.subset and watch the reconstruction loss instead)"
        )
    if method.autoencoder_model is not None and method.autoencoder is None:
        yield (
            f"method.autoencoder_model: {method.autoencoder_model} is not allowed without method.autoencoder: it "
            "overrides the settings of that autoencoder's checkpoint"
        )
    if model.fourier_scale != 1.0 and model.fourier_features == 0 and model.name == "mlp":
        yield (
            f"model.fourier_scale: {model.fourier_scale} is not allowed with model.fourier_features 0: it scales "
            "the Fourier frequencies; set model.fourier_features (e.g. 64) or leave the scale at 1.0"
        )
    if method.coupling == "minibatch_ot" and model.class_conditional:
        yield (
            "method.coupling: 'minibatch_ot' is not allowed with model.class_conditional true: pairing noise with "
            "the data by transport makes the noise tell the class, while sampling draws the two apart; use "
            "'independent' (pairing within each class is not implemented)"
        )
    group_size = method.coupling_group_size
    if method.coupling == "minibatch_ot" and group_size is None and config.train.batch_size > MAX_OT_GROUP:
        yield (
            f"method.coupling_group_size: null (the whole batch of train.batch_size {config.train.batch_size}) is "
            f"not allowed: an exact assignment of more than {MAX_OT_GROUP} examples costs ~0.5 s or more a step; set a "
            f"group size of at most {MAX_OT_GROUP}"
        )
    if method.coupling == "minibatch_ot" and group_size is not None and group_size > config.train.batch_size:
        yield (
            f"method.coupling_group_size: {group_size} is not allowed with train.batch_size "
            f"{config.train.batch_size}: a group is at most one batch; set it to {config.train.batch_size} or less"
        )
    if config.train.compile and method.name == "meanflow":
        yield (
            "train.compile: true is not allowed with method.name 'meanflow': torch.compile does not trace its "
            "forward-mode derivative (dual tensors), so the run would train uncompiled; leave it false"
        )
    if method.training_guidance_scale != 1:
        if method.name != "meanflow":
            yield (
                f"method.training_guidance_scale: {method.training_guidance_scale} is not allowed with method.name "
                f"{method.name!r}: it is MeanFlow's guidance in the training target; guide others with "
                "sample.guidance_scale"
            )
        elif not model.class_conditional or method.label_dropout == 0:
            yield (
                f"method.training_guidance_scale: {method.training_guidance_scale} is not allowed without a "
                "class-conditional model (model.class_conditional true) trained with method.label_dropout > 0: "
                "guidance mixes in the unconditional velocity"
            )
    if method.autoencoder is not None:
        if method.name not in GAUSSIAN_METHODS:
            yield (
                f"method.autoencoder: {method.autoencoder!r} is not allowed with method.name {method.name!r}: "
                f"latent models are {quoted_choices(GAUSSIAN_METHODS)} on the autoencoder's latents"
            )
        elif method.name == "ddpm" and method.clip_sample:
            yield (
                "method.clip_sample: true is not allowed with method.autoencoder: latents are not in [-1, 1]; "
                "set method.clip_sample false"
            )
    if method.name in ("ddpm", "embedding"):
        first, last = alpha_bar_range(method)
        if last < MIN_ALPHA_BAR or first > MAX_ALPHA_BAR:
            yield (
                f"method.beta_end: {method.beta_end} is not allowed with method.beta_schedule {method.beta_schedule!r}, "
                f"beta_start {method.beta_start} and num_train_timesteps {method.num_train_timesteps}: alpha_bar "
                f"runs from {first:.3g} to {last:.3g}; it must stay within [{MIN_ALPHA_BAR:g}, 1 - 1e-12] (fewer "
                "timesteps or smaller betas)"
            )
    if method.init_embeddings is not None and method.name != "embedding":
        yield (
            f"method.init_embeddings: {method.init_embeddings!r} is not allowed with method.name "
            f"{method.name!r}: only embedding diffusion starts from another run's embeddings"
        )
    if kind == "points":
        for key, value in (
            ("data.only_digit", data.only_digit),
            ("data.limit_per_class", data.limit_per_class),
            ("data.npz", data.npz),
            ("data.resolution", data.resolution),
            ("data.subset", data.subset),
            ("train.val_every_steps", config.train.val_every_steps),
            ("eval.scorer_checkpoint", config.eval.scorer_checkpoint),
            ("method.autoencoder", method.autoencoder),
        ):
            if value is not None:
                yield f"{key}: {value!r} is not allowed with data.dataset {data.dataset!r}: 2-D points take no such setting"
        return
    if text:
        for key, value in (
            ("data.only_digit", data.only_digit),
            ("data.limit_per_class", data.limit_per_class),
            ("data.npz", data.npz),
            ("data.resolution", data.resolution),
        ):
            if value is not None:
                yield f"{key}: {value} is not allowed with data.dataset {data.dataset!r}: it is for images; leave it unset"
        if model.class_conditional:
            yield f"model.class_conditional: true is not allowed with data.dataset {data.dataset!r}: text has no classes"
        if data.tokenizer == "bpe" and data.vocab_size <= 256:
            yield (
                f"data.vocab_size: {data.vocab_size} is not allowed with data.tokenizer 'bpe': "
                "must be above 256 (byte-level BPE starts from the 256 bytes)"
            )
        characters = CORPUS_CHARACTERS[data.dataset]
        val_characters = characters - int(characters * (1 - data.val_fraction))
        if data.block_size > val_characters:  # a token is at least one character
            yield (
                f"data.block_size: {data.block_size} is not allowed: must be <= the validation split's "
                f"{val_characters} characters (data.val_fraction {data.val_fraction} of {characters})"
            )
        if model.n_embd % model.n_head:
            yield f"model.n_embd: {model.n_embd} is not allowed: must be a multiple of model.n_head ({model.n_head})"
        elif model.positions == "rotary" and (model.n_embd // model.n_head) % 2:
            yield (
                f"model.n_embd: {model.n_embd} is not allowed with model.positions 'rotary': the head size "
                f"n_embd / n_head ({model.n_embd // model.n_head}) must be even"
            )
    else:
        if data.only_digit is not None and data.dataset != "mnist":
            yield f"data.only_digit: {data.only_digit} is not allowed with data.dataset {data.dataset!r}: it is for MNIST"
        if data.npz is not None and data.dataset != "cifar10":
            yield f"data.npz: {data.npz!r} is not allowed with data.dataset {data.dataset!r}: it is for CIFAR-10"
        # A latent run's UNet sees the autoencoder's latent grid, checked once its checkpoint is read.
        if method.autoencoder is None:
            size = data.resolution or NATIVE_SIZE[data.dataset]
            if model.name == "dit":
                yield from patch_conflicts(model, size)
            else:
                yield from attention_conflicts(model, size)
        lowest = model.base_channels * model.channel_mults[-1]
        if model.name == "unet" and model.attention and lowest % model.attention_heads:
            yield (
                f"model.attention_heads: {model.attention_heads} is not allowed: must divide the lowest "
                f"level's channels (base_channels * channel_mults[-1] = {lowest})"
            )
        for key, value in (
            ("train.val_every_steps", config.train.val_every_steps),
            ("eval.scorer_checkpoint", config.eval.scorer_checkpoint),
        ):
            if value is not None:
                yield f"{key}: {value!r} is not allowed with data.dataset {data.dataset!r}: it is for text; leave it unset"


def image_shape(data: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) of the images a run trains on."""
    size = data.resolution or NATIVE_SIZE[data.dataset]
    return NUM_CHANNELS[data.dataset], size, size


def autoencoder_conflicts(config: RunConfig, autoencoder: RunConfig):
    """What a latent run (`config`, method.autoencoder set) cannot do with the autoencoder run
    whose config is `autoencoder` (what ops checks at submit; the run checks it again from the
    checkpoint, with method.autoencoder_model's settings over it)."""
    reference, model = config.method.autoencoder, config.model
    if autoencoder.method.name != "autoencoder":
        yield (
            f"method.autoencoder: {reference!r} is not allowed: it is a {autoencoder.method.name!r} run, not an "
            "autoencoder (method.name 'autoencoder')"
        )
        return
    if autoencoder.data.dataset in TEXT_DATASETS or image_shape(autoencoder.data) != image_shape(config.data):
        yield (
            f"method.autoencoder: {reference!r} is not allowed: it encodes {autoencoder.data.dataset} images of "
            f"{'x'.join(map(str, image_shape(autoencoder.data)))}, and this run trains on "
            f"{'x'.join(map(str, image_shape(config.data)))}"
        )
    net = (config.method.autoencoder_model or {}).get("name", autoencoder.model.name)
    wanted = ("mlp",) if net == "mlp_autoencoder" else ("unet", "dit")
    if model.name not in wanted:
        yield (
            f"model.name: {model.name!r} is not allowed with method.autoencoder {reference!r}: a {net} gives "
            f"{'latent vectors' if wanted == ('mlp',) else 'a latent grid'}; use {quoted_choices(wanted)}"
        )


def patch_conflicts(model: ModelConfig, size: int):
    """What a DiT with model.patch_size cannot do on size x size inputs (images or a latent grid)."""
    if size % model.patch_size:
        divisors = [d for d in range(1, size + 1) if size % d == 0 and d <= 32]
        yield (
            f"model.patch_size: {model.patch_size} is not allowed: it must divide the {size}x{size} inputs "
            f"(use one of {', '.join(map(str, divisors))})"
        )


def attention_conflicts(model: ModelConfig, size: int):
    """What model.attention_resolutions asks that a UNet on size x size inputs cannot do."""
    sizes = [size]
    for _ in model.channel_mults[1:]:
        sizes.append((sizes[-1] + 1) // 2)
    for resolution in model.attention_resolutions:
        if resolution not in sizes:
            yield (
                f"model.attention_resolutions: {resolution} is not allowed: the levels of {size}x{size} "
                f"inputs are {', '.join(map(str, sizes))}"
            )
        elif (model.base_channels * model.channel_mults[sizes.index(resolution)]) % model.attention_heads:
            yield (
                f"model.attention_heads: {model.attention_heads} is not allowed: must divide the channels "
                f"of the {resolution}x{resolution} level that model.attention_resolutions gives attention"
            )


def sampling_conflicts(config: RunConfig, sample: "SampleConfig", task: str = "sample"):
    """What `sample` cannot do with the method, network and data of `config` (a checkpoint's), in
    a `task` (a training run's previews included)."""
    data, model, method = config.data, config.model, config.method
    if method.name == "autoencoder" and task != "train":
        yield (
            f"task: {task!r} is not allowed with an autoencoder (method.name 'autoencoder'): it draws no new "
            "images; its training run writes reconstructions and the latent space, and a latent diffusion run "
            "(method.autoencoder) samples through it"
        )
        return
    if sample.top_k is not None and method.name not in ("autoregressive", "masked") and sample.guide_checkpoint is None:
        yield (
            f"sample.top_k: {sample.top_k} is not allowed with method.name {method.name!r}: its sampler draws no "
            "tokens (top_k is for autoregressive, masked and guided sampling)"
        )
    samplers = METHOD_SAMPLERS.get(method.name, SCHEDULER_SAMPLERS)
    if sample.sampler not in samplers:
        yield (
            f"sample.sampler: {sample.sampler!r} is not allowed with method.name {method.name!r}: "
            f"use {quoted_choices(samplers)}"
        )
    for key, value, default, read, readers in (
        ("sample.rtol", sample.rtol, 1e-5, sample.sampler == "dopri5", "sampler 'dopri5'"),
        ("sample.atol", sample.atol, 1e-5, sample.sampler == "dopri5", "sampler 'dopri5'"),
        ("sample.eta", sample.eta, 0.0, sample.sampler in SCHEDULER_SAMPLERS, "the DDPM schedulers' samplers"),
        (
            "sample.timestep_spacing",
            sample.timestep_spacing,
            "trailing",
            sample.sampler in SCHEDULER_SAMPLERS,
            "the DDPM schedulers' samplers",
        ),
    ):
        if not read and value != default:
            yield (
                f"{key}: {value!r} is not allowed with sample.sampler {sample.sampler!r}: only {readers} read it; "
                f"leave it at {default!r}"
            )
    if sample.sampler in SCHEDULER_SAMPLERS and sample.num_inference_steps > method.num_train_timesteps:
        yield (
            f"sample.num_inference_steps: {sample.num_inference_steps} is not allowed: must be <= "
            f"method.num_train_timesteps ({method.num_train_timesteps})"
        )
    if data.dataset not in TEXT_DATASETS:
        if sample.guidance_scale != 1 and not model.class_conditional:
            yield (
                f"sample.guidance_scale: {sample.guidance_scale} is not allowed with model.class_conditional false: "
                "guidance mixes a class-conditional model's conditional and unconditional outputs"
            )
        elif sample.guidance_scale != 1 and method.label_dropout == 0:
            yield (
                f"sample.guidance_scale: {sample.guidance_scale} is not allowed with method.label_dropout 0: the "
                "model never learned the null class that guidance needs (train with label_dropout > 0)"
            )
        if sample.class_label is not None and not model.class_conditional:
            yield (
                f"sample.class_label: {sample.class_label} is not allowed with model.class_conditional false: "
                "an unconditional model takes no class"
            )
        if sample.class_label is not None and sample.class_label >= num_classes(data):
            yield (
                f"sample.class_label: {sample.class_label} is not allowed: {data.dataset} has classes "
                f"0 to {num_classes(data) - 1}"
            )
        if sample.guide_checkpoint is not None:
            yield (
                f"sample.guide_checkpoint: {sample.guide_checkpoint!r} is not allowed with data.dataset "
                f"{data.dataset!r}: it is for text; leave it unset"
            )
        return
    if sample.class_label is not None:
        yield (
            f"sample.class_label: {sample.class_label} is not allowed with data.dataset {data.dataset!r}: it is "
            "for images; leave it unset"
        )
    if sample.guidance_scale != 1:
        yield (
            f"sample.guidance_scale: {sample.guidance_scale} is not allowed with data.dataset {data.dataset!r}: it "
            "is for class-conditional images (text is guided by sample.guide_checkpoint)"
        )
    # A sample longer than the block size is drawn window by window by the AR model and by guided
    # decoding, block by block by the masked one; embedding diffusion denoises it all at once.
    length = sample.length or data.block_size
    guided = sample.guide_checkpoint is not None
    if method.name == "masked" and not guided and (sample.block_length or length) > data.block_size:
        key, value = ("sample.block_length", sample.block_length) if sample.block_length else ("sample.length", length)
        yield (
            f"{key}: {value} is not allowed: must be <= data.block_size ({data.block_size}); "
            "longer masked samples are drawn block by block (set sample.block_length)"
        )
    if method.name == "embedding" and not guided and length > data.block_size:
        yield (
            f"sample.length: {length} is not allowed: must be <= data.block_size ({data.block_size}) for "
            "embedding diffusion, which denoises a whole sample at once"
        )
    if not guided and sample.guidance_alpha != 1:
        yield (
            f"sample.guidance_alpha: {sample.guidance_alpha} is not allowed without sample.guide_checkpoint: "
            "set the autoregressive run that guides, or leave alpha at 1"
        )
    if guided and method.name == "embedding" and method.prefix_fraction == 0:
        yield (
            "method.prefix_fraction: 0 is not allowed with sample.guide_checkpoint: guided decoding needs an "
            "embedding model trained to continue a prefix; train with a share in (0, 1], e.g. 0.25"
        )


def conflict(config: RunConfig) -> str | None:
    """The first of `conflicts`, or None."""
    return next(conflicts(config), None)


def sampling_conflict(trained: RunConfig, sample: "SampleConfig", task: str = "sample") -> str | None:
    """The first of `sampling_conflicts` for `sample` in `task` with a checkpoint whose config is `trained`."""
    return next(sampling_conflicts(trained, sample, task), None)


# Fields added after runs were stored whose default would change what a stored run does: a stored
# config (a run dir's config.yaml, a checkpoint's) without them gets the value that reproduces it.
STORED_DEFAULTS = {("method", "label_dropout"): 0.0}  # class-conditional runs before guidance dropped none


def validate_stored_run(raw: dict, source: str) -> RunConfig:
    """A run config as a run dir or checkpoint stored it (every field written out): validated like
    any other, with STORED_DEFAULTS for the fields it predates."""
    if isinstance(raw, dict):
        raw = {section: dict(value) if isinstance(value, dict) else value for section, value in raw.items()}
        for (section, key), value in STORED_DEFAULTS.items():
            if isinstance(raw.get(section), dict):
                raw[section].setdefault(key, value)
    return validate_run(raw, source)


def validate_run(raw: dict, source: str = "config", prefix: str = "") -> RunConfig:
    """Validate a run section; raise ConfigError with the first problem on one line."""
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_error(exc.errors()[0], RunConfig, prefix)}") from None
    problem = conflict(config)
    if problem:
        raise ConfigError(f"{source}: {prefix + '.' if prefix else ''}{problem}")
    return config


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    return parse_yaml(path.read_bytes(), str(path))


def run_section(raw: Any, source: str) -> dict:
    """The run config inside a YAML document: its `run:` section for a job spec, else the whole."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    if "run" in raw:
        unknown = set(raw) - JOB_SPEC_KEYS
        if unknown:
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, sorted(JOB_SPEC_KEYS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(JOB_SPEC_KEYS))}"
            raise ConfigError(f"{source}: {key}: unknown key; {hint}")
        return spec_run(raw, source)
    return raw


def spec_run(spec: dict, source: str) -> dict:
    """A job spec's run section, with the spec's top-level `expect:` lines in it (they live beside
    the prose, and travel with the run's config)."""
    run = dict(spec["run"] or {})
    if spec.get("expect"):
        if run.get("expect") and run["expect"] != spec["expect"]:
            raise ConfigError(f"{source}: run.expect: give the checks once, at the top level beside expected")
        run["expect"] = spec["expect"]
    return run


def parse_assignment(text: str, yaml: YAML | None = None) -> tuple[list[str], Any]:
    """`train.epochs=3` -> (['train', 'epochs'], 3). Values are YAML scalars or flow lists, loaded
    by `yaml` (default: the safe loader; a round-trip one keeps `1e-4` written as typed)."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    return parts, parse_yaml(value, f"--set {text!r}", yaml, inline=True) if value.strip() else None


def parse_override(text: str) -> tuple[list[str], Any]:
    """A run-config override; job-spec paths (`run.train.epochs=3`) are accepted too."""
    parts, value = parse_assignment(text)
    if parts == ["run"]:
        raise ConfigError(
            f"--set {text!r}: the run section as a whole cannot be set; set a key inside it, e.g. run.train.epochs=3"
        )
    return (parts[1:] if parts[0] == "run" else parts), value


def apply_overrides(raw: dict, overrides: list[str], parse=parse_override) -> dict:
    for text in overrides:
        parts, value = parse(text)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_run_config(path: Path, overrides: list[str] = (), stored: bool = False) -> RunConfig:
    """Read a run config or a job spec, apply `--set` overrides, validate; `stored`: a run dir's
    config.yaml, whose missing fields take STORED_DEFAULTS."""
    path = Path(path)
    document = read_yaml(path)
    if document is None:  # a truncated or blank file must not train with every default
        raise ConfigError(f"{path}: empty; a run config holds at least one section (task, data, model ...)")
    raw = run_section(document, str(path))
    raw = apply_overrides(dict(raw), list(overrides))
    return validate_stored_run(raw, str(path)) if stored else validate_run(raw, str(path))


def dump_yaml(data: dict, path: Path) -> None:
    """`data` as block-style YAML, replacing `path` atomically."""
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.width = 1 << 20  # a long path stays on one line: grep and a reader find it whole
    text = io.StringIO()
    yaml.dump(data, text)
    atomic_write(path, text.getvalue().encode())


def to_dict(config: RunConfig) -> dict:
    return config.model_dump(mode="json")

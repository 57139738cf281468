"""A trained run as the tasks use it: a checkpoint's config, method, data spec and (EMA) network.
The one place that turns checkpoints into networks: methods never load one."""

from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion.checkpoint import UNREADABLE, load_checkpoint
from diffusion.config import ConfigError, RunConfig, SampleConfig, sampling_conflict, to_dict, validate_stored_run
from diffusion.data import DataSpec
from diffusion.methods import Method, build_method
from diffusion.records import CHECKPOINTS, LATEST, METRICS, checkpoint_file, last_jsonl


def resolve_checkpoint(reference: str | Path, key: str = "sample.checkpoint") -> Path:
    """A run dir (its latest.pt), a checkpoints/ folder, or a .pt file; ConfigError naming `key`,
    the setting that gave the reference, when there is none."""
    found = checkpoint_file(reference)
    if found is None:
        raise ConfigError(
            f"{key}: {str(reference)!r} is not allowed: no checkpoint there "
            f"(expected a .pt file or a run dir holding {CHECKPOINTS}/{LATEST})"
        )
    return found


def pretrained_token_table(reference: str, data: DataSpec) -> Tensor:
    """(V, d) token embeddings of a trained text run (its EMA weights), for a method whose network
    starts from them (`Method.pretrained_reference`). ConfigError (key method.init_embeddings)
    when the run was trained on other tokens or has no token table."""
    checkpoint = load_checkpoint(resolve_checkpoint(reference, "method.init_embeddings"))
    if (checkpoint.get("data") or {}).get("tokenizer") != data.tokenizer:
        raise ConfigError(
            f"method.init_embeddings: {reference!r} is not allowed: it was trained with another "
            "tokenizer (or is not a text run); give a run with the same data settings"
        )
    # The token table of an autoregressive or masked run's Transformer (an embedding run has none).
    table = checkpoint["ema"].get("wte.weight")
    if table is None:
        raise ConfigError(f"method.init_embeddings: {reference!r} is not allowed: it has no token embedding table")
    return table[: data.vocab_size]  # the extra row is the start (AR) or mask (masked) token


def checkpoint_data(checkpoint: dict) -> DataSpec:
    """The DataSpec a checkpoint records; image checkpoints from before text runs kept the shape
    and classes at the top level."""
    return DataSpec.from_json(
        checkpoint.get("data")
        or {"kind": "image", "image_shape": checkpoint["image_shape"], "num_classes": checkpoint["num_classes"]}
    )


def build_network(config: RunConfig, method: Method, data: DataSpec) -> nn.Module:
    """The method's network for `data`, started from the run its method names, if any."""
    pretrained = None
    if method.pretrained_reference:
        pretrained = pretrained_token_table(method.pretrained_reference, data)
    return method.build_model(config.model, data, pretrained)


class TrainedModel:
    """A checkpoint's network (EMA weights by default), its method and what it was trained on."""

    def __init__(self, checkpoint_path: Path, use_ema: bool, device: torch.device):
        checkpoint = load_checkpoint(checkpoint_path)
        self.path = checkpoint_path
        self.config: RunConfig = validate_stored_run(checkpoint["config"], f"{checkpoint_path} (config)")
        self.step: int = checkpoint["step"]
        self.data = checkpoint_data(checkpoint)
        self.method = build_method(self.config)
        self.model = build_network(self.config, self.method, self.data)
        self.model.load_state_dict(checkpoint["ema" if use_ema else "model"])
        self.model.to(device).eval()
        self.device = device

    def check_sampling(self, sample: SampleConfig) -> None:
        """Raise ConfigError (one line) when `sample` cannot work with this checkpoint's method and
        network, whose config is the checkpoint's own, not the sampling spec's."""
        problem = sampling_conflict(self.config, sample)
        if problem:
            raise ConfigError(f"{self.path}: {problem}")


def inspect_checkpoint(reference: str | Path) -> dict:
    """What a checkpoint holds, without building its network: file, size, step, method, net, data,
    parameter count, the run it started from, and its run's last metrics line. ConfigError (one
    line) when there is no checkpoint there or the file is not one."""
    path = resolve_checkpoint(reference, "checkpoint")
    try:
        checkpoint = load_checkpoint(path)
        stored = checkpoint["config"]
    except (*UNREADABLE, KeyError, TypeError) as exc:  # or a pickle that holds no run's config
        raise ConfigError(
            f"checkpoint: {str(path)!r} is not allowed: not a checkpoint of a run "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
        ) from None
    config = validate_stored_run(stored, f"{path} (config)")
    data = checkpoint_data(checkpoint)
    run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else None
    return {
        "checkpoint": str(path),
        "bytes": path.stat().st_size,
        "step": checkpoint["step"],
        "epoch": checkpoint.get("epoch"),
        "train_seconds": checkpoint.get("train_seconds"),
        "method": config.method.name,
        "net": config.model.name,
        "num_parameters": sum(tensor.numel() for tensor in checkpoint["model"].values() if tensor.is_floating_point()),
        "data": {
            "dataset": config.data.dataset,
            "kind": data.kind,
            "shape": list(data.shape),
            "num_classes": data.num_classes,
            "vocab_size": data.vocab_size,
        },
        "parent": build_method(config).pretrained_reference,  # the run whose weights it started from
        "run_dir": str(run_dir) if run_dir else None,
        "metrics": last_jsonl(run_dir / METRICS) if run_dir else None,
        "config": to_dict(config),
    }


def load_scorer(
    reference: str | None, device: torch.device, key: str = "eval.scorer_checkpoint", tokenizer: dict | None = None
) -> TrainedModel | None:
    """The run that scores text samples, or guides their decoding (key sample.guide_checkpoint,
    which must share the sampled run's `tokenizer`): one whose method has an exact likelihood; None
    without a reference. ConfigError naming `key` when it is missing or will not do."""
    if reference is None:
        return None
    scorer = TrainedModel(resolve_checkpoint(reference, key), use_ema=True, device=device)
    if not scorer.method.exact_likelihood:
        raise ConfigError(
            f"{key}: {reference!r} is not allowed: not an autoregressive run (method.name "
            f"{scorer.config.method.name!r}); text is scored and guided by an autoregressive run"
        )
    if tokenizer is not None and scorer.data.tokenizer != tokenizer:
        raise ConfigError(
            f"{key}: {reference!r} is not allowed: its tokenizer differs from the sampled run's; "
            "guide with an autoregressive run trained on the same data settings"
        )
    return scorer

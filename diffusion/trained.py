"""A trained run as the tasks use it: a checkpoint's config, method, data spec and (EMA) network.
The one place that turns checkpoints into networks: methods never load one."""

import hashlib
from pathlib import Path

import torch
from torch import nn

from diffusion.checkpoint import UNREADABLE, UnreadableCheckpoint, load_checkpoint
from diffusion.config import ConfigError, RunConfig, SampleConfig, sampling_conflict, to_dict, validate_stored_run
from diffusion.data import DataSpec
from diffusion.methods import Method, Parent, build_method
from diffusion.records import CHECKPOINTS, LATEST, METRICS, checkpoint_file, last_jsonl


def resolve_checkpoint(reference: str | Path, key: str = "sample.checkpoint") -> Path:
    """A run dir (its latest.pt), a checkpoints/ folder, or a .pt file; ConfigError naming `key`,
    the setting that gave the reference, when there is none."""
    found = checkpoint_file(reference)
    if found is None:
        named = str(reference).startswith("run:") or not ("/" in str(reference) or str(reference).endswith(".pt"))
        raise ConfigError(
            f"{key}: {str(reference)!r} is not allowed: no checkpoint there "
            f"(expected a .pt file or a run dir holding {CHECKPOINTS}/{LATEST}"
            + ("; run:SPEC and ops ids are resolved by `ops submit`, not here" if named else "")
            + ")"
        )
    return found


def checkpoint_data(checkpoint: dict) -> DataSpec:
    """The DataSpec a checkpoint records; image checkpoints from before text runs kept the shape
    and classes at the top level."""
    return DataSpec.from_json(
        checkpoint.get("data")
        or {"kind": "image", "image_shape": checkpoint["image_shape"], "num_classes": checkpoint["num_classes"]}
    )


def load_parent(method: Method, recorded: dict | None = None) -> Parent | None:
    """The run `method` builds on (`Method.parent_reference`), or None. `recorded`: what a
    checkpoint of the run being built keeps of its parent; then the parent's config comes from it
    and its weights with that checkpoint, so the parent run need not exist. Else the parent's
    checkpoint is read: ConfigError (naming `method.parent_key`) when it is missing or not a run's."""
    reference = method.parent_reference
    if reference is None:
        return None
    if recorded is not None:
        if recorded["config"] is None:  # bare weights: the method's own settings say what they are
            return Parent(None, None, None, recorded)
        config = validate_stored_run(recorded["config"], f"{method.parent_key} {reference!r} (recorded config)")
        return Parent(config, DataSpec.from_json(recorded["data"]), None, recorded)
    path = resolve_checkpoint(reference, method.parent_key)
    try:
        checkpoint = load_checkpoint(path)  # weights only: a file from elsewhere runs no code
    except UNREADABLE as exc:
        raise ConfigError(
            f"{method.parent_key}: {reference!r} is not allowed: {path} is not a checkpoint ({unreadable_reason(exc)})"
        ) from None
    record = {"reference": reference, "checkpoint": str(path.resolve()), "sha256": file_sha256(path)}
    weights = bare_weights(checkpoint)
    if weights is not None:
        return Parent(None, None, weights, record | {"step": None, "config": None, "data": None})
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        raise ConfigError(
            f"{method.parent_key}: {reference!r} is not allowed: {path} is neither a run's checkpoint nor a state dict"
        )
    try:
        data = checkpoint_data(checkpoint)
        record |= {"step": checkpoint["step"], "config": checkpoint["config"], "data": data.to_json()}
        weights = checkpoint["ema"]
    except (KeyError, TypeError) as exc:
        raise ConfigError(
            f"{method.parent_key}: {reference!r} is not allowed: {path} has a config but is not a run's "
            f"checkpoint (no {exc})"
        ) from None
    config = validate_stored_run(checkpoint["config"], f"{method.parent_key} {reference!r} (its config)")
    return Parent(config, data, weights, record)


def bare_weights(checkpoint) -> dict[str, torch.Tensor] | None:
    """A checkpoint that is only weights (`torch.save(net.state_dict())`, or one under
    "state_dict" / "model_state_dict", as other code bases save them), else None."""
    if isinstance(checkpoint, dict) and "config" not in checkpoint:
        for key in ("state_dict", "model_state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
        if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            return dict(checkpoint)
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_network(config: RunConfig, method: Method, data: DataSpec, parent: Parent | None = None) -> nn.Module:
    """The method's network for `data`, built on `parent` (load_parent) when its method names one."""
    return method.build_model(config.model, data, parent)


class TrainedModel:
    """A checkpoint's network (EMA weights by default), its method and what it was trained on."""

    def __init__(self, checkpoint_path: Path, use_ema: bool, device: torch.device, key: str = "sample.checkpoint"):
        checkpoint = read_run_checkpoint(checkpoint_path, key)
        self.path = checkpoint_path
        self.config: RunConfig = validate_stored_run(checkpoint["config"], f"{checkpoint_path} (config)")
        self.step: int = checkpoint["step"]
        self.data = checkpoint_data(checkpoint)
        self.method = build_method(self.config)
        self.parent = load_parent(self.method, checkpoint.get("parent"))
        self.model = build_network(self.config, self.method, self.data, self.parent)
        self.model.load_state_dict(checkpoint["ema" if use_ema else "model"])
        self.model.to(device).eval()
        self.device = device

    def check_sampling(self, sample: SampleConfig, task: str = "sample") -> None:
        """Raise ConfigError (one line) when `sample` cannot work with this checkpoint's method and
        network, whose config is the checkpoint's own, not the sampling spec's."""
        problem = sampling_conflict(self.config, sample, task)
        if problem:
            raise ConfigError(f"{self.path}: {problem}")


def read_run_checkpoint(path: Path, key: str) -> dict:
    """A run's checkpoint (weights-only loading: a foreign file runs no code); ConfigError naming
    `key`, the setting that gave it, when the file is not one."""
    try:
        checkpoint = load_checkpoint(path)
        for part in ("config", "step", "model", "ema"):
            checkpoint[part]
    except (*UNREADABLE, KeyError, TypeError) as exc:  # KeyError, TypeError: it holds no run's checkpoint
        raise ConfigError(
            f"{key}: {str(path)!r} is not allowed: not a checkpoint of a run ({unreadable_reason(exc)})"
        ) from None
    return checkpoint


def unreadable_reason(exc: Exception) -> str:
    if "Weights only load failed" in str(exc):
        return "it holds objects besides weights, which could run code when loaded"
    if isinstance(exc, UnreadableCheckpoint):  # its message names the parser's error
        return str(exc)[:120]
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"


def inspect_checkpoint(reference: str | Path) -> dict:
    """What a checkpoint holds, without building its network: file, size, step, method, net, data,
    parameter count, the run it started from, and its run's last metrics line. ConfigError (one
    line) when there is no checkpoint there or the file is not one."""
    path = resolve_checkpoint(reference, "checkpoint")
    checkpoint = read_run_checkpoint(path, "checkpoint")
    config = validate_stored_run(checkpoint["config"], f"{path} (config)")
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
        "parent": parent_summary(checkpoint.get("parent"), build_method(config).parent_reference),
        "run_dir": str(run_dir) if run_dir else None,
        "metrics": last_jsonl(run_dir / METRICS) if run_dir else None,
        "config": to_dict(config),
    }


def parent_summary(recorded: dict | None, reference: str | None) -> dict | None:
    """The run a checkpoint built on, as `inspect_checkpoint` shows it: its reference, checkpoint,
    hash, step, method and net (recorded by the checkpoint; older ones kept the reference alone)."""
    if reference is None:
        return None
    if recorded is None:
        return {"reference": reference}
    config = recorded["config"]  # None: bare weights, described by the run's own method settings
    return {
        **{key: recorded[key] for key in ("reference", "checkpoint", "sha256", "step")},
        "method": config["method"]["name"] if config else None,
        "net": config["model"]["name"] if config else None,
        "data": recorded["data"],
    }


def load_scorer(
    reference: str | None, device: torch.device, key: str = "eval.scorer_checkpoint", tokenizer: dict | None = None
) -> TrainedModel | None:
    """The run that scores text samples, or guides their decoding (key sample.guide_checkpoint,
    which must share the sampled run's `tokenizer`): one whose method has an exact likelihood; None
    without a reference. ConfigError naming `key` when it is missing or will not do."""
    if reference is None:
        return None
    scorer = TrainedModel(resolve_checkpoint(reference, key), use_ema=True, device=device, key=key)
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

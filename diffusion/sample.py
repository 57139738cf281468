"""Sampling from a trained run: load its checkpoint (which carries its config), generate, save."""

import math
from pathlib import Path

import numpy as np
import torch

from diffusion.checkpoint import load_checkpoint
from diffusion.config import (
    ConfigError,
    RunConfig,
    SampleConfig,
    sampling_conflict,
    validate_run,
)
from diffusion.methods import build_method
from diffusion.records import CHECKPOINTS, LATEST, checkpoint_file


def resolve_checkpoint(reference: str | Path, key: str = "sample.checkpoint") -> Path:
    """A run dir (its latest.pt), a checkpoints/ folder, or a .pt file; ConfigError naming `key`,
    the setting that gave the reference, when there is none."""
    found = checkpoint_file(reference)
    if found is None:
        raise ConfigError(f"{key}: {str(reference)!r} is not allowed: no checkpoint there "
                          f"(expected a .pt file or a run dir holding {CHECKPOINTS}/{LATEST})")
    return found


class TrainedModel:
    """A checkpoint's network (EMA weights by default), its method and what it was trained on."""

    def __init__(self, checkpoint_path: Path, use_ema: bool, device: torch.device):
        from diffusion.train import build_model

        checkpoint = load_checkpoint(checkpoint_path)
        self.path = checkpoint_path
        self.config: RunConfig = validate_run(checkpoint["config"], f"{checkpoint_path} (config)")
        self.step: int = checkpoint["step"]
        # Image checkpoints from before text runs kept the shape and classes at the top level.
        self.meta: dict = checkpoint.get("data") or {"kind": "image", "image_shape": checkpoint["image_shape"],
                                                     "num_classes": checkpoint["num_classes"]}
        self.method = build_method(self.config.method)
        self.model = build_model(self.config, self.method, self.meta)
        self.model.load_state_dict(checkpoint["ema" if use_ema else "model"])
        self.model.to(device).eval()
        self.device = device
        if self.meta["kind"] == "image":
            self.image_shape = tuple(self.meta["image_shape"])
            self.num_classes: int = self.meta["num_classes"]

    def check_sampling(self, sample: SampleConfig) -> None:
        """Raise ConfigError (one line) when `sample` cannot work with this checkpoint's method and
        network, whose config is the checkpoint's own, not the sampling spec's."""
        problem = sampling_conflict(self.config, sample)
        if problem:
            raise ConfigError(f"{self.path}: {problem}")

    def generate(self, sample: SampleConfig, num_samples: int, progress: bool = False) -> torch.Tensor:
        """`num_samples` images in [-1, 1], in batches, reproducible from `sample.seed`."""
        generator = torch.Generator().manual_seed(sample.seed)
        batches = []
        for start in range(0, num_samples, sample.batch_size):
            count = min(sample.batch_size, num_samples - start)
            class_labels = None
            if self.config.model.class_conditional:
                labels = torch.arange(start, start + count) % self.num_classes
                if sample.class_label is not None:
                    labels = torch.full((count,), sample.class_label)
                class_labels = labels.to(self.device)
            batches.append(
                self.method.sample(
                    self.model,
                    count,
                    self.image_shape,
                    sampler=sample.sampler,
                    num_inference_steps=sample.num_inference_steps,
                    eta=sample.eta,
                    timestep_spacing=sample.timestep_spacing,
                    generator=generator,
                    class_labels=class_labels,
                    device=self.device,
                    progress=progress,
                ).cpu()
            )
        return torch.cat(batches)


def sample_name(sample: SampleConfig) -> str:
    eta = f"-eta{sample.eta:g}" if sample.sampler == "ddim" and sample.eta else ""
    return f"{sample.sampler}{sample.num_inference_steps}{eta}-seed{sample.seed}"


def save_samples(images: torch.Tensor, folder: Path, name: str) -> Path:
    """A PNG grid (at most 100 images) to look at, and every sample as uint8 in an .npz."""
    from torchvision.utils import save_image

    folder.mkdir(parents=True, exist_ok=True)
    shown = images[:100]
    grid_path = folder / f"{name}.png"
    save_image((shown + 1) / 2, grid_path, nrow=int(math.ceil(math.sqrt(len(shown)))))
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.savez_compressed(folder / f"{name}.npz", images=pixels)
    return grid_path


def sample_task(config: RunConfig, run) -> int:
    """Sample `sample.num_samples` images into `run` (a RunDir): the trained run's own samples/
    when sampling it in place, else a new run dir."""
    from diffusion.records import Summary
    from diffusion.train import pick_device

    device = pick_device(config.device)
    checkpoint_path = resolve_checkpoint(config.sample.checkpoint or run.path)
    trained = TrainedModel(checkpoint_path, config.sample.use_ema, device)
    trained.check_sampling(config.sample)
    if trained.meta["kind"] == "text":
        from diffusion.evaluate_text import text_sample_task

        return text_sample_task(config, trained, run)  # creates the run dir once its references are found
    if not run.in_place:
        run.create(config)
    images = trained.generate(config.sample, config.sample.num_samples, progress=True)
    grid = save_samples(images, run.samples, sample_name(config.sample))
    run.write_record(Summary(status="completed", step=trained.step, result={
        "checkpoint": str(checkpoint_path), "num_samples": len(images), "grid": str(grid)}))
    print(f"{len(images)} samples from {checkpoint_path} (step {trained.step}) -> {grid}", flush=True)
    return 0

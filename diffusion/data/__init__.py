"""Datasets, held in memory as tensors (images uint8, text token ids): the datasets here are small, and
indexing a tensor by a seeded permutation makes the data order exact to resume (no DataLoader worker state)."""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusion.config import DataConfig
from diffusion.data.cifar10 import load_cifar10
from diffusion.data.mnist import load_mnist
from diffusion.data.shakespeare import load_text_dataset, tokenizer_from_json
from diffusion.data.spec import DATA_ROOT_ENV, DatasetNotFoundError, DataSpec, resolve_data_root
from diffusion.records import atomic_write

__all__ = [
    "DATA_ROOT_ENV",
    "DataSpec",
    "DatasetNotFoundError",
    "ImageDataset",
    "decode",
    "load_dataset",
    "has_validation",
    "load_images",
    "load_validation",
    "resolve_data_root",
    "tokenizer_from_json",
    "write_samples",
]


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)
    num_classes: int
    resolution: int | None = None  # upscaled to this size per batch (the stored images stay small)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        channels, height, width = self.images.shape[1:]
        return (channels, self.resolution, self.resolution) if self.resolution else (channels, height, width)

    def batch(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Images scaled to [-1, 1], the range the diffusion methods assume."""
        images = self.images[indices].to(device).float() / 127.5 - 1.0
        if self.resolution:
            images = F.interpolate(
                images, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False
            )
        return {"images": images, "labels": self.labels[indices].to(device)}

    def spec(self) -> DataSpec:
        return DataSpec("image", self.shape, num_classes=self.num_classes)


def load_images(config: DataConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole image split as stored, (images uint8 (N, C, H, W), labels (N,)): what samples are
    scored against (no subset, no class limit, no upscaling)."""
    root = resolve_data_root(config.root)
    if config.dataset == "cifar10":
        return load_cifar10(root, split, config.download, config.npz, config.val_fraction)
    images, labels = load_mnist(root, split, download=config.download)
    return images.unsqueeze(1), labels


def load_dataset(config: DataConfig, split: str = "train"):
    """An ImageDataset (splits train, test) or a TextDataset (splits train, val); both have
    `spec()`, `len()` and `batch(indices, device)`."""
    if config.dataset == "shakespeare":
        return load_text_dataset(config, split)
    images, labels = load_images(config, split)
    if config.only_digit is not None:
        keep = labels == config.only_digit
        images, labels = images[keep], labels[keep]
    if config.limit_per_class is not None:
        keep = (
            torch.cat([torch.nonzero(labels == label).flatten()[: config.limit_per_class] for label in labels.unique()])
            .sort()
            .values
        )
        images, labels = images[keep], labels[keep]
    if config.subset is not None:
        images, labels = images[: config.subset], labels[: config.subset]
    return ImageDataset(images=images, labels=labels, num_classes=10, resolution=config.resolution)


def has_validation(config: DataConfig) -> bool:
    """Whether the data has a held-out split that models are scored on by likelihood (text);
    images are scored on their samples instead, against real ones."""
    return config.dataset == "shakespeare"


def load_validation(config: DataConfig):
    """That held-out split, or None where there is none."""
    return load_text_dataset(config, "val") if has_validation(config) else None


SAMPLE_RULE = "-" * 72


def decode(data: DataSpec, samples: torch.Tensor) -> list[str]:
    """Text samples (N, L) token ids as strings, with the tokenizer the data spec carries."""
    tokenizer = tokenizer_from_json(data.tokenizer)
    return [tokenizer.decode(row) for row in samples.tolist()]


def write_samples(
    data: DataSpec,
    samples: torch.Tensor,
    folder: Path,
    name: str,
    keep_arrays: bool = True,
    labels: torch.Tensor | None = None,
) -> dict:
    """Samples as a person looks at them: images as a PNG grid (at most 100; with `labels` in
    blocks, one class per row), and with `keep_arrays` every one as uint8 in NAME.npz (and the
    labels); text decoded into NAME.txt, each sample under a numbered rule. Returns {"grid": path}
    or {"samples": path, "texts": the decoded samples}."""
    folder.mkdir(parents=True, exist_ok=True)
    if data.kind == "text":
        texts = decode(data, samples)
        path = folder / f"{name}.txt"
        atomic_write(
            path, "".join(f"{SAMPLE_RULE} sample {index}\n{text}\n" for index, text in enumerate(texts)).encode()
        )
        return {"samples": path, "texts": texts}
    from torchvision.utils import save_image  # torchvision's import costs a second; only where images are saved

    shown = samples[:100]
    columns = math.ceil(math.sqrt(len(shown)))
    if labels is not None and len(labels[: len(shown)].unique()) > 1:
        block = int(torch.bincount(labels[: len(shown)]).max())
        columns = block if block > 1 else columns  # a class per row; one sample each: a square grid
    grid = folder / f"{name}.png"
    save_image((shown + 1) / 2, grid, nrow=columns)
    if keep_arrays:
        pixels = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        arrays = {"images": pixels} if labels is None else {"images": pixels, "labels": labels.numpy()}
        np.savez_compressed(folder / f"{name}.npz", **arrays)
    return {"grid": grid}

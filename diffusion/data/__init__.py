"""Datasets, held in memory as tensors (images uint8, text token ids): the datasets here are small, and
indexing a tensor by a seeded permutation makes the data order exact to resume (no DataLoader worker state)."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from diffusion.config import DataConfig

DATA_ROOT_ENV = "DIFFUSION_DATA_ROOT"


class DatasetNotFoundError(RuntimeError):
    """The dataset is neither under the data root nor downloadable; the message says how to fix it."""


def resolve_data_root(configured: str | None) -> Path:
    """`data.root` when set, else $DIFFUSION_DATA_ROOT, else ./data."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(DATA_ROOT_ENV):
        return Path(os.environ[DATA_ROOT_ENV]).expanduser()
    return Path("data")


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)
    num_classes: int
    kind: ClassVar[str] = "image"

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batch(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Images scaled to [-1, 1], the range the diffusion methods assume."""
        images = self.images[indices].to(device).float() / 127.5 - 1.0
        return {"images": images, "labels": self.labels[indices].to(device)}

    def meta(self) -> dict:
        """What a checkpoint keeps to rebuild the model without the dataset."""
        return {"kind": self.kind, "image_shape": list(self.shape), "num_classes": self.num_classes}


def load_dataset(config: DataConfig, split: str = "train"):
    """An ImageDataset (splits train, test) or a TextDataset (splits train, val); both have kind and meta()."""
    if config.dataset == "shakespeare":
        from diffusion.data.shakespeare import load_text_dataset

        return load_text_dataset(config, split)
    from diffusion.data.mnist import load_mnist

    images, labels = load_mnist(resolve_data_root(config.root), split, download=config.download)
    if config.only_digit is not None:
        keep = labels == config.only_digit
        images, labels = images[keep], labels[keep]
    if config.subset is not None:
        images, labels = images[: config.subset], labels[: config.subset]
    return ImageDataset(images=images.unsqueeze(1), labels=labels, num_classes=10)

"""CIFAR-10: torchvision's files under ROOT/cifar10 (downloaded there when missing), or an .npz of
`images` (N, 32, 32, 3) uint8 and `labels` (N,) that is split into train and test here (the
machines without a network hold the 10,000 test images that way)."""

from pathlib import Path

import numpy as np
import torch

from diffusion.data.spec import DatasetNotFoundError

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FOLDER = "cifar10"


def load_cifar10(
    root: Path, split: str, download: bool = True, npz: str | None = None, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) for split 'train' or 'test'."""
    if npz is not None:
        return split_npz(root / npz, split, val_fraction)
    from torchvision.datasets import CIFAR10  # torchvision costs a second to import; only where CIFAR is read

    folder = root / FOLDER
    present = (folder / "cifar-10-batches-py").is_dir()
    if not present and not download:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: expected {folder / 'cifar-10-batches-py'}; set data.download=true, point "
            f"data.root / $DIFFUSION_DATA_ROOT at a folder holding {FOLDER}/, or give data.npz (an .npz of "
            "images and labels under the data root)"
        )
    try:
        dataset = CIFAR10(root=str(folder), train=split == "train", download=not present)
    except (RuntimeError, OSError) as exc:  # torchvision reports failed downloads so
        raise DatasetNotFoundError(
            f"CIFAR-10 not found in {folder} and the download failed ({str(exc).splitlines()[0]}); copy "
            "cifar-10-batches-py there, or give data.npz (an .npz of images and labels under the data root)"
        ) from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.long)


def split_npz(path: Path, split: str, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The .npz's images split by class: the last `val_fraction` of each class's images (in file
    order) are the test split, the rest the train split, so both keep the class balance."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f"data.npz: {str(path)!r} not found; give a path under the data root "
            "(data.root / $DIFFUSION_DATA_ROOT) to an .npz of images and labels"
        )
    with np.load(path) as arrays:
        images, labels = torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]).long()
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise DatasetNotFoundError(
            f"data.npz: {str(path)!r} holds images of shape {tuple(images.shape)} and type "
            f"{images.dtype}; expected uint8 (N, 32, 32, 3)"
        )
    keep = []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        held_out = max(1, round(len(members) * val_fraction))
        keep.append(members[-held_out:] if split == "test" else members[:-held_out])
    order = torch.cat(keep).sort().values
    return images[order].permute(0, 3, 1, 2).contiguous(), labels[order]

"""MNIST through torchvision: looked up under ROOT/MNIST/raw, downloaded there when missing."""

from pathlib import Path

import torch

from diffusion.data.spec import DatasetNotFoundError

RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_mnist(root: Path, split: str, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) for split 'train' or 'test'."""
    from torchvision.datasets import MNIST  # torchvision costs a second to import; only where MNIST is read

    raw = root / "MNIST" / "raw"
    present = all((raw / name).is_file() for name in RAW_FILES[split])
    if not present and not download:
        raise DatasetNotFoundError(
            f"MNIST not found: expected {', '.join(RAW_FILES[split])} in {raw}; "
            f"set data.download=true, or point data.root / $DIFFUSION_DATA_ROOT at a folder holding MNIST/raw/"
        )
    try:
        dataset = MNIST(root=str(root), train=split == "train", download=not present)
    except RuntimeError as exc:  # torchvision reports failed mirrors as RuntimeError
        raise DatasetNotFoundError(
            f"MNIST not found in {raw} and the download failed ({str(exc).splitlines()[0]}); "
            f"copy {', '.join(RAW_FILES[split])} there, or point data.root / $DIFFUSION_DATA_ROOT "
            f"at a folder holding MNIST/raw/"
        ) from None
    return dataset.data.clone(), dataset.targets.long().clone()

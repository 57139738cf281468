"""What a network and a method need to know about the data, without the data: `DataSpec`. Every
checkpoint keeps one (as JSON), so a run is sampled and its samples decoded without the dataset."""

import os
from dataclasses import dataclass
from pathlib import Path

from diffusion.config import ConfigError

DATA_ROOT_ENV = "DIFFUSION_DATA_ROOT"


class DatasetNotFoundError(ConfigError):
    """The dataset is neither under the data root nor downloadable; the message says how to fix it.
    Bad input like any other (exit 2, nothing written)."""


def resolve_data_root(configured: str | None) -> Path:
    """`data.root` when set, else $DIFFUSION_DATA_ROOT, else ./data."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(DATA_ROOT_ENV):
        return Path(os.environ[DATA_ROOT_ENV]).expanduser()
    return Path("data")


@dataclass(frozen=True)
class DataSpec:
    """kind: "image" (examples are float (C, H, W) in [-1, 1], batches {"images", "labels"}), "text"
    (examples are (block_size,) token ids, batches {"tokens"}) or "points" (2-D toys: examples are
    float (2,), of order 1, batches {"points", "labels"}).
    shape: one example's shape. num_classes: image and point labels (None: unlabelled). vocab_size,
    tokenizer (its JSON, to decode samples) and chars_per_token (bits per character = bits per
    token / chars_per_token): text only."""

    kind: str
    shape: tuple[int, ...]
    num_classes: int | None = None
    vocab_size: int | None = None
    tokenizer: dict | None = None
    chars_per_token: float | None = None

    @property
    def block_size(self) -> int:
        """Text: tokens per example (the transformer's context)."""
        return self.shape[0]

    @property
    def preview_count(self) -> int:
        """How many samples a training run draws at each sample point: a grid of digits, a few texts,
        a scatter of points (which needs many to show a density)."""
        return {"image": 64, "points": 2000}.get(self.kind, 8)

    @property
    def flow_count(self) -> int:
        """How many samples a picture of the flow from noise to data follows (write_flow): a few rows
        of images, a cloud of points; none of text."""
        return {"image": 8, "points": 1000}.get(self.kind, 0)

    def to_json(self) -> dict:
        """The checkpoint's "data" record (the layout checkpoints have always had)."""
        if self.kind == "image":
            return {"kind": "image", "image_shape": list(self.shape), "num_classes": self.num_classes}
        if self.kind == "points":
            return {"kind": "points", "shape": list(self.shape), "num_classes": self.num_classes}
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "block_size": self.block_size,
            "tokenizer": self.tokenizer,
            "chars_per_token": self.chars_per_token,
        }

    @classmethod
    def from_json(cls, record: dict) -> "DataSpec":
        if record["kind"] == "image":
            return cls("image", tuple(record["image_shape"]), num_classes=record["num_classes"])
        if record["kind"] == "points":
            return cls("points", tuple(record["shape"]), num_classes=record["num_classes"])
        return cls(
            record["kind"],
            (record["block_size"],),
            vocab_size=record["vocab_size"],
            tokenizer=record["tokenizer"],
            chars_per_token=record.get("chars_per_token"),
        )

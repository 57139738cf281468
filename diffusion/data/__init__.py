"""Datasets, held in memory as tensors (images uint8, text token ids, 2-D toy points): the datasets here are
small, and indexing a tensor by a seeded permutation makes the data order exact to resume (no DataLoader
worker state)."""

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusion.config import TOY_DATASETS, DataConfig
from diffusion.data.cifar10 import load_cifar10
from diffusion.data.mnist import load_mnist
from diffusion.data.shakespeare import load_text_dataset, tokenizer_from_json
from diffusion.data.spec import DATA_ROOT_ENV, DatasetNotFoundError, DataSpec, resolve_data_root
from diffusion.data.toys import PointDataset, make_toy, num_classes
from diffusion.records import atomic_write

__all__ = [
    "DATA_ROOT_ENV",
    "DataSpec",
    "DatasetNotFoundError",
    "ImageDataset",
    "PointDataset",
    "decode",
    "load_dataset",
    "has_validation",
    "load_images",
    "load_validation",
    "make_toy",
    "resolve_data_root",
    "tokenizer_from_json",
    "write_flow",
    "write_samples",
]

# The toys' splits: fixed seeds, so every run trains on the same points and is scored against the same
# held-out ones. Up to 5000 samples are scored against the first of them; the rest measure the floor of
# the energy distance (scores/points.py: reference_floor), more precisely the more of them there are.
TOY_TRAIN_SEED, TOY_TEST_SEED = 0, 1
TOY_TEST_POINTS = 10_000


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
    """An ImageDataset (splits train, test), a TextDataset (splits train, val) or a PointDataset (toys,
    splits train: `num_points` points from seed 0, test: 10_000 from seed 1); all have `spec()`,
    `len()` and `batch(indices, device)`."""
    if config.dataset == "shakespeare":
        return load_text_dataset(config, split)
    if config.dataset in TOY_DATASETS:
        return load_toy(config, split)
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


def load_toy(config: DataConfig, split: str) -> PointDataset:
    """A toy's split (train or test) as a PointDataset; ValueError for another split."""
    if split not in ("train", "test"):
        raise ValueError(f"a toy's splits are train and test, not {split!r}")
    count, seed = (config.num_points, TOY_TRAIN_SEED) if split == "train" else (TOY_TEST_POINTS, TOY_TEST_SEED)
    points, labels = make_toy(config.dataset, count, seed=seed, num_components=config.num_components)
    return PointDataset(points, labels, num_classes(config.dataset, config.num_components))


def has_validation(config: DataConfig) -> bool:
    """Whether the data has a held-out split that its samples are scored against when training ends
    and by the sample and eval tasks: text (by likelihood and the samples' health) and the toys (by
    the energy distance of the samples to held-out points); images are scored against real ones by
    `eval` only."""
    return config.dataset == "shakespeare" or config.dataset in TOY_DATASETS


def load_validation(config: DataConfig):
    """That held-out split (a TextDataset, or the toy's test PointDataset), or None where there is none."""
    if config.dataset in TOY_DATASETS:
        return load_toy(config, "test")
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
    labels); text decoded into NAME.txt, each sample under a numbered rule; points (N, 2) as a
    scatter NAME.png (every one, coloured by `labels` when given) and with `keep_arrays` as float32
    `points` in NAME.npz (and the labels). Returns {"grid": path}, {"samples": path, "texts": the
    decoded samples} or {"scatter": path}."""
    folder.mkdir(parents=True, exist_ok=True)
    if data.kind == "points":
        return write_points(samples, folder, name, keep_arrays, labels)
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


# Points are drawn on this fixed square, whatever the toy, so that a run's previews compare over training
# and between runs: every toy lies within [-4.6, 4.6] but for the far tails of its noise.
POINT_LIMIT = 5.0
FLOW_PANELS = 6  # a points flow's PNG: panels at evenly spaced steps, first (noise) and last (data) included
FLOW_COLUMNS = 8  # an image flow's PNG: columns (steps) ...
FLOW_ROWS = 8  # ... and rows (samples)
GIF_SECONDS, GIF_HOLD_MS = 3.0, 1000  # a flow's GIF plays in about 3 s, then holds the data for 1 s


def write_points(
    samples: torch.Tensor, folder: Path, name: str, keep_arrays: bool, labels: torch.Tensor | None
) -> dict:
    """`write_samples` for points (N, 2): NAME.png, with `keep_arrays` NAME.npz; {"scatter": path}."""
    from matplotlib.figure import Figure  # matplotlib's import costs a second; only where points are drawn

    samples = samples.detach().cpu().float()
    labels = None if labels is None else labels.detach().cpu()
    figure = Figure(figsize=(5, 5))
    # Said in the title, as a scatter on a fixed square cannot show them: a diverging model's points.
    outside = int((~(samples.abs() <= POINT_LIMIT).all(dim=1)).sum())
    title = f"{name}: {len(samples)} samples" + (f", {outside} outside the frame or not finite" if outside else "")
    draw_points(figure.add_subplot(), samples, labels, title)
    scatter = folder / f"{name}.png"
    atomic_write(scatter, figure_png(figure))
    if keep_arrays:
        arrays = {"points": samples.numpy()} | ({} if labels is None else {"labels": labels.numpy()})
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write(folder / f"{name}.npz", buffer.getvalue())
    return {"scatter": scatter}


def draw_points(axes, points: torch.Tensor, labels: torch.Tensor | None, title: str):
    """A scatter of points (N, 2) on the fixed square [-POINT_LIMIT, POINT_LIMIT]^2, small markers,
    coloured by labels (tab10: more than 10 classes repeat colours); the scatter's artist."""
    colours = {} if labels is None else {"c": (labels % 10).numpy(), "cmap": "tab10", "vmin": -0.5, "vmax": 9.5}
    artist = axes.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=2, linewidths=0, alpha=0.7, **colours)
    axes.set_xlim(-POINT_LIMIT, POINT_LIMIT)
    axes.set_ylim(-POINT_LIMIT, POINT_LIMIT)
    axes.set_aspect("equal")
    axes.tick_params(labelsize=7)
    axes.set_title(title, fontsize=9)
    return artist


def figure_png(figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def evenly_spaced(count: int, chosen: int) -> list[int]:
    """At most `chosen` indices into range(count), evenly spaced, the first and the last included."""
    chosen = min(chosen, count)
    return [round(i * (count - 1) / max(chosen - 1, 1)) for i in range(chosen)]


def write_flow(
    data: DataSpec,
    times: torch.Tensor,
    path: torch.Tensor,
    folder: Path,
    name: str = "flow",
    labels: torch.Tensor | None = None,
) -> list[Path]:
    """The flow from noise to data as a person looks at it. `path` (K, N, *data.shape) holds the N
    samples at the K `times` (K,), in the order the sampler visited them: path[0] is the noise
    (t = 1), path[-1] the data (t = 0).

    Points: an animated GIF NAME.gif, one frame per time (its title shows t), and a PNG NAME.png
    of 6 panels at evenly spaced steps (the first and the last included); `labels` (N,) colour the
    points, each keeping its colour along its path. Images: a PNG NAME.png, one row per sample (the
    first 8), one column per step (8, evenly spaced, first and last included), values in [-1, 1].
    Each file is written atomically. Returns the paths written; ValueError for text, or for shapes
    that do not match."""
    if data.kind not in ("points", "image"):
        raise ValueError(f"write_flow draws points and images, not {data.kind}")
    if path.dim() < 2 or tuple(path.shape[2:]) != tuple(data.shape) or times.shape != path.shape[:1]:
        raise ValueError(
            f"path must be (K, N, {', '.join(map(str, data.shape))}) with times (K,); "
            f"got path {tuple(path.shape)}, times {tuple(times.shape)}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    path, times = path.detach().cpu().float(), times.detach().cpu().double()
    steps = len(times)
    if data.kind == "image":
        from torchvision.utils import save_image

        columns = evenly_spaced(steps, FLOW_COLUMNS)
        shown = path[columns, :FLOW_ROWS].transpose(0, 1)  # (rows, columns, C, H, W): a sample's steps in a row
        buffer = io.BytesIO()
        save_image((shown.flatten(0, 1).clamp(-1, 1) + 1) / 2, buffer, format="png", nrow=len(columns))
        grid = folder / f"{name}.png"
        atomic_write(grid, buffer.getvalue())
        return [grid]

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    labels = None if labels is None else labels.detach().cpu()
    # The GIF: one figure, its scatter moved from frame to frame (far faster than a figure per frame).
    figure = Figure(figsize=(4, 4), dpi=80)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    artist = draw_points(axes, path[0], labels, f"t = {times[0]:.3f}   (step 0 of {steps - 1})")
    figure.tight_layout()  # with a title of the frames' length: the layout stays as the first frame's
    frames = []
    for step in range(steps):
        artist.set_offsets(path[step].numpy())
        # The step in the title too: Pillow merges identical consecutive frames, and K frames are promised.
        axes.set_title(f"t = {times[step]:.3f}   (step {step} of {steps - 1})", fontsize=9)
        canvas.draw()
        frames.append(Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy()))
    per_frame = max(20, round(1000 * GIF_SECONDS / steps))
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=[per_frame] * (steps - 1) + [GIF_HOLD_MS],
        loop=0,
    )
    gif = folder / f"{name}.gif"
    atomic_write(gif, buffer.getvalue())

    panels = evenly_spaced(steps, FLOW_PANELS)
    figure = Figure(figsize=(2.6 * len(panels), 2.8))
    for index, step in enumerate(panels):
        draw_points(figure.add_subplot(1, len(panels), index + 1), path[step], labels, f"t = {times[step]:.3f}")
    grid = folder / f"{name}.png"
    atomic_write(grid, figure_png(figure))
    return [gif, grid]

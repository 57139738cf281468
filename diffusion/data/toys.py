"""2-D toy distributions, the standard ones of the flow-matching and score literature (FFJORD, Grathwohl
et al. 2019; torchcfm): each drawn from its own seeded generator, so a dataset is exact to recreate and
never touches the global RNG. Coordinates are of order 1, within [-4, 4] up to the Gaussian noise's tails
(the N(0, I) noise the flows start from has the same scale).

Every point is an independent draw of (label, point): the label (which moon, mode, square, arm or
component) first, uniform over the classes, then the point given it; class counts are therefore binomial,
not exactly equal.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.data.spec import DataSpec

TOYS = ("moons", "eight_gaussians", "checkerboard", "spirals", "gaussian_mixture")

MOONS_NOISE = 0.2  # std of the Gaussian noise, after the scaling by 2 (sklearn's noise=0.1)
EIGHT_RADIUS = 2 * math.sqrt(2)  # FFJORD's 8gaussians: centres at radius 4, std 0.5, all divided by sqrt(2)
EIGHT_STD = 0.5 / math.sqrt(2)
SPIRAL_TURNS = 3 * math.pi  # FFJORD's 2spirals: the angle runs up to 540 degrees
SPIRAL_NOISE = 0.1
MIXTURE_SEED = 20_250_101  # the mixture's means: fixed whatever the data seed, so train and test share them
MIXTURE_RANGE = 3.0  # means uniform in [-3, 3]^2
MIXTURE_STD = 0.25


def num_classes(name: str, num_components: int = 8) -> int:
    """The labels' count: 2 (moons, spirals), 8 (eight_gaussians, checkerboard), num_components
    (gaussian_mixture). ValueError for an unknown name."""
    counts = {"moons": 2, "eight_gaussians": 8, "checkerboard": 8, "spirals": 2, "gaussian_mixture": num_components}
    if name not in counts:
        raise ValueError(f"unknown toy {name!r}; the toys are {', '.join(TOYS)}")
    return counts[name]


def mixture_means(num_components: int) -> Tensor:
    """(num_components, 2) float32 means of gaussian_mixture, uniform in [-3, 3]^2 from MIXTURE_SEED."""
    generator = torch.Generator().manual_seed(MIXTURE_SEED)
    return (torch.rand(num_components, 2, generator=generator) * 2 - 1) * MIXTURE_RANGE


def make_toy(name: str, num_points: int, seed: int, num_components: int = 8) -> tuple[Tensor, Tensor]:
    """(points float32 (N, 2), labels int64 (N,)) of toy `name`, N = num_points, from torch.Generator(seed).

    With u ~ U[0, 1), z ~ N(0, 1) (fresh for every point and coordinate) and label k uniform over the classes:
      moons:            sklearn's two moons, centred and scaled by 2: theta = pi u,
                        k=0 (upper moon): 2 (cos theta - 0.5, sin theta - 0.25),
                        k=1 (lower moon): 2 (0.5 - cos theta, 0.25 - sin theta),  + 0.2 z.
                        Within [-3, 3] x [-1.5, 1.5] before the noise.
      eight_gaussians:  R (cos(k pi/4), sin(k pi/4)) + s z, R = 2 sqrt(2) = 2.83, s = 0.5 / sqrt(2) = 0.354
                        (FFJORD's 8gaussians). Radius within R +- 5 s = [1.06, 4.6] but for the far tails.
      checkerboard:     uniform on the 8 black squares of a 4 x 4 board of 2 x 2 squares on [-4, 4]^2: square
                        (column i, row j), i, j in 0..3, is black when i + j is even; label k = 2 j + i // 2;
                        the point is (2 i - 4 + 2 u, 2 j - 4 + 2 u'). Exactly within [-4, 4]^2.
      spirals:          FFJORD's 2spirals: r = 3 pi sqrt(u), p = (-r cos r + 0.5 u', r sin r + 0.5 u'') / 3,
                        arm k=0: p, arm k=1: -p; then + 0.1 z. Radius within pi + 0.24 before the noise.
      gaussian_mixture: mu_k + 0.25 z, the num_components means mu_k uniform in [-3, 3]^2 from a fixed seed
                        (`mixture_means`: the same for every `seed`), equal weights. Within [-3, 3]^2 +- 5 std.

    ValueError for an unknown name or a negative num_points."""
    if num_points < 0:
        raise ValueError(f"num_points must be >= 0, got {num_points}")
    classes = num_classes(name, num_components)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (num_points,), generator=generator)
    sign = 1.0 - 2.0 * labels.unsqueeze(1).float()  # +1 for class 0, -1 for class 1 (moons, spirals)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(num_points, *shape, generator=generator)

    def normal(*shape: int) -> Tensor:
        return torch.randn(num_points, *shape, generator=generator)

    if name == "moons":
        theta = math.pi * uniform(1)
        upper = torch.cat([torch.cos(theta) - 0.5, torch.sin(theta) - 0.25], dim=1)
        points = 2 * sign * upper + MOONS_NOISE * normal(2)  # the lower moon is the upper one turned by pi
    elif name == "eight_gaussians":
        angle = labels.float() * (math.pi / 4)
        centres = EIGHT_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        points = centres + EIGHT_STD * normal(2)
    elif name == "checkerboard":
        row = labels // 2
        column = 2 * (labels % 2) + row % 2  # the black squares of row j are the columns of j's parity
        corner = torch.stack([column, row], dim=1).float() * 2 - 4
        points = corner + 2 * uniform(2)
    elif name == "spirals":
        r = SPIRAL_TURNS * uniform(1).sqrt()  # sqrt: uniform density along the arm's area, not its angle
        arm = torch.cat([-r * torch.cos(r), r * torch.sin(r)], dim=1) + 0.5 * uniform(2)
        points = sign * arm / 3 + SPIRAL_NOISE * normal(2)
    else:  # gaussian_mixture
        points = mixture_means(num_components)[labels] + MIXTURE_STD * normal(2)
    return points.float(), labels


@dataclass
class PointDataset:
    """A toy's points in memory, as `ImageDataset` holds images."""

    points: Tensor  # float32, (N, 2)
    labels: Tensor  # int64, (N,)
    num_classes: int

    def __len__(self) -> int:
        return len(self.points)

    @property
    def shape(self) -> tuple[int]:
        return (2,)

    def batch(self, indices: Tensor, device: torch.device) -> dict[str, Tensor]:
        """{"points": (B, 2) float32, "labels": (B,) int64}, both on `device`."""
        return {"points": self.points[indices].to(device), "labels": self.labels[indices].to(device)}

    def spec(self) -> DataSpec:
        return DataSpec("points", self.shape, num_classes=self.num_classes)

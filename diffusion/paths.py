"""Probability paths for flow matching and MeanFlow, and the one time convention every flow uses.

Time convention (here only; every flow module, solver call and net input follows it):
    t runs over [0, 1]; t = 0 is the data end, t = 1 the noise end. A point of the path is
        x_t = (1 - t) x_0 + t eps,          x_0 ~ data, eps ~ N(0, I),
    and its conditional velocity is the time derivative
        v = d x_t / d t = eps - x_0.
    Sampling integrates dx/dt = v(x, t) from t = 1 (pure noise) to t = 0 (data), so the solvers'
    steps are negative. This is the convention of MeanFlow (Geng et al. 2025, eq. 1-2) and of
    rectified flow read backwards; facebookresearch/flow_matching puts noise at t = 0, which is
    this with t -> 1 - t.

The linear path is the conditional optimal-transport path of Lipman et al. 2023 (sigma_min = 0),
the "rectified flow" of Liu et al. 2023.

Coupling: which noise eps each x_0 of a batch is paired with. Independent draws are the default;
`minibatch_ot_coupling` pairs them by optimal transport within the batch (method.coupling).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

DATA_TIME, NOISE_TIME = 0.0, 1.0  # the two ends of every path: samplers go from NOISE_TIME to DATA_TIME


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """(B,) times -> (B, 1, ..., 1), broadcastable against x (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class LinearPath:
    """x_t = (1 - t) x_0 + t eps: alpha_t = 1 - t, sigma_t = t."""

    def sample(self, x_0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t (B, ...) for data x_0 (B, ...), noise of the same shape and times t (B,)."""
        t = expand_like(t, x_0)
        return (1 - t) * x_0 + t * noise

    def velocity(self, x_0: Tensor, noise: Tensor) -> Tensor:
        """d x_t / d t = eps - x_0: the conditional velocity, the same at every t."""
        return noise - x_0


def sample_times(
    num: int, distribution: str, mean: float = 0.0, std: float = 1.0, device: torch.device | str = "cpu"
) -> Tensor:
    """(num,) times in [0, 1] from the global RNG: uniform, or logit-normal (sigmoid of N(mean, std),
    Esser et al. 2024 sec. 3.1: more weight in the middle of the path)."""
    if distribution == "uniform":
        return torch.rand(num, device=device)
    return torch.sigmoid(mean + std * torch.randn(num, device=device))


def minibatch_ot_coupling(x_0: Tensor, noise: Tensor, group_size: int | None = None) -> Tensor:
    """The rows of `noise` (B, ...) reordered so that, within each run of `group_size` consecutive
    examples (None: the whole batch; the last run may be shorter, and is paired among fewer), x_0[i]
    is paired with noise[i] by the exact optimal transport plan for the squared Euclidean cost: the
    permutation minimising sum_i ||x_0[i] - eps[i]||^2. As ||x_0[i]||^2 and ||eps[j]||^2 sum to the same
    under every permutation, that is the one maximising sum_i x_0[i] . eps[i], solved on the CPU in
    float64 (so that every device and rank picks the same pairs) by scipy's linear_sum_assignment
    (shortest augmenting paths, Crouse 2016; time grows as group_size^3).

    Minibatch OT flow matching: Tong et al. 2023, "Improving and Generalizing Flow-Based Generative
    Models with Minibatch Optimal Transport" (OT-CFM); Pooladian et al. 2023, "Multisample Flow
    Matching". A permutation of independent draws keeps both ends exact (x_0 from the data, eps from
    N(0, I)); paired by OT, the conditional paths cross less, so the marginal flow is straighter and
    the conditional velocity eps - x_0 varies less given x_t: a regression target of less noise.
    Deterministic (no random numbers); a class-conditional net must not be trained so, as the noise
    would then tell the class."""
    # scipy.optimize takes a while to import, and only this coupling needs it.
    from scipy.optimize import linear_sum_assignment

    data, draws = x_0.flatten(1).cpu().double(), noise.flatten(1).cpu().double()
    order = torch.arange(len(noise))
    size = group_size or len(noise)
    for start in range(0, len(noise), size):
        group = slice(start, start + size)
        _, columns = linear_sum_assignment((data[group] @ draws[group].T).numpy(), maximize=True)
        order[group] = start + torch.from_numpy(columns)
    return noise[order.to(noise.device)]

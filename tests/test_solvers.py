"""diffusion/solvers.py against a linear ODE with a known solution: dx/dt = A x + b(t), where b(t) makes
x*(t) = (sin 3t + t^2, cos 2t e^t) a solution, so x(t) = x*(t) + expm(A (t - t0)) (x(t0) - x*(t0))."""

import math

import pytest
import torch

from diffusion import solvers
from diffusion.solvers import FIXED_STEP_SOLVERS, SOLVERS, solve, time_grid

A = torch.tensor([[-0.5, 2.0], [-1.0, -0.3]], dtype=torch.float64)
X0 = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.3]], dtype=torch.float64)  # (B=3, 2)
ENDS = [(1.0, 0.0), (1.0, 0.25), (0.0, 1.0)]  # sampling, a partial sampling, and forward in time


def x_star(t):
    return torch.stack([torch.sin(3 * t) + t**2, torch.cos(2 * t) * torch.exp(t)], -1)


def dx_star(t):
    return torch.stack([3 * torch.cos(3 * t) + 2 * t, (torch.cos(2 * t) - 2 * torch.sin(2 * t)) * torch.exp(t)], -1)


def velocity(x, t):
    a = A.to(x.dtype)
    return x @ a.T + dx_star(t) - x_star(t) @ a.T


def exact(x0, t0, t1):
    t0, t1 = torch.tensor(t0, dtype=torch.float64), torch.tensor(t1, dtype=torch.float64)
    return x_star(t1) + (x0 - x_star(t0)) @ torch.linalg.matrix_exp(A * (t1 - t0)).T


class Counting:
    """The velocity, recording the times it is asked at."""

    def __init__(self, x):
        self.x = x
        self.times = []

    def __call__(self, x, t):
        assert t.dim() == 0 and t.dtype == self.x.dtype and t.device == self.x.device
        assert x.shape == self.x.shape and x.dtype == self.x.dtype
        self.times.append(t.item())
        return velocity(x, t)


def rule_times(solver, grid):
    """The times each rule must ask for, in order, from the float64 grid."""
    times = []
    for t, t_next in zip(grid.tolist(), grid[1:].tolist()):
        mid = (t + t_next) / 2
        times += {"euler": [t], "midpoint": [t, mid], "heun": [t, t_next], "rk4": [t, mid, mid, t_next]}[solver]
    return times


@pytest.mark.parametrize("t_start,t_end", ENDS)
@pytest.mark.parametrize("num_steps", [1, 3, 10])
@pytest.mark.parametrize("solver", list(FIXED_STEP_SOLVERS))
def test_fixed_step_evaluations_times_and_path(solver, num_steps, t_start, t_end):
    counting = Counting(X0)
    bars = []

    def progress(steps, description):
        bars.append((len(steps), description))
        return steps

    solution = solve(counting, X0, solver, num_steps, t_start, t_end, keep_path=True, progress=progress)

    assert solution.nfe == len(counting.times) == num_steps * FIXED_STEP_SOLVERS[solver]
    assert counting.times == rule_times(solver, time_grid(num_steps, t_start, t_end))
    low, high = min(t_start, t_end), max(t_start, t_end)
    assert all(low <= t <= high for t in counting.times)
    assert bars == [(num_steps, bars[0][1])] and isinstance(bars[0][1], str)
    assert solution.times.dtype == torch.float64 and solution.times.shape == (num_steps + 1,)
    assert solution.times[0].item() == t_start and solution.times[-1].item() == t_end
    assert solution.path.shape == (num_steps + 1, *X0.shape)
    assert torch.equal(solution.path[0], X0) and torch.equal(solution.path[-1], solution.sample)


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_state_sees_float32_times_and_keeps_its_dtype(solver):
    x = X0.float()
    counting = Counting(x)
    solution = solve(counting, x, solver, num_steps=4)
    assert solution.sample.dtype == torch.float32 and solution.sample.shape == x.shape
    assert solution.nfe == len(counting.times) > 0
    assert solution.path is None
    assert torch.allclose(solution.sample.double(), solve(velocity, X0, solver, num_steps=4).sample, atol=1e-4)


def fitted_order(solver, num_steps, t_start, t_end):
    """Least-squares slope of -log(error) against log(num_steps)."""
    target = exact(X0, t_start, t_end)
    errors = [(solve(velocity, X0, solver, n, t_start, t_end).sample - target).abs().max().item() for n in num_steps]
    logs_n = [math.log(n) for n in num_steps]
    logs_e = [math.log(e) for e in errors]
    mean_n, mean_e = sum(logs_n) / len(logs_n), sum(logs_e) / len(logs_e)
    slope = sum((a - mean_n) * (b - mean_e) for a, b in zip(logs_n, logs_e)) / sum((a - mean_n) ** 2 for a in logs_n)
    return -slope


# Step counts where each rule is in its asymptotic regime on this ODE (observed ratios within 0.1 of the order).
ORDERS = {
    "euler": (1, [32, 64, 128]),
    "midpoint": (2, [16, 32, 64]),
    "heun": (2, [16, 32, 64]),
    "rk4": (4, [8, 16, 32]),
}


@pytest.mark.parametrize("t_start,t_end", [(1.0, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("solver", list(ORDERS))
def test_convergence_order(solver, t_start, t_end):
    order, num_steps = ORDERS[solver]
    assert fitted_order(solver, num_steps, t_start, t_end) == pytest.approx(order, abs=0.3)


def test_gradient_flows_through_the_solve():
    x = X0.clone().requires_grad_(True)
    solve(velocity, x, "rk4", num_steps=20).sample.sum().backward()
    # d x(0) / d x(1) = expm(-A) for every row, so the gradient of the sum is the column sums of expm(-A).
    expected = torch.linalg.matrix_exp(-A).sum(0).expand_as(X0)
    assert torch.allclose(x.grad, expected, atol=1e-5)


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8])
def test_dopri5_error_follows_tolerance(tol):
    counting = Counting(X0)
    solution = solve(counting, X0, "dopri5", rtol=tol, atol=tol)
    target = exact(X0, 1.0, 0.0)
    # Each step's error is kept below atol + rtol |x|; over the tens of steps here that adds up to a few of those.
    bound = 10 * (tol + tol * target.abs().max().item())
    assert (solution.sample - target).abs().max().item() < bound
    assert solution.nfe == len(counting.times) > 0
    assert all(0.0 <= t <= 1.0 for t in counting.times)


def test_dopri5_tighter_tolerance_takes_more_evaluations():
    nfes = [solve(velocity, X0, "dopri5", rtol=tol, atol=tol).nfe for tol in (1e-3, 1e-6, 1e-9)]
    assert nfes[0] < nfes[1] < nfes[2]


@pytest.mark.parametrize("t_start,t_end", ENDS)
def test_dopri5_path(t_start, t_end):
    num_steps = 7
    counting = Counting(X0)
    solution = solve(counting, X0, "dopri5", num_steps, t_start, t_end, rtol=1e-8, atol=1e-8, keep_path=True)
    assert torch.equal(solution.times, time_grid(num_steps, t_start, t_end))
    assert solution.times[-1].item() == t_end
    assert solution.path.shape == (num_steps + 1, *X0.shape)
    assert torch.equal(solution.path[0], X0) and torch.equal(solution.path[-1], solution.sample)
    for t, state in zip(solution.times.tolist(), solution.path):  # dense output between the steps
        assert torch.allclose(state, exact(X0, t_start, t), atol=1e-6)
    low, high = min(t_start, t_end), max(t_start, t_end)
    assert all(low <= t <= high for t in counting.times)
    # The output times do not change the steps taken: the same end and the same work without a path.
    alone = solve(velocity, X0, "dopri5", num_steps, t_start, t_end, rtol=1e-8, atol=1e-8)
    assert alone.nfe == solution.nfe and torch.equal(alone.sample, solution.sample)
    assert alone.path is None and alone.times.tolist() == [t_start, t_end]


def test_dopri5_never_asks_past_a_short_interval():
    # A slow velocity makes the initial-step probe (0.01 |x| / |v| = 10) reach far past t_end = 0.9.
    times = []

    def slow(x, t):
        times.append(t.item())
        return 1e-3 * x

    solution = solve(slow, X0, "dopri5", t_start=1.0, t_end=0.9)
    assert all(0.9 <= t <= 1.0 for t in times)
    assert torch.allclose(solution.sample, X0 * math.exp(-1e-4), rtol=1e-8)


def test_dopri5_runaway_raises(monkeypatch):
    monkeypatch.setattr(solvers, "MAX_DOPRI5_STEPS", 20)
    stiff = lambda x, t: -1e5 * x  # noqa: E731 - stability alone needs thousands of steps
    with pytest.raises(RuntimeError, match="dopri5 took over 20 steps"):
        solve(stiff, X0, "dopri5")


def test_time_grid():
    grid = time_grid(7, 1.0, 0.3)
    assert grid.dtype == torch.float64 and grid.shape == (8,)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.3
    assert torch.allclose(grid.diff(), torch.full((7,), -0.1, dtype=torch.float64))


@pytest.mark.parametrize("solver", ["euler", "dopri5"])
def test_bad_arguments(solver):
    with pytest.raises(ValueError, match="euler, midpoint, heun, rk4, dopri5; got 'rk5'"):
        solve(velocity, X0, "rk5")
    with pytest.raises(ValueError, match=">= 1, got 0"):
        solve(velocity, X0, solver, num_steps=0)
    with pytest.raises(ValueError, match=">= 1, got 0"):
        time_grid(0)
    with pytest.raises(ValueError, match="must differ"):
        solve(velocity, X0, solver, t_start=0.5, t_end=0.5)

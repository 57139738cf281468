"""ODE solvers for flows: integrate dx/dt = velocity(x, t) from t_start to t_end, knowing nothing of
the model but the velocity function. Times follow diffusion/paths.py: sampling goes from t = 1
(noise) to t = 0 (data), so steps are negative; any other pair of ends works the same way.

Fixed-step explicit Runge-Kutta rules (Hairer, Norsett & Wanner, Solving ODEs I, sec. II.1), on an
evenly spaced float64 grid whose last time is exactly t_end:
    euler     order 1, 1 velocity evaluation per step    x += h v(x, t)
    midpoint  order 2, 2 evaluations                     x += h v(x + h/2 v(x, t), t + h/2)
    heun      order 2, 2 evaluations                     explicit trapezoid: x += h/2 (v(x, t) + v(x + h v(x, t), t + h))
    rk4       order 4, 4 evaluations                     the classic Runge-Kutta rule (Kutta 1901)
Adaptive:
    dopri5    order 5(4) embedded pair of Dormand & Prince 1980 with Shampine's dense output, from
              torchdiffeq (Chen et al. 2018); about 6 evaluations per accepted step, the step size
              set by rtol / atol, so the number of evaluations depends on the velocity.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint

FIXED_STEP_SOLVERS: dict[str, int] = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}  # velocity evaluations per step
ADAPTIVE_SOLVERS: tuple[str, ...] = ("dopri5",)  # from torchdiffeq
SOLVERS = (*FIXED_STEP_SOLVERS, *ADAPTIVE_SOLVERS)

# dopri5's runaway guard: the most steps (accepted or rejected, ~6 evaluations each) between two output
# times. Smooth flows need tens; hitting it means a stiff or non-finite velocity, or a tolerance too tight.
MAX_DOPRI5_STEPS = 1_000


def time_grid(num_steps: int, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """(num_steps + 1,) float64 times from t_start to t_end, evenly spaced, first and last exactly t_start and t_end.
    Raises ValueError when num_steps < 1."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    grid = torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64)
    grid[0], grid[-1] = t_start, t_end  # linspace's ends are exact in practice; this makes it a guarantee
    return grid


@dataclass
class Solution:
    sample: Tensor  # x at t_end, the shape and dtype of the start x
    nfe: int  # velocity evaluations used
    times: Tensor  # (K,) float64: the times of `path` (the grid; for dopri5 the num_steps + 1 output times)
    path: Tensor | None  # (K, *x.shape) the states at `times` (first = the start x, last = sample), when keep_path


def solve(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    solver: str = "euler",
    num_steps: int = 50,
    t_start: float = 1.0,
    t_end: float = 0.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    keep_path: bool = False,
    progress: Callable[[Iterable, str], Iterable] = lambda steps, description: steps,
) -> Solution:
    """Integrate dx/dt = velocity(x, t) from x (B, ...) at t_start to t_end.

    velocity(x, t) gets a state (B, ...) and t as a 0-dim tensor of x's dtype on x's device, and returns
    dx/dt of x's shape; it is only asked at times within [t_end, t_start]. Gradients flow through the
    solve: torch.no_grad is the caller's choice.

    Fixed-step solvers take num_steps steps on time_grid(num_steps, t_start, t_end) and use exactly
    num_steps * FIXED_STEP_SOLVERS[solver] evaluations; `progress(steps, description)` wraps their loop.
    dopri5 is one torchdiffeq.odeint call (progress is not used), with rtol / atol as its tolerances;
    num_steps only sets how many output times the path has. Its steps land exactly on t_end (a step_t)
    rather than overshooting it, and it raises RuntimeError when it needs more than MAX_DOPRI5_STEPS steps
    between two output times.

    Returns a Solution; its path (num_steps + 1 states) only when keep_path.
    Raises ValueError for an unknown solver, num_steps < 1 or t_start == t_end.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if t_start == t_end:
        raise ValueError(f"t_start and t_end must differ, got {t_start} for both")

    nfe = 0
    grid = time_grid(num_steps, t_start, t_end)

    if solver in ADAPTIVE_SOLVERS:
        low, high = min(t_start, t_end), max(t_start, t_end)

        def func(t: Tensor, y: Tensor) -> Tensor:
            nonlocal nfe
            nfe += 1
            # torchdiffeq passes t already in y's dtype. The clamp only ever acts on the probe of its initial
            # step size (Hairer & Wanner's rule, a small Euler step), which can land past a short interval.
            return velocity(y, t.clamp(low, high))

        times = grid if keep_path else grid[[0, -1]]
        options = {"max_num_steps": MAX_DOPRI5_STEPS, "step_t": torch.tensor([t_end], dtype=torch.float64)}
        try:
            states = odeint(func, x, times.to(x.device), method=solver, rtol=rtol, atol=atol, options=options)
        except AssertionError as error:
            if not str(error).startswith("max_num_steps exceeded"):
                raise
            raise RuntimeError(
                f"dopri5 took over {MAX_DOPRI5_STEPS} steps ({nfe} velocity evaluations) between two output times "
                f"from t={t_start} to t={t_end}: the velocity may be stiff or not finite, or rtol={rtol} / "
                f"atol={atol} too tight; loosen them or use a fixed-step solver"
            ) from error
        return Solution(sample=states[-1], nfe=nfe, times=times, path=states if keep_path else None)

    def v(x: Tensor, t: float) -> Tensor:
        nonlocal nfe
        nfe += 1
        return velocity(x, torch.full((), t, dtype=x.dtype, device=x.device))

    # Times stay python floats (float64) so the steps add up to exactly t_end; only velocity sees x's dtype.
    ts = grid.tolist()
    path = [x] if keep_path else None
    for i in progress(range(num_steps), f"{solver} sampling"):
        t, t_next = ts[i], ts[i + 1]
        h = t_next - t
        if solver == "euler":
            x = x + h * v(x, t)
        elif solver == "midpoint":
            t_mid = (t + t_next) / 2
            x = x + h * v(x + h / 2 * v(x, t), t_mid)
        elif solver == "heun":
            k1 = v(x, t)
            k2 = v(x + h * k1, t_next)
            x = x + h / 2 * (k1 + k2)
        else:  # rk4
            t_mid = (t + t_next) / 2
            k1 = v(x, t)
            k2 = v(x + h / 2 * k1, t_mid)
            k3 = v(x + h / 2 * k2, t_mid)
            k4 = v(x + h * k3, t_next)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if path is not None:
            path.append(x)
    return Solution(sample=x, nfe=nfe, times=grid, path=torch.stack(path) if path is not None else None)

"""Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) on the linear path of
diffusion/paths.py (t = 1 noise, t = 0 data): the network learns the velocity field v(x_t, t) by
regressing the conditional velocity eps - x_0,

    L = E_{t, x_0, eps} || v_theta(x_t, t) - (eps - x_0) ||^2,    x_t = (1 - t) x_0 + t eps,

with t uniform or logit-normal (method.time_sampling), and eps drawn apart from x_0 or paired with
it by minibatch optimal transport (method.coupling, paths.py). Samples integrate dx/dt = v(x, t) from
t = 1 to t = 0 with an ODE solver of diffusion/solvers.py (sample.sampler). Path, solver and loss
are kept apart, as in facebookresearch/flow_matching. A class-conditional net is trained with label
dropout and sampled with classifier-free guidance on the velocity (methods/conditioning.py).

Nets see t itself (NET_TIME_SCALE 1), not t * 1000 as DDPM's timesteps: MeanFlow's target holds
du/dt, and the high frequencies of a sinusoidal embedding of t * 1000 make it large and noisy. On
eight Gaussians, 400 MeanFlow steps reached 2.7x the real-vs-real energy floor at scale 1 against
11x at 1000 (and 19x at 100); flow matching did not care (1.5x and 1.6x). (Against the floor of
before 2026-12-01, two pairs of held-out draws: ~1.8x these against the present one.)
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.config import ModelConfig, RunConfig, SampleConfig, data_kind, num_classes
from diffusion.data.spec import DataSpec
from diffusion.methods.base import Method, Progress, no_progress, register
from diffusion.methods.conditioning import asked_labels, drop_labels, guided_output
from diffusion.nets import build_denoiser
from diffusion.paths import DATA_TIME, NOISE_TIME, LinearPath, minibatch_ot_coupling, sample_times
from diffusion.solvers import Solution, solve

NET_TIME_SCALE = 1.0
COUPLINGS = ("independent", "minibatch_ot")  # of noise with data in a batch (paths.py)
# Frames of the flow's picture at most: an animation of every Euler step would be as long as the sampling.
MAX_FRAMES = 41


@register
class FlowMatching(Method):
    """`model(x, t, class_labels=None)` is a velocity field: any net from diffusion/nets that maps
    (B, *shape) points of the path and (B,) times to (B, *shape)."""

    name = "flow_matching"
    data_kinds = ("image", "points")
    path = LinearPath()

    def __init__(
        self,
        examples_key: str = "images",
        time_sampling: str = "uniform",
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
        num_classes: int | None = None,
        label_dropout: float = 0.0,
        coupling: str = "independent",
        coupling_group_size: int | None = None,
    ):
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling: {coupling!r} is not one of {', '.join(COUPLINGS)}")
        self.examples_key = examples_key  # the batch's key of the data: "images" or "points"
        self.time_sampling = time_sampling
        self.logit_normal_mean, self.logit_normal_std = logit_normal_mean, logit_normal_std
        self.num_classes = num_classes  # None: unconditional; else also the null class's index
        self.label_dropout = label_dropout
        self.coupling, self.coupling_group_size = coupling, coupling_group_size

    @classmethod
    def from_config(cls, config: RunConfig) -> "FlowMatching":
        return cls(**flow_matching_settings(config))

    def build_model(self, model_config: ModelConfig, data: DataSpec, parent=None) -> nn.Module:
        return build_denoiser(model_config, data.shape, data.num_classes)

    def draw(self, batch: dict, shard: slice | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(x_0, noise, t, class_labels) of a training batch, on `shard` of it: every random number
        is drawn for the whole batch from the global RNG, so that ranks and resumes draw alike."""
        x_0 = batch[self.examples_key]
        t = sample_times(len(x_0), self.time_sampling, self.logit_normal_mean, self.logit_normal_std, x_0.device)
        noise = self.couple(x_0, torch.randn_like(x_0))
        class_labels = drop_labels(batch.get("class_labels"), self.label_dropout, self.num_classes)
        if shard is not None:
            x_0, noise, t = x_0[shard], noise[shard], t[shard]
            class_labels = class_labels[shard] if class_labels is not None else None
        return x_0, noise, t, class_labels

    def couple(self, x_0: Tensor, noise: Tensor) -> Tensor:
        """The batch's noise (B, *shape) as method.coupling pairs it with x_0: on the whole batch,
        before any shard is taken, so that every rank pairs alike."""
        if self.coupling == "minibatch_ot":
            return minibatch_ot_coupling(x_0, noise, self.coupling_group_size)
        return noise

    def loss(self, model, batch: dict, shard: slice | None = None) -> Tensor:
        return self.loss_at(model, *self.draw(batch, shard))

    def loss_at(self, model, x_0: Tensor, noise: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        """The loss at drawn data x_0, noise (B, *shape), times t (B,) and labels."""
        x_t = self.path.sample(x_0, noise, t)
        velocity = model(x_t, t * NET_TIME_SCALE, class_labels=class_labels)
        # In float32 even when the model ran under bf16 autocast.
        return F.mse_loss(velocity.float(), self.path.velocity(x_0, noise).float())

    def velocity_field(self, model, class_labels: Tensor | None, guidance_scale: float):
        """v(x, t) for the solvers: the (guided) net at a scalar time t."""

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            times = (t * NET_TIME_SCALE).expand(x.shape[0])
            return guided_output(model, x, times, class_labels, guidance_scale, self.num_classes, **self.instant(times))

        return velocity

    def instant(self, times: Tensor) -> dict[str, Tensor]:
        """What else the net takes to give the instantaneous velocity at (B,) `times`: nothing here."""
        return {}

    @torch.no_grad()
    def solve_batch(
        self,
        model,
        noise: Tensor,
        sample: SampleConfig,
        class_labels: Tensor | None,
        keep_path: bool = False,
        progress: Progress = no_progress,
    ) -> Solution:
        """One batch from `noise` (t = 1) to t = 0 with the sample settings' solver."""
        return solve(
            self.velocity_field(model, class_labels, sample.guidance_scale),
            noise,
            sample.sampler,
            sample.num_inference_steps,
            t_start=NOISE_TIME,
            t_end=DATA_TIME,
            rtol=sample.rtol,
            atol=sample.atol,
            keep_path=keep_path,
            progress=progress,
        )

    def sample(
        self,
        model: nn.Module,
        num_samples: int,
        data: DataSpec,
        sample: SampleConfig,
        generator: torch.Generator | None,
        device: torch.device | str = "cpu",
        progress: Progress = no_progress,
        stats: dict | None = None,
    ) -> Tensor:
        """In batches of `sample.batch_size`, each from noise drawn on the CPU from `generator`. The
        samples are as the solver ends them (not clipped: the image writers clip)."""
        labels = self.class_labels(num_samples, data, sample)
        batches, evaluations = [], []
        for start in range(0, num_samples, sample.batch_size):
            count = min(sample.batch_size, num_samples - start)
            noise = torch.randn((count, *data.shape), generator=generator).to(device)
            batch_labels = None if labels is None else labels[start : start + count].to(device)
            solution = self.solve_batch(model, noise, sample, batch_labels, progress=progress)
            batches.append(solution.sample)
            evaluations.append(solution.nfe)
        if stats is not None:
            stats["nfe"] = sum(evaluations) / len(evaluations)
        return torch.cat(batches)

    def trajectory(self, model, num_samples, data, sample, generator, device) -> tuple[Tensor, Tensor]:
        labels = self.class_labels(num_samples, data, sample)
        noise = torch.randn((num_samples, *data.shape), generator=generator).to(device)
        solution = self.solve_batch(model, noise, sample, None if labels is None else labels.to(device), True)
        return frames(solution.times, solution.path)

    def class_labels(self, num_samples: int, data: DataSpec, sample: SampleConfig) -> Tensor | None:
        return asked_labels(num_samples, self.num_classes, sample)

    def sample_name(self, sample: SampleConfig) -> str:
        return solver_sample_name(sample)


def flow_matching_settings(config: RunConfig) -> dict:
    """FlowMatching's arguments as the run config sets them (MeanFlow's too)."""
    conditional = config.model.class_conditional
    return dict(
        examples_key="points" if data_kind(config.data.dataset) == "points" else "images",
        time_sampling=config.method.time_sampling,
        logit_normal_mean=config.method.logit_normal_mean,
        logit_normal_std=config.method.logit_normal_std,
        num_classes=num_classes(config.data) if conditional else None,
        label_dropout=config.method.label_dropout if conditional else 0.0,
        coupling=config.method.coupling,
        coupling_group_size=config.method.coupling_group_size,
    )


def frames(times: Tensor, path: Tensor) -> tuple[Tensor, Tensor]:
    """At most MAX_FRAMES of a solver's path, evenly chosen, the first and the last kept."""
    if len(times) > MAX_FRAMES:
        chosen = torch.linspace(0, len(times) - 1, MAX_FRAMES).round().long()
        times, path = times[chosen], path[chosen]
    return times, path.cpu()


def solver_sample_name(sample: SampleConfig) -> str:
    """The file stem of flow samples: solver and steps (dopri5: its tolerances), guidance, class
    and seed, e.g. euler50-seed0, rk4-10-seed0, dopri5-rtol1e-05-atol1e-05-seed0."""
    if sample.sampler == "dopri5":
        steps = f"-rtol{sample.rtol:g}-atol{sample.atol:g}"
    else:  # rk4-10, not rk410
        steps = ("-" if sample.sampler[-1].isdigit() else "") + str(sample.num_inference_steps)
    guidance = f"-w{sample.guidance_scale:g}" if sample.guidance_scale != 1 else ""
    label = f"-class{sample.class_label}" if sample.class_label is not None else ""
    return f"{sample.sampler}{steps}{guidance}{label}-seed{sample.seed}"

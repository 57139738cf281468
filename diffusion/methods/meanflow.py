"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): the network learns
the average velocity over an interval of the linear path (diffusion/paths.py: t = 1 noise, t = 0
data),

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds,    so that  z_r = z_t - (t - r) u(z_t, r, t),

and one step from noise, z_0 = eps - u(eps, 0, 1), samples. Differentiating (t - r) u = integral
gives the MeanFlow identity (eq. 6), the training target

    u_tgt = v - (t - r) d/dt u(z_t, r, t),    d/dt u = v . du/dz + du/dt  (r held fixed),

the total derivative taken along the tangent (v, 0, 1) of (z, r, t) by one forward-mode product
(a Jacobian-vector product, eq. 8), with a stop-gradient on u_tgt (eq. 9). v = eps - x_0 is the conditional
velocity. At r = t the target is v and the loss is flow matching's.

- Times (sec. 4.3): t and r are drawn from method.time_sampling (the paper: logit-normal(-0.4, 1)),
  ordered so that r <= t, and a method.r_equals_t_share of pairs get r = t.
- Pairs: noise and data paired as flow matching's method.coupling says (paths.py).
- Loss: the squared error averaged over the example's dimensions, times the adaptive weight
  sg(1 / (error + c)^p) (sec. 4.3; p = adaptive_weight_power, c = adaptive_weight_eps; p = 0 is
  the plain squared error). The paper sums over dimensions; the mean keeps the loss in flow
  matching's units (c is in those units too). The gradient is the weighted loss's; the value
  returned (and logged) is the unweighted error, which the weighting would pin near 1.
- Tangent (method.jvp_tangent): the paper takes d/dt u along the conditional velocity v; `model`
  takes it along the net's own instantaneous velocity u(z_t, t, t), no gradient (the improved
  MeanFlow, iMF). d/dt u is linear in the tangent and E[v | z_t] is the marginal velocity that
  u(z_t, t, t) learns (the r = t pairs; with training guidance, the guided one, as the tangent v
  then is), so both aim at the same target, the second without v's variance; it costs one more
  forward pass. The target keeps v.
- Guidance (sec. 4.2, eq. 13): with training_guidance_scale w != 1 the target's velocity is
  w v + (1 - w) u(z_t, t, t | null class), the unconditional velocity, so that one step samples the
  guided model; examples whose label was dropped keep v. Label dropout makes the null class.
- Nets take t and the interval t - r (the paper's best conditioning, Table 1c), both times
  NET_TIME_SCALE.

Sampling: sample.sampler meanflow takes num_inference_steps jumps z_r = z_t - (t - r) u(z_t, r, t)
on an even grid from 1 to 0 (1 or 2 in the paper); the ODE solvers integrate the instantaneous
velocity u(z, t, t) like flow matching.
"""

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion.config import ModelConfig, RunConfig, SampleConfig
from diffusion.data.spec import DataSpec
from diffusion.methods.base import Progress, no_progress, register
from diffusion.methods.conditioning import drop_labels, guided_output
from diffusion.methods.flow_matching import NET_TIME_SCALE, FlowMatching, flow_matching_settings, frames
from diffusion.nets import build_denoiser
from diffusion.paths import DATA_TIME, NOISE_TIME, expand_like, sample_times
from diffusion.solvers import Solution, time_grid

# Frames of the one-step map's picture: z_r = eps - (1 - r) u(eps, r, 1) for r from 1 to 0.
MAP_FRAMES = 21


def average_and_time_derivative(u, z: Tensor, r: Tensor, t: Tensor, velocity: Tensor) -> tuple[Tensor, Tensor]:
    """(u(z, r, t), d/dt u(z_t, r, t)) in one forward-mode pass (eq. 8): the total derivative along
    the path, whose tangent is dz/dt = velocity, dr/dt = 0, dt/dt = 1. `u(z, r, t)` any function;
    the first output keeps a graph where grad mode is on (the loss calls it under no_grad: its target
    takes no gradient).

    torch.autograd.forward_ad rather than torch.func.jvp: the same dual numbers, with the network's
    parameters left plain tensors, as DistributedDataParallel wants them (torch.func.jvp wraps them:
    in a pass with a graph, DDP's bucket rebuild on the second step failed on the wrapped ones).
    Attention runs on the math kernel: the fused scaled_dot_product_attention kernels have no
    forward-mode derivative."""
    with forward_ad.dual_level(), sdpa_kernel(SDPBackend.MATH):
        dual = u(
            forward_ad.make_dual(z, velocity),
            forward_ad.make_dual(r, torch.zeros_like(r)),
            forward_ad.make_dual(t, torch.ones_like(t)),
        )
        average, derivative = forward_ad.unpack_dual(dual)
    return average, derivative


@register
class MeanFlow(FlowMatching):
    """`model(z, t, class_labels=None, second_time=None)`: the average velocity u(z, r, t) of a net
    built with two times, given t and t - r (times NET_TIME_SCALE)."""

    name = "meanflow"

    def __init__(
        self,
        r_equals_t_share: float = 0.75,
        adaptive_weight_power: float = 1.0,
        adaptive_weight_eps: float = 1e-3,
        training_guidance_scale: float = 1.0,
        jvp_tangent: str = "conditional",
        **flow_matching,
    ):
        super().__init__(**flow_matching)
        self.r_equals_t_share, self.jvp_tangent = r_equals_t_share, jvp_tangent
        self.adaptive_weight_power, self.adaptive_weight_eps = adaptive_weight_power, adaptive_weight_eps
        self.training_guidance_scale = training_guidance_scale

    @classmethod
    def from_config(cls, config: RunConfig) -> "MeanFlow":
        fields = {
            "r_equals_t_share",
            "adaptive_weight_power",
            "adaptive_weight_eps",
            "training_guidance_scale",
            "jvp_tangent",
        }
        return cls(**config.method.model_dump(include=fields), **flow_matching_settings(config))

    def build_model(self, model_config: ModelConfig, data: DataSpec, parent=None) -> nn.Module:
        return build_denoiser(model_config, data.shape, data.num_classes, two_times=True)

    def average_velocity(self, model, z: Tensor, r: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        """u(z, r, t) for (B,) times r <= t."""
        return model(z, t * NET_TIME_SCALE, class_labels=class_labels, second_time=(t - r) * NET_TIME_SCALE)

    def draw_times(self, batch_size: int, device) -> tuple[Tensor, Tensor]:
        """(r, t), r <= t, a r_equals_t_share of them equal; from the global RNG."""
        distribution = (self.time_sampling, self.logit_normal_mean, self.logit_normal_std)
        first, second = sample_times(batch_size, *distribution, device), sample_times(batch_size, *distribution, device)
        t, r = torch.maximum(first, second), torch.minimum(first, second)
        equal = torch.rand(batch_size, device=device) < self.r_equals_t_share
        return torch.where(equal, t, r), t

    def loss(self, model, batch: dict, shard: slice | None = None) -> Tensor:
        x_0 = batch[self.examples_key]
        r, t = self.draw_times(len(x_0), x_0.device)
        noise = self.couple(x_0, torch.randn_like(x_0))
        class_labels = drop_labels(batch.get("class_labels"), self.label_dropout, self.num_classes)
        if shard is not None:
            x_0, noise, r, t = x_0[shard], noise[shard], r[shard], t[shard]
            class_labels = class_labels[shard] if class_labels is not None else None
        return self.loss_at(model, x_0, noise, r, t, class_labels)

    def loss_at(self, model, x_0: Tensor, noise: Tensor, r: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        """The loss at drawn data x_0, noise (B, *shape), times r <= t (B,) and labels."""
        z = self.path.sample(x_0, noise, t)
        velocity = self.path.velocity(x_0, noise)
        if self.training_guidance_scale != 1 and class_labels is not None:
            velocity = self.guided_velocity(model, z, t, velocity, class_labels)
        target = velocity - expand_like(t - r, z) * self.time_derivative(model, z, r, t, class_labels, velocity)
        average = self.average_velocity(model, z, r, t, class_labels)
        error = (average.float() - target.float()).pow(2).flatten(1).mean(1)
        weight = 1 / (error.detach() + self.adaptive_weight_eps) ** self.adaptive_weight_power
        weighted = (weight * error).mean()
        # The value is the unweighted error (the weighted one is near 1 whatever the model: err / (err + c)),
        # so that the logged loss tells how well it fits and reads like flow matching's; the gradient is
        # the weighted loss's.
        return weighted - weighted.detach() + error.mean().detach()

    @torch.no_grad()
    def time_derivative(
        self, model, z: Tensor, r: Tensor, t: Tensor, class_labels: Tensor | None, velocity: Tensor
    ) -> Tensor:
        """d/dt u(z_t, r, t) along the method's tangent (B, *shape), zero where r = t.

        The target takes no gradient (eq. 9), so the forward-mode pass keeps no graph and the loss's
        u(z, r, t) is a plain second forward pass: a dual pass with a graph costs more than the two.
        Only the pairs with r < t are differentiated (at r = t the derivative is multiplied by 0):
        the r_equals_t_share of the batch costs nothing here. Every rank makes the same calls, an
        empty selection included, so that DistributedDataParallel's forwards stay in step.

        With model.dropout > 0 this pass draws its own dropout masks, apart from the loss's pass:
        the target is that of another draw of the same stochastic net."""
        jumps = (r != t).nonzero().squeeze(1)
        z_jump, r_jump, t_jump = z[jumps], r[jumps], t[jumps]
        labels = None if class_labels is None else class_labels[jumps]
        if self.jvp_tangent == "conditional":
            tangent = velocity[jumps]
        else:
            tangent = self.model_velocity(model, z_jump, t_jump, labels).to(velocity.dtype)

        def u(z: Tensor, r: Tensor, t: Tensor) -> Tensor:
            return self.average_velocity(model, z, r, t, labels)

        derivative = torch.zeros_like(velocity)
        derivative[jumps] = average_and_time_derivative(u, z_jump, r_jump, t_jump, tangent)[1].to(velocity.dtype)
        return derivative

    @torch.no_grad()
    def model_velocity(self, model, z: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        """The net's instantaneous velocity u(z, t, t) (B, *shape). With training guidance the r = t
        pairs train it towards the guided velocity already: it is not guided again."""
        return self.average_velocity(model, z, t, t, class_labels)

    @torch.no_grad()
    def guided_velocity(self, model, z: Tensor, t: Tensor, velocity: Tensor, class_labels: Tensor) -> Tensor:
        """w v + (1 - w) u(z, t, t | null) for the examples with a label; v for those without."""
        null = torch.full_like(class_labels, self.num_classes)
        unconditional = self.average_velocity(model, z, t, t, null).to(velocity.dtype)
        guided = self.training_guidance_scale * velocity + (1 - self.training_guidance_scale) * unconditional
        return torch.where(expand_like(class_labels == null, z), velocity, guided)

    def instant(self, times: Tensor) -> dict[str, Tensor]:
        """The instantaneous velocity v(x, t) = u(x, t, t), for the ODE solvers: an interval of 0."""
        return {"second_time": torch.zeros_like(times)}

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
        """The ODE solvers as flow matching; sampler meanflow: the average-velocity jumps."""
        if sample.sampler != "meanflow":
            return super().solve_batch(model, noise, sample, class_labels, keep_path, progress)
        times = time_grid(sample.num_inference_steps, NOISE_TIME, DATA_TIME)
        z, path = noise, [noise]
        for t, r in progress(list(zip(times[:-1].tolist(), times[1:].tolist())), "meanflow sampling"):
            z = z - (t - r) * self.guided_average(model, z, r, t, class_labels, sample.guidance_scale)
            if keep_path:
                path.append(z)
        return Solution(z, sample.num_inference_steps, times, torch.stack(path) if keep_path else None)

    def guided_average(self, model, z: Tensor, r: float, t: float, class_labels, guidance_scale: float) -> Tensor:
        """u(z, r, t) at scalar times, with classifier-free guidance on u."""
        times = torch.full((z.shape[0],), t * NET_TIME_SCALE, device=z.device, dtype=z.dtype)
        interval = torch.full_like(times, (t - r) * NET_TIME_SCALE)
        return guided_output(model, z, times, class_labels, guidance_scale, self.num_classes, second_time=interval)

    def trajectory(self, model, num_samples, data, sample, generator, device) -> tuple[Tensor, Tensor]:
        """With the meanflow sampler, the one-step map from the same noise to every time r of the path,
        z_r = eps - (1 - r) u(eps, r, 1): what one jump makes of noise, frame by frame."""
        if sample.sampler != "meanflow":
            return super().trajectory(model, num_samples, data, sample, generator, device)
        labels = self.class_labels(num_samples, data, sample)
        labels = None if labels is None else labels.to(device)
        noise = torch.randn((num_samples, *data.shape), generator=generator).to(device)
        times = time_grid(MAP_FRAMES - 1, NOISE_TIME, DATA_TIME)
        with torch.no_grad():
            states = [
                noise
                - (NOISE_TIME - r) * self.guided_average(model, noise, r, NOISE_TIME, labels, sample.guidance_scale)
                for r in times.tolist()
            ]
        return frames(times, torch.stack(states))

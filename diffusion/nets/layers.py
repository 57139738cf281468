"""Layers every net shares: the sinusoidal embedding of a time (a timestep, or a flow's t), and a
Linear whose forward-mode derivative costs one matrix product."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) timesteps -> (B, dim) as in DDPM and diffusers' get_timestep_embedding (defaults):
    [sin(t * f_i), cos(t * f_i)] with f_i = max_period ** (-i / (dim/2 - 1)), i = 0 .. dim/2 - 1.
    The frequencies suit times of order 1..1000: a method whose time runs over [0, 1] scales it.
    Computed in float32, or in float64 for float64 times (so that a float64 net's derivative in t
    is float64-accurate)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    exponent = -math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / (half - 1)
    angles = t.to(dtype)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class LinearFunction(torch.autograd.Function):
    """F.linear whose forward-mode derivative (a Jacobian-vector product) takes only the tangents that
    exist: W dx (+ dW x + db when the weight or bias has a tangent). PyTorch's own formula for linear
    materialises a zero tangent for a plain weight and multiplies it too: a JVP in the input alone
    cost ~5x the plain product, not ~2x (PyTorch 2.14, CPU, 256 x 256). No backward: `Linear` uses it
    only where no graph is recorded."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_forward(x, weight)
        ctx.output_dtype = output.dtype  # under autocast, the tangent takes the output's dtype
        ctx.set_materialize_grads(False)  # an input without a tangent comes as None, not zeros

    @staticmethod
    def jvp(ctx, x_tangent: Tensor | None, weight_tangent: Tensor | None, bias_tangent: Tensor | None) -> Tensor:
        x, weight = ctx.saved_tensors
        shape = (*x.shape[:-1], weight.shape[0])
        tangent = F.linear(x_tangent, weight) if x_tangent is not None else x.new_zeros(shape)
        if weight_tangent is not None:
            tangent = tangent + F.linear(x, weight_tangent)
        if bias_tangent is not None:
            tangent = tangent + bias_tangent
        return tangent.to(ctx.output_dtype)


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict) whose forward-mode derivative without a graph
    costs one matrix product (`LinearFunction`): MeanFlow's time derivative is such a pass. With
    grad enabled it is nn.Linear's own forward."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return LinearFunction.apply(x, self.weight, self.bias)


class TimeEmbedding(nn.Module):
    """(B,) times -> (B, emb_dim): the sinusoidal embedding of size `dim` through a two-layer MLP,
    the way the UNet embeds its timestep. A net that takes a second time (MeanFlow's interval
    t - r) embeds it with a second one and adds the two."""

    def __init__(self, dim: int, emb_dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(Linear(dim, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.dim).to(self.mlp[0].weight.dtype))


def second_time_embedding(embedding: TimeEmbedding | None, second_time: Tensor | None, batch: int) -> Tensor | float:
    """The embedding of a net's second time, or 0 for a net of one time. ValueError when the net and
    the call disagree on whether there is one (a MeanFlow net called as a one-time net, or back)."""
    if (embedding is None) != (second_time is None):
        raise ValueError(
            "second_time given to a net built without two_times" if embedding is None else "second_time is missing"
        )
    if embedding is None:
        return 0.0
    return embedding(second_time.expand(batch) if second_time.ndim == 0 else second_time)

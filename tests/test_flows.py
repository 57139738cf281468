"""Flow matching and MeanFlow: the paths, the MeanFlow identity's time derivative, the losses, the
samplers' step counts, training on a toy to its floor, and every new spec trained, resumed and sampled."""

import itertools
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion.__main__ import main
from diffusion.config import ConfigError, ModelConfig, SampleConfig, load_run_config, validate_run
from diffusion.data.spec import DataSpec
from diffusion.methods.flow_matching import NET_TIME_SCALE, FlowMatching
from diffusion.methods.meanflow import MeanFlow, average_and_time_derivative
from diffusion.nets import build_denoiser
from diffusion.nets.layers import Linear, LinearFunction
from diffusion.nets.mlp import FiLMMLP
from diffusion.paths import LinearPath, minibatch_ot_coupling, sample_times
from diffusion.train import train
from tests.conftest import REPO, assert_resumes_bitwise, run_diffusion

POINTS = DataSpec("points", (2,), num_classes=8)
SPECS = REPO / "configs/jobs"


def mlp(two_times: bool, num_classes: int | None = None, dtype=torch.float32) -> FiLMMLP:
    torch.manual_seed(0)
    net = FiLMMLP(2, hidden_dim=32, num_layers=2, num_classes=num_classes, two_times=two_times).to(dtype)
    for parameter in net.parameters():  # the zero-initialised FiLM too: a net whose every input matters
        parameter.data.normal_(0, 0.3)
    return net


def test_linear_path_runs_from_data_at_zero_to_noise_at_one_and_its_velocity_is_the_time_derivative():
    path, x_0, noise = LinearPath(), torch.randn(5, 2), torch.randn(5, 2)
    assert torch.equal(path.sample(x_0, noise, torch.zeros(5)), x_0)
    assert torch.equal(path.sample(x_0, noise, torch.ones(5)), noise)
    t, h = torch.rand(5, dtype=torch.float64), 1e-6
    x_0, noise = x_0.double(), noise.double()
    finite = (path.sample(x_0, noise, t + h) - path.sample(x_0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(finite, path.velocity(x_0, noise))


def test_minibatch_ot_pairs_each_group_by_the_cheapest_permutation_of_its_own_noise():
    """Against brute force over every permutation of groups of 5 (the last of 2): the pairing is a
    permutation within each group (so both ends keep their distributions) and costs the minimum."""
    torch.manual_seed(0)
    x_0, noise = torch.randn(12, 1, 2) * 3, torch.randn(12, 1, 2)
    paired = minibatch_ot_coupling(x_0, noise, group_size=5)
    assert paired.shape == noise.shape
    for start in (0, 5, 10):
        data, draws, chosen = x_0[start : start + 5], noise[start : start + 5], paired[start : start + 5]
        assert sorted(map(tuple, chosen.flatten(1).tolist())) == sorted(map(tuple, draws.flatten(1).tolist()))
        cost = lambda order: (data - draws[list(order)]).pow(2).sum().item()  # noqa: E731
        best = min(cost(order) for order in itertools.permutations(range(len(data))))
        assert (data - chosen).pow(2).sum().item() == pytest.approx(best, rel=1e-6)
        assert best < cost(range(len(data)))  # the independent pairing, as drawn, costs more
    assert torch.equal(minibatch_ot_coupling(x_0, noise, group_size=5), paired)  # no random numbers
    whole = minibatch_ot_coupling(x_0[:6], noise[:6])  # no group size: the whole batch is one group
    best = min((x_0[:6] - noise[list(order)]).pow(2).sum().item() for order in itertools.permutations(range(6)))
    assert (x_0[:6] - whole).pow(2).sum().item() == pytest.approx(best, rel=1e-6)


def test_flow_matching_with_minibatch_ot_pairs_the_batch_before_sharding_and_straightens_the_pairs():
    """The whole batch is paired before ranks take their shards, and the pairs' squared length
    E||eps - x_0||^2 (the conditional velocity's) falls below the independent pairing's: with modes at
    +-(3, 3), 18.2 + 2 independent; transport sends each mode the noise on its side of the diagonal,
    taking off 2 * 3 E|eps_1 + eps_2| = 12 / sqrt(pi) = 6.8, to ~13.4."""
    torch.manual_seed(0)
    x_0 = torch.cat([torch.randn(128, 2) * 0.3 + 3, torch.randn(128, 2) * 0.3 - 3])[torch.randperm(256)]
    batch = {"points": x_0}
    lengths = {}
    for coupling in ("independent", "minibatch_ot"):
        method = FlowMatching(examples_key="points", coupling=coupling, coupling_group_size=128)
        torch.manual_seed(1)
        whole = method.draw(batch, None)
        torch.manual_seed(1)
        shard = method.draw(batch, slice(64, 128))
        assert torch.equal(shard[1], whole[1][64:128])
        lengths[coupling] = (whole[1] - whole[0]).pow(2).sum(1).mean().item()
    assert lengths["independent"] == pytest.approx(20.2, rel=0.1) and lengths["minibatch_ot"] < 14, lengths


def test_meanflow_trains_on_the_pairs_its_coupling_makes():
    """An optimal pairing is its own re-pairing: the noise MeanFlow's loss is given is a fixed point
    of the coupling under minibatch_ot, and is not under independent draws."""
    seen = {}

    class Recording(MeanFlow):
        def loss_at(self, model, x_0, noise, r, t, class_labels):
            seen["x_0"], seen["noise"] = x_0, noise
            return torch.zeros(())

    for coupling in ("independent", "minibatch_ot"):
        Recording(examples_key="points", coupling=coupling, coupling_group_size=32).loss(
            None, {"points": torch.randn(64, 2) * 3}
        )
        repaired = minibatch_ot_coupling(seen["x_0"], seen["noise"], 32)
        assert torch.equal(repaired, seen["noise"]) == (coupling == "minibatch_ot")


def test_logit_normal_times_concentrate_in_the_middle_uniform_ones_do_not():
    torch.manual_seed(0)
    uniform, logit_normal = sample_times(20000, "uniform"), sample_times(20000, "logit_normal", 0.0, 1.0)
    middle = lambda t: ((t > 0.25) & (t < 0.75)).float().mean().item()  # noqa: E731
    assert abs(middle(uniform) - 0.5) < 0.02
    assert middle(logit_normal) > 0.6  # P(|N(0,1)| < logit(0.75) = 1.0986) = 0.73
    shifted = sample_times(20000, "logit_normal", -0.4, 1.0)
    assert shifted.median() < 0.45  # sigmoid(-0.4) = 0.40


def test_meanflow_time_derivative_is_the_total_derivative_along_the_path():
    """jvp along (v, 0, 1) equals d/ds u(z + s v, r, t + s) by central differences (float64)."""
    net = mlp(two_times=True, dtype=torch.float64)
    method = MeanFlow(examples_key="points")
    z, velocity = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64) * 0.5 + 0.5
    r = t * torch.rand(6, dtype=torch.float64)

    def u(z, r, t):
        return method.average_velocity(net, z, r, t, None)

    average, derivative = average_and_time_derivative(u, z, r, t, velocity)
    # Small steps: the third derivative that central differences leave grows with the net's weights.
    h = 1e-7
    finite = (u(z + h * velocity, r, t + h) - u(z - h * velocity, r, t - h)) / (2 * h)
    torch.testing.assert_close(average, u(z, r, t))
    torch.testing.assert_close(derivative, finite, rtol=1e-5, atol=1e-7)
    # Not the partial derivative in t alone, nor along z alone: both parts count.
    partial_t = (u(z, r, t + h) - u(z, r, t - h)) / (2 * h)
    assert not torch.allclose(derivative, partial_t, rtol=1e-3)


def test_meanflow_loss_at_r_equal_t_is_the_flow_matching_loss():
    net = mlp(two_times=True)
    x_0, noise, t = torch.randn(16, 2), torch.randn(16, 2), torch.rand(16)
    flow_matching = FlowMatching(examples_key="points")
    meanflow = MeanFlow(examples_key="points", adaptive_weight_power=0.0)

    def as_one_time(x, t, class_labels=None):  # the MeanFlow net at r = t, as flow matching calls it
        return net(x, t, class_labels=class_labels, second_time=torch.zeros_like(t))

    expected = flow_matching.loss_at(as_one_time, x_0, noise, t, None)
    torch.testing.assert_close(meanflow.loss_at(net, x_0, noise, t, t, None), expected)
    # With r < t the target moves by (t - r) du/dt: another loss.
    assert not torch.allclose(meanflow.loss_at(net, x_0, noise, t / 2, t, None), expected)
    # p = 1: the value is still the unweighted error (what is logged); the gradient is that of
    # sg(1 / (error + c)) * error, which the weighting would pin near 1 as a value.
    weighted = MeanFlow(examples_key="points", adaptive_weight_power=1.0).loss_at(net, x_0, noise, t, t, None)
    torch.testing.assert_close(weighted, expected)
    velocity = as_one_time(LinearPath().sample(x_0, noise, t), t * NET_TIME_SCALE)
    error = (velocity - (noise - x_0)).pow(2).mean(1)
    reference = (error / (error.detach() + 1e-3)).mean()
    for got, want in zip(
        torch.autograd.grad(weighted, list(net.parameters())), torch.autograd.grad(reference, list(net.parameters()))
    ):
        torch.testing.assert_close(got, want)


def test_meanflow_model_tangent_takes_du_dt_along_the_nets_own_velocity():
    """jvp_tangent model (iMF): the target is v - (t - r) d/dt u along (u(z, t, t), 0, 1), computed
    here by hand with torch.func.jvp; the conditional tangent gives another loss, and at r = t both
    are flow matching's."""
    net = mlp(two_times=True, dtype=torch.float64)
    x_0, noise = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.5 + 0.5
    r = t * torch.rand(16, dtype=torch.float64)
    method = MeanFlow(examples_key="points", adaptive_weight_power=0.0, jvp_tangent="model")
    z, velocity = LinearPath().sample(x_0, noise, t), noise - x_0

    def u(z, r, t):
        return method.average_velocity(net, z, r, t, None)

    own = u(z, t, t).detach()
    average, derivative = torch.func.jvp(u, (z, r, t), (own, torch.zeros_like(r), torch.ones_like(t)))
    expected = (average - (velocity - (t - r)[:, None] * derivative)).pow(2).mean().float()  # the loss is float32
    torch.testing.assert_close(method.loss_at(net, x_0, noise, r, t, None), expected)
    conditional = MeanFlow(examples_key="points", adaptive_weight_power=0.0)
    assert not torch.allclose(conditional.loss_at(net, x_0, noise, r, t, None), expected)
    torch.testing.assert_close(
        method.loss_at(net, x_0, noise, t, t, None), conditional.loss_at(net, x_0, noise, t, t, None)
    )


def test_meanflow_differentiates_only_the_pairs_with_r_below_t_and_matches_the_whole_batch_jvp():
    """The derivative is taken without a graph over the r < t rows only: the loss and its gradient
    equal those of one torch.func.jvp over the whole batch, for either tangent."""
    net = mlp(two_times=True, dtype=torch.float64)
    x_0, noise = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.5 + 0.5
    r = torch.where(torch.arange(16) % 3 == 0, t, t * torch.rand(16, dtype=torch.float64))  # a third r = t
    z, velocity = LinearPath().sample(x_0, noise, t), noise - x_0
    for tangent_kind in ("conditional", "model"):
        method = MeanFlow(examples_key="points", adaptive_weight_power=0.0, jvp_tangent=tangent_kind)

        def u(z, r, t):
            return method.average_velocity(net, z, r, t, None)

        tangent = velocity if tangent_kind == "conditional" else u(z, t, t).detach()
        average, derivative = torch.func.jvp(u, (z, r, t), (tangent, torch.zeros_like(r), torch.ones_like(t)))
        target = (velocity - (t - r)[:, None] * derivative).detach()
        expected = (average - target).pow(2).mean()
        got = method.loss_at(net, x_0, noise, r, t, None)
        torch.testing.assert_close(got, expected.float())
        for mine, reference in zip(
            torch.autograd.grad(got, list(net.parameters())), torch.autograd.grad(expected, list(net.parameters()))
        ):
            torch.testing.assert_close(mine, reference.to(mine.dtype), rtol=1e-5, atol=1e-6)
        derivative_rows = method.time_derivative(net, z, r, t, None, velocity)
        assert torch.equal(derivative_rows[r == t], torch.zeros_like(derivative_rows[r == t]))
        torch.testing.assert_close(derivative_rows[r != t], derivative[r != t])


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(name="unet", base_channels=8, channel_mults=[1, 2], num_res_blocks=1),
        ModelConfig(name="dit", dit_size="tiny", patch_size=2),
    ],
    ids=["unet", "dit"],
)
def test_meanflow_time_derivative_of_an_image_net_is_zero_with_no_pair_below_t_and_matches_jvp_otherwise(model):
    """An empty selection (every r = t: each rank still calls the net, on no rows) goes through the
    UNet's and the DiT's forward-mode pass; a mixed batch matches torch.func.jvp over those rows."""
    torch.manual_seed(0)
    net = build_denoiser(model, (1, 8, 8), None, two_times=True)
    for parameter in net.parameters():  # the zero-initialised output layers too: an output that moves
        parameter.data.normal_(0, 0.05)
    method = MeanFlow(examples_key="images", jvp_tangent="conditional")
    z, velocity, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.rand(4) * 0.5 + 0.5
    assert torch.equal(method.time_derivative(net, z, t, t, None, velocity), torch.zeros_like(z))
    r = torch.where(torch.arange(4) < 2, t, t / 2)

    def u(z, r, t):
        return method.average_velocity(net, z, r, t, None)

    with sdpa_kernel(SDPBackend.MATH):
        derivative = torch.func.jvp(u, (z[2:], r[2:], t[2:]), (velocity[2:], torch.zeros(2), torch.ones(2)))[1]
    got = method.time_derivative(net, z, r, t, None, velocity)
    torch.testing.assert_close(got[2:], derivative, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[:2], torch.zeros_like(got[:2])) and got[2:].abs().max() > 0


def test_the_nets_linear_takes_the_forward_mode_derivative_of_the_tangents_it_is_given_and_no_others(monkeypatch):
    """Without a graph, Linear's JVP is W dx (+ dW x + db where those have tangents), equal to
    PyTorch's own formula for F.linear (float64), with or without a bias; the weight's and bias's
    absent tangents reach it as None (nothing multiplied by zeros); under bf16 autocast the tangent
    has the output's dtype; with grad on it is nn.Linear's forward and gradient."""
    received = []
    jvp = LinearFunction.jvp

    def recording_jvp(ctx, *tangents):
        received.append(tuple(tangent is None for tangent in tangents))
        return jvp(ctx, *tangents)

    monkeypatch.setattr(LinearFunction, "jvp", staticmethod(recording_jvp))
    torch.manual_seed(0)
    x, dx = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    dw, db = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    def dual(primal, tangent):
        return primal if tangent is None or primal is None else forward_ad.make_dual(primal, tangent)

    for bias in (True, False):
        linear = Linear(5, 3, bias=bias).double()
        cases = {"input": (dx, None, None), "all": (dx, dw, db), "weight": (None, dw, None), "bias": (None, None, db)}
        for name, (x_tangent, weight_tangent, bias_tangent) in cases.items():
            if not bias and name == "bias":
                continue
            with torch.no_grad(), forward_ad.dual_level():
                inputs = (dual(x, x_tangent), dual(linear.weight, weight_tangent), dual(linear.bias, bias_tangent))
                mine = forward_ad.unpack_dual(LinearFunction.apply(*inputs))
                expected = forward_ad.unpack_dual(F.linear(*inputs))
            torch.testing.assert_close(mine.primal, expected.primal, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(mine.tangent, expected.tangent, msg=name)
        received.clear()
        with torch.no_grad(), forward_ad.dual_level():
            tangent = forward_ad.unpack_dual(linear(forward_ad.make_dual(x, dx))).tangent
        assert received == [(False, True, True)]  # through LinearFunction, the weight's and bias's as None
        torch.testing.assert_close(tangent, dx @ linear.weight.T)

    linear = Linear(5, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), forward_ad.dual_level():
        output = forward_ad.unpack_dual(linear(forward_ad.make_dual(x.float(), dx.float())))
    assert output.primal.dtype == output.tangent.dtype == torch.bfloat16

    reference = torch.nn.Linear(5, 3)
    reference.load_state_dict(linear.state_dict())
    received.clear()
    inputs = x.float().requires_grad_(True)
    mine, expected = linear(inputs), reference(inputs)
    assert mine.grad_fn.name() == expected.grad_fn.name() and not received
    torch.testing.assert_close(torch.autograd.grad(mine.sum(), inputs), torch.autograd.grad(expected.sum(), inputs))


def test_fourier_features_are_saved_with_the_weights_and_learn_a_sharp_edge_sooner():
    """The frequencies are a buffer drawn from the seeded RNG (saved, the same for the same seed);
    on 2-D points, an MLP with them fits eight angular sectors (the map one MeanFlow step makes)
    far better in the same steps than one without."""
    torch.manual_seed(0)
    net = FiLMMLP(2, hidden_dim=64, num_layers=2, fourier_features=32, fourier_scale=0.5)
    assert net.state_dict()["frequencies"].shape == (2, 32)
    torch.manual_seed(0)
    assert torch.equal(FiLMMLP(2, hidden_dim=64, num_layers=2, fourier_features=32).frequencies, net.frequencies * 2)
    assert "frequencies" not in FiLMMLP(2, hidden_dim=64, num_layers=2).state_dict()

    generator = torch.Generator().manual_seed(1)
    points = torch.randn(4096, 2, generator=generator)
    angle = torch.atan2(points[:, 1], points[:, 0])
    sector = torch.floor((angle + torch.pi) / (torch.pi / 4))  # 0..7
    target = torch.stack([torch.cos(sector * torch.pi / 4), torch.sin(sector * torch.pi / 4)], dim=1) * 2
    errors = {}
    for features in (0, 32):
        torch.manual_seed(0)
        model = FiLMMLP(2, hidden_dim=64, num_layers=2, fourier_features=features, fourier_scale=0.5)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(300):
            batch = slice((step * 256) % 4096, (step * 256) % 4096 + 256)
            loss = (model(points[batch], torch.zeros(256)) - target[batch]).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            errors[features] = (model(points, torch.zeros(4096)) - target).pow(2).mean().item()
    assert errors[32] < 0.6 * errors[0], errors


def test_meanflow_draws_ordered_times_with_the_configured_share_equal():
    method = MeanFlow(examples_key="points", r_equals_t_share=0.3, time_sampling="logit_normal")
    torch.manual_seed(0)
    r, t = method.draw_times(20000, "cpu")
    assert (r <= t).all() and ((t >= 0) & (t <= 1)).all()
    assert abs((r == t).float().mean().item() - 0.3) < 0.02


def test_meanflow_training_guidance_mixes_in_the_unconditional_velocity_only_for_labelled_examples():
    net = mlp(two_times=True, num_classes=8)
    method = MeanFlow(examples_key="points", num_classes=8, label_dropout=0.1, training_guidance_scale=3.0)
    z, t, velocity = torch.randn(4, 2), torch.rand(4), torch.randn(4, 2)
    labels = torch.tensor([1, 8, 3, 8])  # 8: the null class (dropped)
    guided = method.guided_velocity(net, z, t, velocity, labels)
    unconditional = method.average_velocity(net, z, t, t, torch.full_like(labels, 8))
    expected = 3.0 * velocity + (1 - 3.0) * unconditional
    torch.testing.assert_close(guided[[0, 2]], expected[[0, 2]])
    assert torch.equal(guided[[1, 3]], velocity[[1, 3]])


def test_meanflow_model_tangent_under_training_guidance_is_the_nets_own_velocity_not_guided_again(monkeypatch):
    """The r = t pairs train u(z, t, t | c) towards the guided velocity already: the tangent is u(z, t, t | c)."""
    net = mlp(two_times=True, num_classes=8)
    method = MeanFlow(examples_key="points", num_classes=8, training_guidance_scale=2.0, jvp_tangent="model")
    x_0, noise, t = torch.randn(4, 2), torch.randn(4, 2), torch.rand(4) * 0.5 + 0.5
    r, labels = t / 2, torch.tensor([1, 8, 3, 5])
    tangents = []
    real = average_and_time_derivative

    def recording(u, z, r, t, tangent):
        tangents.append(tangent)
        return real(u, z, r, t, tangent)

    monkeypatch.setattr("diffusion.methods.meanflow.average_and_time_derivative", recording)
    method.loss_at(net, x_0, noise, r, t, labels)
    z = LinearPath().sample(x_0, noise, t)
    torch.testing.assert_close(tangents[0], method.average_velocity(net, z, t, t, labels))


@pytest.mark.parametrize(("sampler", "steps", "nfe"), [("euler", 7, 7), ("heun", 5, 10), ("rk4", 3, 12)])
def test_flow_matching_samples_with_exactly_the_solver_evaluations_and_names_them(sampler, steps, nfe):
    net = mlp(two_times=False)
    calls = []

    def counting(x, t, class_labels=None):
        calls.append(t[0].item() / NET_TIME_SCALE)
        return net(x, t, class_labels=class_labels)

    sample = SampleConfig(sampler=sampler, num_inference_steps=steps, batch_size=10, num_samples=20)
    stats = {}
    method = FlowMatching(examples_key="points")
    samples = method.sample(counting, 20, POINTS, sample, torch.Generator().manual_seed(0), stats=stats)
    assert samples.shape == (20, 2) and stats["nfe"] == nfe and len(calls) == 2 * nfe  # two batches
    assert max(calls) == pytest.approx(1.0) and min(calls) >= 0.0
    assert method.sample_name(sample) == {"euler": "euler7", "heun": "heun5", "rk4": "rk4-3"}[sampler] + "-seed0"


def test_meanflow_one_step_is_one_jump_from_noise_along_the_average_velocity():
    net = mlp(two_times=True)
    method = MeanFlow(examples_key="points")
    sample = SampleConfig(sampler="meanflow", num_inference_steps=1)
    stats = {}
    samples = method.sample(net, 8, POINTS, sample, torch.Generator().manual_seed(3), stats=stats)
    noise = torch.randn((8, 2), generator=torch.Generator().manual_seed(3))
    expected = noise - method.average_velocity(net, noise, torch.zeros(8), torch.ones(8), None)
    torch.testing.assert_close(samples, expected)
    assert stats["nfe"] == 1
    two = method.sample(net, 8, POINTS, sample.model_copy(update={"num_inference_steps": 2}), torch.Generator())
    assert not torch.allclose(two, samples)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"method": {"name": "flow_matching"}},
            "sample.sampler: 'ddim' is not allowed with method.name 'flow_matching'",
        ),
        (
            {"method": {"name": "ddpm"}, "data": {"dataset": "moons"}, "model": {"name": "mlp"}},
            "method.name: 'ddpm' is not allowed with data.dataset 'moons': use one of flow_matching, meanflow",
        ),
        (
            {"method": {"name": "flow_matching"}, "data": {"dataset": "moons"}, "sample": {"sampler": "euler"}},
            "model.name: 'unet' is not allowed with data.dataset 'moons': use 'mlp'",
        ),
        (
            {
                "method": {"name": "flow_matching"},
                "model": {"name": "dit", "patch_size": 3},
                "sample": {"sampler": "euler"},
            },
            "model.patch_size: 3 is not allowed: it must divide the 28x28 inputs",
        ),
        (
            {"method": {"name": "flow_matching", "training_guidance_scale": 2.0}, "sample": {"sampler": "euler"}},
            "method.training_guidance_scale: 2.0 is not allowed with method.name 'flow_matching'",
        ),
        (
            {"method": {"name": "meanflow", "training_guidance_scale": 2.0}, "sample": {"sampler": "meanflow"}},
            "method.training_guidance_scale: 2.0 is not allowed without a class-conditional model",
        ),
        (
            {"method": {"name": "flow_matching"}, "sample": {"sampler": "meanflow"}},
            "sample.sampler: 'meanflow' is not allowed with method.name 'flow_matching'",
        ),
        (
            {"method": {"name": "flow_matching", "r_equals_t_share": 0.5}, "sample": {"sampler": "euler"}},
            "method.r_equals_t_share: 0.5 is not allowed here: only meanflow read it; leave it at 0.75",
        ),
        (
            {"method": {"name": "flow_matching", "prediction_type": "v_prediction"}, "sample": {"sampler": "euler"}},
            "method.prediction_type: 'v_prediction' is not allowed here: only ddpm (flows predict a velocity)",
        ),
        (
            {"method": {"name": "ddpm", "time_sampling": "logit_normal"}},
            "method.time_sampling: 'logit_normal' is not allowed here: only flow_matching and meanflow read it",
        ),
        (
            {"data": {"num_points": 100}},
            "data.num_points: 100 is not allowed here: only the 2-D toys read it; leave it at 20000",
        ),
        (
            {"model": {"patch_size": 4}},
            "model.patch_size: 4 is not allowed here: only model.name 'dit' read it",
        ),
        (
            {"model": {"fourier_features": 16}},
            "model.fourier_features: 16 is not allowed here: only model.name 'mlp' read it; leave it at 0",
        ),
        (
            {
                "method": {"name": "flow_matching"},
                "data": {"dataset": "moons"},
                "model": {"name": "mlp", "fourier_scale": 2.0},
                "sample": {"sampler": "euler"},
            },
            "model.fourier_scale: 2.0 is not allowed with model.fourier_features 0",
        ),
        (
            {"method": {"name": "flow_matching"}, "sample": {"sampler": "euler", "rtol": 1e-3}},
            "sample.rtol: 0.001 is not allowed with sample.sampler 'euler': only sampler 'dopri5' read it",
        ),
        (
            {"method": {"name": "flow_matching"}, "sample": {"sampler": "dopri5", "rtol": 1e-300}},
            "sample.rtol: 1e-300 is not allowed: must be greater than or equal to 0.0000001",
        ),
        (
            {"method": {"name": "meanflow"}, "sample": {"sampler": "meanflow", "eta": 0.5}},
            "sample.eta: 0.5 is not allowed with sample.sampler 'meanflow': only the DDPM schedulers' samplers",
        ),
        (
            {"method": {"name": "ddpm", "coupling": "minibatch_ot"}},
            "method.coupling: 'minibatch_ot' is not allowed here: only flow_matching and meanflow read it",
        ),
        (
            {"method": {"name": "flow_matching", "coupling_group_size": 64}, "sample": {"sampler": "euler"}},
            "method.coupling_group_size: 64 is not allowed here: only method.coupling 'minibatch_ot' read it; leave it at null",
        ),
        (
            {
                "method": {"name": "meanflow", "coupling": "minibatch_ot", "label_dropout": 0.1},
                "model": {"class_conditional": True},
                "sample": {"sampler": "meanflow"},
            },
            "method.coupling: 'minibatch_ot' is not allowed with model.class_conditional true",
        ),
        (
            {
                "method": {"name": "flow_matching", "coupling": "minibatch_ot", "coupling_group_size": 512},
                "train": {"batch_size": 256},
                "sample": {"sampler": "euler"},
            },
            "method.coupling_group_size: 512 is not allowed with train.batch_size 256: a group is at most one batch",
        ),
        (
            {
                "method": {"name": "meanflow", "coupling": "minibatch_ot"},
                "train": {"batch_size": 1024},
                "sample": {"sampler": "meanflow"},
            },
            "method.coupling_group_size: null (the whole batch of train.batch_size 1024) is not allowed",
        ),
        (
            {"method": {"name": "meanflow"}, "train": {"compile": True}, "sample": {"sampler": "meanflow"}},
            "train.compile: true is not allowed with method.name 'meanflow'",
        ),
        (
            {
                "method": {"name": "flow_matching"},
                "data": {"dataset": "moons", "subset": 100},
                "model": {"name": "mlp"},
                "sample": {"sampler": "euler"},
            },
            "data.subset: 100 is not allowed with data.dataset 'moons'",
        ),
        (
            {
                "method": {"name": "meanflow"},
                "data": {"dataset": "spirals"},
                "model": {"name": "mlp", "class_conditional": True},
                "sample": {"sampler": "meanflow", "class_label": 2},
            },
            "sample.class_label: 2 is not allowed: spirals has classes 0 to 1",
        ),
    ],
)
def test_flow_settings_that_cannot_work_are_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError) as error:
        validate_run(settings)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_unet_attention_limits_do_not_apply_to_the_dit():
    config = validate_run(
        {
            "method": {"name": "flow_matching"},
            "model": {"name": "dit", "attention_heads": 3},
            "sample": {"sampler": "euler"},
        }
    )
    assert config.model.name == "dit"


def test_a_thousand_steps_of_flow_matching_bring_eight_gaussians_within_2x_the_floor(tmp_path):
    """Within 2x what real draws score against the same held-out points (300 steps: 3.3x); the EMA
    averages the last hundred steps, as a run this short wants."""
    overrides = [
        "train.max_minutes=null",
        "train.max_steps=1000",
        "train.batch_size=256",
        "train.ema_decay=0.99",
        "train.progress=lines",
    ]
    overrides += ["train.checkpoint_every_minutes=null", "train.sample_every_epochs=null", "device=cpu"]
    assert train(load_run_config(SPECS / "flow-toy.yaml", overrides), tmp_path / "run") == 0
    scores = json.loads((tmp_path / "run/summary.json").read_text())["scores"]
    assert scores["num_samples"] == 2000
    assert scores["energy_distance"] < 2 * scores["real_floor"], scores
    # The Gaussian it starts from is far from the data: the score can tell the two apart.
    from diffusion.data import load_validation
    from diffusion.scores.points import point_scores

    held_out = load_validation(load_run_config(SPECS / "flow-toy.yaml").data).points
    noise = point_scores(torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)), held_out)
    assert noise["energy_distance"] > 20 * scores["energy_distance"]
    with Image.open(tmp_path / "run/figures/flow.gif") as animation:
        assert animation.n_frames > 10  # the flow from noise to data, frame by frame
    assert (tmp_path / "run/samples/final.png").is_file()


def test_compile_failure_falls_back_in_one_line_to_the_uncompiled_trajectory(tmp_path):
    """A C++ compiler that is not there makes inductor fail for real (in a fresh process: inductor
    reads $CXX when it is imported); the run says so and takes the very steps an uncompiled run takes."""
    overrides = ["train.max_minutes=null", "train.max_steps=3", "train.batch_size=64", "device=cpu"]
    overrides += ["train.checkpoint_every_minutes=null", "train.sample_every_epochs=null", "sample.num_samples=16"]
    overrides += ["model.hidden_dim=16", "model.num_layers=1", "data.num_points=256", "train.progress=lines"]
    env = os.environ | {"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    sets = [part for override in [*overrides, "train.compile=true"] for part in ("--set", override)]
    result = run_diffusion("train", SPECS / "flow-toy.yaml", "--out", tmp_path / "a", *sets, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    fallback = [line for line in result.stdout.splitlines() if line.startswith("train.compile:")]
    assert (
        len(fallback) == 1 and "torch.compile failed (" in fallback[0] and fallback[0].endswith("training uncompiled")
    )
    assert train(load_run_config(SPECS / "flow-toy.yaml", overrides), tmp_path / "b") == 0
    a = torch.load(tmp_path / "a/checkpoints/latest.pt", weights_only=False)
    b = torch.load(tmp_path / "b/checkpoints/latest.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


TOY_COMMON = [
    "device=cpu",
    "data.num_points=512",
    "train.batch_size=64",
    "train.max_minutes=null",
    "train.progress=lines",
    "train.sample_every_epochs=null",
    "train.checkpoint_every_minutes=null",
    "train.warmup_steps=0",
    "model.hidden_dim=32",
    "model.num_layers=2",
    "sample.num_samples=200",
]
IMAGE_COMMON = [
    "device=cpu",
    "data.subset=64",
    "data.download=false",
    "train.batch_size=16",
    "train.max_minutes=null",
    "train.progress=lines",
    "train.sample_every_epochs=null",
    "train.checkpoint_every_minutes=null",
    "train.warmup_steps=0",
    "sample.num_samples=8",
    "sample.num_inference_steps=2",
    "eval.num_samples=50",
]
SMALL_UNET = ["model.base_channels=8", "model.norm_groups=4", "model.num_res_blocks=1", "model.attention_heads=2"]


@pytest.mark.parametrize(
    ("spec", "overrides"),
    [
        ("flow-toy", TOY_COMMON),
        ("meanflow-toy", TOY_COMMON),
        ("flow-mnist", IMAGE_COMMON + SMALL_UNET),
        ("meanflow-mnist", IMAGE_COMMON + SMALL_UNET),
        ("dit-mnist", [*IMAGE_COMMON, "model.dit_size=tiny", "model.patch_size=4"]),
    ],
)
def test_each_flow_spec_trains_checkpoints_resumes_bitwise_and_samples(spec, overrides, tmp_path, request):
    if spec.endswith("mnist"):
        request.getfixturevalue("mnist_root")  # skips without the MNIST files
    whole = assert_resumes_bitwise(SPECS / f"{spec}.yaml", overrides, tmp_path)
    assert (whole / "figures/flow.png").is_file()
    sampler = "dopri5" if spec.startswith("flow") else "heun" if spec == "dit-mnist" else "meanflow"
    assert main(["sample", str(whole), "--set", f"sample.sampler={sampler}", "--set", "sample.num_samples=8"]) == 0
    arrays = next((whole / "samples").glob(f"{sampler}*.npz"))
    values = np.load(arrays)["points" if "toy" in spec else "images"]
    assert len(values) == 8 and np.isfinite(values.astype(float)).all()
    if "toy" in spec:  # a toy's sample task scores the samples against the held-out split
        record = json.loads(next((whole / "eval").glob(f"{sampler}*.json")).read_text())
        assert record["scores"]["energy_distance"] > 0 and record["nfe"] >= 1


def test_meanflow_cifar10_spec_builds_a_two_time_unet_with_guidance_in_training():
    config = load_run_config(SPECS / "meanflow-cifar10.yaml")
    from diffusion.methods import build_method

    method = build_method(config)
    assert isinstance(method, MeanFlow) and method.training_guidance_scale == 2.0 and method.num_classes == 10
    with torch.device("meta"):
        net = method.build_model(config.model, DataSpec("image", (3, 32, 32), num_classes=10))
    assert net.second_time_embedding is not None
    assert 30e6 < sum(p.numel() for p in net.parameters()) < 60e6


def test_dit_serves_ddpm_and_flows_on_latent_grids_too():
    model = ModelConfig(name="dit", dit_size="tiny", patch_size=1, class_conditional=True)
    net = build_denoiser(model, (4, 7, 7), 10, two_times=True)
    out = net(torch.randn(2, 4, 7, 7), torch.tensor([3.0, 500.0]), torch.tensor([1, 10]), second_time=torch.zeros(2))
    assert out.shape == (2, 4, 7, 7)
    with pytest.raises(ConfigError, match="model.patch_size: 2 is not allowed: it must divide the 7x7 inputs"):
        build_denoiser(model.model_copy(update={"patch_size": 2}), (4, 7, 7), 10)


def test_the_journal_shows_the_settings_of_the_runs_own_method_and_net():
    from diffusion.config import main_settings

    flow = main_settings("meanflow", "dit")
    assert {"method.r_equals_t_share", "method.training_guidance_scale", "model.dit_size", "model.patch_size"} <= set(
        flow
    )
    assert not {"method.beta_schedule", "method.num_train_timesteps", "model.base_channels"} & set(flow)
    assert {"method.beta_schedule", "model.base_channels"} <= set(main_settings("ddpm", "unet"))
    assert main_settings("a-method-from-a-test", None)[:3] == ("task", "device", "data.dataset")

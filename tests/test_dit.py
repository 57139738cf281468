import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion.nets.dit import DIT_SIZES, DiT, DiTBlock, sincos_2d
from diffusion.nets.layers import timestep_embedding

# Tiny nets: every test runs in well under a second on CPU.
TINY = dict(hidden_size=32, depth=2, num_heads=2)


def perturb_zero_init(net: DiT, seed: int = 0, std: float = 0.1) -> None:
    """Give the zero-initialised adaLN and output linears random values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    zero_init = [block.adaLN_modulation[-1] for block in net.blocks]
    zero_init += [net.final_layer.adaLN_modulation[-1], net.final_layer.linear]
    with torch.no_grad():
        for linear in zero_init:
            for param in (linear.weight, linear.bias):
                param.copy_(std * torch.randn(param.shape, generator=generator, dtype=param.dtype))


@pytest.mark.parametrize(
    "in_channels, size, patch_size",
    [(1, 28, 2), (1, 28, 4), (3, 32, 2), (4, 7, 1), (4, 7, 7)],
)
def test_output_has_input_shape(in_channels, size, patch_size):
    torch.manual_seed(0)
    net = DiT(in_channels, size, patch_size=patch_size, **TINY)
    perturb_zero_init(net)  # else the output is zero, whatever the layout
    x = torch.randn(2, in_channels, size, size)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert net(x, torch.tensor(500.0)).shape == x.shape  # a 0-dim time is expanded


def test_unpatchify_inverts_patchify():
    # Patchify (as the conv sees patches) then unpatchify must put every value back in place.
    net = DiT(3, 8, patch_size=4, **TINY)
    x = torch.randn(2, 3, 8, 8)
    p, g = 4, 2
    # (B, C, H, W) -> (B, N, p * p * C) with N row-major and values ordered (p, q, c), as DiT's output.
    tokens = x.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 3)
    assert torch.equal(net.unpatchify(tokens), x)


def test_adaln_zero_starts_as_identity_with_zero_output():
    torch.manual_seed(0)
    net = DiT(3, 16, patch_size=2, num_classes=10, two_times=True, **TINY).eval()
    seen = []
    for block in net.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    x = torch.randn(3, 3, 16, 16)
    out = net(x, torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 9, 10]), torch.tensor([0.0, 3.0, 7.0]))
    assert len(seen) == len(net.blocks)
    for tokens_in, tokens_out in seen:
        assert tokens_in.abs().sum() > 0 and torch.equal(tokens_in, tokens_out)
    assert torch.equal(out, torch.zeros_like(x))


def test_output_depends_on_times_and_class_after_perturbation():
    torch.manual_seed(0)
    net = DiT(1, 8, patch_size=2, num_classes=10, two_times=True, **TINY).eval()
    perturb_zero_init(net)
    x = torch.randn(2, 1, 8, 8)
    t, r, y = torch.tensor([100.0, 600.0]), torch.tensor([10.0, 20.0]), torch.tensor([3, 7])
    base = net(x, t, y, r)
    assert not torch.allclose(base, net(x, t + 50, y, r))
    assert not torch.allclose(base, net(x, t, y, r + 50))
    assert not torch.allclose(base, net(x, t, torch.tensor([4, 7]), r))
    # Each sample is conditioned on its own label only.
    changed = net(x, t, torch.tensor([4, 7]), r)
    assert not torch.allclose(base[0], changed[0]) and torch.allclose(base[1], changed[1])
    # No label is the null class, index num_classes.
    assert torch.equal(net(x, t, None, r), net(x, t, torch.tensor([10, 10]), r))
    assert not torch.allclose(net(x, t, None, r), base)


def test_integer_and_float_timesteps_agree():
    torch.manual_seed(0)
    net = DiT(1, 8, patch_size=2, **TINY).eval()
    perturb_zero_init(net)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(net(x, torch.tensor([3, 999])), net(x, torch.tensor([3.0, 999.0])))


@pytest.mark.parametrize("t0", [0.3, 400.0])  # flow units and DDPM units
@pytest.mark.parametrize("tangent", ["x_and_t", "t", "second_time"])
def test_jvp_matches_central_difference_float64(t0, tangent):
    torch.manual_seed(0)
    net = DiT(2, 8, patch_size=2, num_classes=3, two_times=True, **TINY).double().eval()
    perturb_zero_init(net)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([t0, 2 * t0], dtype=torch.float64)
    r = 0.5 * t
    labels = torch.tensor([1, 3])
    v = torch.randn_like(x) if tangent == "x_and_t" else torch.zeros_like(x)
    dt = torch.ones_like(t) if tangent in ("x_and_t", "t") else torch.zeros_like(t)
    dr = torch.ones_like(r) if tangent == "second_time" else torch.zeros_like(r)

    def f(x, t, r):
        return net(x, t, labels, r)

    with sdpa_kernel(SDPBackend.MATH):  # as MeanFlow calls it: the fused kernels have no forward-mode rule
        out, jvp = torch.func.jvp(f, (x, t, r), (v, dt, dr))
    h = 1e-4
    central = (f(x + h * v, t + h * dt, r + h * dr) - f(x - h * v, t - h * dt, r - h * dr)) / (2 * h)
    assert torch.allclose(out, f(x, t, r))
    assert jvp.norm() > 1e-4
    assert (jvp - central).norm() / jvp.norm() < 1e-5


def test_jvp_runs_in_float32():
    torch.manual_seed(0)
    net = DiT(1, 8, patch_size=2, two_times=True, **TINY)
    perturb_zero_init(net)
    x, t, r = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2])
    with sdpa_kernel(SDPBackend.MATH):
        _, jvp = torch.func.jvp(lambda t: net(x, t, None, r), (t,), (torch.ones_like(t),))
        net64 = net.double()
        _, jvp64 = torch.func.jvp(
            lambda t: net64(x.double(), t, None, r.double()), (t.double(),), (torch.ones_like(t),)
        )
    assert torch.allclose(jvp.double(), jvp64, rtol=1e-3, atol=1e-5)


def test_time_embedding_is_float64_for_float64_times_and_float32_otherwise():
    t = torch.tensor([0, 1, 250, 999])
    float64 = timestep_embedding(t.double(), 256)
    assert float64.dtype == torch.float64 and timestep_embedding(t, 256).dtype == torch.float32
    # Equal up to float32's rounding of angles as large as t (999 * 6e-8).
    assert torch.allclose(float64, timestep_embedding(t, 256).double(), atol=1e-4)
    assert not torch.allclose(float64, timestep_embedding(t + 1, 256).double(), atol=1e-4)


def test_positional_embedding_is_fixed_2d_sincos_and_state_dict_round_trips():
    torch.manual_seed(0)
    net = DiT(1, 8, patch_size=2, num_classes=10, two_times=True, **TINY)
    perturb_zero_init(net)
    assert "pos_embed" not in dict(net.named_parameters())
    pos = net.pos_embed[0]
    assert pos.shape == (16, 32) and not pos.requires_grad
    # Token 5 is row 1, column 1 of the 4x4 grid: the first half encodes the column, the second the row.
    assert pos[5, 0].item() == pytest.approx(math.sin(1.0)) and pos[5, 16].item() == pytest.approx(math.sin(1.0))
    assert pos[1, 0].item() == pytest.approx(math.sin(1.0)) and pos[1, 16].item() == pytest.approx(0.0)
    assert torch.equal(pos, sincos_2d(32, 4))

    torch.manual_seed(1)
    fresh = DiT(1, 8, patch_size=2, num_classes=10, two_times=True, **TINY)
    fresh.load_state_dict(net.state_dict())
    x, t, r = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 50.0]), torch.tensor([1.0, 2.0])
    assert torch.equal(fresh(x, t, torch.tensor([1, 2]), r), net(x, t, torch.tensor([1, 2]), r))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    net = DiT(1, 8, patch_size=2, dropout=0.5, **TINY)
    perturb_zero_init(net)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 50.0])
    assert not torch.equal(net.train()(x, t), net(x, t))
    assert torch.equal(net.eval()(x, t), net(x, t))


def test_bad_construction_and_conditioning_raise():
    with pytest.raises(ValueError, match=r"patch_size=3.*image_size=28"):
        DiT(1, 28, patch_size=3, **TINY)
    with pytest.raises(ValueError, match=r"num_heads=3.*hidden_size=32"):
        DiT(1, 28, hidden_size=32, depth=2, num_heads=3)

    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    plain = DiT(1, 8, **TINY)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="second_time"):
        plain(x, t, None, t)
    two = DiT(1, 8, two_times=True, **TINY)
    with pytest.raises(ValueError, match="second_time"):
        two(x, t)


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_dit_s_has_the_papers_size():
    with torch.device("meta"):
        net = DiT(4, 32, patch_size=2, **DIT_SIZES["S"])
    # Peebles & Xie: DiT-S/2 has 33M parameters (with 1000 classes and a learned sigma).
    assert 25e6 < count(net) < 40e6
    assert sum(isinstance(m, DiTBlock) for m in net.modules()) == DIT_SIZES["S"]["depth"]

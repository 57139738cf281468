import math

import pytest
import torch
from torch import nn

from diffusion.nets.layers import timestep_embedding
from diffusion.nets.unet import ResBlock, UNet

# Tiny nets: every test runs in well under a second on CPU.
TINY = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_heads=2, norm_groups=4)


def perturb_film(net: UNet, std: float = 0.1) -> None:
    """Give the zero-initialised FiLM projections small random values, as training would."""
    for module in net.modules():
        if isinstance(module, ResBlock):
            nn.init.normal_(module.film.weight, std=std)
            nn.init.normal_(module.film.bias, std=std)


@pytest.mark.parametrize(
    "in_channels, size, config",
    [
        (1, 28, dict(TINY, channel_mults=(1, 2, 2))),  # 28 -> 14 -> 7
        (3, 32, dict(TINY, channel_mults=(1, 2, 2))),  # 32 -> 16 -> 8
        (1, 28, dict(TINY, channel_mults=(1, 2, 2, 2))),  # 28 -> 14 -> 7 -> 4, back up 4 -> 7
        (1, 28, dict(TINY, num_res_blocks=2, attention=False, dropout=0.1)),
    ],
)
def test_output_has_input_shape(in_channels, size, config):
    torch.manual_seed(0)
    net = UNet(in_channels=in_channels, **config)
    x = torch.randn(2, in_channels, size, size)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_out_channels_and_scalar_t():
    net = UNet(in_channels=1, out_channels=2, **TINY)
    x = torch.randn(3, 1, 28, 28)
    assert net(x, torch.tensor(500.0)).shape == (3, 2, 28, 28)


def test_timestep_embedding_matches_ddpm_formula():
    t = torch.tensor([0, 1, 250])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # sin(0), cos(0)
    # Frequencies 10000 ** (-i / 3) for i = 0..3: the first is 1, the last 1 / 10000.
    assert emb[1, 0].item() == pytest.approx(math.sin(1.0))
    assert emb[2, 3].item() == pytest.approx(math.sin(250 / 10000))
    assert emb[2, 7].item() == pytest.approx(math.cos(250 / 10000))


def test_output_ignores_t_and_label_at_init():
    # FiLM projections start at zero, so nothing conditions the output yet: exactly equal.
    torch.manual_seed(0)
    net = UNet(in_channels=1, num_classes=10, **TINY).eval()
    x = torch.randn(2, 1, 28, 28)
    out = net(x, torch.tensor([10, 10]), torch.tensor([3, 3]))
    assert torch.equal(out, net(x, torch.tensor([900, 900]), torch.tensor([3, 3])))
    assert torch.equal(out, net(x, torch.tensor([10, 10]), torch.tensor([7, 7])))
    assert torch.equal(out, net(x, torch.tensor([10, 10])))


def test_output_depends_on_t_and_label_once_film_is_nonzero():
    torch.manual_seed(0)
    net = UNet(in_channels=1, num_classes=10, **TINY).eval()
    perturb_film(net)
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([10, 10])
    out = net(x, t, torch.tensor([3, 3]))
    assert not torch.allclose(out, net(x, torch.tensor([900, 900]), torch.tensor([3, 3])), atol=1e-4)
    assert not torch.allclose(out, net(x, t, torch.tensor([7, 7])), atol=1e-4)
    assert not torch.allclose(out, net(x, t), atol=1e-4)  # None means the null class, index 10
    assert torch.equal(net(x, t), net(x, t, torch.tensor([10, 10])))


def test_class_labels_on_unconditional_net_raise():
    net = UNet(in_channels=1, **TINY)
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), torch.tensor([3, 7]))


@pytest.mark.parametrize("channel_mults", [(1, 2), (1, 2, 2, 2)])
def test_gradients_reach_every_parameter(channel_mults):
    torch.manual_seed(0)
    net = UNet(in_channels=1, num_classes=10, **dict(TINY, channel_mults=channel_mults))
    # With zero FiLM weights no gradient flows back into the time MLP or class embedding.
    perturb_film(net)
    x = torch.randn(4, 1, 28, 28)
    out = net(x, torch.tensor([1, 200, 500, 999]), torch.tensor([0, 3, 7, 10]))
    (out - torch.randn_like(out)).pow(2).mean().backward()
    no_grad = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []

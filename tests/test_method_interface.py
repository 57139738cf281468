"""The Method interface is enough: a toy method defined here alone (a one-parameter denoiser on
MNIST digits, x0_hat = w * x_t) is registered, trained, checkpointed, resumed bit for bit and
sampled through the real trainer and the real sample task, with no edit to any other module."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffusion.__main__ import main
from diffusion.config import METHOD_KINDS, ConfigError, validate_run
from diffusion.methods import METHODS, Method, register
from diffusion.train import train


class Scale(nn.Module):
    """The whole network: one number."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        return self.w * x


class OneParameterDenoiser(Method):
    """x_t = sqrt(1 - s) x0 + sqrt(s) noise with s ~ U(0, 1); the net predicts x0 from x_t alone,
    and sampling is one step from pure noise."""

    name = "toy-scale"
    data_kinds = ("image",)

    def build_model(self, model_config, data, parent=None):
        return Scale()

    def loss(self, model, batch, shard=None):
        images = batch["images"]
        s = torch.rand(images.shape[0], 1, 1, 1, device=images.device)  # the global RNG, which checkpoints keep
        noise = torch.randn_like(images)
        if shard is not None:
            images, s, noise = images[shard], s[shard], noise[shard]
        noisy = (1 - s).sqrt() * images + s.sqrt() * noise
        return (model(noisy) - images).pow(2).mean()

    def sample(self, model, num_samples, data, sample, generator, device="cpu", progress=None, stats=None):
        noise = torch.randn((num_samples, *data.shape), generator=generator).to(device)
        return model(noise).clamp(-1, 1)

    def sample_name(self, sample):
        return f"toy-seed{sample.seed}"


@pytest.fixture
def toy_method():
    register(OneParameterDenoiser)
    yield OneParameterDenoiser
    del METHODS[OneParameterDenoiser.name], METHOD_KINDS[OneParameterDenoiser.name]


def toy_config(root: Path, **train) -> dict:
    return {
        "task": "train",
        "device": "cpu",
        "data": {"root": str(root), "download": False, "subset": 64},
        "method": {"name": "toy-scale"},
        "train": {
            "batch_size": 16,
            "epochs": 2,
            "lr": 0.05,
            "log_every": 1,
            "sample_every_epochs": 1,
            "checkpoint_every_steps": 2,
            "checkpoint_every_minutes": None,
            "progress": "lines",
            **train,
        },
        "sample": {"num_samples": 5, "seed": 3},
    }


def test_an_unregistered_method_name_is_refused_in_one_line(mnist_root):
    with pytest.raises(ConfigError, match=r"^config: method.name: 'toy-scale' is not allowed: must be 'ddpm', "):
        validate_run(toy_config(mnist_root))


def test_a_toy_method_trains_resumes_and_samples_through_the_real_trainer_and_tasks(toy_method, mnist_root, tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert train(validate_run(toy_config(mnist_root)), whole) == 0
    assert train(validate_run(toy_config(mnist_root, max_steps=3)), halves) == 0
    assert train(validate_run(toy_config(mnist_root)), halves) == 0  # resumes from step 3 to the end

    a = torch.load(whole / "checkpoints/latest.pt", weights_only=False)
    b = torch.load(halves / "checkpoints/latest.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    assert torch.equal(a["model"]["w"], b["model"]["w"]) and torch.equal(a["ema"]["w"], b["ema"]["w"])
    w = a["model"]["w"].item()
    # From 0 toward the best scale E[x_t x0] / E[x_t^2] (about 0.6 on MNIST), below 1 (there is always noise).
    assert 0.2 < w < 1.0
    steps = [json.loads(line)["step"] for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert {path.name for path in (whole / "samples").iterdir()} == {"epoch_0001.png", "epoch_0002.png", "final.png"}
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_parameters"] == 1

    # The sample task draws through the method, with the checkpoint's EMA weight.
    assert main(["sample", str(whole)]) == 0
    pixels = np.load(whole / "samples/toy-seed3.npz")["images"]
    noise = torch.randn((5, 1, 28, 28), generator=torch.Generator().manual_seed(3))
    expected = ((a["ema"]["w"] * noise).clamp(-1, 1) + 1) * 127.5
    assert pixels.shape == (5, 1, 28, 28)
    assert np.array_equal(pixels, expected.round().to(torch.uint8).numpy())

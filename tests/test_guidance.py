"""Classifier-free guidance: labels really dropped in training, w = 1 and w = 0 the conditional and
the unconditional model, one batched pass for both branches, samples of a chosen class or a class
per row, and their class accuracy in the eval scores."""

import json
import os

import numpy as np
import pytest
import torch

from diffusion.config import ConfigError, validate_run
from diffusion.methods import build_method
from diffusion.methods.conditioning import guided_output
from diffusion.methods.ddpm import DDPM
from diffusion.nets.unet import UNet
from diffusion.train import train
from tests.conftest import run_diffusion


def tiny_unet(num_classes: int = 10) -> UNet:
    """A UNet as if trained: random weights everywhere (fresh, its zero-initialised layers would
    make the output ignore the class)."""
    torch.manual_seed(0)
    net = UNet(
        in_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention=False,
        norm_groups=4,
        num_classes=num_classes,
    ).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, 0.2)
    return net


class Recording(torch.nn.Module):
    """Wraps a net and keeps the labels and batch sizes it was called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.labels, self.batch_sizes = net, [], []

    def forward(self, x, t, class_labels=None):
        self.labels.append(class_labels)
        self.batch_sizes.append(len(x))
        return self.net(x, t, class_labels=class_labels)


@pytest.mark.parametrize("label_dropout", [0.0, 0.1, 0.5])
def test_label_dropout_hands_the_net_the_null_class_that_often(label_dropout):
    method = DDPM(num_train_timesteps=50, class_conditional=True, num_classes=10, label_dropout=label_dropout)
    model = Recording(tiny_unet())
    torch.manual_seed(1)
    for _ in range(4):
        labels = torch.randint(0, 10, (500,))
        method.loss(model, {"images": torch.zeros(500, 1, 8, 8), "class_labels": labels})
    seen = torch.cat(model.labels)
    null_share = (seen == 10).double().mean().item()
    assert abs(null_share - label_dropout) < 0.03, null_share  # 2000 labels: a 3-sigma band of about 0.03
    assert ((seen >= 0) & (seen <= 10)).all()


def test_label_dropout_comes_from_the_config_and_only_for_conditional_models():
    conditional = validate_run({"model": {"class_conditional": True}})
    assert build_method(conditional).label_dropout == 0.1 and build_method(conditional).num_classes == 10
    assert (
        build_method(
            validate_run({"model": {"class_conditional": True}, "method": {"label_dropout": 0.25}})
        ).label_dropout
        == 0.25
    )
    assert build_method(validate_run({})).label_dropout == 0.0  # nothing to drop


def test_guidance_scale_one_is_the_conditional_model_zero_the_unconditional_in_one_pass():
    method = DDPM(num_train_timesteps=50, class_conditional=True, num_classes=10)
    net = tiny_unet()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 10, 20, 40])
    labels = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        conditional = net(x, t, class_labels=labels)
        unconditional = net(x, t, class_labels=None)  # the null class
        assert not torch.allclose(conditional, unconditional)
        assert torch.equal(guided_output(net, x, t, labels, 1.0, method.num_classes), conditional)
        assert torch.equal(guided_output(net, x, t, labels, 0.0, method.num_classes), unconditional)
        recording = Recording(net)
        guided = guided_output(recording, x, t, labels, 3.0, method.num_classes)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-5, atol=1e-5)
    assert recording.batch_sizes == [8]  # both branches in one forward pass
    assert recording.labels[0].tolist() == [0, 3, 7, 9, 10, 10, 10, 10]


def test_samples_take_a_class_per_row_or_the_chosen_class():
    method = DDPM(num_train_timesteps=50, class_conditional=True, num_classes=10)
    data = type("Spec", (), {"num_classes": 10})()
    sample = validate_run({"model": {"class_conditional": True}}).sample
    assert method.class_labels(100, data, sample).tolist() == [k for k in range(10) for _ in range(10)]
    assert method.class_labels(20, data, sample).tolist() == [k for k in range(10) for _ in range(2)]
    chosen = sample.model_copy(update={"class_label": 7})
    assert method.class_labels(5, data, chosen).tolist() == [7] * 5
    assert DDPM().class_labels(5, data, sample) is None
    # w = 0 samples the unconditional model: no class is asked for, so none is scored.
    assert method.class_labels(5, data, sample.model_copy(update={"guidance_scale": 0.0})) is None


def test_guidance_needs_a_class_conditional_image_model():
    with pytest.raises(ConfigError, match=r"sample.guidance_scale: 2.0 is not allowed with model.class_conditional"):
        validate_run({"sample": {"guidance_scale": 2.0}})
    with pytest.raises(ConfigError, match=r"sample.guidance_scale: 2.0 is not allowed with data.dataset 'shakespeare'"):
        validate_run(
            {
                "data": {"dataset": "shakespeare"},
                "model": {"name": "transformer"},
                "method": {"name": "masked"},
                "sample": {"sampler": "ancestral", "guidance_scale": 2.0},
            }
        )


def test_a_conditional_run_samples_guided_with_dpm_solver_and_scores_its_class_accuracy(tiny_config, tmp_path):
    tiny_config.model.class_conditional = True
    tiny_config.train.max_steps = 4
    run = tmp_path / "run"
    assert train(tiny_config, run) == 0
    env = {**os.environ, "DIFFUSION_CACHE_DIR": str(tmp_path / "cache")}
    sampled = run_diffusion(
        "sample",
        run,
        "--set",
        "sample.sampler=dpmsolver++",
        "--set",
        "sample.num_inference_steps=5",
        "--set",
        "sample.guidance_scale=2",
        "--set",
        "sample.num_samples=20",
        env=env,
    )
    assert sampled.returncode == 0, sampled.stderr
    arrays = np.load(run / "samples/dpmsolver++5-w2-seed0.npz")
    assert arrays["images"].shape == (20, 1, 28, 28)
    assert arrays["labels"].tolist() == [k for k in range(10) for _ in range(2)]
    assert (run / "samples/dpmsolver++5-w2-seed0.png").is_file()

    evaluated = run_diffusion(
        "eval",
        run,
        "--set",
        "eval.num_samples=30",
        "--set",
        "eval.classifier_subset=2000",
        "--set",
        "eval.classifier_epochs=1",
        "--set",
        "sample.num_inference_steps=3",
        "--set",
        "sample.class_label=4",
        env=env,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    record = json.loads((run / "eval/ddim3-class4-seed0.json").read_text())
    scores = record["scores"]
    predicted_four = scores["class_counts"][4] / sum(scores["class_counts"])
    assert scores["class_accuracy"] == pytest.approx(predicted_four)  # every sample was asked to be a 4
    assert "class_accuracy" not in record["real_floor"] and record["guidance_scale"] == 1.0
    assert "class accuracy" in evaluated.stdout


def test_a_stored_config_from_before_label_dropout_keeps_training_without_it_and_refuses_guidance(tmp_path):
    from diffusion.config import dump_yaml, load_run_config, to_dict, validate_stored_run

    raw = to_dict(validate_run({"model": {"class_conditional": True}}))
    del raw["method"]["label_dropout"]  # as a run dir or checkpoint written before the field existed stores it
    stored = validate_stored_run(raw, "checkpoint (config)")
    assert stored.method.label_dropout == 0.0 and build_method(stored).label_dropout == 0.0
    dump_yaml(raw, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml", stored=True).method.label_dropout == 0.0
    assert load_run_config(tmp_path / "config.yaml").method.label_dropout == 0.1  # a new spec: the default
    with pytest.raises(ConfigError, match=r"sample.guidance_scale: 2.0 is not allowed with method.label_dropout 0"):
        validate_stored_run({**raw, "sample": {"guidance_scale": 2.0}}, "config")

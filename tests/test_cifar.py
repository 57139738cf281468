"""CIFAR-10 from the offline .npz, overfit mode, and the new job specs: each trains a few steps,
checkpoints, resumes bit for bit and samples."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.__main__ import main
from diffusion.config import ConfigError, load_run_config, validate_run
from diffusion.data import load_dataset
from diffusion.train import train
from tests.conftest import assert_resumes_bitwise

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cifar_root(monkeypatch) -> Path:
    root = os.environ.get("DIFFUSION_DATA_ROOT")
    if not root or not (Path(root) / "cifar10/test.npz").is_file():
        pytest.skip("set DIFFUSION_DATA_ROOT to a folder holding cifar10/test.npz (see README)")
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(Path(root).resolve()))
    return Path(root)


def test_the_npz_splits_by_class_into_disjoint_train_and_test(cifar_root):
    config = validate_run({"data": {"dataset": "cifar10", "npz": "cifar10/test.npz", "download": False}}).data
    train_set, test_set = load_dataset(config, "train"), load_dataset(config, "test")
    assert len(train_set) == 9000 and len(test_set) == 1000
    assert torch.bincount(train_set.labels).tolist() == [900] * 10
    assert torch.bincount(test_set.labels).tolist() == [100] * 10
    assert train_set.spec().shape == (3, 32, 32) and train_set.spec().num_classes == 10
    with np.load(cifar_root / "cifar10/test.npz") as arrays:
        first = torch.from_numpy(arrays["images"][0]).permute(2, 0, 1)
    assert torch.equal(train_set.images[0], first)  # channels first, pixels untouched
    assert not any(torch.equal(test_set.images[i], first) for i in range(len(test_set)))


def test_images_are_upscaled_per_batch_and_limited_per_class(cifar_root):
    config = validate_run(
        {
            "data": {
                "dataset": "cifar10",
                "npz": "cifar10/test.npz",
                "download": False,
                "resolution": 64,
                "limit_per_class": 3,
            }
        }
    ).data
    dataset = load_dataset(config, "train")
    assert len(dataset) == 30 and torch.bincount(dataset.labels).tolist() == [3] * 10
    batch = dataset.batch(torch.arange(4), torch.device("cpu"))
    assert batch["images"].shape == (4, 3, 64, 64) and dataset.spec().shape == (3, 64, 64)
    assert -1 <= batch["images"].min() and batch["images"].max() <= 1


def test_cifar_settings_are_checked_before_any_work():
    with pytest.raises(
        ConfigError, match=r"model.attention_resolutions: 12 is not allowed: the levels of 32x32 inputs are 32, 16, 8"
    ):
        validate_run({"data": {"dataset": "cifar10"}, "model": {"attention_resolutions": [12]}})
    with pytest.raises(ConfigError, match=r"data.npz: 'x.npz' is not allowed with data.dataset 'mnist'"):
        validate_run({"data": {"npz": "x.npz"}})
    with pytest.raises(ConfigError, match=r"data.only_digit: 3 is not allowed with data.dataset 'cifar10'"):
        validate_run({"data": {"dataset": "cifar10", "only_digit": 3}})


def test_overfit_mode_memorises_two_cifar_images_and_says_so(cifar_root, tmp_path, capsys):
    config = load_run_config(REPO / "configs/jobs/cifar10-overfit.yaml", ["device=cpu", "train.progress=lines"])
    assert train(config, tmp_path / "run") == 0
    overfit = json.loads((tmp_path / "run/summary.json").read_text())["scores"]["overfit"]
    assert overfit["loss_near_zero"] and overfit["final_loss"] < 0.01
    assert overfit["reproduced"] and len(overfit["nearest_train_rms"]) == 2 and max(overfit["nearest_train_rms"]) < 0.1
    assert "overfit mode: final loss" in capsys.readouterr().out


TINY_IMAGE_MODEL = [
    "model.base_channels=8",
    "model.channel_mults=[1,2]",
    "model.num_res_blocks=1",
    "model.norm_groups=4",
    "model.attention_heads=2",
    "model.dropout=0.0",
]


@pytest.mark.parametrize(
    "spec, overrides",
    [
        ("mnist-conditional", TINY_IMAGE_MODEL + ["data.subset=64"]),
        ("cifar10-quick", TINY_IMAGE_MODEL + ["data.subset=64", "model.attention_resolutions=[16]"]),
        ("cifar10-overfit", TINY_IMAGE_MODEL),
        (
            "cifar10-conditional",
            TINY_IMAGE_MODEL
            + [
                "data.subset=64",
                "data.npz=cifar10/test.npz",
                "data.download=false",
                "model.attention_resolutions=[16]",
                "data.resolution=null",
            ],
        ),
        (
            "meanflow-cifar10",
            TINY_IMAGE_MODEL
            + [
                "data.subset=64",
                "data.npz=cifar10/test.npz",
                "data.download=false",
                "model.attention_resolutions=[16]",
            ],
        ),
    ],
)
def test_each_new_spec_trains_resumes_bitwise_and_samples(spec, overrides, cifar_root, mnist_root, tmp_path):
    common = [
        "device=cpu",
        "train.max_minutes=null",
        "train.batch_size=16",
        "train.progress=lines",
        "train.sample_every_epochs=null",
        "train.checkpoint_every_minutes=null",
        "train.checkpoint_every_steps=2",
        "train.warmup_steps=0",
        "sample.num_samples=4",
        "sample.num_inference_steps=3",
        *overrides,
    ]
    whole = assert_resumes_bitwise(REPO / "configs/jobs" / f"{spec}.yaml", common, tmp_path, parts=("model",))
    assert main(["sample", str(whole)]) == 0
    (grid,) = (whole / "samples").glob("*seed0.png")
    arrays = np.load(grid.with_suffix(".npz"))
    assert len(arrays["images"]) == 4 and np.isfinite(arrays["images"]).all()


def test_a_cifar_run_is_scored_on_a_cifar_classifier_against_its_floor(cifar_root, tmp_path):
    from tests.conftest import run_diffusion

    config = load_run_config(
        REPO / "configs/jobs/cifar10-quick.yaml",
        [
            *TINY_IMAGE_MODEL,
            "device=cpu",
            "data.subset=64",
            "model.attention_resolutions=[16]",
            "train.max_steps=4",
            "train.max_minutes=null",
            "train.batch_size=16",
            "train.sample_every_epochs=null",
            "train.progress=lines",
        ],
    )
    assert train(config, tmp_path / "run") == 0
    result = run_diffusion(
        "eval",
        tmp_path / "run",
        "--set",
        "eval.num_samples=40",
        "--set",
        "eval.classifier_subset=500",
        "--set",
        "eval.classifier_epochs=1",
        "--set",
        "sample.num_inference_steps=3",
        env={**os.environ, "DIFFUSION_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run/eval/dpmsolver++3-seed0.json").read_text())
    scores, floor = record["scores"], record["real_floor"]
    assert record["num_samples"] == 40 and sum(scores["class_counts"]) == 40
    assert scores["fid"] > 2 * floor["fid"]  # four steps of training: noise, far from real CIFAR images
    assert 0 <= scores["class_accuracy"] <= 1  # a conditional run: the asked classes were checked
    assert record["inception_fid"] is None and "Inception FID: skipped: " in result.stdout
    (classifier,) = (tmp_path / "cache/classifiers").glob("lenet-*.pt")
    assert torch.load(classifier, weights_only=True)["conv1.weight"].shape[1] == 3  # a colour classifier

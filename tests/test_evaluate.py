"""Offline MNIST evaluation: Frechet distance against the closed form, class entropy, and (with MNIST) the
LeNet classifier's accuracy, the FID it gives real vs noise images, and its on-disk cache."""

import math
import os

import pytest
import torch

from diffusion.nets.lenet import LeNet
from diffusion.scores.images import (
    class_entropy_bits,
    classifier_cache_key,
    classifier_outputs,
    frechet_distance,
    load_or_train_classifier,
    real_floor,
    reference_features,
    sample_scores,
)

CLASSIFIER_SUBSET = 10_000  # training images for the test classifier: enough for >= 95%, trains in seconds
NUM_SCORE_SAMPLES = 2000


def random_uint8_images(num_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (num_images,), generator=generator)
    return images, labels


@pytest.fixture(scope="module")
def mnist() -> dict[str, torch.Tensor]:
    if "DIFFUSION_DATA_ROOT" not in os.environ:
        pytest.skip("needs MNIST: set DIFFUSION_DATA_ROOT to a folder holding MNIST/raw/")
    from torchvision.datasets import MNIST

    train = MNIST(root=os.environ["DIFFUSION_DATA_ROOT"], train=True, download=False)
    test = MNIST(root=os.environ["DIFFUSION_DATA_ROOT"], train=False, download=False)
    return {
        "train_images": train.data,
        "train_labels": train.targets,
        "test_images": test.data,
        "test_labels": test.targets,
    }


@pytest.fixture(scope="module")
def classifier_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def classifier(mnist, classifier_cache_dir) -> LeNet:
    return load_or_train_classifier(
        mnist["train_images"][:CLASSIFIER_SUBSET],
        mnist["train_labels"][:CLASSIFIER_SUBSET],
        epochs=2,
        cache_dir=classifier_cache_dir,
    )


# --- Frechet distance --------------------------------------------------------------------------


def gaussian_features(mean: torch.Tensor, variance: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples, len(mean), generator=generator, dtype=torch.float64)
    return mean + variance.sqrt() * noise


def test_frechet_distance_of_identical_features_is_zero():
    features = gaussian_features(torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64), 1000, 0)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    generator = torch.Generator().manual_seed(1)
    mean_a, mean_b = torch.randn(2, 8, generator=generator, dtype=torch.float64)
    variance_a, variance_b = 0.2 + 2 * torch.rand(2, 8, generator=generator, dtype=torch.float64)
    expected = float(
        (mean_a - mean_b).square().sum() + (variance_a + variance_b - 2 * (variance_a * variance_b).sqrt()).sum()
    )
    features_a = gaussian_features(mean_a, variance_a, 100_000, seed=2)
    features_b = gaussian_features(mean_b, variance_b, 100_000, seed=3)
    assert expected > 1.0  # far from 0, so the comparison below is not trivially met
    assert frechet_distance(features_a, features_b) == pytest.approx(expected, rel=0.01)


def test_frechet_distance_is_symmetric():
    features_a = gaussian_features(torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 500, 4)
    features_b = gaussian_features(torch.ones(8, dtype=torch.float64), 3 * torch.ones(8, dtype=torch.float64), 700, 5)
    forward, backward = frechet_distance(features_a, features_b), frechet_distance(features_b, features_a)
    assert forward > 1.0
    assert forward == pytest.approx(backward, rel=1e-9)


# --- class histogram ---------------------------------------------------------------------------


def test_class_entropy_bits():
    assert class_entropy_bits(torch.full((10,), 7)) == pytest.approx(math.log2(10))
    assert class_entropy_bits(torch.tensor([0, 0, 0, 42, 0, 0, 0, 0, 0, 0])) == pytest.approx(0.0)
    assert class_entropy_bits(torch.tensor([5, 5, 0, 0, 0, 0, 0, 0, 0, 0])) == pytest.approx(1.0)


def test_sample_scores_of_a_classifier_that_always_says_three():
    classifier = LeNet().eval()
    for parameter in classifier.parameters():
        torch.nn.init.zeros_(parameter)
    torch.nn.init.constant_(classifier.fc3.bias[3:4], 20.0)  # every input: logit 20 for class 3, 0 elsewhere
    samples = torch.rand(50, 1, 28, 28) * 2 - 1
    scores = sample_scores(classifier, samples, reference_features=torch.zeros(50, 128, dtype=torch.float64))
    assert scores["class_counts"] == [0, 0, 0, 50, 0, 0, 0, 0, 0, 0]
    assert scores["class_entropy_bits"] == pytest.approx(0.0)
    assert scores["confident_share"] == 1.0
    assert scores["fid"] == pytest.approx(0.0, abs=1e-9)  # all features are 0, as are the reference's


def test_uint8_and_float_images_give_the_same_outputs():
    images, _ = random_uint8_images(20, seed=0)
    classifier = LeNet().eval()
    features_uint8, probs_uint8 = classifier_outputs(classifier, images, batch_size=7)
    features_float, probs_float = classifier_outputs(classifier, images.unsqueeze(1).float() / 127.5 - 1)
    assert features_uint8.dtype == torch.float64 and features_uint8.shape == (20, 128)
    assert probs_uint8.shape == (20, 10)
    torch.testing.assert_close(features_uint8, features_float)
    torch.testing.assert_close(probs_uint8, probs_float)


# --- training and cache without MNIST ----------------------------------------------------------


def test_training_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    images, labels = random_uint8_images(256, seed=0)
    torch.manual_seed(123)
    rng_state = torch.get_rng_state()
    first = load_or_train_classifier(images, labels, epochs=1, seed=7, cache_dir=tmp_path / "first")
    assert torch.equal(torch.get_rng_state(), rng_state)
    second = load_or_train_classifier(images, labels, epochs=1, seed=7, cache_dir=tmp_path / "second")
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    other_seed = load_or_train_classifier(images, labels, epochs=1, seed=8, cache_dir=tmp_path / "second")
    assert not torch.equal(first.fc3.weight, other_seed.fc3.weight)
    # each cache holds finished files only: no temp files left behind
    assert sorted(path.name for path in (tmp_path / "first" / "classifiers").iterdir()) == [
        f"lenet-{classifier_cache_key(images, labels, epochs=1, seed=7)[:16]}.pt"
    ]
    assert len(list((tmp_path / "second" / "classifiers").iterdir())) == 2


def test_cache_key_changes_with_data_and_recipe():
    images, labels = random_uint8_images(64, seed=0)
    key = classifier_cache_key(images, labels, epochs=2, seed=0)
    assert key == classifier_cache_key(images.clone(), labels.clone(), epochs=2, seed=0)
    one_pixel_changed = images.clone()
    one_pixel_changed[5, 10, 10] += 1
    one_label_changed = labels.clone()
    one_label_changed[5] = (one_label_changed[5] + 1) % 10
    other_keys = [
        classifier_cache_key(one_pixel_changed, labels, epochs=2, seed=0),
        classifier_cache_key(images, one_label_changed, epochs=2, seed=0),
        classifier_cache_key(images[:-1], labels[:-1], epochs=2, seed=0),
        classifier_cache_key(images, labels, epochs=1, seed=0),
        classifier_cache_key(images, labels, epochs=2, seed=1),
    ]
    # the file name holds the first 16 hex digits, so those must differ
    assert len({key[:16]} | {other[:16] for other in other_keys}) == 1 + len(other_keys)


# --- with MNIST --------------------------------------------------------------------------------


@pytest.mark.mnist
def test_classifier_is_accurate_and_confident_on_real_digits(classifier, mnist):
    _, probs = classifier_outputs(classifier, mnist["test_images"])
    accuracy = (probs.argmax(dim=1) == mnist["test_labels"]).double().mean().item()
    confident_share = (probs.max(dim=1).values >= 0.9).double().mean().item()
    assert accuracy >= 0.95
    assert confident_share >= 0.9


@pytest.mark.mnist
def test_noise_scores_far_worse_than_real_digits(classifier, mnist):
    floor = real_floor(classifier, mnist["train_images"], mnist["test_images"], NUM_SCORE_SAMPLES)
    reference = reference_features(classifier, mnist["train_images"], NUM_SCORE_SAMPLES)
    noise = torch.rand(NUM_SCORE_SAMPLES, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise_scores = sample_scores(classifier, noise, reference)

    assert set(floor) == {"fid", "confident_share", "class_entropy_bits", "class_counts"}
    assert sum(floor["class_counts"]) == NUM_SCORE_SAMPLES
    assert 0 < floor["fid"] < 10
    assert floor["confident_share"] >= 0.9
    assert floor["class_entropy_bits"] > 3.25  # test digits are close to balanced; log2(10) = 3.32
    assert noise_scores["fid"] > 50 * floor["fid"]
    assert noise_scores["confident_share"] < 0.5


@pytest.mark.mnist
def test_second_load_is_a_cache_hit(classifier, mnist, classifier_cache_dir):
    cache_files = list((classifier_cache_dir / "classifiers").iterdir())
    assert len(cache_files) == 1
    mtime_before = cache_files[0].stat().st_mtime_ns
    reloaded = load_or_train_classifier(
        mnist["train_images"][:CLASSIFIER_SUBSET],
        mnist["train_labels"][:CLASSIFIER_SUBSET],
        epochs=2,
        cache_dir=classifier_cache_dir,
    )
    for name, tensor in classifier.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert cache_files[0].stat().st_mtime_ns == mtime_before  # read, not retrained and rewritten
    assert list((classifier_cache_dir / "classifiers").iterdir()) == cache_files

"""Offline sample quality for MNIST: no Inception weights can be fetched here, so we score on our own LeNet.

- FID on the LeNet's penultimate features (the classifier is trained on the MNIST training set once and
  cached on disk under a hash of its data and recipe),
- the share of samples the classifier labels with confidence >= 0.9 (are they recognisable digits?),
- the entropy in bits of the predicted-class histogram (are all ten digits produced? log2(10) = 3.32 at best),
- and the real-vs-real floor (test images against train images at the same sample size), to be reported next
  to every score: FID is biased upward at finite N, so a perfect generator scores the floor, not 0.

Images are float tensors in [-1, 1] of shape (N, 1, 28, 28); uint8 images (0..255) are accepted too.
"""

import hashlib
import importlib.util
import io
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from diffusion.methods.base import Progress, no_progress
from diffusion.nets.lenet import LeNet
from diffusion.records import atomic_write, default_cache_dir

# Part of the cache key: bump it whenever LeNet or the training recipe below changes, so stale weights are not reused.
CLASSIFIER_VERSION = "lenet-v1:conv16-conv32-fc256-fc128-fc10:adam-onecycle-5e-3:batch-64"
BATCH_SIZE = 64
# One-cycle (warm up, then anneal to ~0) at a high peak rate: in 1-2 epochs it reaches clearly higher accuracy and
# confidence than a constant 1e-3 (10k images, 2 epochs: 98.2% vs 96.3% test accuracy).
MAX_LEARNING_RATE = 5e-3


def to_model_input(images: Tensor) -> Tensor:
    """uint8 (N, 28, 28) or (N, 1, 28, 28) in 0..255, or float in [-1, 1] -> float32 (N, 1, 28, 28) in [-1, 1]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    return images.float()


def classifier_cache_key(images: Tensor, labels: Tensor, epochs: int, seed: int) -> str:
    digest = hashlib.sha256()
    digest.update(CLASSIFIER_VERSION.encode())
    digest.update(f"epochs={epochs} seed={seed} dtype={images.dtype} shape={tuple(images.shape)}".encode())
    digest.update(images.contiguous().cpu().numpy().tobytes())
    # Hash labels as int64 so the key does not depend on the dtype the caller happened to load them as.
    digest.update(labels.to(torch.int64).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def shuffled_batches(num_images: int, epochs: int, generator: torch.Generator):
    """Index batches of BATCH_SIZE, a fresh permutation every epoch."""
    for _ in range(epochs):
        yield from torch.randperm(num_images, generator=generator).split(BATCH_SIZE)


def train_classifier(
    images: Tensor, labels: Tensor, epochs: int, seed: int, device="cpu", progress: Progress = no_progress
) -> LeNet:
    """Adam with a one-cycle learning rate on cross-entropy. Deterministic given seed; the caller's global RNG
    state is left as it was."""
    device = torch.device(device)
    # The net is built on the CPU and shuffling has its own generator, so only the CPU generator is seeded
    # (torch.manual_seed would also reseed every GPU) and only its state needs restoring afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        classifier = classifier_for(images)
    classifier.to(device).train()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=MAX_LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, MAX_LEARNING_RATE, total_steps=epochs * math.ceil(len(images) / BATCH_SIZE)
    )
    batches = list(shuffled_batches(len(images), epochs, torch.Generator().manual_seed(seed)))  # a length for the bar
    for indices in progress(batches, "training LeNet classifier"):
        x = to_model_input(images[indices]).to(device)
        y = labels[indices].to(device)
        loss = F.cross_entropy(classifier(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return classifier.eval()


def classifier_for(images: Tensor) -> LeNet:
    """An untrained LeNet for images like these: (N, H, W) or (N, C, H, W), H = W."""
    return LeNet() if images.dim() == 3 else LeNet(in_channels=images.shape[1], image_size=images.shape[-1])


def save_atomically(state_dict: dict, path: Path) -> None:
    """Readers never see a half-written file, and two processes training the same classifier at once
    both end up with a valid one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    atomic_write(path, buffer.getvalue())


def load_or_train_classifier(
    images: Tensor,
    labels: Tensor,
    epochs: int = 2,
    seed: int = 0,
    cache_dir: Path | None = None,
    device="cpu",
    progress: Progress = no_progress,
) -> LeNet:
    """The LeNet trained on (images, labels), from cache_dir/classifiers/ when trained before. Returned in eval mode."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    key = classifier_cache_key(images, labels, epochs, seed)
    path = cache_dir / "classifiers" / f"lenet-{key[:16]}.pt"
    if path.is_file():
        classifier = classifier_for(images)
        classifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return classifier.to(device).eval()
    classifier = train_classifier(images, labels, epochs, seed, device=device, progress=progress)
    save_atomically({name: tensor.cpu() for name, tensor in classifier.state_dict().items()}, path)
    return classifier


@torch.inference_mode()
def classifier_outputs(classifier: LeNet, images: Tensor, batch_size=500, device="cpu") -> tuple[Tensor, Tensor]:
    """(features float64 (N, D), class probabilities float64 (N, 10))."""
    features, probs = [], []
    for batch in images.split(batch_size):
        batch_features = classifier.features(to_model_input(batch).to(device))
        features.append(batch_features.double().cpu())
        probs.append(F.softmax(classifier.fc3(batch_features), dim=1).double().cpu())
    return torch.cat(features), torch.cat(probs)


class PrecomputedFeatures(nn.Module):
    """Lets torchmetrics' FID take features we already computed: its custom-extractor hook, as the identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two (N, D) feature sets,
    computed by torchmetrics in float64."""
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(features_a.shape[1]))
    metric.update(features_a.double(), real=True)
    metric.update(features_b.double(), real=False)
    return float(metric.compute())


def class_entropy_bits(class_counts: Tensor) -> float:
    """Entropy (base 2) of a class histogram: log2(10) when all ten classes are equally common, 0 for one class."""
    shares = class_counts.double() / class_counts.sum()
    shares = shares[shares > 0]  # 0 log 0 = 0
    return float(-(shares * shares.log2()).sum())


def sample_scores(
    classifier: LeNet,
    samples: Tensor,
    reference_features: Tensor,
    confidence: float = 0.9,
    device="cpu",
    labels: Tensor | None = None,
) -> dict:
    """{"fid", "confident_share", "class_entropy_bits", "class_counts"} of samples against reference
    features, and with the `labels` the samples were asked for, "class_accuracy": the share the
    classifier puts in that class."""
    features, probs = classifier_outputs(classifier, samples, device=device)
    top_probs, predicted = probs.max(dim=1)
    class_counts = torch.bincount(predicted, minlength=probs.shape[1])
    scores = {
        "fid": frechet_distance(reference_features, features),
        "confident_share": float((top_probs >= confidence).double().mean()),
        "class_entropy_bits": class_entropy_bits(class_counts),
        "class_counts": class_counts.tolist(),
    }
    if labels is not None:
        scores["class_accuracy"] = float((predicted == labels.cpu()).double().mean())
    return scores


# Inception FID (Heusel et al. 2017) is the number papers report; its network's weights cannot be
# fetched on machines without a network, so it is computed only when they are already on disk.
INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's, which torchmetrics uses


def inception_unavailable() -> str | None:
    """Why Inception FID cannot be computed here, or None when it can."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return "torch-fidelity is not installed (pip install torch-fidelity)"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not weights.is_file():
        return f"its weights are not on disk ({weights})"
    return None


def inception_fid(samples: Tensor, real_images: Tensor, device="cpu", batch_size: int = 100) -> float:
    """FID on Inception-v3 pool3 features between samples in [-1, 1] and real uint8 images, both
    (N, 3, H, W); torchmetrics resizes them to 299. Only when `inception_unavailable()` is None."""
    metric = FrechetInceptionDistance(feature=2048).to(device)
    for batch in real_images.split(batch_size):
        metric.update(batch.to(device), real=True)
    for batch in samples.split(batch_size):
        metric.update(((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(device), real=False)
    return float(metric.compute())


# Overfit mode (data.limit_per_class): did the model memorise its few training images?
NEAR_ZERO_LOSS = 0.01
REPRODUCED_RMS = 0.1  # pixels in [-1, 1]: a tenth of a grey level's range ~ 12 of 255 levels per pixel, on average


def overfit_report(samples: Tensor, train_images: Tensor, final_loss: float) -> dict:
    """For each sample (N, C, H, W) in [-1, 1], the RMS distance to its nearest training image
    (M, C, H, W) in [-1, 1]; whether the loss came near zero and every sample reproduces an image."""
    distances = torch.cdist(samples.flatten(1).double().cpu(), train_images.flatten(1).double().cpu())
    nearest = distances.min(dim=1).values / math.sqrt(samples[0].numel())
    return {
        "final_loss": final_loss,
        "loss_near_zero": final_loss < NEAR_ZERO_LOSS,
        "nearest_train_rms": [round(value, 4) for value in nearest.tolist()],
        "reproduced": bool((nearest < REPRODUCED_RMS).all()),
    }


def random_subset(images: Tensor, num_samples: int, seed: int) -> Tensor:
    if num_samples > len(images):
        raise ValueError(f"asked for {num_samples} images but only {len(images)} are available")
    indices = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return images[indices]


def reference_features(
    classifier: LeNet, train_images: Tensor, num_samples: int, seed: int = 0, device="cpu"
) -> Tensor:
    """Features (float64) of num_samples random training images: the reference the samples are scored against."""
    features, _ = classifier_outputs(classifier, random_subset(train_images, num_samples, seed), device=device)
    return features


def real_floor(
    classifier: LeNet, train_images: Tensor, test_images: Tensor, num_samples: int, seed: int = 0, device="cpu"
) -> dict:
    """sample_scores of num_samples random test images against num_samples random training images: what a
    perfect generator would get at this sample size."""
    reference = reference_features(classifier, train_images, num_samples, seed, device=device)
    test_subset = random_subset(test_images, num_samples, seed)
    return sample_scores(classifier, test_subset, reference, device=device)

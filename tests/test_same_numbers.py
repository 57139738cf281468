"""The renovation of issue 16 changed no number: a fixed-seed tiny MNIST train plus a DDIM sample,
and a fixed-seed tiny masked-text train plus a sample, give the tensors that main gave
before it (tests/fixtures/same_numbers.pt, recorded by `python -m tests.test_same_numbers record`
on that main, torch 2.14.1 on the CPU).

What is compared: every weight of the final checkpoint (model and EMA), the logged losses, the
sample task's samples (the images' uint8 pixels, the decoded text) and the text run's validation
bits per character. Bit for bit where the recording's kernels are this machine's (the fixture's
`kernels`: torch's version, CPU capability and thread count); elsewhere (AVX2 against AVX512, say)
oneDNN and MKL sum in another order, so within what rounding explains: losses and bits per
character to a relative 1e-5, which any change of the method exceeds by far; each weight within one
step of the run's lr (Adam's first steps turn a rounding-sized change of a near-zero gradient into
a step; measured on AVX2: 2e-4 of the largest weight); pixels off by at most one level in at most
1% of them; the text exactly. The fixture of issue 16 has no `kernels` (the machines before
2026-12-01 matched it bit for bit; an AMD EPYC with AVX2 does not, by 1e-7 of a loss): it is
compared within rounding everywhere.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.__main__ import main
from diffusion.config import validate_run
from diffusion.train import train

FIXTURE = Path(__file__).parent / "fixtures" / "same_numbers.pt"

IMAGE = {
    "task": "train",
    "device": "cpu",
    "data": {"download": False, "subset": 64},
    "model": {
        "base_channels": 8,
        "channel_mults": [1, 2],
        "num_res_blocks": 1,
        "attention": True,
        "attention_heads": 2,
        "norm_groups": 4,
    },
    "method": {"num_train_timesteps": 50},
    "train": {
        "batch_size": 16,
        "epochs": 2,
        "lr": 1e-3,
        "log_every": 1,
        "sample_every_epochs": None,
        "checkpoint_every_steps": None,
        "checkpoint_every_minutes": None,
        "progress": "lines",
        "seed": 3,
    },
    "sample": {"sampler": "ddim", "num_inference_steps": 5, "eta": 0.5, "num_samples": 6, "seed": 11},
}
TEXT = {
    "task": "train",
    "device": "cpu",
    "data": {"dataset": "shakespeare", "block_size": 32, "subset": 64, "download": False},
    "model": {"name": "transformer", "n_layer": 1, "n_head": 2, "n_embd": 32},
    "method": {"name": "masked"},
    "train": {
        "batch_size": 16,
        "epochs": 2,
        "lr": 3e-3,
        "log_every": 1,
        "sample_every_epochs": None,
        "checkpoint_every_minutes": None,
        "checkpoint_every_steps": None,
        "progress": "lines",
        "seed": 5,
    },
    "sample": {"sampler": "ancestral", "num_inference_steps": 8, "num_samples": 4, "seed": 7},
    "eval": {"val_blocks": 8},
}


def run_image(run_dir: Path) -> dict:
    assert train(validate_run(IMAGE), run_dir) == 0
    assert main(["sample", str(run_dir)]) == 0
    (pixels,) = run_dir.glob("samples/*.npz")
    return {**weights_and_losses(run_dir), "pixels": torch.from_numpy(np.load(pixels)["images"])}


def run_text(run_dir: Path) -> dict:
    assert train(validate_run(TEXT), run_dir) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert main(["sample", str(run_dir)]) == 0
    (record,) = run_dir.glob("eval/*.json")
    sampled = json.loads(record.read_text())
    return {
        **weights_and_losses(run_dir),
        "final_samples": (run_dir / "samples/final.txt").read_text(),
        "samples": Path(sampled["samples"]).read_text(),
        "val_bits_per_char": summary["scores"]["val_bits_per_char"],
        "sampled_val_bits_per_char": sampled["scores"]["val_bits_per_char"],
    }


def weights_and_losses(run_dir: Path) -> dict:
    checkpoint = torch.load(run_dir / "checkpoints/latest.pt", weights_only=False)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"model": checkpoint["model"], "ema": checkpoint["ema"], "losses": losses}


def kernels() -> str:
    """What decides the order of the CPU's sums: torch's version, its CPU capability, its threads."""
    return f"torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()} {torch.get_num_threads()} threads"


def assert_same(got: dict, expected: dict, lr: float) -> None:
    """Bit for bit where the fixture was recorded on this CPU's kernels, else within rounding (above)."""
    exact = expected.get("kernels") == kernels()
    expected = {key: value for key, value in expected.items() if key != "kernels"}
    assert set(got) == set(expected)
    for key, value in expected.items():
        if key in ("model", "ema"):
            assert list(got[key]) == list(value), key
            for name, tensor in value.items():
                if exact or not tensor.is_floating_point():
                    assert torch.equal(got[key][name], tensor), f"{key}.{name}"
                else:
                    torch.testing.assert_close(
                        got[key][name], tensor, rtol=0, atol=lr, msg=lambda m: f"{key}.{name}: {m}"
                    )
        elif isinstance(value, torch.Tensor):  # uint8 pixels
            if exact:
                assert torch.equal(got[key], value), key
            else:
                assert got[key].shape == value.shape, key
                off = (got[key].int() - value.int()).abs()
                assert off.max() <= 1 and (off > 0).float().mean() <= 0.01, key
        elif isinstance(value, str) or exact:
            assert got[key] == value, key
        else:  # losses, bits per character
            assert got[key] == pytest.approx(value, rel=1e-5), key


@pytest.fixture
def data_root(mnist_root, shakespeare_root, monkeypatch) -> Path:
    assert mnist_root == shakespeare_root
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(mnist_root))
    return mnist_root


def test_tiny_mnist_train_and_ddim_sample_give_the_recorded_tensors(data_root, tmp_path):
    assert_same(run_image(tmp_path / "image"), torch.load(FIXTURE, weights_only=False)["image"], IMAGE["train"]["lr"])


def test_tiny_masked_text_train_and_sample_give_the_recorded_tensors(data_root, tmp_path):
    assert_same(run_text(tmp_path / "text"), torch.load(FIXTURE, weights_only=False)["text"], TEXT["train"]["lr"])


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        recorded = {
            "image": {**run_image(Path(folder) / "image"), "kernels": kernels()},
            "text": {**run_text(Path(folder) / "text"), "kernels": kernels()},
        }
    FIXTURE.parent.mkdir(exist_ok=True)
    torch.save(recorded, FIXTURE)
    print(f"recorded {FIXTURE} ({FIXTURE.stat().st_size:,} bytes)")

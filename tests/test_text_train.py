"""Text runs through the one trainer and the sample / eval tasks: tiny transformers on the real
tiny-shakespeare corpus, on CPU, in seconds."""

import json

import pytest
import torch

from diffusion.__main__ import main
from diffusion.config import ConfigError, load_run_config, validate_run
from diffusion.train import train

TINY = {
    "task": "train",
    "device": "cpu",
    "data": {"dataset": "shakespeare", "block_size": 32, "subset": 64, "download": False},
    "model": {"name": "transformer", "n_layer": 1, "n_head": 2, "n_embd": 32},
    "train": {
        "batch_size": 16,
        "epochs": 3,
        "lr": 3e-3,
        "log_every": 2,
        "sample_every_epochs": None,
        "checkpoint_every_minutes": None,
        "checkpoint_every_steps": 6,
        "progress": "lines",
    },
    "sample": {"num_samples": 4},
    "eval": {"val_blocks": 8, "num_samples": 4},
}
METHODS = {
    "autoregressive": ({"name": "autoregressive"}, {"sampler": "ancestral"}),
    "masked": ({"name": "masked"}, {"sampler": "ancestral", "num_inference_steps": 8}),
    "embedding": (
        {"name": "embedding", "num_train_timesteps": 100, "beta_schedule": "sqrt", "embedding_dim": 8},
        {"sampler": "ddim", "num_inference_steps": 8},
    ),
}


def tiny_config(method: str, **train):
    method_section, sample = METHODS[method]
    raw = json.loads(json.dumps(TINY))
    raw["method"] = method_section
    raw["sample"] |= sample
    raw["train"] |= train
    return validate_run(raw)


@pytest.mark.parametrize("method", METHODS)
def test_text_training_writes_samples_and_scores(shakespeare_root, monkeypatch, tmp_path, method):
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(shakespeare_root))
    run_dir = tmp_path / method
    assert train(tiny_config(method), run_dir) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    scores = summary["scores"]
    # Per character, not per block: an exact NLL or a bound (loose for barely trained embedding diffusion).
    assert 0.5 < scores["val_bits_per_char"] < (400 if method == "embedding" else 12)
    assert {"distinct_1", "distinct_2", "distinct_3", "top_token_share", "longest_repeat_share"} <= set(scores)
    assert summary["collapsed"] == bool(scores["collapsed"])
    samples = (run_dir / "samples/final.txt").read_text()
    assert samples.count("sample ") == 4 and len(samples) > 4 * 32
    checkpoint = torch.load(run_dir / "checkpoints/latest.pt", weights_only=False)
    assert checkpoint["data"]["kind"] == "text" and checkpoint["data"]["tokenizer"]["type"] == "char"
    if method == "embedding":  # logged while training: the scale and spread that collapsed before
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        norms, spreads = [r["embedding_norm"] for r in records], [r["embedding_spread"] for r in records]
        assert len(norms) >= 3 and min(norms) > 0.5 * max(norms) and min(spreads) > 0.5 * max(spreads)


def test_masked_text_run_resumes_bit_for_bit(shakespeare_root, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(shakespeare_root))
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert train(tiny_config("masked"), whole) == 0
    assert train(tiny_config("masked", max_steps=6), halves) == 0
    assert train(tiny_config("masked"), halves) == 0  # resumes from step 6 to the end
    a = torch.load(whole / "checkpoints/latest.pt", weights_only=False)
    b = torch.load(halves / "checkpoints/latest.pt", weights_only=False)
    assert a["step"] == b["step"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_validation_curve_is_logged_and_leaves_training_alone(shakespeare_root, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(shakespeare_root))
    plain, curve = tmp_path / "plain", tmp_path / "curve"
    assert train(tiny_config("masked"), plain) == 0
    assert train(tiny_config("masked", val_every_steps=3), curve) == 0
    records = [json.loads(line) for line in (curve / "metrics.jsonl").read_text().splitlines()]
    # A line every log_every (2) steps and at every validation (3): a curve point is never skipped.
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8, 9, 10, 12]
    values = {r["step"]: r["val_bits_per_char"] for r in records if "val_bits_per_char" in r}
    assert list(values) == [3, 6, 9, 12]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 9/")]
    assert printed and printed[0].endswith(f"val {values[9]:.3f} bits/char")
    assert values[12] < values[3] < 8  # falling, from about log2(65) = 6.0 bits at initialisation
    # The curve's last point is the final score: the same EMA weights, blocks and seed.
    assert json.loads((curve / "summary.json").read_text())["scores"]["val_bits_per_char"] == values[12]
    # The same weights as without the curve: evaluating draws nothing from the training RNG.
    a = torch.load(plain / "checkpoints/latest.pt", weights_only=False)
    b = torch.load(curve / "checkpoints/latest.pt", weights_only=False)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_sample_task_with_ar_guidance_and_scoring(shakespeare_root, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(shakespeare_root))
    ar, masked = tmp_path / "ar", tmp_path / "masked"
    assert train(tiny_config("autoregressive"), ar) == 0
    assert train(tiny_config("masked"), masked) == 0
    code = main(
        [
            "sample",
            str(masked),
            "--set",
            f"sample.guide_checkpoint={ar}",
            "--set",
            "sample.guidance_alpha=0.5",
            "--set",
            f"eval.scorer_checkpoint={ar}",
            "--set",
            "sample.num_samples=3",
            "--set",
            "sample.length=40",
        ]
    )
    assert code == 0
    [record_path] = (masked / "eval").glob("*alpha0.5*.json")
    record = json.loads(record_path.read_text())
    assert record["guidance_alpha"] == 0.5 and record["num_samples"] == 3
    assert record["scores"]["ar_perplexity"] > 1
    texts = (masked / "samples" / f"{record_path.stem}.txt").read_text()
    assert texts.count("sample ") == 3

    # Only an autoregressive run can guide: a masked one given as the guide is refused in one line.
    assert main(["sample", str(masked), "--set", f"sample.guide_checkpoint={masked}"]) == 2
    assert "not an autoregressive run" in capsys.readouterr().err


def test_text_specs_refuse_image_parts_in_one_line(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("run:\n  data: {dataset: shakespeare}\n  model: {name: transformer}\n  method: {name: ddpm}\n")
    with pytest.raises(ConfigError, match=r"method.name: 'ddpm' is not allowed with data.dataset 'shakespeare'"):
        load_run_config(spec)
    spec.write_text("run:\n  data: {dataset: shakespeare}\n  method: {name: masked}\n  sample: {sampler: ancestral}\n")
    with pytest.raises(ConfigError, match=r"model.name: 'unet' is not allowed .* use 'transformer'"):
        load_run_config(spec)
    spec.write_text("run:\n  data: {dataset: shakespeare}\n  model: {name: transformer}\n  method: {name: masked}\n")
    with pytest.raises(ConfigError, match=r"sample.sampler: 'ddim' is not allowed with method.name 'masked'"):
        load_run_config(spec)
    spec.write_text("run:\n  data: {dataset: mnist}\n  train: {val_every_steps: 100}\n")
    with pytest.raises(ConfigError, match=r"train.val_every_steps: 100 is not allowed with data.dataset 'mnist'"):
        load_run_config(spec)


def test_embedding_diffusion_starts_from_a_trained_runs_embeddings(shakespeare_root, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(shakespeare_root))
    ar, embedding = tmp_path / "ar", tmp_path / "embedding"
    assert train(tiny_config("autoregressive"), ar) == 0
    config = tiny_config("embedding")
    config.method.init_embeddings = str(ar)
    assert train(config, embedding) == 0
    trained = torch.load(embedding / "checkpoints/latest.pt", weights_only=False)["model"]
    ar_table = torch.load(ar / "checkpoints/latest.pt", weights_only=False)["ema"]["wte.weight"]
    # The AR run's table (less its start-token row) is kept fixed; a learned projection maps it.
    assert torch.equal(trained["pretrained"], ar_table[:-1])
    assert trained["projection.weight"].shape == (8, 32) and "embedding.weight" not in trained

    # The run it started from may go: resuming and sampling read the table from this run's checkpoint.
    moved = tmp_path / "ar-moved"
    ar.rename(moved)
    config.train.epochs += 1  # resumes: four more steps
    assert train(config, embedding) == 0
    assert main(["sample", str(embedding), "--set", "sample.num_samples=2"]) == 0
    config.method.init_embeddings = str(embedding)  # an embedding run has no token table to give
    with pytest.raises(ConfigError, match="no token embedding table"):
        train(config, tmp_path / "again")

import json
import os

from diffusion.train import train
from tests.conftest import run_diffusion


def test_eval_command_scores_samples_next_to_the_real_floor(tiny_config, tmp_path):
    tiny_config.train.max_steps = 4
    run = tmp_path / "run"
    train(tiny_config, run)
    result = run_diffusion(
        "eval",
        run,
        "--set",
        "eval.num_samples=40",
        "--set",
        "eval.classifier_subset=2000",
        "--set",
        "eval.classifier_epochs=1",
        "--set",
        "sample.num_inference_steps=3",
        env={**os.environ, "DIFFUSION_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((run / "eval/ddim3-seed0.json").read_text())
    assert record["num_samples"] == 40 and record["step"] == 4 and record["sampler"] == "ddim"
    scores, floor = record["scores"], record["real_floor"]
    assert sum(scores["class_counts"]) == 40 and sum(floor["class_counts"]) == 40
    # Four steps of training make noise, not digits: far from real test images, which score the floor.
    assert scores["fid"] > 3 * floor["fid"]
    assert floor["confident_share"] > scores["confident_share"]
    assert (run / "eval/ddim3-seed0.png").is_file()
    assert "real vs real" in result.stdout
    assert list((tmp_path / "cache/classifiers").glob("lenet-*.pt"))


def test_eval_scores_what_the_checkpoint_holds_not_what_the_task_config_says(shakespeare_root, tmp_path, monkeypatch):
    """An image spec pointed at a text run scores text (held-out bits per character), in one go."""
    from tests.test_text_train import tiny_config as tiny_text_config

    run = tmp_path / "masked"
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(shakespeare_root))
    assert train(tiny_text_config("masked", max_steps=2), run) == 0
    env = {**os.environ}
    result = run_diffusion(
        "eval",
        "configs/jobs/mnist-sampling.yaml",
        "--set",
        f"sample.checkpoint={run}",
        "--set",
        "sample.sampler=ancestral",
        "--set",
        "eval.num_samples=4",
        "--out",
        tmp_path / "scored",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    (record,) = (tmp_path / "scored/eval").glob("*.json")
    assert json.loads(record.read_text())["scores"]["val_bits_per_char"] > 0


def test_sampling_a_config_without_a_checkpoint_says_the_setting_is_missing(tmp_path):
    result = run_diffusion("sample", "configs/jobs/mnist-quick.yaml", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: sample.checkpoint: not set, and there is no trained run to sample in "
        "place; set it to a run dir or a .pt file, or give the run dir itself"
    )
    assert not (tmp_path / "out").exists()

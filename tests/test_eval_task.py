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

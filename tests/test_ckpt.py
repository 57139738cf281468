"""`ops ckpt inspect` and `ops ckpt best` on real runs: what a checkpoint holds (read by the run's
own entry point, never by ops, which imports no torch) and the best step checkpoint by a metric."""

import json
from pathlib import Path

from tests.ops_project import ops, ops_json


def submit_and_wait(root: Path, *sets: str) -> dict:
    run = ops_json(root, "submit", "tiny", *[arg for item in sets for arg in ("--set", item)])["runs"][0]
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    return run


def test_inspect_tells_what_a_checkpoint_holds(ops_project):
    root = ops_project
    run = submit_and_wait(root)
    record = ops_json(root, "ckpt", "inspect", run["ops_id"])
    assert record["step"] == 8 and record["method"] == "ddpm" and record["net"] == "unet"
    assert record["data"] == {
        "dataset": "mnist",
        "kind": "image",
        "shape": [1, 28, 28],
        "num_classes": 10,
        "vocab_size": None,
    }
    assert record["checkpoint"].endswith("checkpoints/latest.pt") and record["bytes"] > 10_000
    assert record["num_parameters"] > 1000 and record["metrics"]["step"] == 8
    assert record["config"]["model"]["base_channels"] == 8
    shown = ops(root, "ckpt", "inspect", run["run_dir"])  # a run dir works too, and a table for people
    assert (
        shown.returncode == 0
        and "method  ddpm" in shown.stdout
        and "mnist (image, 1x28x28, 10 classes)" in shown.stdout
    )

    (root / "broken.pt").write_bytes(b"not a checkpoint")
    broken = ops(root, "ckpt", "inspect", "broken.pt")
    assert broken.returncode == 2 and len(broken.stderr.splitlines()) == 1
    assert broken.stderr.startswith("error: checkpoint: ") and "not a checkpoint of a run" in broken.stderr
    missing = ops(root, "ckpt", "inspect", "nowhere-123")
    assert missing.returncode == 2 and "no such run" in missing.stderr


def test_best_picks_the_step_checkpoint_with_the_best_logged_metric(ops_project):
    root = ops_project
    runs = [
        submit_and_wait(
            root, "run.train.checkpoint_every_steps=2", "run.train.keep_checkpoints=10", f"run.train.lr={lr}"
        )
        for lr in (1e-3, 3e-3)
    ]
    result = ops_json(
        root, "ckpt", "best", runs[0]["ops_id"], "--metric", "loss", "--mode", "min", "--copy-to", "chosen/best.pt"
    )
    candidates = result["candidates"]
    assert [candidate["step"] for candidate in candidates] == [2, 4, 6, 8]
    logged = {
        line["step"]: line["loss"]
        for line in map(json.loads, (Path(runs[0]["run_dir"]) / "metrics.jsonl").read_text().splitlines())
    }
    assert [candidate["value"] for candidate in candidates] == [logged[step] for step in (2, 4, 6, 8)]
    assert result["best"]["value"] == min(logged[step] for step in (2, 4, 6, 8))
    assert (root / "chosen/best.pt").read_bytes() == Path(result["best"]["checkpoint"]).read_bytes()

    highest = ops_json(root, "ckpt", "best", "tiny", "--metric", "grad_norm", "--mode", "max")  # the spec: both runs
    assert {candidate["run_dir"] for candidate in highest["candidates"]} == {run["run_dir"] for run in runs}
    assert highest["best"]["value"] == max(candidate["value"] for candidate in highest["candidates"])

    unknown = ops(root, "ckpt", "best", runs[0]["ops_id"], "--metric", "fid")
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1
    assert "--metric 'fid': no step checkpoint" in unknown.stderr and "loss" in unknown.stderr
    bad_mode = ops(root, "ckpt", "best", runs[0]["ops_id"], "--mode", "lowest")
    assert bad_mode.returncode == 2 and "--mode 'lowest': not allowed; use min or max" in bad_mode.stderr

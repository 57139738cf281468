"""Runs that build on runs: `run:SPEC` resolves at submit to the newest succeeded run of the spec,
provenance records which run and the checkpoint's sha256, and a rerun reads that same checkpoint."""

import hashlib
import json
import os
from pathlib import Path

from tests.ops_project import git, ops, ops_json, registry_rows, wait_for

SAMPLING = """\
name: tiny-sampling
description: Samples of the newest tiny run.
engine: local
resources:
  local: {threads: 1}
run:
  task: sample
  device: cpu
  data: {download: false}
  sample: {checkpoint: "run:tiny", num_samples: 4, num_inference_steps: 5}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finished(root: Path, *args: str) -> dict:
    run = ops_json(root, "submit", *args)["runs"][0]
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    return run


def test_run_spec_resolves_is_recorded_and_a_rerun_reads_the_recorded_checkpoint(ops_project):
    root = ops_project
    (root / "configs/jobs/tiny-sampling.yaml").write_text(SAMPLING)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "a sampling spec")

    refused = ops(root, "submit", "tiny-sampling")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    assert "run.sample.checkpoint: 'run:tiny' is not allowed: no checkpoint there: no succeeded tiny run yet" in (
        refused.stderr
    )
    text = ops(root, "submit", "tiny-sampling", "--set", "run.sample.checkpoint=configs/jobs/tiny.yaml")
    assert text.returncode == 2 and len(text.stderr.splitlines()) == 1
    assert "configs/jobs/tiny.yaml is not a checkpoint (a .pt file torch.save wrote" in text.stderr
    misspelt = ops(root, "submit", "tiny-sampling", "--set", "run.sample.checkpoint=run:tinny")
    assert misspelt.returncode == 2 and "there is no spec 'tinny'; did you mean 'run:tiny'?" in misspelt.stderr
    assert not (root / "runs/registry.sqlite").is_file() or registry_rows(root) == []

    first = finished(root, "tiny", "--set", "train.max_steps=2")
    sampled = finished(root, "tiny-sampling")
    checkpoint = Path(first["run_dir"]) / "checkpoints/latest.pt"
    [read] = json.loads((Path(sampled["run_dir"]) / "provenance.json").read_text())["references"]
    assert read == {
        "key": "run.sample.checkpoint",
        "reference": "run:tiny",
        "run_id": first["ops_id"],
        "checkpoint": str(checkpoint),
        "sha256": sha256(checkpoint),
    }

    second = finished(root, "tiny", "--set", "train.max_steps=3")  # newer: what run:tiny names from now on
    newer = ops_json(root, "submit", "tiny-sampling", "--dry-run")["runs"][0]
    assert newer["spec"]["run"]["sample"]["checkpoint"] == second["run_dir"]

    again = ops_json(root, "rerun", sampled["ops_id"])
    assert ops(root, "wait", again["ops_id"], "--interval", "0.3").returncode == 0
    assert json.loads((Path(again["run_dir"]) / "provenance.json").read_text())["references"] == [read]
    result = json.loads((Path(again["run_dir"]) / "summary.json").read_text())["result"]
    assert result["checkpoint"] == str(checkpoint)  # the first run's, not the newer one's

    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")  # the recorded weights changed since
    changed = ops(root, "rerun", sampled["ops_id"])
    assert changed.returncode == 2 and "has changed since (sha256 differs)" in changed.stderr


def test_a_running_runs_checkpoint_is_pinned_so_a_later_start_reads_the_recorded_weights(ops_project):
    """A queued job that starts after the run it reads has written a newer latest.pt would read
    other weights than the recorded sha256: the checkpoint of a run not over is read from a frozen
    hard link named by its hash."""
    root = ops_project
    (root / "configs/jobs/tiny-sampling.yaml").write_text(SAMPLING)
    live = ops_json(root, "submit", "tiny", "--set", "train.epochs=1000", "--set", "train.checkpoint_every_steps=2")
    live = live["runs"][0]
    try:
        reads_a_frozen_copy(root, live)
    finally:
        ops(root, "cancel", live["ops_id"])


def reads_a_frozen_copy(root: Path, live: dict) -> None:
    latest = Path(live["run_dir"]) / "checkpoints/latest.pt"
    wait_for(latest.is_file, timeout=120)
    reading = ["tiny-sampling", "--set", f"run.sample.checkpoint={live['ops_id']}"]
    dry = ops_json(root, "submit", *reading, "--dry-run")["runs"][0]  # a dry run writes nothing
    assert dry["spec"]["run"]["sample"]["checkpoint"] == live["run_dir"] and not (root / "runs/.pinned").exists()

    planned = ops_json(root, "submit", *reading)["runs"][0]
    [read] = json.loads((Path(planned["run_dir"]) / "provenance.json").read_text())["references"]
    frozen = Path(read["checkpoint"])
    assert frozen.parent == root / "runs/.pinned" and frozen.name == f"{read['sha256']}.pt"
    assert read["pinned_from"] == str(latest) and read["run_id"] == live["ops_id"]
    assert f"checkpoint: {frozen}\n" in (Path(planned["run_dir"]) / "config.yaml").read_text()
    wait_for(lambda: sha256(latest) != read["sha256"], timeout=120)  # the run went on writing latest.pt
    assert sha256(frozen) == read["sha256"]
    assert ops(root, "wait", planned["ops_id"], "--interval", "0.3").returncode == 0
    result = json.loads((Path(planned["run_dir"]) / "summary.json").read_text())["result"]
    assert result["checkpoint"] == str(frozen)
    assert ops_json(root, "du")["pinned_bytes"] >= os.stat(frozen).st_blocks * 512 > 0  # counted apart
    # Once no run's provenance names it (the run that read it removed), ops rm removes it too.
    removed = ops_json(root, "rm", planned["ops_id"], "--yes")
    assert removed["pinned_removed"] == [str(frozen)] and not frozen.exists() and latest.is_file()

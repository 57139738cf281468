"""Trackers: TensorBoard event files hold what metrics.jsonl holds (read back with TensorBoard's
own event reader), switched on by a spec or by ops.yaml; a tracker whose package is missing is one
line before anything is written."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion.config import TRACKER_PACKAGES, ConfigError
from diffusion.train import train
from tests.conftest import run_diffusion, write_config
from tests.ops_project import ops, ops_json


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_events_hold_the_logged_scalars_and_the_sample_grid(tiny_config, tmp_path):
    tiny_config.train.max_steps = 3
    tiny_config.train.trackers = ["tensorboard"]
    assert train(tiny_config, tmp_path / "run") == 0
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    accumulator = events(tmp_path / "run/tensorboard")
    for name in ("loss", "lr", "grad_norm"):
        scalars = accumulator.Scalars(name)
        assert [event.step for event in scalars] == [line["step"] for line in logged] == [1, 2, 3]
        assert [event.value for event in scalars] == pytest.approx([line[name] for line in logged], rel=1e-6)
    [grid] = accumulator.Images("samples")
    assert grid.step == 3 and grid.width > 0


def test_trackio_holds_the_logged_scalars_and_the_sample_grid(tiny_config, tmp_path):
    """The real trackio, in a fresh process, logging to its local database under TRACKIO_DIR; read
    back with trackio's own storage reader."""
    pytest.importorskip("trackio", reason="the trackio extra (in dev) is not installed")
    tiny_config.train.max_steps = 3
    tiny_config.train.trackers = ["trackio"]
    config = write_config(tiny_config, tmp_path / "config.yaml")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    result = run_diffusion("train", config, "--out", tmp_path / "run", env=env)
    assert result.returncode == 0, result.stderr
    read = (
        "import json; from trackio.sqlite_storage import SQLiteStorage; "
        "print(json.dumps(SQLiteStorage.get_logs('diffusion', 'run'), default=str))"
    )
    logs = json.loads(subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True).stdout)
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    scalars = [entry for entry in logs if "loss" in entry]
    assert [entry["step"] for entry in scalars] == [line["step"] for line in logged] == [1, 2, 3]
    assert [entry["loss"] for entry in scalars] == pytest.approx([line["loss"] for line in logged], rel=1e-6)
    [grid] = [entry for entry in logs if "samples" in entry]
    assert grid["step"] == 3 and grid["samples"]["_type"] == "trackio.image"
    assert (tmp_path / "trackio/media" / grid["samples"]["file_path"]).is_file()


def test_a_tracker_without_its_package_is_one_line_before_anything_is_written(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setitem(TRACKER_PACKAGES, "trackio", "trackio_not_installed_here")  # as on a machine without it
    tiny_config.train.trackers = ["trackio"]
    with pytest.raises(ConfigError, match=r"train.trackers: 'trackio' needs the trackio_not_installed_here package"):
        train(tiny_config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_ops_yaml_switches_trackers_on_for_a_project(ops_project):
    root = ops_project
    (root / "ops.yaml").write_text("trackers: tensorboard\n")
    run = ops_json(root, "submit", "tiny", "--set", "train.max_steps=2")["runs"][0]
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    assert "trackers:\n  - tensorboard" in (Path(run["run_dir"]) / "config.yaml").read_text()
    assert [event.step for event in events(Path(run["run_dir"]) / "tensorboard").Scalars("loss")] == [1, 2]
    # A spec (or --set) of train.trackers [] switches the project's off for its runs.
    off = ops_json(root, "submit", "tiny", "--set", "train.max_steps=2", "--set", "train.trackers=[]")["runs"][0]
    assert ops(root, "wait", off["ops_id"], "--interval", "0.3").returncode == 0
    assert "trackers: []" in (Path(off["run_dir"]) / "config.yaml").read_text()
    assert not (Path(off["run_dir"]) / "tensorboard").exists()
    (root / "ops.yaml").write_text("trackers: wandb\n")
    refused = ops(root, "submit", "tiny")
    assert refused.returncode == 2 and "trackers: 'wandb' is not allowed: tensorboard or trackio" in refused.stderr


@pytest.mark.skipif(importlib.util.find_spec("trackio") is not None, reason="trackio is installed here")
def test_ops_refuses_a_tracker_without_its_package_at_submit(git_project):
    refused = ops(git_project, "submit", "tiny", "--set", "run.train.trackers=[trackio]")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    assert "run.train.trackers: 'trackio' needs the trackio package" in refused.stderr
    assert not (git_project / "runs").exists() and not (git_project / "EXPERIMENT_LOG.md").exists()

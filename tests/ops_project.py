"""A throwaway project (a real git repo with a tiny job spec) and `ops` run in it as a real process."""

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

TINY_SPEC = """\
name: tiny
description: A tiny DDPM for the ops tests.
hypothesis: The loss goes down.
engine: local

resources:
  local:
    threads: 1      # many runs share two cores in the tests

run:
  task: train
  device: cpu
  data: {subset: 64, download: false}
  model: {base_channels: 8, channel_mults: [1, 2], num_res_blocks: 1, attention: false, norm_groups: 4}
  method: {num_train_timesteps: 50}
  train:
    batch_size: 16
    epochs: 2                  # 8 steps
    lr: 1.0e-3                 # a comment `ops config set` must keep
    log_every: 1
    sample_every_epochs: null
    checkpoint_every_minutes: null
    progress: lines
  sample: {num_samples: 4, num_inference_steps: 5}
"""


def write_misfit_checkpoint(path: Path) -> Path:
    """A checkpoint that loads but whose weights fit no network: a sample task from it fails at
    run time, with a traceback (a file that does not load at all is refused in one line)."""
    import torch  # only the tests that need a failing run

    from diffusion.config import RunConfig, to_dict

    data = {"kind": "image", "image_shape": [1, 28, 28], "num_classes": 10}
    torch.save({"config": to_dict(RunConfig()), "data": data, "step": 0, "model": {}, "ema": {}}, path)
    return path


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def make_project(root: Path, with_git: bool = True) -> Path:
    (root / "configs/jobs").mkdir(parents=True)
    (root / "configs/jobs/tiny.yaml").write_text(TINY_SPEC)
    (root / "notes.md").write_text("# notes\n")
    if with_git:
        git(root, "init", "-q", "-b", "main")
        git(root, "config", "user.email", "test@example.com")
        git(root, "config", "user.name", "Test")
        git(root, "add", "-A")
        git(root, "commit", "-qm", "initial")
    return root


def ops(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ops", *map(str, args)], cwd=root, capture_output=True, text=True, timeout=timeout
    )


def ops_json(root: Path, *args: str):
    result = ops(root, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def registry_rows(root: Path) -> list[dict]:
    path = root / "runs/registry.sqlite"
    if not path.is_file():
        return []
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    rows = [dict(row) for row in db.execute("SELECT * FROM runs")]
    db.close()
    return rows


def wait_for(condition, timeout: float = 120, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def metrics_steps(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0

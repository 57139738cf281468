"""The run directory: everything a run writes lives here (layout in shared DESIGN.md)."""

import json
import os
import time
from pathlib import Path

from diffusion.checkpoint import atomic_write_bytes
from diffusion.config import ConfigError, RunConfig, dump_yaml, to_dict


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.samples = self.path / "samples"
        self.summary = self.path / "summary.json"

    def create(self, config: RunConfig) -> None:
        """Make the folders and write the resolved config; refuse to mix two different models."""
        if self.config.is_file():
            from diffusion.config import load_run_config

            existing = load_run_config(self.config)
            for section in ("data", "model", "method"):
                if getattr(existing, section) != getattr(config, section):
                    raise ConfigError(
                        f"{self.path}: holds a run with a different '{section}' section; "
                        f"choose another --out, or resume it without changing '{section}'"
                    )
        for folder in (self.path, self.checkpoints, self.samples):
            folder.mkdir(parents=True, exist_ok=True)
        dump_yaml(to_dict(config), self.config)

    def log_metrics(self, record: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop lines logged after the checkpoint: they will be logged again."""
        if not self.metrics.is_file():
            return
        kept = [
            line
            for line in self.metrics.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= after_step
        ]
        atomic_write_bytes(self.metrics, "".join(line + "\n" for line in kept).encode())

    def write_summary(self, summary: dict) -> None:
        summary = {**summary, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()}
        atomic_write_bytes(self.summary, (json.dumps(summary, indent=2) + "\n").encode())

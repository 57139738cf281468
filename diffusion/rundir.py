"""The run directory: everything a run writes lives here (layout in shared DESIGN.md, names and
fields in diffusion/records.py)."""

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from diffusion import records
from diffusion.config import ConfigError, RunConfig, dump_yaml, load_run_config, to_dict
from diffusion.expectations import judge


class RunDir:
    """A run dir, as one task sees it. `in_place`: the task runs inside another task's run dir
    (sampling a training run), so its own record goes to tasks/TASK-TIME.json, never over the
    run's summary.json."""

    def __init__(self, path: Path, task: str = "train", in_place: bool = False):
        self.path = Path(path)
        self.config = self.path / records.CONFIG
        self.metrics = self.path / records.METRICS
        self.checkpoints = self.path / records.CHECKPOINTS
        self.samples = self.path / records.SAMPLES
        self.eval = self.path / records.EVAL
        self.figures = self.path / records.FIGURES
        self.summary = self.path / records.SUMMARY
        self.in_place = in_place
        self._lock: int | None = None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.record = self.path / records.TASKS / f"{task}-{stamp}-{os.getpid()}.json" if in_place else self.summary

    def create(self, config: RunConfig) -> None:
        """Make the folders and write the resolved config; refuse to mix two different models."""
        if self.config.is_file():
            existing = load_run_config(self.config, stored=True)
            for section in ("data", "model", "method"):
                if getattr(existing, section) != getattr(config, section):
                    raise ConfigError(
                        f"{self.path}: holds a run with a different '{section}' section; "
                        f"choose another --out, or resume it without changing '{section}'"
                    )
        for folder in (self.path, self.checkpoints, self.samples):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock()
        dump_yaml(to_dict(config), self.config)

    def lock(self) -> None:
        """Hold RUN_DIR/.lock for the rest of this process: one writer per run dir (two trainers
        would interleave metrics and checkpoints). The lock goes with the process, however it ends.
        ConfigError naming the holder when another process has it."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"{self.path}: is being written by {holder}; wait for it to end, or stop it "
                "(`ops cancel`, or kill that process)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._lock = fd  # open until unlock (or the process's end): closing it releases the lock

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def log_metrics(self, record: records.MetricsRecord) -> None:
        records.append_jsonl(self.metrics, record.to_json())

    def read_metrics(self) -> list[records.MetricsRecord]:
        return [records.MetricsRecord.from_json(line) for line in records.read_jsonl(self.metrics)]

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again) and a line
        torn by the crash that stopped the run."""
        if not self.metrics.is_file():
            return
        kept = [
            line
            for line in records.read_jsonl(self.metrics)
            if records.fits(line.get("step"), int) and line.get("step", 0) <= after_step
        ]
        records.atomic_write(self.metrics, "".join(json.dumps(line) + "\n" for line in kept).encode())

    def write_record(self, summary: records.Summary, expect: list[str] = ()) -> None:
        """This task's record: summary.json, or tasks/TASK-TIME.json for a task run in place; with
        `expect` (the config's `expect:` lines), judged on this summary first (expectations, verdict)."""
        if expect:
            summary.expectations, summary.verdict = judge(list(expect), summary.to_json())
        summary.written_at, summary.pid = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getpid()
        self.record.parent.mkdir(parents=True, exist_ok=True)
        records.write_json(self.record, summary.to_json())

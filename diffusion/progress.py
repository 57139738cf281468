"""Training progress: a rich bar on a terminal, plain log lines in a log file (engines, CI),
nothing on data-parallel ranks other than 0 ("quiet")."""

import sys
import time

import rich.progress
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from diffusion.records import MetricsRecord


def console():
    """A rich console that never wraps a line when the output is a file or a pipe (log.txt, an
    engine's log): width unlimited and no soft wrapping there; the terminal's width on a terminal."""
    terminal = sys.stdout.isatty()
    return Console(soft_wrap=not terminal, width=None if terminal else 1_000_000)


def track(steps, description: str):
    """The Progress that tasks hand to methods: a rich bar over `steps` (which must have a length)."""
    return rich.progress.track(steps, description=description)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class TrainProgress:
    def __init__(self, mode: str, total_steps: int, start_step: int, seconds_left: float | None = None):
        self.quiet = mode == "quiet"
        self.use_bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        self.total_steps = total_steps
        self.start_step = start_step
        self.seconds_left = seconds_left  # a wall-clock budget may end the run before its last step
        self.started = time.monotonic()
        self.bar: Progress | None = None

    def __enter__(self) -> "TrainProgress":
        if self.use_bar:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[speed]}"),
                TimeElapsedColumn(),
                TextColumn("eta {task.fields[eta]}"),
                console=console(),
            )
            self.bar.start()
            self.task = self.bar.add_task(
                "train", total=self.total_steps, completed=self.start_step, loss="-", speed="- it/s", eta="-"
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def advance(self, step: int) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step)

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.total_steps - step) if done else 0.0
        if self.seconds_left is not None:
            eta = min(eta, max(self.seconds_left - elapsed, 0.0))
        return eta

    def log(self, record: MetricsRecord) -> None:
        if self.quiet:
            return
        eta = self.eta_seconds(record.step)
        validation = f"  val {record.val_bits_per_char:.3f} bits/char" if record.val_bits_per_char is not None else ""
        if self.bar:
            if validation:  # above the bar, which has no room for it
                self.bar.console.print(f"step {record.step}{validation}")
            self.bar.update(
                self.task, loss=f"{record.loss:.4f}", speed=f"{record.it_per_s:.1f} it/s", eta=format_seconds(eta)
            )
            return
        print(
            f"step {record.step}/{self.total_steps}  epoch {record.epoch:.2f}  loss {record.loss:.4f}  "
            f"lr {record.lr:.2e}  {record.it_per_s:.1f} it/s  eta {format_seconds(eta)}{validation}",
            flush=True,
        )

"""Engines start, watch and stop `python -m diffusion RUN_DIR`; they know nothing of training.

Every engine implements the same five calls and maps its own job states onto ours
(ops.registry.STATES). `requeues_itself` says whether a PREEMPTED run comes back without us
(SLURM requeue) or stays stopped until `ops resume` (local).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ops.errors import OpsError
from ops.registry import Run


@dataclass
class Launch:
    """What to start: the run dir, and where its code is (the repo, or a snapshot of a commit)."""

    run_dir: Path
    project_root: Path
    code_dir: Path | None = None  # a materialised commit + diff.patch; None: the project itself
    resources: dict | None = None  # the spec's resources for this engine


@dataclass
class EngineState:
    state: str
    exit_code: int | None = None
    detail: str = ""
    finished_at: float | None = None  # when the job ended, if the engine knows (else: when we noticed)


class Engine(Protocol):
    name: str
    requeues_itself: bool

    def describe(self, launch: Launch) -> str: ...

    def submit(self, launch: Launch) -> str: ...

    def state(self, run: Run) -> EngineState: ...

    def logs(self, run: Run, offset: int = 0) -> tuple[str, int]: ...

    def cancel(self, run: Run, grace_seconds: float) -> None: ...


def get_engine(name: str) -> Engine:
    if name == "local":
        from ops.engines.local import LocalEngine

        return LocalEngine()
    raise OpsError(f"--engine {name!r}: not available in this version of ops; allowed: local")

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
    requeues: int | None = None  # restarts the engine made on its own (SLURM requeue), if it counts them


class Engine(Protocol):
    name: str
    requeues_itself: bool
    snapshots_code: bool  # runs start later, elsewhere: they get RUN_DIR/code, made at submit
    needs_image: bool  # runs in a container: ops builds (or finds) the image of the run's code

    def missing(self, resources: dict) -> list[str]:
        """What a real submit of these resources from here lacks (a setting, a tool), each a short
        phrase with the fix; empty when nothing is. A dry run shows these instead of failing."""

    def preflight(self, resources: dict) -> None:
        """Raise OpsError (one line, with the fix) when this engine cannot run these resources from here."""

    def describe(self, launch: Launch) -> str: ...

    def submit(self, launch: Launch) -> str: ...

    def submit_many(self, launches: list[Launch]) -> list[str]: ...

    def recorded_job(self, run_dir: Path) -> str | None:
        """The job id this engine wrote into the run dir when it took the run, or None: how a run
        whose submitting ops died before recording the id is found again."""

    def state(self, run: Run) -> EngineState: ...

    def logs(self, run: Run, offset: int = 0) -> tuple[str, int]: ...

    def cancel(self, run: Run, grace_seconds: float) -> None: ...


def read_from(path: Path, offset: int) -> tuple[str, int]:
    """A log file's text from byte `offset` on, and the offset to read from next time."""
    if not path.is_file():
        return "", offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    return data.decode(errors="replace"), offset + len(data)


def get_engine(name: str, settings) -> Engine:
    """The engine called `name`; `settings` are the project's (ops.settings.Settings)."""
    # Here, not at the top: each engine module imports this package (Launch, EngineState) and,
    # through ops.rundir, `diffusion`; this package is also imported by the code that runs beside
    # a job (the local wrapper; a SLURM job unpickling ops.engines.slurm_job), which must not import
    # `diffusion` itself (a SLURM job imports it only once its code snapshot is on sys.path).
    if name == "local":
        from ops.engines.local import LocalEngine

        return LocalEngine()
    if name == "slurm":
        from ops.engines.slurm import SlurmEngine

        return SlurmEngine()
    if name == "vertex":
        from ops.engines.vertex import VertexEngine

        return VertexEngine(settings)
    raise OpsError(f"--engine {name!r}: not available; allowed: local, slurm, vertex")

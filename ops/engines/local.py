"""The local engine: the run is a detached process group on this machine.

`ops submit` starts `ops.engines.local_wrapper` in a new session (so it outlives the CLI and
the terminal); the wrapper runs `python -m diffusion RUN_DIR` with the log in RUN_DIR/log.txt
and, when it ends, writes RUN_DIR/exit_status.json. The state is read from these files and
from the process itself, identified by pid *and* creation time so that a reused pid is not
mistaken for our run.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ops.engines import EngineState, Launch, read_from
from ops.engines.local_wrapper import EXIT_FILE
from ops.registry import Run
from ops.rundir import LOG as LOG_FILE
from ops.rundir import read_json, read_summary, write_json

EXIT_PREEMPTED = 75  # diffusion's "preempted, resumable" (checkpoint written)
PROCESS_FILE = "local_process.json"
CANCEL_FILE = "cancel_requested"


def command(launch: Launch) -> list[str]:
    # -P: do not put the working directory first on sys.path, so that PYTHONPATH (a code
    # snapshot) decides which `diffusion` runs.
    run = [sys.executable, "-P", "-m", "diffusion", str(launch.run_dir)]
    return [sys.executable, "-m", "ops.engines.local_wrapper", str(launch.run_dir), "--", *run]


def environment(launch: Launch) -> dict[str, str]:
    resources = launch.resources or {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **resources.get("env", {})}
    if env.get("DIFFUSION_DATA_ROOT"):
        # The run starts in the project root, maybe not where the CLI was called from.
        env["DIFFUSION_DATA_ROOT"] = str(Path(env["DIFFUSION_DATA_ROOT"]).resolve())
    if launch.code_dir:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(launch.code_dir), env.get("PYTHONPATH")]))
    if resources.get("threads"):
        env["OMP_NUM_THREADS"] = str(resources["threads"])
    return env


def _process(run_dir: Path):
    """The wrapper's psutil.Process if it is still ours and alive, else None."""
    import psutil  # here and below, not at the top: `ops --help` and `ops list` of finished runs never need it

    record = read_json(run_dir / PROCESS_FILE) or {}
    pid, created = record.get("pid"), record.get("create_time")
    if not isinstance(pid, int) or not isinstance(created, (int, float)):
        return None  # missing or damaged: no process we can recognise as ours
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - created) > 0.01:
            return None  # the pid was reused by another process
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.NoSuchProcess:
        return None


class LocalEngine:
    name = "local"
    requeues_itself = False
    needs_image = False
    snapshots_code = False  # it starts now, from the working tree that provenance just recorded

    def missing(self, resources: dict) -> list[str]:
        return []

    def preflight(self, resources: dict) -> None:
        pass

    def describe(self, launch: Launch) -> str:
        env = environment(launch)
        extra = {key: env[key] for key in ("PYTHONPATH", "OMP_NUM_THREADS") if key in env}
        extra |= (launch.resources or {}).get("env", {})
        prefix = " ".join(f"{key}={value}" for key, value in extra.items())
        return f"in {launch.project_root}, detached (new session), log {launch.run_dir / LOG_FILE}:\n  " + " ".join(
            filter(None, [prefix, *command(launch)])
        )

    def submit(self, launch: Launch) -> str:
        import psutil  # as in _process

        run_dir = launch.run_dir
        for stale in (EXIT_FILE, CANCEL_FILE):
            (run_dir / stale).unlink(missing_ok=True)
        with (run_dir / LOG_FILE).open("ab") as log:
            process = subprocess.Popen(
                command(launch),
                cwd=launch.project_root,
                env=environment(launch),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        record = {
            "pid": process.pid,
            "create_time": psutil.Process(process.pid).create_time(),
            "started_at": time.time(),
        }
        write_json(run_dir / PROCESS_FILE, record)
        return str(process.pid)

    def submit_many(self, launches: list[Launch]) -> list[str]:
        return [self.submit(launch) for launch in launches]

    def recorded_job(self, run_dir: Path) -> str | None:
        pid = (read_json(run_dir / PROCESS_FILE) or {}).get("pid")
        return str(pid) if isinstance(pid, int) else None

    def state(self, run: Run) -> EngineState:
        run_dir = Path(run.run_dir)
        cancelled = (run_dir / CANCEL_FILE).is_file()
        status = read_json(run_dir / EXIT_FILE) or {}
        code, ended = status.get("returncode"), status.get("finished_at")
        if isinstance(code, int) and not isinstance(code, bool):  # else unreadable: judged as if missing
            ended = ended if isinstance(ended, (int, float)) else None
            if cancelled:
                return EngineState("CANCELLED", code, "cancelled by ops cancel", ended)
            if code == 0:
                return EngineState("SUCCEEDED", code, "", ended)
            if code == EXIT_PREEMPTED:
                return EngineState("PREEMPTED", code, "checkpointed on a signal; `ops resume` continues it", ended)
            return EngineState("FAILED", code, f"exit code {code}", ended)
        if _process(run_dir) is not None:
            return EngineState("RUNNING")
        if not (run_dir / PROCESS_FILE).is_file():
            return EngineState("QUEUED")
        # The wrapper is gone without writing its exit status: killed hard, or the machine rebooted.
        if cancelled:
            return EngineState("CANCELLED", None, "cancelled by ops cancel")
        summary = read_summary(run_dir)
        status = summary.status if summary else None
        if status == "completed":
            return EngineState("SUCCEEDED", 0, "the wrapper vanished after the run completed")
        if status == "preempted":
            return EngineState("PREEMPTED", EXIT_PREEMPTED, "checkpointed; `ops resume` continues it")
        return EngineState("FAILED", None, "the process vanished without an exit status (killed, or a reboot)")

    def logs(self, run: Run, offset: int = 0) -> tuple[str, int]:
        return read_from(Path(run.run_dir) / LOG_FILE, offset)

    def cancel(self, run: Run, grace_seconds: float) -> None:
        run_dir = Path(run.run_dir)
        (run_dir / CANCEL_FILE).write_text(f"{time.time()}\n")
        process = _process(run_dir)
        if process is None:
            return
        pgid = process.pid  # the wrapper leads its own session and process group
        os.killpg(pgid, signal.SIGTERM)  # the trainer checkpoints and exits (resumable)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
            while _group_alive(pgid):
                time.sleep(0.05)
        if read_json(run_dir / EXIT_FILE) is None:
            write_json(run_dir / EXIT_FILE, {"returncode": -signal.SIGKILL, "finished_at": time.time()})


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies do not: in a container, PID 1 may
    never reap them)."""
    import psutil  # as in _process

    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except ProcessLookupError:
            continue  # it ended while we looked
    return False

"""The SLURM engine, on submitit: one job per run (a job array for a sweep).

The run dir must be on a disk the nodes share. The job runs `ops.engines.slurm_job.SlurmRun`,
which imports `diffusion` from the run's code snapshot (RUN_DIR/code) and runs the task in it.
submitit's files (sbatch script, pickles, stdout) live in RUN_DIR/slurm/.

States come from sacct (with accounting; SLURM's own states mapped onto ours below); a job that
was requeued after a preemption or a time limit shows PREEMPTED until it runs again.
"""

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ops.engines import EngineState, Launch, read_from
from ops.engines.slurm_job import SlurmRun
from ops.errors import OpsError
from ops.registry import Run
from ops.rundir import read_json, read_required, write_json

SLURM_FILE = "slurm_job.json"  # the job id and submitit's folder, for logs

SLURM_STATES = {
    "PENDING": "QUEUED",
    "CONFIGURING": "QUEUED",
    "REQUEUED": "PREEMPTED",
    "REQUEUE_HOLD": "PREEMPTED",
    "REQUEUE_FED": "PREEMPTED",
    "RESV_DEL_HOLD": "QUEUED",
    "SUSPENDED": "PREEMPTED",
    "PREEMPTED": "PREEMPTED",
    "RUNNING": "RUNNING",
    "COMPLETING": "RUNNING",
    "STAGE_OUT": "RUNNING",
    "SIGNALING": "RUNNING",
    "RESIZING": "RUNNING",
    "COMPLETED": "SUCCEEDED",
    "CANCELLED": "CANCELLED",
    "FAILED": "FAILED",
    "TIMEOUT": "FAILED",
    "NODE_FAIL": "FAILED",
    "OUT_OF_MEMORY": "FAILED",
    "BOOT_FAIL": "FAILED",
    "DEADLINE": "FAILED",
    "REVOKED": "CANCELLED",
    "SPECIAL_EXIT": "FAILED",
}
SUBMITIT_FOLDER = "slurm"


def parameters(resources: dict, job_name: str) -> dict:
    """resources.slurm (ops/spec.py) -> submitit SlurmExecutor parameters."""
    params = {
        "job_name": job_name,
        "time": resources["time_minutes"],
        "nodes": resources["nodes"],
        "ntasks_per_node": resources["tasks_per_node"],
        "cpus_per_task": resources["cpus_per_task"],
        "signal_delay_s": resources["signal_delay_s"],
        "setup": list(resources["setup"]),
        "additional_parameters": dict(resources["additional_parameters"]),
        "stderr_to_stdout": True,
    }
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if resources[key]:
            params[key] = resources[key]
    if resources["gpus_per_node"]:
        params["gpus_per_node"] = resources["gpus_per_node"]
    if resources["mem_gb"]:
        params["mem"] = f"{int(resources['mem_gb'] * 1024)}M"
    return params


def executor(folder: Path, resources: dict, job_name: str):
    import submitit  # heavy: here and below, imported only when SLURM is used

    # SlurmExecutor, not AutoExecutor: AutoExecutor silently falls back to local processes.
    slurm = submitit.SlurmExecutor(folder=folder, max_num_timeout=resources["max_requeues"])
    slurm.update_parameters(**parameters(resources, job_name))
    return slurm


def sbatch_script(launch: Launch, job_name: str) -> str:
    """The script submitit would hand to sbatch, for --dry-run and for review."""
    from submitit.slurm.slurm import _make_sbatch_string  # heavy, as in executor()

    folder = launch.run_dir / SUBMITIT_FOLDER
    # SlurmExecutor._submitit_command_str's command, built here: the executor's constructor needs
    # srun, and a dry run shows the script on machines without SLURM too.
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **parameters(launch.resources, job_name))


def sacct(job_id: str) -> list[dict]:
    """Every attempt of the job (requeues are duplicates), oldest first."""
    result = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "--duplicates", "-o", "JobID,State,ExitCode"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise OpsError(f"sacct -j {job_id} failed: {result.stderr.strip() or result.stdout.strip()}")
    rows = []
    for line in result.stdout.splitlines():
        job, state, exit_code = line.split("|")
        if job == job_id:
            rows.append({"state": state.split()[0], "exit_code": exit_code})
    return rows


def in_queue(job_id: str) -> bool:
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    return bool(result.stdout.strip())


class SlurmEngine:
    name = "slurm"
    requeues_itself = True
    needs_image = False
    snapshots_code = True

    def missing(self, resources: dict) -> list[str]:
        return [] if shutil.which("sbatch") else ["sbatch on PATH (run ops on a SLURM login node)"]

    def preflight(self, resources: dict) -> None:
        if self.missing(resources):
            raise OpsError("--engine slurm: sbatch is not on PATH; run ops on a SLURM login node")

    def describe(self, launch: Launch) -> str:
        job_name = launch.run_dir.name
        return f"with sbatch (submitit), run dir {launch.run_dir}:\n" + sbatch_script(launch, job_name)

    def submit(self, launch: Launch) -> str:
        return self.submit_many([launch])[0]

    def submit_many(self, launches: list[Launch]) -> list[str]:
        """One sbatch call; several launches become one job array (they share the resources)."""
        first = launches[0]
        # An array's files live with its first run; each run dir gets a pointer to them.
        folder = first.run_dir / SUBMITIT_FOLDER
        slurm = executor(
            folder, first.resources, first.run_dir.name if len(launches) == 1 else first.run_dir.name + "-sweep"
        )
        runs = [SlurmRun(str(launch.run_dir), str(launch.code_dir) if launch.code_dir else None) for launch in launches]
        with slurm.batch():
            jobs = [slurm.submit(run) for run in runs]
        for launch, job in zip(launches, jobs):
            write_json(
                launch.run_dir / SLURM_FILE, {"job_id": job.job_id, "folder": str(folder), "submitted_at": time.time()}
            )
        return [job.job_id for job in jobs]

    def recorded_job(self, run_dir: Path) -> str | None:
        job_id = (read_json(run_dir / SLURM_FILE) or {}).get("job_id")
        return job_id if isinstance(job_id, str) else None

    def state(self, run: Run) -> EngineState:
        attempts = sacct(run.engine_job_id)
        if not attempts:
            return EngineState("QUEUED", None, "not in sacct yet")
        last = attempts[-1]
        state = SLURM_STATES.get(last["state"], "UNKNOWN")
        if state == "QUEUED" and len(attempts) > 1:
            state = "PREEMPTED"  # requeued after a preemption or a time limit, waiting to run again
        exit_code = int(last["exit_code"].split(":")[0]) if last["exit_code"] else None
        detail = f"SLURM {last['state']}, exit code {last['exit_code']}"
        if len(attempts) > 1:
            detail += f", {len(attempts) - 1} requeue(s)"
        return EngineState(state, exit_code, detail, requeues=len(attempts) - 1)

    def logs(self, run: Run, offset: int = 0) -> tuple[str, int]:
        return read_from(self.log_path(run), offset)

    def log_path(self, run: Run) -> Path:
        pointer = read_required(Path(run.run_dir) / SLURM_FILE)
        from submitit.core.utils import JobPaths  # heavy, as in executor()

        return JobPaths(Path(pointer["folder"]), job_id=run.engine_job_id, task_id=0).stdout

    def cancel(self, run: Run, grace_seconds: float) -> None:
        # scancel: SLURM sends SIGTERM (the trainer checkpoints), then SIGKILL after its KillWait.
        # sacct says CANCELLED at once; the job leaves squeue only when its processes are gone.
        subprocess.run(["scancel", run.engine_job_id], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + max(grace_seconds, 5) + 60
        while time.monotonic() < deadline and in_queue(run.engine_job_id):
            time.sleep(0.5)

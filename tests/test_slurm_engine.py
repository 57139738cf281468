"""`ops submit --engine slurm` against a real single-node SLURM (tests/slurm_cluster.py)."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.ops_project import git, metrics_steps, ops, ops_json, registry_rows, wait_for, write_misfit_checkpoint

# One thread everywhere: bitwise comparisons need the same reduction order in every process.
SLURM = [
    "--engine",
    "slurm",
    "--set",
    "resources.slurm.cpus_per_task=1",
    "--set",
    "resources.slurm.time_minutes=20",
    "--set",
    "resources.slurm.setup=['export OMP_NUM_THREADS=1']",
]


@pytest.fixture
def slurm_project(ops_project, slurm_cluster):
    return ops_project


def wait_ok(root: Path, ops_id: str, expected: int = 0) -> dict:
    result = ops(root, "wait", ops_id, "--interval", "1", timeout=600)
    assert result.returncode == expected, result.stdout + result.stderr + ops(root, "monitor", ops_id, "--logs").stdout
    return ops_json(root, "monitor", ops_id, "--logs", "--lines", "200")


def reference_run(run_dir: Path, out: Path) -> dict:
    """The same config trained in one go, without SLURM."""
    env = {"OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "diffusion", "train", str(run_dir / "config.yaml"), "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        env={**__import__("os").environ, **env},
    )
    return torch.load(out / "checkpoints/latest.pt", weights_only=False)


def test_a_run_goes_through_slurm_to_success(slurm_project):
    root = slurm_project
    run = ops_json(root, "submit", "tiny", *SLURM)["runs"][0]
    assert run["engine"] == "slurm" and run["state"] in ("QUEUED", "RUNNING")
    assert run["engine_job_id"].isdigit()
    view = wait_ok(root, run["ops_id"])
    assert view["state"] == "SUCCEEDED" and view["progress"]["step"] == 8
    assert "completed: finished all steps" in view["log_tail"]
    run_dir = Path(run["run_dir"])
    for name in (
        "config.yaml",
        "provenance.json",
        "diff.patch",
        "metrics.jsonl",
        "summary.json",
        "job.json",
        "code/configs/jobs/tiny.yaml",
    ):
        assert (run_dir / name).exists(), name
    [row] = registry_rows(root)
    assert (row["state"], row["engine"], row["engine_job_id"]) == ("SUCCEEDED", "slurm", run["engine_job_id"])
    sacct = subprocess.run(
        ["sacct", "-j", run["engine_job_id"], "-X", "-n", "-P", "-o", "State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sacct == ["COMPLETED"]


def test_dry_run_prints_the_sbatch_script_and_writes_nothing(slurm_project):
    root = slurm_project
    result = ops(
        root,
        "submit",
        "tiny",
        *SLURM,
        "--set",
        "resources.slurm.partition=debug",
        "--set",
        "resources.slurm.mem_gb=2",
        "--set",
        "resources.slurm.signal_delay_s=30",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    for line in (
        "#SBATCH --partition=debug",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=2048M",
        "#SBATCH --signal=USR2@30",
        "#SBATCH --time=20",
        "export OMP_NUM_THREADS=1",
        "submitit.core._submit",
    ):
        assert line in result.stdout, line
    assert not (root / "runs").exists()


def test_preemption_checkpoints_requeues_and_ends_equal_to_an_uninterrupted_run(slurm_project, tmp_path):
    root = slurm_project
    run = ops_json(root, "submit", "tiny", *SLURM, "--set", "train.epochs=100", "--set", "train.max_steps=40")["runs"][
        0
    ]
    run_dir = Path(run["run_dir"])
    wait_for(lambda: metrics_steps(run_dir) >= 5, timeout=300)
    subprocess.run(["scancel", "--signal=USR2", run["engine_job_id"]], check=True)
    seen = []

    def running_again() -> bool:
        view = ops_json(root, "monitor", run["ops_id"])
        seen.append(view["state"])
        return view["requeues"] >= 1 and view["state"] in ("RUNNING", "SUCCEEDED")

    wait_for(running_again, timeout=300, interval=0.2)
    assert "PREEMPTED" in seen, seen  # while it waited in the queue to run again
    view = wait_ok(root, run["ops_id"])
    assert view["state"] == "SUCCEEDED" and view["requeues"] >= 1
    log = view["log_tail"]
    assert "received SIGUSR2" in log and "resumed from" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 40

    resumed = torch.load(run_dir / "checkpoints/latest.pt", weights_only=False)
    reference = reference_run(run_dir, tmp_path / "reference")
    for key in ("model", "ema"):
        for name, value in reference[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"


def test_two_tasks_train_data_parallel_like_one_process(slurm_project, tmp_path):
    root = slurm_project
    run = ops_json(
        root, "submit", "tiny", *SLURM, "--set", "resources.slurm.tasks_per_node=2", "--set", "train.max_steps=6"
    )["runs"][0]
    view = wait_ok(root, run["ops_id"])
    assert "rank 0 of 2" in view["log_tail"]
    parallel = torch.load(Path(run["run_dir"]) / "checkpoints/latest.pt", weights_only=False)
    reference = reference_run(Path(run["run_dir"]), tmp_path / "reference")
    assert parallel["step"] == reference["step"] == 6
    for name, value in reference["model"].items():
        torch.testing.assert_close(parallel["model"][name], value, rtol=1e-4, atol=1e-5)


def test_cancel_and_failure(slurm_project):
    root = slurm_project
    run = ops_json(root, "submit", "tiny", *SLURM, "--set", "train.epochs=1000")["runs"][0]
    wait_for(lambda: metrics_steps(Path(run["run_dir"])) >= 2, timeout=300)
    cancelled = ops_json(root, "cancel", run["ops_id"], "--grace", "10")
    assert cancelled["state"] == "CANCELLED"
    leftover = subprocess.run(["pgrep", "-f", run["run_dir"]], capture_output=True, text=True).stdout
    assert leftover == ""

    write_misfit_checkpoint(root / "broken.pt")  # loads, fits no network: fails at run time
    failing = ops_json(
        root,
        "submit",
        "tiny",
        *SLURM,
        "--set",
        "run.task=sample",
        "--set",
        f"run.sample.checkpoint={root / 'broken.pt'}",
    )["runs"][0]
    view = wait_ok(root, failing["ops_id"], expected=1)
    assert view["state"] == "FAILED" and "Traceback" in view["log_tail"]
    assert view["detail"].startswith("SLURM FAILED, exit code 1")
    assert "SLURM FAILED" in ops(root, "monitor", failing["ops_id"]).stdout


def test_a_sweep_is_one_job_array(slurm_project):
    root = slurm_project
    runs = ops_json(root, "submit", "tiny", *SLURM, "--sweep", "train.max_steps=1,2,3")["runs"]
    array_ids = {run["engine_job_id"].split("_")[0] for run in runs}
    assert len(runs) == 3 and len(array_ids) == 1
    assert sorted(run["engine_job_id"].split("_")[1] for run in runs) == ["0", "1", "2"]
    for run, steps in zip(runs, (1, 2, 3)):
        assert wait_ok(root, run["ops_id"])["progress"]["step"] == steps


def test_a_queued_job_runs_the_code_as_submitted(slurm_project):
    root = slurm_project
    shutil.copytree(REPO / "diffusion", root / "diffusion", ignore=shutil.ignore_patterns("__pycache__"))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "vendor the diffusion package")
    run = ops_json(
        root,
        "submit",
        "tiny",
        *SLURM,
        "--set",
        "train.max_steps=2",
        "--set",
        "resources.slurm.additional_parameters={hold: true}",
    )["runs"][0]
    assert run["state"] == "QUEUED"
    # While it waits, the working tree changes in a way that would make the run fail.
    train = root / "diffusion/train.py"
    train.write_text(train.read_text().replace("def train_loop(", "def train_loop_renamed("))
    subprocess.run(["scontrol", "release", run["engine_job_id"]], check=True)
    view = wait_ok(root, run["ops_id"])
    assert view["state"] == "SUCCEEDED"
    assert "def train_loop(" in (Path(run["run_dir"]) / "code/diffusion/train.py").read_text()


@pytest.mark.parametrize("moment", ["completed: finished all steps", "Exiting after successful completion"])
def test_a_late_signal_cannot_fail_or_requeue_a_completed_run(slurm_project, moment):
    """USR2 (what SLURM sends for a preemption or a time limit) the moment the log says the run has
    completed: the job, ops and the experiment log still say SUCCEEDED."""
    from ops.engines.slurm import SlurmEngine
    from ops.registry import Run

    root = slurm_project
    run = ops_json(root, "submit", "tiny", *SLURM, "--set", "train.max_steps=20", "--set", "train.max_minutes=null")[
        "runs"
    ][0]
    log = SlurmEngine().log_path(
        Run(
            ops_id=run["ops_id"],
            name="tiny",
            engine="slurm",
            run_dir=run["run_dir"],
            engine_job_id=run["engine_job_id"],
        )
    )
    wait_for(lambda: log.is_file() and moment in log.read_text(errors="replace"), timeout=300, interval=0.02)
    subprocess.run(["scancel", "--signal=USR2", run["engine_job_id"]], capture_output=True)
    view = wait_ok(root, run["ops_id"])
    assert view["state"] == "SUCCEEDED" and view["exit_code"] == 0, view
    assert json.loads((Path(run["run_dir"]) / "summary.json").read_text())["status"] == "completed"
    assert "**Result: SUCCEEDED**" in (root / "EXPERIMENT_LOG.md").read_text()
    assert view["requeues"] == 0


def test_a_requeue_by_sigterm_says_so_in_a_line_and_the_run_ends_whole(slurm_project):
    """`scontrol requeue` (SIGTERM, as a default preemption sends) mid-run: no traceback, one plain
    line, the job resumes, and ops shows the whole run: its first start, its final step."""
    root = slurm_project
    run = ops_json(
        root,
        "submit",
        "tiny",
        *SLURM,
        "--set",
        "train.epochs=100",
        "--set",
        "train.max_steps=150",
        "--set",
        "train.checkpoint_every_steps=5",
        "--set",
        "train.log_every=7",
    )["runs"][0]
    run_dir = Path(run["run_dir"])
    wait_for(lambda: metrics_steps(run_dir) >= 14, timeout=300)
    started = registry_rows(root)[0]["started_at"]
    subprocess.run(["scontrol", "requeue", run["engine_job_id"]], check=True)
    view = wait_ok(root, run["ops_id"])
    log = view["log_tail"]
    assert view["state"] == "SUCCEEDED" and view["requeues"] >= 1, view
    assert "Traceback" not in log and "(cancelled?)" not in log
    assert "[ops] checkpointed on SIGTERM: SLURM is cancelling or requeueing job" in log
    assert view["progress"]["step"] == 150
    [row] = registry_rows(root)
    assert row["started_at"] == started and view["elapsed_seconds"] >= row["finished_at"] - started - 1


def test_two_preemption_notices_checkpoint_once_and_the_job_requeues(slurm_project):
    root = slurm_project
    run = ops_json(
        root,
        "submit",
        "tiny",
        *SLURM,
        "--set",
        "train.epochs=100",
        "--set",
        "train.max_steps=80",
        "--set",
        "train.log_every=1",
    )["runs"][0]
    wait_for(lambda: metrics_steps(Path(run["run_dir"])) >= 20, timeout=300)
    for _ in range(2):
        subprocess.run(["scancel", "--signal=USR2", run["engine_job_id"]], check=True)
    # While it waits for its requeue, resuming by hand would start a second job on the run dir.
    for _ in range(100):
        view = ops_json(root, "monitor", run["ops_id"])
        if view["state"] != "RUNNING":
            break
        time.sleep(0.2)
    if view["state"] == "PREEMPTED":
        refused = ops(root, "resume", run["ops_id"])
        assert refused.returncode == 2 and "resumes by itself" in refused.stderr
    view = wait_ok(root, run["ops_id"])
    assert view["state"] == "SUCCEEDED" and view["requeues"] >= 1 and view["progress"]["step"] == 80
    assert "Exited with exit code 140" not in view["log_tail"]

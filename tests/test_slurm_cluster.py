"""The real single-node SLURM cluster that the SLURM engine tests run on (see tests/slurm_cluster.py)."""

import os
import subprocess
import time

import pytest

from tests.slurm_cluster import SlurmCluster

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}


def slurm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env={**os.environ, **cluster.env}, capture_output=True, text=True, check=check, timeout=60
    )


def submit(cluster, *args: str) -> int:
    return int(slurm(cluster, "sbatch", "--parsable", "-p", cluster.partition, *args).stdout.strip().split(";")[0])


def wait_for(what: str, ready, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
    return value


def final_accounting(cluster, job_id: int) -> tuple[str, str]:
    """(State, ExitCode) of the job once sacct has it in a final state: accounting lags a second or two."""

    def record():
        lines = slurm(cluster, "sacct", "-j", str(job_id), "-n", "-X", "-P", "-o", "State,ExitCode").stdout.split()
        # A requeued job has a line per run; the last is the current one.
        state, exit_code = lines[-1].split("|") if lines else ("", "")
        return (state.split()[0], exit_code) if state.split() and state.split()[0] in FINAL_STATES else None

    return wait_for(f"job {job_id} to reach a final state in sacct", record)


def in_queue(cluster, job_id: int) -> bool:
    return bool(slurm(cluster, "squeue", "-h", "-j", str(job_id), "-o", "%T", check=False).stdout.strip())


def test_sbatch_wait_runs_the_job(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    result = slurm(
        slurm_cluster,
        "sbatch",
        "--wait",
        "-p",
        slurm_cluster.partition,
        "-o",
        str(out),
        "--wrap",
        "echo hello from $SLURM_JOB_ID",
    )
    job_id = int(result.stdout.split()[-1])
    assert out.read_text().strip() == f"hello from {job_id}"


def test_sacct_reports_completed(slurm_cluster, tmp_path):
    job_id = submit(slurm_cluster, "--wait", "-o", str(tmp_path / "out.txt"), "--wrap", "true")
    assert final_accounting(slurm_cluster, job_id) == ("COMPLETED", "0:0")


def test_sacct_reports_failed_with_exit_code(slurm_cluster, tmp_path):
    result = slurm(
        slurm_cluster,
        "sbatch",
        "--parsable",
        "--wait",
        "-p",
        slurm_cluster.partition,
        "-o",
        str(tmp_path / "out.txt"),
        "--wrap",
        "exit 3",
        check=False,
    )
    assert result.returncode == 3  # sbatch --wait exits with the job's exit code
    job_id = int(result.stdout.strip().split(";")[0])
    assert final_accounting(slurm_cluster, job_id) == ("FAILED", "3:0")


def test_signal_reaches_the_job_script(slurm_cluster, tmp_path):
    started, marker = tmp_path / "started", tmp_path / "marker"
    script = tmp_path / "job.sh"
    # `wait` on a background sleep returns as soon as a trapped signal arrives; a foreground sleep would not.
    script.write_text(f"""#!/bin/bash
trap 'echo "USR2 in $SLURM_JOB_ID" > {marker}; exit 0' USR2
touch {started}
sleep 60 &
wait $!
""")
    job_id = submit(slurm_cluster, "-o", str(tmp_path / "out.txt"), str(script))
    try:
        # The trap is set before `started` exists, so the signal cannot arrive too early.
        wait_for("the job to start", started.exists)
        slurm(slurm_cluster, "scancel", "--signal=USR2", "--full", str(job_id))
        wait_for("the marker the trap writes", marker.exists, timeout=10)
        assert marker.read_text().strip() == f"USR2 in {job_id}"
        assert final_accounting(slurm_cluster, job_id) == ("COMPLETED", "0:0")
    finally:
        slurm(slurm_cluster, "scancel", str(job_id), check=False)


def test_requeue_runs_the_job_again(slurm_cluster, tmp_path):
    starts = tmp_path / "starts.txt"
    script = tmp_path / "job.sh"
    # SLURM_RESTART_COUNT is unset on the first run. Only the first run waits, to be requeued.
    script.write_text(f"""#!/bin/bash
echo "start ${{SLURM_RESTART_COUNT:-0}}" >> {starts}
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then sleep 60; fi
""")
    job_id = submit(slurm_cluster, "--requeue", "--open-mode=append", "-o", str(tmp_path / "out.txt"), str(script))
    try:
        wait_for("the first run", starts.exists)
        slurm(slurm_cluster, "scontrol", "requeue", str(job_id))
        # A requeued job may start again only after AuthInfo's cred_expire (5 s here).
        wait_for("the second run to finish", lambda: not in_queue(slurm_cluster, job_id), timeout=25)
        assert starts.read_text().splitlines() == ["start 0", "start 1"]
        assert final_accounting(slurm_cluster, job_id) == ("COMPLETED", "0:0")
    finally:
        slurm(slurm_cluster, "scancel", str(job_id), check=False)


def test_started_cluster_is_configured_for_the_engine(slurm_cluster):
    if not isinstance(slurm_cluster, SlurmCluster):
        pytest.skip("an external cluster is configured by whoever runs it")
    config = slurm(slurm_cluster, "scontrol", "show", "config").stdout
    settings = {
        key.strip(): value.strip()
        for key, value in (line.split("=", 1) for line in config.splitlines() if " = " in line)
    }
    assert settings["SelectType"] == "select/cons_tres"
    assert settings["JobRequeue"] == "1"
    assert settings["AccountingStorageType"] == "accounting_storage/slurmdbd"
    node = slurm(slurm_cluster, "scontrol", "show", "node").stdout
    assert f"CPUTot={os.cpu_count()}" in node

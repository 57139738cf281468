"""ops under concurrency and damaged state, with real processes: two resumes at once, a second
trainer on a run dir, a submit killed at the worst moment, a garbage registry, a truncated job.json.
"""

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_diffusion
from tests.ops_project import metrics_steps, ops, ops_json, registry_rows, wait_for

RESTORED = ("ops_id", "name", "engine", "engine_job_id", "state", "run_dir", "git_commit", "created_at", "started_at",
            "finished_at", "exit_code", "requeues", "sweep", "overrides", "github_issue", "journal_post", "detail",
            "submitter")


def start_ops(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ops", *args], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_resumes_at_once_start_one_trainer(ops_project):
    root = ops_project
    run = ops_json(root, "submit", "tiny", "--set", "run.train.epochs=400", "--set", "run.train.log_every=1",
                   "--set", "run.train.checkpoint_every_steps=5")["runs"][0]
    run_dir = Path(run["run_dir"])
    for _ in range(3):  # rounds: the race is a matter of timing
        wait_for(lambda: metrics_steps(run_dir) >= 2)
        assert ops(root, "cancel", run["ops_id"], "--grace", "30").returncode == 0
        resumes = [start_ops(root, "resume", run["ops_id"], "--json") for _ in range(2)]
        results = [(process.wait(120), process.communicate()) for process in resumes]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        [loser] = [err.strip() for code, (_, err) in results if code == 2]
        # What the loser saw depends on when it looked: the claim taken, or the run already started.
        assert loser.startswith((f"error: {run['ops_id']} is being resumed by another ops",
                                 f"error: {run['ops_id']}: is RUNNING; nothing to resume")), loser
        assert len(loser.splitlines()) == 1
    wait_for(lambda: ops_json(root, "monitor", run["ops_id"])["state"] == "RUNNING")
    assert ops(root, "cancel", run["ops_id"], "--grace", "30").returncode == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one trainer: every step logged once, in order
    assert ops_json(root, "monitor", run["ops_id"])["requeues"] == 3


def test_a_second_trainer_on_a_run_dir_exits_2_naming_the_holder(tiny_config, tmp_path):
    from tests.conftest import write_config

    tiny_config.train.epochs = 1000
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "diffusion", "train", write_config(tiny_config, tmp_path / "c.yaml"),
                              "--out", run], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file())
        before = (run / "metrics.jsonl").read_text()
        second = run_diffusion("train", run)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"error: {run}: is being written by pid {first.pid} on {__import__('socket').gethostname()}; wait for it "
            "to end, or stop it (`ops cancel`, or kill that process)"]
        assert (run / "metrics.jsonl").read_text().startswith(before)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
    resumed = run_diffusion("train", run, "--set", "train.max_steps=1")  # the lock went with the process
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM])
def test_a_submit_killed_before_its_runs_start_leaves_them_failed_and_resumable(ops_project, kill):
    root = ops_project
    submit = start_ops(root, "submit", "tiny", "--sweep", "run.train.max_steps=1,2,3,4,5,6,7,8")
    def rows_so_far() -> list[dict]:
        try:
            return registry_rows(root)
        except sqlite3.OperationalError:  # the registry is being created at this very moment
            return []

    rows = wait_for(rows_so_far, interval=0.01)  # the worst moment: rows, no engine job yet
    submit.send_signal(kill)
    submit.communicate(timeout=60)
    killed = registry_rows(root)
    assert killed and all(row["engine_job_id"] is None for row in killed), killed
    if kill == signal.SIGTERM:  # the submit marked them itself on its way out
        assert {row["state"] for row in killed} == {"FAILED"}
        assert {row["detail"] for row in killed} == {"not started: interrupted"}
    else:  # nothing could mark them: reconcile finds the orphans
        assert {row["state"] for row in killed} == {"QUEUED"}
        synced = ops_json(root, "sync")
        assert synced["problems"] == []
        states = {run["ops_id"]: run for run in synced["runs"]}
        assert len(states) >= len(rows) and {run["state"] for run in states.values()} == {"FAILED"}
        assert all(run["detail"].startswith("not started: the ops that was starting it (pid ") for run in states.values())
    orphan = registry_rows(root)[0]["ops_id"]
    assert ops(root, "cancel", orphan).returncode == 0  # says it is already FAILED; no traceback
    resumed = ops_json(root, "resume", orphan)
    assert resumed["engine_job_id"] is not None
    assert ops(root, "wait", orphan, "--interval", "0.3").returncode == 0


def test_a_garbage_registry_is_one_line_and_sync_rebuilds_every_field(ops_project):
    root = ops_project
    runs = [ops_json(root, "submit", "tiny", "--set", f"run.train.max_steps={steps}")["runs"][0] for steps in (1, 2, 3)]
    for run in runs:
        assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    assert ops(root, "sync").returncode == 0
    before = {row["ops_id"]: {key: row[key] for key in RESTORED} for row in registry_rows(root)}

    registry = root / "runs/registry.sqlite"
    registry.write_bytes(b"this is not a database" * 100)
    for command in (["list"], ["monitor", "latest"], ["submit", "tiny", "--dry-run"]):
        result = ops(root, *command)
        if command[0] == "submit":
            continue  # a dry run needs no registry
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"error: {registry}: damaged, not a run registry")
        assert "`ops sync` moves it aside and rebuilds it from the run dirs" in result.stderr
    synced = ops_json(root, "sync")
    assert len(synced["problems"]) == 1 and "moved it to" in synced["problems"][0]
    assert sorted(synced["rebuilt"]) == sorted(before)
    assert list(root.glob("runs/registry.sqlite.damaged-*"))
    after = {row["ops_id"]: {key: row[key] for key in RESTORED} for row in registry_rows(root)}
    assert after == before

    log_before = (root / "EXPERIMENT_LOG.md").read_text()
    posts_before = {path: path.read_text() for path in root.glob("docs/blog/posts/*.md")}
    (Path(runs[1]["run_dir"]) / "job.json").write_text('{"ops_id": "tiny-')  # torn
    registry.unlink()
    synced = ops_json(root, "sync")
    assert synced["problems"] == [f"{runs[1]['run_dir']}/job.json: damaged (not a complete ops record); skipped, "
                                  "so this run is not in the registry"]
    assert sorted(synced["rebuilt"]) == sorted([runs[0]["ops_id"], runs[2]["ops_id"]])
    assert {row["ops_id"] for row in registry_rows(root)} == {runs[0]["ops_id"], runs[2]["ops_id"]}
    # Follow-ups done before are not done again: the log and the posts (with their durations) stand.
    assert (root / "EXPERIMENT_LOG.md").read_text() == log_before
    assert {path: path.read_text() for path in root.glob("docs/blog/posts/*.md")} == posts_before

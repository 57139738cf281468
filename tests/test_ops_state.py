"""ops under concurrency and damaged state, with real processes: two resumes at once, a second
trainer on a run dir, a submit killed at the worst moment, a garbage registry, a truncated job.json.
"""

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_diffusion
from tests.ops_project import metrics_steps, ops, ops_json, registry_rows, wait_for

RESTORED = (
    "ops_id",
    "name",
    "engine",
    "engine_job_id",
    "state",
    "run_dir",
    "git_commit",
    "created_at",
    "started_at",
    "finished_at",
    "exit_code",
    "requeues",
    "sweep",
    "overrides",
    "github_issue",
    "journal_post",
    "detail",
    "submitter",
)


def start_ops(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ops", *args], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_resumes_at_once_start_one_trainer(ops_project):
    root = ops_project
    run = ops_json(
        root,
        "submit",
        "tiny",
        "--set",
        "run.train.epochs=400",
        "--set",
        "run.train.log_every=1",
        "--set",
        "run.train.checkpoint_every_steps=5",
    )["runs"][0]
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
        assert loser.startswith(
            (
                f"error: {run['ops_id']} is being resumed by another ops",
                f"error: {run['ops_id']}: is RUNNING; nothing to resume",
            )
        ), loser
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
    first = subprocess.Popen(
        [sys.executable, "-m", "diffusion", "train", write_config(tiny_config, tmp_path / "c.yaml"), "--out", run],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file())
        before = (run / "metrics.jsonl").read_text()
        second = run_diffusion("train", run)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"error: {run}: is being written by pid {first.pid} on {__import__('socket').gethostname()}; wait for it "
            "to end, or stop it (`ops cancel`, or kill that process)"
        ]
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
        assert all(
            run["detail"].startswith("not started: the ops that was starting it (pid ") for run in states.values()
        )
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
    assert synced["problems"] == [
        f"{runs[1]['run_dir']}/job.json: damaged (not a complete ops record); skipped, "
        "so this run is not in the registry"
    ]
    assert sorted(synced["rebuilt"]) == sorted([runs[0]["ops_id"], runs[2]["ops_id"]])
    assert {row["ops_id"] for row in registry_rows(root)} == {runs[0]["ops_id"], runs[2]["ops_id"]}
    # Follow-ups done before are not done again: the log and the posts (with their durations) stand.
    assert (root / "EXPERIMENT_LOG.md").read_text() == log_before
    assert {path: path.read_text() for path in root.glob("docs/blog/posts/*.md")} == posts_before


def kill_when(root: Path, pattern: str, process: subprocess.Popen, signum: int) -> None:
    """Send `signum` to `process` the moment a file matching `pattern` appears under `root`."""
    wait_for(lambda: any(root.glob(pattern)) or process.poll() is not None, interval=0.005)
    process.send_signal(signum)
    process.communicate(timeout=120)


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_a_submit_interrupted_after_the_engine_took_its_runs_keeps_them(ops_project, kill):
    """Killed the moment the engine wrote its record: the runs are the engine's, never 'not started'."""
    root = ops_project
    submit = start_ops(root, "submit", "tiny", "--sweep", "run.train.max_steps=1,2")
    kill_when(root, "runs/*/local_process.json", submit, kill)
    synced = ops_json(root, "sync")
    for row in registry_rows(root):
        if row["engine_job_id"] is None:  # never handed over: interrupted (SIGTERM) or an orphan (SIGKILL)
            assert row["state"] == "FAILED" and not (Path(row["run_dir"]) / "local_process.json").exists()
            continue
        assert ops(root, "wait", row["ops_id"], "--interval", "0.3").returncode == 0, synced
    assert any(row["engine_job_id"] for row in registry_rows(root))


def test_a_registry_from_a_newer_ops_or_damaged_inside_is_one_line(ops_project):
    root = ops_project
    run = ops_json(root, "submit", "tiny", "--set", "run.train.max_steps=1")["runs"][0]
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    registry = root / "runs/registry.sqlite"
    db = sqlite3.connect(registry)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    result = ops(root, "list")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "written by a newer ops (schema 99" in result.stderr
    assert ops(root, "sync").returncode == 2 and registry.is_file()  # not moved aside: it is not damaged

    db = sqlite3.connect(registry)
    db.execute("PRAGMA user_version = 6")
    db.execute("CREATE TABLE filler (x TEXT)")
    db.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,) for _ in range(400)])
    db.commit()
    db.close()
    data = bytearray(registry.read_bytes())
    data[4096 * 20 : 4096 * 21] = b"\xde\xad" * 2048  # a page in the middle, past what opening reads
    registry.write_bytes(bytes(data))
    listed = ops(root, "list")
    assert listed.returncode in (0, 2) and "Traceback" not in listed.stderr
    synced = ops(root, "sync", "--json")
    assert synced.returncode == 0, synced.stderr
    assert [row["ops_id"] for row in registry_rows(root)] == [run["ops_id"]]


def test_resumed_then_rebuilt_its_end_is_recorded_again(ops_project):
    root = ops_project
    run = ops_json(
        root,
        "submit",
        "tiny",
        "--set",
        "run.train.epochs=400",
        "--set",
        "run.train.max_steps=60",
        "--set",
        "run.train.log_every=1",
    )["runs"][0]
    wait_for(lambda: metrics_steps(run["run_dir"]) >= 2)
    assert ops(root, "cancel", run["ops_id"], "--grace", "30").returncode == 0
    assert ops(root, "sync").returncode == 0
    assert "**Result: CANCELLED**" in (root / "EXPERIMENT_LOG.md").read_text()
    assert ops(root, "resume", run["ops_id"]).returncode == 0
    for path in root.glob("runs/registry.sqlite*"):
        path.unlink()
    assert ops(root, "sync").returncode == 0
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    log = (root / "EXPERIMENT_LOG.md").read_text()
    assert "**Result: SUCCEEDED**" in log and "**Result: CANCELLED**" not in log


def test_a_run_dir_gone_while_running_ends_the_run(ops_project, tmp_path):
    root = ops_project
    run = ops_json(root, "submit", "tiny", "--set", "run.train.epochs=400", "--set", "run.train.log_every=1")["runs"][0]
    wait_for(lambda: metrics_steps(run["run_dir"]) >= 2)
    Path(run["run_dir"]).rename(tmp_path / "moved")
    try:
        view = ops_json(root, "monitor", run["ops_id"])
        assert view["state"] == "FAILED" and "is gone (moved or deleted)" in view["detail"]
        assert ops(root, "wait", run["ops_id"], "--timeout", "30").returncode == 1
        cancelled = ops(root, "cancel", run["ops_id"])
        assert cancelled.returncode == 0 and "already FAILED" in cancelled.stdout
    finally:
        pid = json.loads((tmp_path / "moved/local_process.json").read_text())["pid"]
        # os.killpg, not `kill -TERM -PID`: procps-ng 4.0.2's kill reads a negative PID that is no
        # signal number as -1 and signals every process (it took CI down with it).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)


def test_damaged_provenance_and_followups_records_are_reported_not_fatal(ops_project):
    root = ops_project
    run = ops_json(root, "submit", "tiny", "--set", "run.train.max_steps=1")["runs"][0]
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    run_dir = Path(run["run_dir"])
    (run_dir / "provenance.json").write_text('{"git": "abc"}')
    (run_dir / "followups.json").write_text('{"journal_post": ["a"], "nonsense": 1}')
    for path in root.glob("runs/registry.sqlite*"):
        path.unlink()
    synced = ops(root, "sync", "--json")
    assert synced.returncode == 0, synced.stderr
    problems = json.loads(synced.stdout)["problems"]
    assert any("provenance.json: missing or damaged" in problem for problem in problems)
    assert ops(root, "journal", run["ops_id"]).returncode == 0


def test_the_journal_post_of_a_run_is_the_same_file_in_any_time_zone(ops_project, monkeypatch):
    root = ops_project
    run = ops_json(root, "submit", "tiny", "--set", "run.train.max_steps=1")["runs"][0]
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    posts = sorted(root.glob("docs/blog/posts/*.md"))
    for zone in ("Pacific/Pago_Pago", "Pacific/Kiritimati"):
        monkeypatch.setenv("TZ", zone)
        assert ops(root, "journal", run["ops_id"]).returncode == 0
    assert sorted(root.glob("docs/blog/posts/*.md")) == posts

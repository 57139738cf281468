"""`ops` end to end on the local engine: real processes, a real SQLite registry, real git repos."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.ops_project import (
    git,
    make_project,
    metrics_steps,
    ops,
    ops_json,
    registry_rows,
    wait_for,
    write_misfit_checkpoint,
)

RUN_FIELDS = {
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
}
PROGRESS_FIELDS = {"step", "total_steps", "epoch", "total_epochs", "loss", "it_per_s", "eta_seconds", "percent"}


def group_processes(pgid: int) -> list[psutil.Process]:
    alive = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except ProcessLookupError:
            pass
    return alive


def test_submit_runs_to_success_and_records_it(ops_project):
    root = ops_project
    submitted = ops_json(root, "submit", "tiny")["runs"]
    assert len(submitted) == 1
    run = submitted[0]
    assert RUN_FIELDS <= set(run)
    assert run["state"] == "RUNNING"
    # The CLI has exited; the run goes on in its own session.
    process = psutil.Process(int(run["engine_job_id"]))
    assert process.is_running() and os.getsid(process.pid) == process.pid

    waited = ops(root, "wait", run["ops_id"], "--interval", "0.3")
    assert waited.returncode == 0, waited.stdout + waited.stderr

    run_dir = Path(run["run_dir"])
    for name in (
        "config.yaml",
        "provenance.json",
        "diff.patch",
        "metrics.jsonl",
        "summary.json",
        "log.txt",
        "job.json",
    ):
        assert (run_dir / name).is_file(), name
    head = git(root, "rev-parse", "HEAD")
    assert json.loads((run_dir / "provenance.json").read_text())["git"]["commit"] == head

    [row] = registry_rows(root)
    assert (row["ops_id"], row["state"], row["engine_job_id"], row["run_dir"], row["git_commit"], row["exit_code"]) == (
        run["ops_id"],
        "SUCCEEDED",
        run["engine_job_id"],
        str(run_dir),
        head,
        0,
    )

    view = ops_json(root, "monitor", run["ops_id"], "--logs")
    assert RUN_FIELDS | {"elapsed_seconds", "progress", "log_tail"} <= set(view)
    assert set(view["progress"]) == PROGRESS_FIELDS
    assert view["progress"]["step"] == view["progress"]["total_steps"] == 8
    assert view["progress"]["percent"] == 100.0
    assert "completed: finished all steps" in view["log_tail"]
    # The engine job id finds the run too.
    assert ops_json(root, "monitor", run["engine_job_id"])["ops_id"] == run["ops_id"]

    full = ops_json(root, "monitor", run["ops_id"], "--full")
    assert full["config"]["train"]["epochs"] == 2 and full["provenance"]["git"]["commit"] == head
    assert Path(full["paths"]["metrics.jsonl"]).is_file()

    log = (root / "EXPERIMENT_LOG.md").read_text()
    assert f"## {run['ops_id']} (tiny)" in log and "The loss goes down." in log
    assert "**Result: SUCCEEDED**" in log and "steps 8" in log
    listed = ops_json(root, "list")
    assert [r["ops_id"] for r in listed] == [run["ops_id"]] and RUN_FIELDS <= set(listed[0])


def test_a_failing_run_ends_failed_and_its_log_shows_the_traceback(ops_project):
    root = ops_project
    write_misfit_checkpoint(root / "broken.pt")
    run = ops_json(
        root, "submit", "tiny", "--set", "run.task=sample", "--set", f"run.sample.checkpoint={root / 'broken.pt'}"
    )["runs"][0]
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 1
    shown = ops(root, "monitor", run["ops_id"], "--logs")
    assert "FAILED" in shown.stdout and "Traceback (most recent call last)" in shown.stdout
    view = ops_json(root, "monitor", run["ops_id"], "--logs")
    assert view["state"] == "FAILED" and view["exit_code"] == 1
    assert "Result: FAILED" in (root / "EXPERIMENT_LOG.md").read_text()


def test_monitor_follow_streams_states_and_log_lines_until_the_end(ops_project):
    root = ops_project
    run = ops_json(root, "submit", "tiny")["runs"][0]
    followed = ops(root, "monitor", run["ops_id"], "--follow", "--json", "--interval", "0.2")
    assert followed.returncode == 0, followed.stderr
    events = [json.loads(line) for line in followed.stdout.splitlines()]
    states = [event["state"] for event in events if event["event"] == "state"]
    lines = [event["line"] for event in events if event["event"] == "log"]
    assert states == ["RUNNING", "SUCCEEDED"]
    # Every log line once, in order, across the polls.
    assert [line.split()[1] for line in lines if line.startswith("step ")] == [f"{i}/8" for i in range(1, 9)]
    assert "completed: finished all steps" in lines
    assert events[-1]["event"] == "end" and events[-1]["run"]["state"] == "SUCCEEDED"
    assert [r["ops_id"] for r in ops_json(root, "list", "--state", "succeeded", "--name", "ti*")] == [run["ops_id"]]
    assert ops_json(root, "list", "--state", "FAILED") == []


def test_cancel_checkpoints_then_resume_continues_and_a_hard_cancel_kills(ops_project):
    root = ops_project
    run = ops_json(root, "submit", "tiny", "--set", "train.epochs=1000")["runs"][0]
    run_dir, pgid = Path(run["run_dir"]), int(run["engine_job_id"])
    wait_for(lambda: metrics_steps(run_dir) >= 2)

    cancelled = ops_json(root, "cancel", run["ops_id"], "--grace", "60")
    assert cancelled["state"] == "CANCELLED"
    assert group_processes(pgid) == []
    # SIGTERM reached the trainer, which checkpointed and exited "preempted, resumable".
    assert json.loads((run_dir / "exit_status.json").read_text())["returncode"] == 75
    stopped_at = json.loads((run_dir / "summary.json").read_text())["step"]
    assert (run_dir / "checkpoints/latest.pt").is_file() and stopped_at >= 2

    resumed = ops_json(root, "submit", "--resume", run["ops_id"])
    assert resumed["state"] == "RUNNING" and resumed["requeues"] == 1
    assert resumed["engine_job_id"] != run["engine_job_id"]
    wait_for(lambda: metrics_steps(run_dir) > stopped_at + 2)
    assert f"at step {stopped_at} " in (run_dir / "log.txt").read_text()

    killed = ops_json(root, "cancel", run["ops_id"], "--grace", "0")
    assert killed["state"] == "CANCELLED"
    assert group_processes(int(resumed["engine_job_id"])) == []
    assert ops(root, "wait", run["ops_id"]).returncode == 3


def test_a_preempted_run_is_shown_as_such_and_resumes_to_the_same_end(ops_project):
    root = ops_project
    run = ops_json(root, "submit", "tiny", "--set", "train.epochs=1000", "--set", "train.max_steps=60")["runs"][0]
    run_dir = Path(run["run_dir"])
    wait_for(lambda: metrics_steps(run_dir) >= 3)
    os.killpg(int(run["engine_job_id"]), signal.SIGUSR1)  # what a scheduler's preemption looks like
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 75
    assert ops_json(root, "monitor", run["ops_id"])["state"] == "PREEMPTED"
    assert "_Running." in (root / "EXPERIMENT_LOG.md").read_text()  # no result until it ends

    ops_json(root, "resume", run["ops_id"])
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 60
    log = (root / "EXPERIMENT_LOG.md").read_text()
    assert log.count("**Result: SUCCEEDED**") == 1 and "steps 60" in log


def test_twenty_concurrent_submits_get_distinct_ids_and_a_consistent_registry(ops_project):
    root = ops_project
    command = [sys.executable, "-m", "ops", "submit", "tiny", "--set", "train.max_steps=1", "--json"]
    processes = [
        subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(20)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert all(process.returncode == 0 for process in processes), [
        (process.returncode, err) for process, (_, err) in zip(processes, outputs)
    ]
    ids = [json.loads(out)["runs"][0]["ops_id"] for out, _ in outputs]
    assert len(set(ids)) == 20  # the same values: the readable part is shared, the random tail tells them apart
    assert all(re.fullmatch(r"tiny-steps1-[0-9a-f]{4}", ops_id) for ops_id in ids), ids

    rows = registry_rows(root)
    assert sorted(row["ops_id"] for row in rows) == sorted(ids)
    assert len({row["run_dir"] for row in rows}) == 20 and all(Path(row["run_dir"]).is_dir() for row in rows)
    db = sqlite3.connect(root / "runs/registry.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    log = (root / "EXPERIMENT_LOG.md").read_text()
    assert all(log.count(f"## {ops_id} (tiny)") == 1 for ops_id in ids)

    def all_settled():
        return all(run["state"] in ("SUCCEEDED", "FAILED") for run in ops_json(root, "list"))

    wait_for(all_settled, timeout=600, interval=2)
    assert {run["state"] for run in ops_json(root, "list")} == {"SUCCEEDED"}


BAD_SPECS = sorted((Path(__file__).parent / "bad_specs").glob("*.yaml"))


def test_the_bad_spec_corpus_is_big_enough():
    assert len(BAD_SPECS) >= 20


@pytest.mark.parametrize("spec", BAD_SPECS, ids=lambda path: path.stem)
def test_a_bad_spec_gives_one_line_naming_the_key_and_creates_nothing(git_project, spec):
    expected = spec.read_bytes().splitlines()[0].decode().removeprefix("# expect: ")
    (git_project / "configs/jobs" / spec.name).write_bytes(spec.read_bytes())
    commands = (
        ["submit", spec.stem],
        ["submit", spec.stem, "--dry-run"],
        ["config", "show", spec.stem],
        ["config", "set", spec.stem, "hypothesis=edited"],
    )
    for command in commands:
        result = ops(git_project, *command)
        assert result.returncode == 2, command
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr
        assert re.match(rf"error: configs/jobs/{re.escape(spec.name)}(:\d+)*: ", lines[0]), lines[0]
    result = ops(git_project, "config", "validate", spec.stem)
    assert result.returncode == 1 and expected in result.stdout and len(result.stdout.splitlines()) == 1
    assert (git_project / "configs/jobs" / spec.name).read_bytes() == spec.read_bytes()
    assert not (git_project / "runs").exists() and not (git_project / "EXPERIMENT_LOG.md").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "run.train.epochs=0"], "run.train.epochs: 0 is not allowed"),
        (["--set", "train.lrr=1"], "run.train.lrr: unknown key; did you mean 'run.train.lr'?"),
        (["--sweep", "run.train.lr=1e-3,-1"], "run.train.lr: -1 is not allowed"),
        (["--engine", "kubernetes"], "engine: 'kubernetes' is not allowed"),
        (["--set", "resources.local.treads=2"], "did you mean 'resources.local.threads'?"),
        (
            ["--set", "run.model.channel_mults=[1,2"],
            "--set 'run.model.channel_mults=[1,2' (column 5): not valid YAML: "
            "expected ',' or ']', but got '<stream end>'",
        ),
        (["--set", "run.train.lr=&x 1"], "--set 'run.train.lr=&x 1' (column 1): YAML anchors and aliases"),
        (["--sweep", "run.train.lr=1e-3,{a"], "--sweep 'run.train.lr=1e-3,{a' (column 3): not valid YAML"),
    ],
)
def test_bad_overrides_submit_nothing(git_project, args, expected):
    result = ops(git_project, "submit", "tiny", *args)
    assert result.returncode == 2 and expected in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (git_project / "runs").exists()


def test_config_set_keeps_comments_and_refuses_invalid_values(git_project):
    path = git_project / "configs/jobs/tiny.yaml"
    before = path.read_text()
    result = ops(
        git_project,
        "config",
        "set",
        "tiny",
        "run.train.lr=5e-4",
        "resources.vertex.accelerator_type=NVIDIA_TESLA_V100",
        "resources.vertex.accelerator_count=1",
    )  # a GPU type needs a count (Vertex's rule)
    assert result.returncode == 0, result.stderr
    after = path.read_text()
    assert "    lr: 5e-4                   # a comment `ops config set` must keep" in after  # as typed
    assert "threads: 1      # many runs share two cores in the tests" in after
    changed = set(before.splitlines()) ^ set(after.splitlines())
    assert all("lr:" in line or "vertex" in line or "accelerator_" in line for line in changed), changed
    assert (
        ops_json(git_project, "config", "show", "tiny")["resources"]["vertex"]["accelerator_type"]
        == "NVIDIA_TESLA_V100"
    )

    for bad, message in [
        ("run.train.lr=-1", "run.train.lr: -1 is not allowed"),
        ("run.train.lrr=1", "did you mean 'run.train.lr'?"),
        ("run.model=3", "run.model: 3 is not allowed"),
    ]:
        result = ops(git_project, "config", "set", "tiny", bad)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert path.read_text() == after
    assert not list(path.parent.glob(".*tmp"))


def test_dry_run_and_sweep(ops_project):
    root = ops_project
    planned = ops_json(
        root,
        "submit",
        "tiny",
        "--dry-run",
        "--sweep",
        "run.train.lr=1e-3,1e-4",
        "--sweep",
        "run.model.channel_mults=[1,2],[1,1]",
    )
    assert planned["dry_run"] and len(planned["runs"]) == 4
    assert {
        (r["spec"]["run"]["train"]["lr"], tuple(r["spec"]["run"]["model"]["channel_mults"])) for r in planned["runs"]
    } == {(1e-3, (1, 2)), (1e-4, (1, 2)), (1e-3, (1, 1)), (1e-4, (1, 1))}
    assert "-m diffusion" in planned["runs"][0]["would_start"]
    assert not (root / "runs").exists()

    runs = ops_json(root, "submit", "tiny", "--sweep", "run.train.max_steps=1,2")["runs"]
    assert [run["sweep"] for run in runs] == [{"run.train.max_steps": "1"}, {"run.train.max_steps": "2"}]
    for run, steps in zip(runs, (1, 2)):
        assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
        assert json.loads((Path(run["run_dir"]) / "summary.json").read_text())["step"] == steps
    assert "`run.train.max_steps`: null → 2" in (root / "EXPERIMENT_LOG.md").read_text()


def test_dry_runs_show_the_whole_job_on_a_machine_without_the_engine(git_project, tmp_path):
    """No sbatch on PATH and no GCP settings: the sbatch script and the CustomJob in full, each with
    one note of what a real submit lacks; nothing written."""
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPS_")} | {"PATH": str(bare)}

    def dry_run(engine: str, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "ops", "submit", "tiny", "--engine", engine, "--dry-run", *args]
        return subprocess.run(command, cwd=git_project, env=env, capture_output=True, text=True, timeout=120)

    slurm = dry_run("slurm", "--set", "run.train.lr=2e-4", "--set", "resources.slurm.time_minutes=30")
    assert slurm.returncode == 0, slurm.stderr
    for line in ("#!/bin/bash", "#SBATCH --job-name=tiny-lr2e-4-xxxx", "#SBATCH --time=30", "submitit.core._submit"):
        assert line in slurm.stdout, line
    notes = [line for line in slurm.stdout.splitlines() if line.startswith("# note:")]
    assert notes == ["# note: a real submit from here needs sbatch on PATH (run ops on a SLURM login node)"]

    gpu = ["--set", "resources.vertex.accelerator_count=1"]
    vertex = dry_run("vertex", "--json", "--set", "resources.vertex.accelerator_type=NVIDIA_TESLA_T4", *gpu)
    assert vertex.returncode == 0, vertex.stderr
    row = json.loads(vertex.stdout)["runs"][0]
    assert row["missing"] == [
        "ops.yaml: gcp_project (or OPS_GCP_PROJECT)",
        "ops.yaml: gcs_bucket (or OPS_GCS_BUCKET)",
        "ops.yaml: image_repository (or OPS_IMAGE_REPOSITORY)",
    ]
    header, job = row["would_start"].split("\n", 1)
    assert header == "as a Vertex AI CustomJob in projects/<gcp_project>/locations/us-central1:"
    job = json.loads(job)
    (pool,) = job["job_spec"]["worker_pool_specs"]
    assert pool["machine_spec"]["accelerator_type"] == "NVIDIA_TESLA_T4"
    assert pool["container_spec"]["image_uri"] == "<image_repository>@sha256:<built at submit>"
    assert job["job_spec"]["base_output_directory"]["output_uri_prefix"].startswith("<gcs_bucket>/tiny-xxxx")
    # A misspelt accelerator is still refused in a dry run: only the missing settings are forgiven.
    refused = dry_run("vertex", "--set", "resources.vertex.accelerator_type=NVIDIA_TESLA_T5", *gpu)
    assert refused.returncode == 2 and "did you mean 'NVIDIA_TESLA_T4'?" in refused.stderr
    assert not (git_project / "runs").exists()


def test_rerun_restores_the_dirty_tree_and_refuses_a_missing_commit(ops_project):
    root = ops_project
    (root / "notes.md").write_text("# notes\nan uncommitted idea\n")
    (root / "scratch.py").write_text("print('untracked')\n")
    run = ops_json(root, "submit", "tiny", "--set", "train.max_steps=1")["runs"][0]
    assert "an uncommitted idea" in (Path(run["run_dir"]) / "diff.patch").read_text()
    assert ops(root, "wait", run["ops_id"]).returncode == 0
    git(root, "checkout", "--", "notes.md")
    (root / "scratch.py").unlink()
    (root / "later.md").write_text("later\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "later work")

    again = ops_json(root, "rerun", run["ops_id"])
    code = Path(again["run_dir"]) / "code"
    assert (code / "notes.md").read_text() == "# notes\nan uncommitted idea\n"
    assert (code / "scratch.py").is_file() and not (code / "later.md").exists()
    assert again["git_commit"] == run["git_commit"] and again["ops_id"] != run["ops_id"]
    assert ops(root, "wait", again["ops_id"]).returncode == 0

    provenance_path = Path(run["run_dir"]) / "provenance.json"
    provenance = json.loads(provenance_path.read_text())
    provenance["git"]["commit"] = "f" * 40
    provenance_path.write_text(json.dumps(provenance))
    before = sorted(p.name for p in (root / "runs").iterdir())
    refused = ops(root, "rerun", run["ops_id"])
    assert refused.returncode == 2 and "is not in" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert sorted(p.name for p in (root / "runs").iterdir()) == before


def test_sync_rebuilds_a_lost_registry_from_the_run_dirs(ops_project):
    root = ops_project
    run = ops_json(root, "submit", "tiny", "--set", "train.max_steps=1")["runs"][0]
    assert ops(root, "wait", run["ops_id"]).returncode == 0
    for path in (root / "runs").glob("registry.sqlite*"):
        path.unlink()
    assert ops_json(root, "list") == []
    synced = ops_json(root, "sync")
    assert synced["rebuilt"] == [run["ops_id"]]
    [listed] = ops_json(root, "list")
    assert listed["state"] == "SUCCEEDED" and listed["engine_job_id"] == run["engine_job_id"]
    # The results were written once, before the registry was lost; the rebuilt row does not repeat them.
    assert (root / "EXPERIMENT_LOG.md").read_text().count("**Result: SUCCEEDED**") == 1


def test_registry_migrates_an_old_schema_and_keeps_its_rows(tmp_path):
    from ops.registry import MIGRATIONS, SCHEMA_VERSION, Registry

    path = tmp_path / "registry.sqlite"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute(
        "INSERT INTO runs (ops_id, name, engine, state, run_dir, created_at, updated_at) "
        "VALUES ('old-1', 'old', 'local', 'SUCCEEDED', '/x', 1.0, 1.0)"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    registry = Registry(path)
    assert registry.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert registry.get("old-1").state == "SUCCEEDED"
    assert registry.pending_followups(["experiment_log_result"]) == ["old-1"]
    assert registry.get("old-1").detail is None  # the column added by the third migration
    assert registry.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_submit_outside_git_refuses_unless_allowed(tmp_path, mnist_root, monkeypatch):
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(mnist_root.resolve()))
    root = make_project(tmp_path / "plain", with_git=False)
    refused = ops(root, "submit", "tiny")
    assert refused.returncode == 2 and "not inside a git repository" in refused.stderr
    assert registry_rows(root) == [] and not list((root / "runs").glob("tiny-*"))
    run = ops_json(root, "submit", "tiny", "--allow-no-git", "--set", "train.max_steps=1")["runs"][0]
    assert json.loads((Path(run["run_dir"]) / "provenance.json").read_text())["git"] is None
    assert run["git_commit"] is None
    assert ops(root, "wait", run["ops_id"]).returncode == 0
    assert "no git" in (root / "EXPERIMENT_LOG.md").read_text()


def test_unknown_job_id_is_one_clear_line(git_project):
    result = ops(git_project, "monitor", "tiny-000000")
    assert result.returncode == 2 and "JOB_ID 'tiny-000000': no such run" in result.stderr


def test_resources_of_another_engine_are_named_in_a_warning(git_project):
    result = ops(git_project, "submit", "tiny", "--dry-run", "--json", "--set", "resources.slurm.cpus_per_task=4")
    assert result.returncode == 0, result.stderr
    warning = (
        "warning: --set resources.slurm.cpus_per_task=4: the run goes to the local engine, which ignores "
        "resources.slurm; add --engine slurm to use it"
    )
    assert result.stderr.strip().splitlines() == [warning]
    assert json.loads(result.stdout)["runs"][0]["warnings"] == [warning.removeprefix("warning: ")]
    result = ops(
        git_project,
        "submit",
        "tiny",
        "--dry-run",
        "--set",
        "resources.local.threads=2",
        "--sweep",
        "resources.vertex.spot=true,false",
    )
    assert result.returncode == 0 and result.stderr.count("warning:") == 2  # one per sweep value
    assert "resources.vertex.spot=false: the run goes to the local engine" in result.stderr


def test_output_to_a_pipe_never_wraps_a_line(ops_project):
    run = ops_json(ops_project, "submit", "tiny", "--set", "run.train.max_steps=2")["runs"][0]
    assert ops(ops_project, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    log_lines = (Path(run["run_dir"]) / "log.txt").read_text().splitlines()
    long_lines = [line for line in log_lines if len(line) > 80]  # rich wrapped at 80 off a terminal
    assert long_lines, log_lines  # "training on cpu: 64 examples, ..." and the step lines
    shown = ops(ops_project, "monitor", run["ops_id"], "--logs", "--lines", "50").stdout.splitlines()
    assert all(line in shown for line in long_lines), shown
    assert any(line.startswith(f"  run dir {run['run_dir']}") for line in shown)


def tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): path.read_bytes().hex()[:64] if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
        if ".git" not in path.parts
    }


@pytest.mark.parametrize(
    "command, code, line",
    [
        (["monitor", "nope"], 2, "JOB_ID 'nope': no such run"),
        (["monitor", "latest"], 2, "JOB_ID 'latest': the registry has no runs yet"),
        (["cancel", "nope"], 2, "JOB_ID 'nope': no such run"),
        (["resume", "nope"], 2, "JOB_ID 'nope': no such run"),
        (["rerun", "latest"], 2, "JOB_ID 'latest': the registry has no runs yet"),
        (["wait", "nope"], 2, "JOB_ID 'nope': no such run"),
        (["journal", "nope"], 2, "JOB_ID 'nope': no such run"),
        (["compare", "a", "b"], 2, "JOB_ID 'a': no such run"),
        (["pull", "nope"], 2, "JOB_ID 'nope': no such run"),
        (["list"], 0, ""),
        (["sync"], 0, ""),
    ],
)
def test_commands_that_only_look_write_nothing_in_a_fresh_clone(git_project, command, code, line):
    before = tree(git_project)
    result = ops(git_project, *command)
    assert result.returncode == code, result.stderr
    assert line in result.stderr and len(result.stderr.splitlines()) == (1 if line else 0)
    assert tree(git_project) == before


def test_config_set_writes_values_as_typed_and_keeps_section_comments_above_their_sections(git_project):
    path = git_project / "configs/jobs/tiny.yaml"
    path.write_text(
        path.read_text()
        .replace("    lr: 1.0e-3  ", "    lr: 2.0e-4  ")
        .replace(
            "  sample: {num_samples: 4, num_inference_steps: 5}\n",
            "  # how the run samples\n  sample:\n    num_samples: 4\n    num_inference_steps: 5\n# end of the spec\n",
        )
    )
    result = ops(
        git_project,
        "config",
        "set",
        "tiny",
        "run.train.lr=1e-4",
        "run.train.weight_decay=1.5E-2",
        "run.model.channel_mults=[1, 2]",
        "run.sample.seed=7",
        "run.eval.num_samples=16",
    )
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert "    lr: 1e-4                   # a comment `ops config set` must keep\n" in text
    assert "    weight_decay: 1.5E-2\n  # how the run samples\n  sample:\n" in text  # the comment stays with sample
    assert "channel_mults: [1, 2]" in text
    assert text.endswith("    num_inference_steps: 5\n    seed: 7\n  eval:\n    num_samples: 16\n# end of the spec\n")
    spec = ops_json(git_project, "config", "show", "tiny")["run"]
    assert (spec["train"]["lr"], spec["train"]["weight_decay"], spec["sample"]["seed"]) == (1e-4, 1.5e-2, 7)


def test_submit_names_the_untracked_files_it_leaves_out_of_the_snapshot(ops_project):
    root = ops_project
    (root / ".envrc").write_text("export TOKEN=sk-live-0123456789abcdefghijklmnop\n")
    (root / "Credentials.json").write_text("{}\n")
    (root / "helper.py").write_text("x = 1\n")
    result = ops(root, "submit", "tiny", "--set", "run.train.max_steps=1", "--json")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: left out of the run's code snapshot: .envrc (secret by its name)",
        "note: left out of the run's code snapshot: Credentials.json (secret by its name)",
    ]
    [run] = json.loads(result.stdout)["runs"]
    assert [item["path"] for item in run["left_out"]] == [".envrc", "Credentials.json"]
    patch = (Path(run["run_dir"]) / "diff.patch").read_text()
    assert "helper.py" in patch and "sk-live" not in patch and "Credentials" not in patch


def test_monitor_shows_where_a_run_ended_and_a_resumed_run_counts_from_its_first_start(ops_project):
    root = ops_project
    run = ops_json(
        root,
        "submit",
        "tiny",
        "--set",
        "run.train.epochs=1000",
        "--set",
        "run.train.log_every=1000",
        "--set",
        "run.train.max_minutes=0.05",
        "--set",
        "run.train.checkpoint_every_steps=1000",
    )["runs"][0]
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
    assert summary["reason"].startswith("time budget") and 0 < summary["step"] < 1000
    shown = ops_json(root, "monitor", run["ops_id"])["progress"]
    assert shown["step"] == summary["step"] and shown["epoch"] == summary["epoch"]  # nothing was logged before

    long = ops_json(root, "submit", "tiny", "--set", "run.train.epochs=400", "--set", "run.train.log_every=1")["runs"][
        0
    ]
    wait_for(lambda: metrics_steps(long["run_dir"]) >= 2)
    assert ops(root, "cancel", long["ops_id"], "--grace", "30").returncode == 0
    first_start = ops_json(root, "monitor", long["ops_id"])["started_at"]
    time.sleep(1.0)
    resumed = ops_json(root, "resume", long["ops_id"])
    assert resumed["started_at"] == first_start
    view = ops_json(root, "monitor", long["ops_id"])
    assert view["elapsed_seconds"] >= time.time() - first_start - 1 > 1.0
    assert ops(root, "cancel", long["ops_id"], "--grace", "30").returncode == 0


def test_a_secret_given_on_the_command_line_is_recorded_nowhere(ops_project):
    root = ops_project
    token = "hf_" + "Q" * 34
    result = ops(
        root,
        "submit",
        "tiny",
        "--set",
        "run.train.max_steps=1",
        "--set",
        f"resources.local.env.HF_TOKEN={token}",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)["runs"][0]
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    assert token not in json.dumps(run)
    job = json.loads((Path(run["run_dir"]) / "job.json").read_text())
    assert job["spec"]["resources"]["local"]["env"]["HF_TOKEN"] == token  # the engine needs it ...
    published = [
        root / "EXPERIMENT_LOG.md",
        Path(run["run_dir"]) / "provenance.json",
        *root.glob("docs/blog/posts/*.md"),
    ]
    assert all(token not in path.read_text() for path in published)  # ... nobody else sees it
    assert token not in json.dumps(job["overrides"]) + job["command"] + json.dumps(job["changes"])
    assert all(token not in json.dumps(row) for row in registry_rows(root))
    assert "resources.local.env.HF_TOKEN=***" in job["command"]

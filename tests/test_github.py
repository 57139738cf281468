"""Experiment issues through the real PyGithub client against a local stand-in of GitHub's REST API
(tests/github_standin.py): one issue per run, one comment when it ends, nothing lost or sent twice
through 500s, timeouts, rate limits and a crash, and the token nowhere in what ops writes."""

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.github_standin import GitHubStandIn
from tests.ops_project import git, ops, ops_json, registry_rows, wait_for

# Shaped like a token, but not in any provider's format, so secret scanners leave the repo alone.
TOKEN = "test-token-0123456789abcdefSECRET"


@pytest.fixture
def github(ops_project, monkeypatch):
    with GitHubStandIn("lab/diffusion") as standin:
        monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
        monkeypatch.delenv("GH_TOKEN", raising=False)
        monkeypatch.setenv("OPS_GITHUB_API_URL", standin.url)
        monkeypatch.setenv("OPS_GITHUB_REPO", "lab/diffusion")
        monkeypatch.setenv("OPS_GITHUB_TIMEOUT_SECONDS", "1")
        standin.timeout_seconds = 2.5
        yield standin


def posts(standin: GitHubStandIn, suffix: str) -> list[dict]:
    return [r for r in standin.requests if r["method"] == "POST" and r["path"].endswith(suffix)]


def outbox_rows(root: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(root / "runs/registry.sqlite")
    rows = db.execute("SELECT kind, attempts FROM followup_failures").fetchall()
    db.close()
    return rows


def assert_token_nowhere(root: Path, standin: GitHubStandIn, *outputs: subprocess.CompletedProcess) -> None:
    """Not in any file under the project (run dirs, registry, logs, journal), any output, or anything sent."""
    for path in root.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert TOKEN.encode() not in path.read_bytes(), path
    for output in outputs:
        assert TOKEN not in output.stdout + output.stderr
    for request in standin.requests:
        assert TOKEN not in request["body"] + request["path"] + request["query"]
    # ... though it was sent where it belongs, or nothing above would mean much.
    assert any(TOKEN in request["headers"].get("Authorization", "") for request in standin.requests)


def test_submit_opens_one_issue_and_the_end_adds_one_comment(ops_project, github, monkeypatch):
    root = ops_project
    monkeypatch.setenv("OPS_JOURNAL_URL", "https://lab.example/journal/")
    submitted = ops(root, "submit", "tiny", "--set", "run.train.lr=0.002", "--json")
    assert submitted.returncode == 0, submitted.stderr
    [run] = json.loads(submitted.stdout)["runs"]
    assert run["outbox"] == []

    [issue] = github.issues.values()
    head = git(root, "rev-parse", "HEAD")
    short = git(root, "rev-parse", "--short", "HEAD")
    assert issue["title"] == f"tiny @ {short}: train.lr=0.002"
    assert issue["labels"] == ["experiment", "engine: local", f"state: {run['state'].lower()}"]
    body = issue["body"]
    assert f"<!-- ops-run: {run['ops_id']} -->" in body
    assert "**Hypothesis.** The loss goes down." in body
    assert f"job `{run['engine_job_id']}`" in body
    assert f"https://github.example/lab/diffusion/commit/{head}" in body
    assert f"ops monitor {run['ops_id']} --logs" in body
    assert "`run.train.lr`: `0.001` → `0.002`" in body
    config_block = body.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert config_block == (Path(run["run_dir"]) / "config.yaml").read_text().rstrip()
    assert {"experiment", "engine: local"} <= set(github.labels)
    assert run["github_issue"] == issue["html_url"]
    assert registry_rows(root)[0]["github_issue"] == issue["html_url"]

    waited = ops(root, "wait", run["ops_id"], "--interval", "0.3")
    assert waited.returncode == 0, waited.stderr
    synced = ops(root, "sync")
    assert synced.returncode == 0 and "warning" not in synced.stdout, synced.stdout + synced.stderr
    [comment] = github.comments[issue["number"]]
    summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
    assert "### SUCCEEDED" in comment["body"]
    assert f"| loss | {summary['final_metrics']['loss']:.4g} |" in comment["body"]
    assert f"| step | {summary['step']} |" in comment["body"]
    # The sample grid, where the built journal serves the post's copy of it (blog/ID/samples.png).
    assert f"Journal post: https://lab.example/journal/blog/{run['ops_id']}/" in comment["body"]
    assert f"![samples](https://lab.example/journal/blog/{run['ops_id']}/samples.png)" in comment["body"]
    post = Path(ops_json(root, "monitor", run["ops_id"])["journal_post"])
    assert (post.parent / run["ops_id"] / "samples.png").read_bytes() == (
        Path(run["run_dir"]) / "samples/final.png"
    ).read_bytes()
    assert github.issues[issue["number"]]["labels"] == ["experiment", "engine: local", "state: succeeded"]

    # Reconciled again and again: nothing more is sent.
    sent = len(posts(github, "/issues")), len(posts(github, "/comments"))
    for _ in range(2):
        assert ops(root, "sync").returncode == 0
        assert ops(root, "monitor", run["ops_id"]).returncode == 0
    assert (len(posts(github, "/issues")), len(posts(github, "/comments"))) == sent == (1, 1)
    assert_token_nowhere(root, github, submitted, waited, synced)


def test_outages_leave_the_actions_in_the_outbox_and_sync_sends_each_once(ops_project, github):
    root = ops_project
    github.fail("500")
    submitted = ops(root, "submit", "tiny", "--json")
    assert submitted.returncode == 0, submitted.stderr  # the run starts whatever GitHub does
    [run] = json.loads(submitted.stdout)["runs"]
    assert "github_issue waits for the next `ops sync`: GitHub lab/diffusion: HTTP 500" in submitted.stderr
    assert [(item["kind"], item["attempts"]) for item in run["outbox"]] == [("github_issue", 1)]
    assert run["github_issue"] is None and github.issues == {}

    outputs = [submitted]
    for fault, message in (("timeout", "Read timed out"), ("rate-limit", "rate limited")):
        github.fail(fault)
        outputs.append(ops(root, "sync", "--json"))
        problems = json.loads(outputs[-1].stdout)["problems"]
        assert len(problems) == 1 and "github_issue failed" in problems[0] and message in problems[0], problems
        assert github.issues == {}
    assert outbox_rows(root) == [("github_issue", 3)]

    # Every reconcile retries: a plain `ops monitor` delivers it.
    assert ops_json(root, "monitor", run["ops_id"])["outbox"] == []
    assert len(github.issues) == 1 and outbox_rows(root) == []

    github.fail("500")  # the end-of-run comment fails once (in the reconcile `ops wait` does) ...
    outputs.append(ops(root, "wait", run["ops_id"], "--interval", "0.3"))
    assert outputs[-1].returncode == 0
    assert "github_result failed" in outputs[-1].stderr
    assert outbox_rows(root) == [("github_result", 1)] and github.comments[1] == []
    outputs.append(ops(root, "sync", "--json"))  # ... and is sent by the next sync, once
    assert json.loads(outputs[-1].stdout)["problems"] == []
    assert len(github.comments[1]) == 1 and "### SUCCEEDED" in github.comments[1][0]["body"]
    assert ops(root, "sync").returncode == 0
    assert len(posts(github, "/issues")) == 1 and len(posts(github, "/comments")) == 1
    assert_token_nowhere(root, github, *outputs)


def test_a_crash_between_creating_the_issue_and_recording_it_makes_no_second_issue(ops_project, github):
    root = ops_project
    github.hang_after_create = True
    submit = subprocess.Popen(
        [sys.executable, "-m", "ops", "submit", "tiny", "--json"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert github.created.wait(60)
    submit.send_signal(signal.SIGKILL)  # GitHub has the issue; ops never heard back
    submit.communicate()
    github.hang_after_create = False
    github.release.set()
    [row] = registry_rows(root)
    assert row["github_issue"] is None and len(github.issues) == 1

    synced = ops(root, "sync", "--json")
    assert json.loads(synced.stdout)["problems"] == []
    assert len(github.issues) == 1 and len(posts(github, "/issues")) == 1
    assert registry_rows(root)[0]["github_issue"] == github.issues[1]["html_url"]
    wait_for(lambda: ops(root, "wait", row["ops_id"], "--interval", "0.3").returncode == 0)
    assert ops(root, "sync").returncode == 0
    assert len(github.comments[1]) == 1
    assert_token_nowhere(root, github, synced)


def test_repository_from_the_github_remote_and_a_missing_token_waits(ops_project, github, monkeypatch):
    root = ops_project
    monkeypatch.delenv("OPS_GITHUB_REPO")
    monkeypatch.delenv("GITHUB_TOKEN")
    git(root, "remote", "add", "origin", f"https://x-access-token:{TOKEN}@github.com/lab/diffusion.git")
    submitted = ops(root, "submit", "tiny", "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert "no token; export GITHUB_TOKEN" in submitted.stderr
    [run] = json.loads(submitted.stdout)["runs"]
    assert github.requests == []

    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    synced = ops(root, "sync", "--json")
    assert json.loads(synced.stdout)["problems"] == []
    [issue] = github.issues.values()  # in lab/diffusion, the repository the remote names
    assert f"<!-- ops-run: {run['ops_id']} -->" in issue["body"]
    # The credentials in the remote's URL were never recorded (provenance strips them).
    assert_token_nowhere(root, github, submitted, synced)


def test_without_a_github_repository_nothing_is_sent_and_nothing_waits(ops_project, github, monkeypatch):
    root = ops_project
    monkeypatch.delenv("OPS_GITHUB_REPO")
    run = ops_json(root, "submit", "tiny")["runs"][0]
    assert run["outbox"] == [] and run["github_issue"] is None
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    synced = ops_json(root, "sync")
    assert synced["problems"] == [] and github.requests == []
    monkeypatch.setenv("OPS_GITHUB_ISSUES", "false")
    monkeypatch.setenv("OPS_GITHUB_REPO", "lab/diffusion")
    second = ops_json(root, "submit", "tiny")["runs"][0]
    assert second["outbox"] == [] and github.requests == []


def test_the_result_comment_of_a_text_run_quotes_its_samples(git_project):
    from ops.github import result_body
    from ops.registry import Run
    from ops.rundir import Summary
    from ops.settings import Project

    run_dir = git_project / "runs/text-1"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "samples/final.txt").write_text("-" * 72 + " sample 0\nROMEO:\nBut soft, what light\n" + "x" * 2000)
    run = Run(ops_id="text-1", name="text", engine="local", run_dir=str(run_dir), state="SUCCEEDED")
    summary = Summary(status="completed", step=10, scores={"val_bits_per_char": 2.25, "collapsed": []})
    body = result_body(Project(git_project), run, summary, attempt=0)
    assert "| val_bits_per_char | 2.25 |" in body
    assert "```text\n" + "-" * 72 + " sample 0\nROMEO:\nBut soft, what light\n" in body
    assert body.count("x") < 700  # an excerpt, not the whole file


def start_ops(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ops", *args], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_reconciling_commands_at_once_post_each_issue_and_comment_once(ops_project, github):
    """GitHub down while runs are submitted and finish, then back at the real API's pace: two syncs
    (then a sync, a list, a monitor and a wait) at once must not both open an issue or comment."""
    root = ops_project
    github.down = True
    for round_number, runs in enumerate((3, 2)):
        submitted = [ops_json(root, "submit", "tiny", "--set", "run.train.max_steps=2")["runs"][0] for _ in range(runs)]
        for run in submitted:
            wait_for(lambda: (Path(run["run_dir"]) / "exit_status.json").is_file())
        github.down, github.latency = False, 0.1
        commands = (
            [["sync", "--json"], ["sync", "--json"]]
            if round_number == 0
            else [
                ["sync", "--json"],
                ["list", "--json"],
                ["monitor", submitted[0]["ops_id"], "--json"],
                ["wait", submitted[1]["ops_id"]],
            ]
        )
        processes = [start_ops(root, *command) for command in commands]
        for process, command in zip(processes, commands):
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, err
            if command[0] == "sync":
                assert json.loads(out)["problems"] == [], out
        github.down = True
    numbers = {issue["body"].split("ops-run: ")[1].split(" ")[0]: number for number, issue in github.issues.items()}
    assert len(github.issues) == 5 and len(numbers) == 5  # one issue per run
    assert all(len(github.comments[number]) == 1 for number in numbers.values()), github.comments
    assert len(posts(github, "/issues")) == 5


def test_an_existing_label_in_another_case_is_used_and_a_permanent_error_is_not_retried(ops_project, github):
    root = ops_project
    github.labels["Experiment"] = {"color": "000000"}  # the repository's own spelling
    run = ops_json(root, "submit", "tiny", "--set", "run.train.max_steps=2")["runs"][0]
    assert run["outbox"] == [] and run["github_issue"] is not None
    assert github.issues[1]["labels"][0] == "Experiment" and "experiment" not in github.labels
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    assert len(github.comments[1]) == 1 and [p for p in posts(github, "/labels")] == [
        p for p in posts(github, "/labels") if "xperiment" not in p["body"]
    ]

    github.fail("401")
    second = ops(root, "submit", "tiny", "--set", "run.train.max_steps=2", "--json")
    [item] = json.loads(second.stdout)["runs"][0]["outbox"]
    assert item["permanent"] and "HTTP 401: Bad credentials; the token is not valid" in item["error"]
    assert "github_issue waits for `ops sync --retry` once fixed" in second.stderr
    ops_id = json.loads(second.stdout)["runs"][0]["ops_id"]
    sent = len(github.requests)
    for _ in range(2):
        synced = ops(root, "sync", "--json")
        assert json.loads(synced.stdout)["problems"] == []  # shown once, not again at every sync
    assert len(github.requests) == sent  # and not retried
    shown = ops(root, "monitor", ops_id)
    assert "stopped github_issue until fixed, then `ops sync --retry`" in shown.stdout
    assert ops(root, "sync", "--retry").returncode == 0
    assert len(github.issues) == 2 and ops_json(root, "monitor", ops_id)["outbox"] == []


def test_a_met_and_a_missed_expectation_are_reported_everywhere_with_their_values(ops_project, github):
    """summary.json, `ops monitor --json`, `ops list`, the journal post, the experiment log, and the
    GitHub comment with an expected-missed label: each says which check held and what was measured."""
    root = ops_project
    spec = root / "configs/jobs/tiny.yaml"
    spec.write_text(
        spec.read_text().replace(
            "engine: local\n", "expect:\n  - final_metrics.loss < 100\n  - step >= 1000\nengine: local\n"
        )
    )
    git(root, "commit", "-qam", "tiny: two checks")
    run = ops_json(root, "submit", "tiny")["runs"][0]
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    assert ops(root, "sync").returncode == 0

    summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
    loss, step = summary["final_metrics"]["loss"], summary["step"]
    assert summary["verdict"] == "missed"
    assert [(check["expect"], check["measured"], check["verdict"]) for check in summary["expectations"]] == [
        ("final_metrics.loss < 100", loss, "met"),
        ("step >= 1000", step, "missed"),
    ]
    view = ops_json(root, "monitor", run["ops_id"])
    assert view["expectations"]["verdict"] == "missed"
    assert [check["verdict"] for check in view["expectations"]["checks"]] == ["met", "missed"]
    assert [row["verdict"] for row in ops_json(root, "list")] == ["missed"]
    listed = ops(root, "list").stdout.splitlines()
    assert listed[0].split()[:3] == ["ops", "id", "state"] and "expected" in listed[0]
    assert "SUCCEEDED  missed" in listed[1]

    post = Path(view["journal_post"]).read_text()
    assert '!!! failure "Expected: missed"' in post
    assert f"- `step >= 1000`: {step}, **missed**" in post and "- `final_metrics.loss < 100`:" in post
    log = (root / "EXPERIMENT_LOG.md").read_text()
    assert f"- expected: **missed** (`final_metrics.loss < 100`: {loss:.6g} met; `step >= 1000`: {step} missed)" in log
    [issue] = github.issues.values()
    [comment] = github.comments[issue["number"]]
    assert "**Expected: missed**" in comment["body"]
    assert f"| `step >= 1000` | {step} | missed |" in comment["body"]
    assert "expected-missed" in issue["labels"] and "expected-met" not in issue["labels"]


def test_an_unknown_metric_is_refused_naming_the_nearest_and_nothing_is_written(git_project):
    spec = git_project / "configs/jobs/tiny.yaml"
    spec.write_text(
        spec.read_text().replace("engine: local\n", "expect:\n  - scores.confident_shar >= 0.7\nengine: local\n")
    )
    line = "configs/jobs/tiny.yaml: expect[0]: 'scores.confident_shar' is not a metric; did you mean 'scores.confident_share'?"
    submitted = ops(git_project, "submit", "tiny")
    assert submitted.returncode == 2 and submitted.stderr.strip() == f"error: {line}", submitted.stderr
    validated = ops(git_project, "config", "validate", "tiny")
    assert validated.returncode == 1 and validated.stdout.strip() == f"error {line}", validated.stdout
    assert not (git_project / "runs").exists() and not (git_project / "EXPERIMENT_LOG.md").exists()

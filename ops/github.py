"""One GitHub issue per run, labelled `experiment`: opened when the run starts, commented when it ends.

Both are follow-ups (ops/followups.py): whatever GitHub does (errors, timeouts, rate limits), the
submit goes through and the action waits in the outbox for the next `ops sync`. Nothing is sent
twice: the issue body and the result comment carry HTML-comment markers with the ops id, and
GitHub is searched for them before anything is created, so a crash between creating an issue and
recording its number finds the issue instead of opening another.

The token comes from GITHUB_TOKEN, GH_TOKEN or the `gh` CLI's login, and never from a file of ours;
every text we send or report passes `scrub` first.
"""

import json
import os
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from ops.errors import OpsError, PermanentError
from ops.journal import SAMPLES_IMAGE
from ops.monitor import elapsed_seconds, run_expectations
from ops.registry import Run
from ops.rundir import (
    CONFIG,
    FINAL_SAMPLES,
    PROVENANCE,
    SAMPLES,
    Summary,
    git_of,
    read_job,
    read_json,
    read_summary,
)
from ops.settings import Project

EXPERIMENT_LABEL = "experiment"
LABEL_COLORS = {
    EXPERIMENT_LABEL: "5319e7",
    "engine": "c5def5",
    "queued": "fbca04",
    "running": "fbca04",
    "preempted": "f9d0c4",
    "unknown": "ededed",
    "succeeded": "0e8a16",
    "failed": "d73a4a",
    "cancelled": "cccccc",
    "expected-met": "0e8a16",
    "expected-missed": "d73a4a",
}
EXPECTED_LABELS = ("expected-met", "expected-missed")  # the verdict of a run's `expect:` checks
# Answers that the same request will get again, and what to fix; anything else (5xx, timeouts,
# rate limits) is retried by the next sync.
PERMANENT_STATUS = {
    401: "the token is not valid: export a fresh GITHUB_TOKEN (or `gh auth login`)",
    403: "the token may not do this: give it the 'issues: write' permission on the repository",
    404: "no such repository, or the token cannot see it: check github_repo in ops.yaml and the token's access",
    410: "issues are turned off for this repository: turn them on, or set github_issues: false in ops.yaml",
    422: "GitHub refused the request as invalid",
}
GITHUB_REMOTE = re.compile(r"github\.com[:/](?P<repo>[^/\s]+/[^/\s]+?)(?:\.git)?/?$")


def issue_marker(ops_id: str) -> str:
    return f"<!-- ops-run: {ops_id} -->"


def result_marker(ops_id: str, attempt: int) -> str:
    """One result comment per ending: a resumed run that ends again gets a new one."""
    return f"<!-- ops-result: {ops_id} attempt {attempt} -->"


def run_labels(run: Run) -> list[str]:
    return [EXPERIMENT_LABEL, f"engine: {run.engine}", f"state: {run.state.lower()}"]


def repository(project: Project, provenance: dict) -> str | None:
    """owner/name: the setting, else the run's recorded git remote when it is on github.com."""
    if not project.settings.github_issues:
        return None
    if project.settings.github_repo:
        return project.settings.github_repo
    match = GITHUB_REMOTE.search(git_of(provenance).get("remote") or "")
    return match["repo"] if match else None


def token() -> str | None:
    for name in ("GITHUB_TOKEN", "GH_TOKEN"):
        if os.environ.get(name):
            return os.environ[name]
    if shutil.which("gh"):
        found = subprocess.run(["gh", "auth", "token"], capture_output=True, text=True, timeout=10)
        return found.stdout.strip() or None
    return None


def scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


class GitHub:
    """The project's repository through PyGithub, with every failure as one OpsError line."""

    def __init__(self, project: Project, repo_name: str):
        from github import Auth, Github  # PyGithub, heavy: imported only when a run has an issue to write

        self.secret = token()
        if self.secret is None:
            raise OpsError(
                f"GitHub {repo_name}: no token; export GITHUB_TOKEN (or run `gh auth login`), "
                "or set github_issues: false in ops.yaml"
            )
        settings = project.settings
        # No retries and no sleeping inside a CLI: a failed request is retried by the next sync.
        self.client = Github(
            base_url=settings.github_api_url,
            auth=Auth.Token(self.secret),
            timeout=max(1, round(settings.github_timeout_seconds)),
            retry=None,
        )
        self.repo_name = repo_name
        self.repo = self.call(lambda: self.client.get_repo(repo_name))

    def call(self, request):
        import requests  # as in __init__: only when GitHub is called
        from github import GithubException, RateLimitExceededException

        try:
            return request()
        except RateLimitExceededException as exc:
            reset = (exc.headers or {}).get("x-ratelimit-reset")
            when = time.strftime(" (resets %H:%M)", time.localtime(int(reset))) if reset else ""
            raise OpsError(f"GitHub {self.repo_name}: rate limited{when}") from None
        except GithubException as exc:
            message = (exc.data or {}).get("message") if isinstance(exc.data, dict) else exc.data
            line = scrub(f"GitHub {self.repo_name}: HTTP {exc.status}: {message}", self.secret)
            if exc.status in PERMANENT_STATUS:
                raise PermanentError(f"{line}; {PERMANENT_STATUS[exc.status]}") from None
            raise OpsError(line) from None
        except requests.RequestException as exc:
            raise OpsError(scrub(f"GitHub {self.repo_name}: {type(exc).__name__}: {exc}", self.secret)) from None

    def ensure_labels(self, names: list[str]) -> list[str]:
        """The labels, created where missing; GitHub compares label names ignoring case, so an
        existing `Experiment` is `experiment`, under the name the repository gave it."""

        def labels() -> dict[str, str]:
            return {label.name.lower(): label.name for label in self.call(lambda: list(self.repo.get_labels()))}

        existing = labels()
        for name in names:
            if name.lower() in existing:
                continue
            color = LABEL_COLORS.get(name.split(": ")[-1], LABEL_COLORS["engine"])
            try:
                existing[name.lower()] = self.call(lambda: self.repo.create_label(name, color)).name
            except PermanentError:  # a 422 "already_exists": another ops created it a moment ago
                existing = labels()
                if name.lower() not in existing:
                    raise
        return [existing[name.lower()] for name in names]

    def find_issue(self, ops_id: str, since: float):
        """The run's issue if one was opened already (its body carries the marker)."""
        marker = issue_marker(ops_id)
        # Issues updated since the run was created: bounded however many runs the repo has.
        after = datetime.fromtimestamp(since - 3600, UTC)
        issues = self.call(lambda: list(self.repo.get_issues(state="all", labels=[EXPERIMENT_LABEL], since=after)))
        return next((issue for issue in issues if marker in (issue.body or "")), None)

    def open_issue(self, run: Run, title: str, body: str):
        issue = self.find_issue(run.ops_id, run.created_at)
        if issue is None:
            labels = self.ensure_labels(run_labels(run))
            issue = self.call(
                lambda: self.repo.create_issue(
                    title=scrub(title, self.secret), body=scrub(body, self.secret), labels=labels
                )
            )
        return issue

    def comment_result(self, run: Run, issue_number: int, body: str, attempt: int, verdict: str | None = None):
        issue = self.call(lambda: self.repo.get_issue(issue_number))
        marker = result_marker(run.ops_id, attempt)
        comments = self.call(lambda: list(issue.get_comments()))
        comment = next((c for c in comments if marker in (c.body or "")), None)
        if comment is None:
            comment = self.call(lambda: issue.create_comment(scrub(body, self.secret)))
        wanted = run_labels(run) + ([f"expected-{verdict}"] if f"expected-{verdict}" in EXPECTED_LABELS else [])
        labels = self.ensure_labels(wanted)
        replaced = ("state: ", "engine: ", *EXPECTED_LABELS)  # this ending's, not an earlier one's
        kept = [label.name for label in issue.labels if not label.name.lower().startswith(replaced)]
        self.call(lambda: issue.set_labels(*dict.fromkeys([*kept, *labels])))
        return comment


# ---------------------------------------------------------------------------------------------
# What the issue and the comment say


def issue_title(run: Run, job: dict, provenance: dict) -> str:
    git = git_of(provenance)
    commit = (git.get("short_commit") or "no git") + ("+dirty" if git.get("dirty") else "")
    changed = ", ".join(
        f"{key.removeprefix('run.')}={json.dumps(new) if not isinstance(new, str) else new}"
        for key, _, new in job["changes"]
    )
    title = f"{run.name} @ {commit}" + (f": {changed}" if changed else "")
    return title if len(title) <= 200 else title[:199] + "…"


def commit_line(repo_url: str, provenance: dict) -> str:
    git = provenance.get("git")
    if git is None:
        return "no git (submitted with --allow-no-git)"
    line = f"[`{git['short_commit']}`]({repo_url}/commit/{git['commit']})"
    if git.get("branch"):
        line += f" on `{git['branch']}`"
    if git.get("dirty"):
        line += f", plus uncommitted changes in `diff.patch`: {git.get('diff_stat') or 'untracked files'}"
    return line


def issue_body(project: Project, run: Run, job: dict, provenance: dict, repo_url: str) -> str:
    spec = job["spec"]
    config_text = (Path(run.run_dir) / CONFIG).read_text()
    changes = "\n".join(f"- `{key}`: `{json.dumps(old)}` → `{json.dumps(new)}`" for key, old, new in job["changes"])
    submitted = datetime.fromtimestamp(run.created_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            issue_marker(run.ops_id),
            f"**Hypothesis.** {' '.join(spec.get('hypothesis', '').split()) or '(none given in the spec)'}",
            "",
            f"**Expected outcome.** {' '.join(spec.get('expected', '').split()) or '(none given in the spec)'}",
            "",
            "| | |",
            "|---|---|",
            f"| ops id | `{run.ops_id}` |",
            f"| engine | {run.engine}, job `{run.engine_job_id}` |",
            f"| commit | {commit_line(repo_url, provenance)} |",
            f"| submitted | {submitted} by `{provenance.get('user')}` on `{provenance.get('host')}` |",
            f"| command | `{job['command']}` |",
            f"| run dir | `{os.path.relpath(run.run_dir, project.root)}` |",
            "",
            "**Changed from the spec:**" if changes else "**Changed from the spec:** nothing; the spec as written.",
            changes,
            "",
            "<details><summary>Resolved config (<code>config.yaml</code>)</summary>",
            "",
            "```yaml",
            config_text.rstrip(),
            "```",
            "</details>",
            "",
            "**Follow it:**",
            "```bash",
            f"ops monitor {run.ops_id} --logs           # state, progress and the log tail",
            f"ops monitor {run.ops_id} --logs --follow  # stream the log",
            f"ops wait {run.ops_id}                     # block until it ends",
            "```",
            "_Filed by `ops`; the result is posted here as a comment when the run ends._",
        ]
    )


def format_number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)


def check_row(check: dict) -> str:
    """One judged `expect:` line as a row of the result comment's table."""
    measured = format_number(check["measured"]) if check["measured"] is not None else "-"
    why = f": {check['why']}" if check.get("why") else ""
    return f"| `{check['expect']}` | {measured} | {check['verdict']}{why} |"


def result_body(project: Project, run: Run, summary: Summary, attempt: int, expected: dict | None = None) -> str:
    """`expected`: monitor.expectations' verdict and checks."""
    duration = elapsed_seconds(run) if run.finished_at else None
    lines = [
        result_marker(run.ops_id, attempt),
        f"### {run.state}" + (f" after {duration / 60:.1f} min" if duration else ""),
    ]
    if expected and expected["verdict"]:
        lines += [
            "",
            f"**Expected: {expected['verdict']}**",
            "",
            "| check | measured | verdict |",
            "|---|---|---|",
            *(check_row(check) for check in expected["checks"]),
        ]
    if run.detail:
        lines.append(f"> {run.detail}")
    final = summary.final_metrics or {}
    rows = [
        (key, value)
        for key in ("step", "epoch", "train_seconds", "num_parameters")
        if (value := getattr(summary, key)) is not None
    ]
    rows += [
        (key, value) for key, value in final.items() if key not in ("step", "epoch", "train_seconds", "total_steps")
    ]
    rows += list((summary.scores or {}).items())
    if rows:
        lines += [
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {key} | {format_number(value)} |" for key, value in rows),
        ]
    if summary.reason:
        lines += ["", f"Stopped: {summary.reason}."]
    if summary.error:
        lines += ["", f"Error: `{summary.error}`"]
    lines += ["", *sample_links(project, run), *text_excerpt(run)]
    lines += ["", f"Details: `ops monitor {run.ops_id} --logs`; reproduce: `ops rerun {run.ops_id}`."]
    return "\n".join(lines)


def sample_links(project: Project, run: Run) -> list[str]:
    """The sample grid: on the published journal when there is one, else where the files are."""
    samples = sorted(Path(run.run_dir).glob(f"{SAMPLES}/*.png"))
    url = project.settings.journal_url
    if url and run.journal_post:
        base = url.rstrip("/")
        lines = [f"Journal post: {base}/blog/{run.ops_id}/"]
        if samples:
            lines.append(f"![samples]({base}/blog/{run.ops_id}/{SAMPLES_IMAGE})")
        return lines
    lines = []
    if run.journal_post:
        lines.append(f"Journal post: `{os.path.relpath(run.journal_post, project.root)}` (`mkdocs serve` shows it)")
    if samples:
        final = next((path for path in samples if path.name == f"{FINAL_SAMPLES}.png"), samples[-1])
        lines.append(f"Sample grid: `{os.path.relpath(final, project.root)}` (`ops pull {run.ops_id}` for remote runs)")
    return lines


def text_excerpt(run: Run, limit: int = 600) -> list[str]:
    """A text run's first final samples, where the discussion happens (the rest in the run dir)."""
    path = Path(run.run_dir) / SAMPLES / f"{FINAL_SAMPLES}.txt"
    if not path.is_file():
        return []
    text = path.read_text()
    shown = text[:limit] + ("\n..." if len(text) > limit else "")
    fence = "~~~~" if "```" in shown else "```"
    return ["", f"Samples (`{SAMPLES}/{path.name}`):", f"{fence}text", shown, fence]


def open_run_issue(project: Project, run: Run) -> str | None:
    """The run's issue (found or created): its html_url, or None when GitHub is not in use."""
    run_dir = Path(run.run_dir)
    provenance = read_json(run_dir / PROVENANCE) or {}
    repo_name = repository(project, provenance)
    if repo_name is None:
        return None
    github = GitHub(project, repo_name)
    job = read_job(run_dir)
    body = issue_body(project, run, job, provenance, github.repo.html_url)
    return github.open_issue(run, issue_title(run, job, provenance), body).html_url


def comment_run_result(project: Project, run: Run) -> str | None:
    """The result comment on the run's issue: its html_url, or None when the run has no issue."""
    repo_name = repository(project, (read_json(Path(run.run_dir) / PROVENANCE) or {}))
    if run.github_issue is None or repo_name is None:
        return None
    github = GitHub(project, repo_name)
    summary = read_summary(Path(run.run_dir)) or Summary()
    number = int(run.github_issue.rstrip("/").rsplit("/", 1)[1])
    expected = run_expectations(run)
    body = result_body(project, run, summary, run.requeues, expected)
    return github.comment_result(run, number, body, run.requeues, expected["verdict"]).html_url

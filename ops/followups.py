"""What ops does once per run besides running it: the experiment log's section (at submit) and
results (at the end), the GitHub issue and its result comment, the journal post.

An outbox: each follow-up is done once, under the run's follow-up claim, and recorded in the
registry and in RUN_DIR/followups.json (so that a rebuilt registry does not redo it). A failure
is reported, not raised, and the next reconcile retries it; a permanent one (a GitHub 4xx) waits
for `ops sync --retry`.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ops.errors import OpsError, PermanentError
from ops.explog import append_section, fill_results, results_text
from ops.github import comment_run_result, open_run_issue
from ops.journal import write_post
from ops.monitor import elapsed_seconds, run_expectations
from ops.registry import Registry, Run
from ops.rundir import (
    FOLLOWUPS_FILE,
    PROVENANCE,
    Summary,
    git_of,
    read_job,
    read_json,
    read_required,
    read_summary,
    write_json,
)
from ops.settings import Project


def log_entry(project: Project, run: Run, job: dict, provenance: dict) -> dict:
    git = git_of(provenance)
    return {
        "ops_id": run.ops_id,
        "name": run.name,
        "hypothesis": job["spec"].get("hypothesis", ""),
        "command": job["command"],
        "engine": run.engine,
        "engine_job_id": run.engine_job_id,
        "run_dir": os.path.relpath(run.run_dir, project.root),
        "commit": git.get("commit"),
        "dirty": git.get("dirty", False),
        "changes": job["changes"],
        "created_at": run.created_at,
    }


def experiment_log_lock(project: Project) -> Path:
    return project.runs_dir / ".experiment_log.lock"


def experiment_log_submit(project: Project, run: Run) -> str:
    run_dir = Path(run.run_dir)
    provenance = read_required(run_dir / PROVENANCE)
    append_section(
        project.experiment_log, log_entry(project, run, read_job(run_dir), provenance), experiment_log_lock(project)
    )
    return str(project.experiment_log)


def experiment_log_result(project: Project, run: Run) -> str:
    summary = read_summary(run.run_dir) or Summary()
    duration = elapsed_seconds(run) if run.finished_at else None
    results = results_text(run.state, summary, duration, run_expectations(run))
    if not fill_results(project.experiment_log, run.ops_id, results, experiment_log_lock(project)):
        raise OpsError(f"{project.experiment_log}: no section for {run.ops_id} to fill in")
    return str(project.experiment_log)


def journal_post(project: Project, run: Run) -> str:
    return str(write_post(project, run))


def refresh_records(project: Project, run: Run) -> None:
    """Rewrite what a finished run's local records say (the experiment log's results, the journal
    post, which keeps its Observations) from its run dir: after `ops pull` brought its figures."""
    experiment_log_result(project, run)
    journal_post(project, run)


@dataclass(frozen=True)
class Followup:
    """Something done once per run, when it has started or when it has finished.

    The action returns what it made (a path, a URL), or None when it does not apply to this
    project (no GitHub repository): recorded as skipped, never retried. `column` is the registry
    column that keeps the result; `after` lists follow-ups that must be done first."""

    kind: str
    when: str  # "started" | "finished"
    action: Callable[[Project, Run], str | None]
    column: str | None = None
    after: tuple[str, ...] = ()

    def due(self, run: Run) -> bool:
        # A run that ended without ever starting (refused, interrupted, orphaned) is recorded too.
        return run.finished or (self.when == "started" and run.engine_job_id is not None)


FOLLOWUPS = [
    Followup("experiment_log_submit", "started", experiment_log_submit),
    Followup("github_issue", "started", open_run_issue, column="github_issue"),
    Followup("experiment_log_result", "finished", experiment_log_result, after=("experiment_log_submit",)),
    Followup("journal_post", "finished", journal_post, column="journal_post"),
    Followup("github_result", "finished", comment_run_result, after=("github_issue",)),
]
SKIPPED = "skipped: not in use"


def followup_lock(project: Project, ops_id: str):
    """The claim on a run's follow-ups: one ops at a time does them. Another reconciling command
    (sync, wait, monitor, list) waits here, then finds them done; a crashed holder's claim goes
    with its process (an fcntl lock)."""
    from filelock import FileLock  # a few tens of ms: only the commands that do follow-ups pay it

    folder = project.runs_dir / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{ops_id}.followups.lock"), timeout=FOLLOWUP_LOCK_SECONDS)


FOLLOWUP_LOCK_SECONDS = 600  # a GitHub at its slowest takes a few requests of 15 s each


def do_followups(project: Project, registry: Registry, run: Run) -> tuple[Run, list[str]]:
    """Each due follow-up once, under the run's follow-up claim; a failure is reported and retried
    by the next reconcile, a permanent one (a GitHub 4xx) waits for `ops sync --retry`. Returns
    the run as the follow-ups left it (its issue URL, its post) and the failures."""

    def pending(followup: Followup) -> bool:
        return (
            followup.due(run)
            and not registry.followup_done(run.ops_id, followup.kind)
            and not registry.followup_stopped(run.ops_id, followup.kind)
        )

    if not any(pending(followup) for followup in FOLLOWUPS):
        return run, []
    from filelock import Timeout  # as followup_lock: only when a follow-up is due

    problems = []
    try:
        with followup_lock(project, run.ops_id):
            for followup in FOLLOWUPS:
                if not pending(followup):  # asked again under the claim: another ops may have done it
                    continue
                if not all(registry.followup_done(run.ops_id, kind) for kind in followup.after):
                    continue  # waits for the one it builds on (the comment needs the issue)
                try:
                    detail = followup.action(project, run)
                except Exception as exc:  # an outbox: keep going, the next sync retries this one
                    permanent = isinstance(exc, PermanentError)
                    registry.record_failure(run.ops_id, followup.kind, str(exc), permanent)
                    problems.append(
                        f"{run.ops_id}: {followup.kind} failed, "
                        + (
                            "stopped until it is fixed (then `ops sync --retry`)"
                            if permanent
                            else "will retry on the next sync"
                        )
                        + f": {exc}"
                    )
                    continue
                if followup.column and detail is not None:
                    registry.update(run.ops_id, **{followup.column: detail})
                    run = registry.get(run.ops_id)
                registry.record_followup(run.ops_id, followup.kind, SKIPPED if detail is None else detail)
                done_path = Path(run.run_dir) / FOLLOWUPS_FILE  # so that a rebuilt registry does not redo it
                write_json(done_path, (read_json(done_path) or {}) | {followup.kind: detail})
    except Timeout:
        problems.append(
            f"{run.ops_id}: its follow-ups are being done by another ops for over "
            f"{FOLLOWUP_LOCK_SECONDS} s; the next sync looks again"
        )
    return run, problems


def do_pending(project: Project, registry: Registry) -> list[str]:
    """The follow-ups of finished runs that an earlier crash or outage left undone; the failures."""
    problems = []
    for ops_id in registry.pending_followups([followup.kind for followup in FOLLOWUPS]):
        problems += do_followups(project, registry, registry.get(ops_id))[1]
    return problems


def skip_all(registry: Registry, run: Run, detail: str) -> None:
    """Every follow-up recorded as skipped: there is nothing to report from, now or later."""
    for followup in FOLLOWUPS:
        registry.record_followup(run.ops_id, followup.kind, f"skipped: {detail}")


def due_again(registry: Registry, run: Run) -> None:
    """A resumed run ends again: its end-of-run follow-ups are due again, here and in a rebuild."""
    again = [followup.kind for followup in FOLLOWUPS if followup.when == "finished"]
    for kind in again:
        registry.forget_followup(run.ops_id, kind)
    done_path = Path(run.run_dir) / FOLLOWUPS_FILE
    write_json(done_path, {kind: detail for kind, detail in (read_json(done_path) or {}).items() if kind not in again})


def recorded(run_dir: Path) -> dict[str, str | None]:
    """The follow-ups RUN_DIR/followups.json says were done, {kind: detail}, for a rebuilt row."""
    return {
        kind: detail
        for kind, detail in (read_json(run_dir / FOLLOWUPS_FILE) or {}).items()
        if kind in {followup.kind for followup in FOLLOWUPS} and isinstance(detail, (str, type(None)))
    }


def columns(done: dict[str, str | None]) -> dict[str, str | None]:
    """The registry columns that keep what recorded follow-ups made (the issue URL, the post)."""
    return {followup.column: done.get(followup.kind) for followup in FOLLOWUPS if followup.column}


def record_done(registry: Registry, ops_id: str, done: dict[str, str | None]) -> None:
    for kind, detail in done.items():
        registry.record_followup(ops_id, kind, SKIPPED if detail is None else detail)

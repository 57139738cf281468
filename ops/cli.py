"""The `ops` command line: submit, watch and record diffusion experiments.

Every command takes `--json` for agents. Stable fields:
- a run (`list`, `submit`, `monitor`, `wait`, `cancel`, `sync`): ops_id, name, engine, engine_job_id,
  state (QUEUED RUNNING SUCCEEDED FAILED CANCELLED PREEMPTED UNKNOWN), run_dir, git_commit,
  created_at, started_at, finished_at (unix seconds or null), exit_code, requeues, sweep, overrides,
  github_issue (the issue's URL), journal_post (the post's path), detail (why it is in its state,
  in the engine's words), removed_at and removed_kept (`ops rm`: when the run dir went, and what
  it kept).
- `submit` and `monitor` add outbox: [{kind, error, attempts, failed_at}], the follow-ups (GitHub
  issue or comment, journal post, experiment log) that failed and wait for the next `ops sync`.
- `journal`: ops_id, state, post (path), url (in the built site), images.
- `compare`: runs, states, config {key: [value per run]} (differing keys only), metrics {name:
  [value per run]}, post (path, with --post).
- `monitor` adds elapsed_seconds, progress {step, total_steps, epoch, total_epochs, loss,
  it_per_s, eta_seconds, percent}, expectations {verdict (met, missed, not measured, pending or
  null), checks [{expect, metric, comparison, value, measured, verdict, why (with `not measured`: no
  such value, a run that did not complete, a cut evaluation)}]}, estimate (a GPU-sized
  run on this CPU: {why, timing, seconds, warning}, or null), log_tail (with --logs), and with
  --full: config, provenance, job, paths.
- `list` adds verdict (of the run's `expect:` checks, as in monitor).
- `du`: runs [{ops_id, name, state, run_dir, bytes, checkpoint_bytes, removed_at}], total_bytes;
  `rm`: removed (would_remove with --dry-run) [{ops_id, run_dir, keep_checkpoints, kept, freed_bytes, remote
  (a Vertex run's bucket copy: {gcs_run_dir, kept, latest_from, freed_bytes}, else null)}], pinned_removed
  [paths], pinned_freed_bytes.
Exit codes: 0 ok, 2 bad input (one line on stderr, nothing written); `ops wait` exits by the
final state: 0 SUCCEEDED, 1 FAILED, 3 CANCELLED, 75 PREEMPTED (resumable), 4 UNKNOWN.
The commands parse their arguments, call ops.runs (what happens to runs) and ops.views (what is
printed), and choose the exit code. Heavy imports (pydantic through the spec modules, rich,
ruamel.yaml) live inside the commands and views that need them, so `ops --help` stays fast.
"""

import functools
import shlex
import signal
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import typer

from ops import rundir, runs, views
from ops.build import build_image
from ops.errors import OpsError
from ops.registry import STATES, Registry
from ops.secrets import redact_words
from ops.settings import Project
from ops.storage import WHAT

app = typer.Typer(
    help="Submit, watch and record diffusion experiments.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(
    help="Job specs in configs/jobs/: list, show, validate, set.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(config_app, name="config")
ckpt_app = typer.Typer(
    help="Checkpoints: what one holds, and the best of a run or a spec.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(ckpt_app, name="ckpt")

WAIT_EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 3, "PREEMPTED": 75, "UNKNOWN": 4}
JSON_OPTION = typer.Option(False, "--json", help="Machine-readable output (fields in `ops --help` docs).")


def user_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [OpsError]
    yamlfile = sys.modules.get("diffusion.yamlfile")  # not imported: no ConfigError can have been raised
    if yamlfile is not None:
        errors.append(yamlfile.ConfigError)
    return tuple(errors)


def one_line_errors(command):
    """Bad input ends the command with one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except user_errors() as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except sqlite3.DatabaseError as exc:  # the registry, damaged past what opening it reads
            typer.echo(
                f"error: the run registry is damaged ({exc}); `ops sync` moves it aside and rebuilds it "
                "from the run dirs",
                err=True,
            )
            raise typer.Exit(2) from None

    return wrapper


@contextmanager
def signals_interrupt():
    """SIGTERM and SIGHUP end the command as Ctrl-C does (KeyboardInterrupt), so that a run it was
    starting is marked FAILED, not left QUEUED with nobody to start it."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def command_line() -> str:
    """This command as it is recorded (job.json, the experiment log, issues): secrets hidden."""
    return shlex.join(["ops", *redact_words(sys.argv[1:])])


# ---------------------------------------------------------------------------------------------
# submit, resume, rerun


@app.command()
@one_line_errors
def submit(
    name: str = typer.Argument(None, help="Job spec: configs/jobs/NAME.yaml (or a path to a .yaml)."),
    engine: str = typer.Option(None, "--engine", help="local | slurm | vertex (default: the spec's engine)."),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE, e.g. run.train.epochs=5 (repeatable)."),
    sweeps: list[str] = typer.Option([], "--sweep", help="KEY=V1,V2: one run per combination (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved spec and what would start; do nothing."),
    resume_id: str = typer.Option(None, "--resume", help="Continue a stopped run (same as `ops resume JOB_ID`)."),
    allow_no_git: bool = typer.Option(False, "--allow-no-git", help="Submit outside git, recorded as 'no git'."),
    image: str = typer.Option(
        None,
        "--image",
        help="Container engines: run this image (REPO@sha256:...) instead of building one for the code.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Validate a spec, record provenance, start the run.

    Creates the run dir and registry row, starts it on the engine, prints the ops id and the
    engine job id. --sweep makes one run per combination of values."""
    if resume_id:
        return resume(resume_id, as_json)
    if not name:
        raise OpsError("NAME: missing; give a job spec name (`ops config list`) or --resume JOB_ID")
    project = Project()
    planned = runs.plan(project, name, engine, overrides, sweeps, dry_run)  # raises before anything is written
    views.warn(list(dict.fromkeys(warning for item in planned for warning in item.warnings)))
    if dry_run:
        return views.print_dry_run(runs.dry_run(project, planned), as_json)
    registry = Registry(project.registry_path)
    with signals_interrupt():
        started = runs.submit(project, registry, planned, command_line(), allow_no_git, image)
    views.print_submitted(registry, started, runs.snapshot_left_out(started), as_json)


@app.command()
@one_line_errors
def resume(
    job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."), as_json: bool = JSON_OPTION
) -> None:
    """Continue a stopped run from its last checkpoint.

    For preempted, cancelled or failed runs; the run keeps its ops id and run dir."""
    project, registry = runs.open_project()
    with signals_interrupt():
        run = runs.resume(project, registry, runs.find(registry, job_id))
    views.print_resumed(registry, run, as_json)


@app.command()
@one_line_errors
def rerun(
    job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."), as_json: bool = JSON_OPTION
) -> None:
    """Run again on the recorded commit, config and diff.

    A new run with the same spec, on the recorded commit plus its diff.patch (materialised in
    RUN_DIR/code); refuses when the commit is not in the repository."""
    project, registry = runs.open_project()
    with signals_interrupt():
        run = runs.rerun(project, registry, runs.find(registry, job_id), command_line())
    views.print_rerun(registry, run, job_id, as_json)


# ---------------------------------------------------------------------------------------------
# monitor, list, wait, cancel, sync


@app.command()
@one_line_errors
def monitor(
    job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."),
    logs: bool = typer.Option(False, "--logs", help="Show the tail of the run's log."),
    lines: int = typer.Option(30, "--lines", help="Log lines to show with --logs."),
    follow: bool = typer.Option(False, "--follow", help="Stream state changes and log lines until the run ends."),
    full: bool = typer.Option(False, "--full", help="Everything recorded: config, provenance, paths."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between polls with --follow."),
    as_json: bool = JSON_OPTION,
) -> None:
    """State, progress (step, loss, it/s, ETA) and log of a run."""
    project, registry = runs.open_project()
    run, problems = runs.reconcile(project, registry, runs.find(registry, job_id))
    views.warn(problems)
    if not follow:
        view = views.run_view(project, run, logs, lines, full) | {"outbox": registry.failures(run.ops_id)}
        return views.echo_json(view) if as_json else views.print_view(project, view)
    events = runs.follow(project, registry, run, interval)
    try:
        for event, value in events:
            views.print_event(event, value, as_json)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; the run goes on: ops monitor {run.ops_id} --logs", err=True)


@app.command("list")
@one_line_errors
def list_runs(
    states: list[str] = typer.Option([], "--state", help="Only runs in this state (repeatable)."),
    names: list[str] = typer.Option([], "--name", help="Only runs of this spec; * matches anything (repeatable)."),
    limit: int = typer.Option(50, "--limit", help="Newest N runs; 0 for all."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Runs, newest first (unfinished ones are refreshed)."""
    for state in states:
        if state.upper() not in STATES:
            raise OpsError(f"--state {state!r}: not a state; allowed: {', '.join(STATES)}")
    project, registry = runs.open_project()
    shown = registry.select([s.upper() for s in states], names, limit or None)
    shown = [runs.reconcile(project, registry, run)[0] if not run.finished else run for run in shown]
    views.print_runs(shown, bool(states or names), as_json)


@app.command()
@one_line_errors
def wait(
    job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."),
    timeout: float = typer.Option(None, "--timeout", help="Give up after this many seconds (exit 124)."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between polls."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Block until the run ends; exit code by final state.

    0 SUCCEEDED, 1 FAILED, 3 CANCELLED, 75 PREEMPTED (stopped, resumable), 4 UNKNOWN, 124 timeout."""
    project, registry = runs.open_project()
    run = runs.find(registry, job_id)
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        run, problems = runs.reconcile(project, registry, run)
        if runs.settled(project, run):
            break
        if deadline and time.monotonic() > deadline:
            typer.echo(f"{run.ops_id}: still {run.state} after {timeout:g} s", err=True)
            raise typer.Exit(124)
        time.sleep(interval)
    views.warn(problems)
    views.print_state(run, as_json)
    raise typer.Exit(WAIT_EXIT_CODES.get(run.state, 4))


@app.command()
@one_line_errors
def cancel(
    job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."),
    grace: float = typer.Option(None, "--grace", help="Seconds between SIGTERM and SIGKILL (default: ops.yaml)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Stop a run: SIGTERM (it checkpoints), later SIGKILL."""
    project, registry = runs.open_project()
    run, stopped = runs.cancel(project, registry, runs.find(registry, job_id), grace)
    views.print_cancelled(run, stopped, as_json)


@app.command()
@one_line_errors
def sync(
    retry: bool = typer.Option(
        False,
        "--retry",
        help="Also retry follow-ups stopped by a permanent error (a GitHub 4xx), after fixing its cause.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Reconcile unfinished runs, rebuild rows, retry follow-ups.

    Polls the engine of every unfinished run, adds registry rows for run dirs it lacks, and
    retries follow-ups (experiment log ...) that failed before."""
    added, reconciled, problems = runs.sync(Project(), retry)
    views.print_synced(added, reconciled, problems, as_json)


@app.command()
@one_line_errors
def du(
    job_ids: list[str] = typer.Argument(None, help="Runs (ops ids, engine job ids, latest); default: every run."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Disk used by each run dir and in all, as `du` counts it (allocated bytes).

    The runs folder's .pinned/ (frozen checkpoints of running runs that submitted runs read) is
    counted apart. JSON: runs [{ops_id, name, state, run_dir, bytes, checkpoint_bytes, removed_at}],
    total_bytes, pinned_bytes."""
    from ops import cleanup  # only this command and rm

    project, registry = runs.open_project()
    shown = [runs.find(registry, job_id) for job_id in job_ids] if job_ids else registry.select()
    views.print_usage(cleanup.usage(shown), cleanup.disk_usage(project.runs_dir / rundir.PINNED), as_json)


@app.command()
@one_line_errors
def rm(
    job_ids: list[str] = typer.Argument(..., help="Runs to remove: ops ids, engine job ids, or latest."),
    keep_checkpoints: str = typer.Option(
        "none",
        "--keep-checkpoints",
        help="best (lowest logged loss) | latest | none: the checkpoint the run dir keeps.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go and what it frees; remove nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking."),
    local_only: bool = typer.Option(
        False, "--local-only", help="A Vertex run: leave its copy in Cloud Storage as it is (no credentials here)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Remove finished runs' dirs; never a run that is not over or whose dir a process holds.

    The registry row stays (removed_at, removed_kept), and the experiment log and the journal post
    say the run dir was removed. With --keep-checkpoints best or latest the run dir keeps that
    checkpoint and its small records (config, provenance, job, summary, metrics). JSON: removed
    (or would_remove with --dry-run) [{ops_id, run_dir, keep_checkpoints, kept, freed_bytes, remote}];
    a Vertex run's copy in Cloud Storage goes too (remote: {gcs_run_dir, kept, latest_from, freed_bytes}).
    Pinned checkpoints (runs/.pinned) that no remaining run read go too: pinned_removed, pinned_freed_bytes."""
    from ops import cleanup  # as in du

    if keep_checkpoints not in cleanup.KEEP_CHOICES:
        raise OpsError(f"--keep-checkpoints {keep_checkpoints!r}: not allowed; use {', '.join(cleanup.KEEP_CHOICES)}")
    project, registry = runs.open_project()
    found = {run.ops_id: run for run in (runs.find(registry, job_id) for job_id in job_ids)}  # latest and its id: once
    targets = [runs.reconcile(project, registry, run)[0] for run in found.values()]
    plans = [cleanup.plan_removal(run, keep_checkpoints, local_only) for run in targets]  # every refusal first
    if not dry_run and not yes:
        if not sys.stdin.isatty():
            raise OpsError("ops rm: no terminal to confirm on; add --yes (or look first with --dry-run)")
        views.print_removal(plans, True, False)
        typer.confirm(f"remove {len(plans)} run dir(s)?", abort=True)
    pins, pinned_bytes = [], 0
    if not dry_run:
        for run, plan in zip(targets, plans):
            cleanup.remove(project, registry, run, plan)
        pins = cleanup.unread_pins(project, registry)  # the runs that read them are gone now
        pinned_bytes = cleanup.remove_pins(pins)
    views.print_removal(plans, dry_run, as_json, [str(path) for path in pins], pinned_bytes)


# ---------------------------------------------------------------------------------------------
# journal, compare, build, pull


@app.command()
@one_line_errors
def journal(
    job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."), as_json: bool = JSON_OPTION
) -> None:
    """Write the run's journal post again, from its run dir.

    The post is JOURNAL_DIR/blog/posts/DATE-OPS_ID.md, served at blog/OPS_ID/, its images in
    OPS_ID/ beside it. Everything is rewritten except the text inside the marked regions
    (Observations), which is kept. JSON: ops_id, state, post (path), url (in the site), images."""
    project, registry = runs.open_project()
    run, problems = runs.reconcile(project, registry, runs.find(registry, job_id))
    views.warn(problems)
    views.print_post(run, runs.rewrite_post(project, registry, run), as_json)


@app.command()
@one_line_errors
def compare(
    job_ids: list[str] = typer.Argument(..., help="Two or more runs: ops ids, engine job ids, or latest."),
    post: bool = typer.Option(False, "--post", help="Also write a journal post: tables and sample grids side by side."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Runs side by side: the settings that differ, and the final metrics.

    Settings are each run's config.yaml plus its spec's own fields (engine, resources, ...); only
    keys whose values differ are shown. --post writes JOURNAL_DIR/blog/posts/DATE-compare-HASH.md
    (category comparisons; HASH names the set of runs, so comparing them again rewrites the same
    post and keeps its Observations). JSON: runs (ops ids), states, config {key: [value per run]}
    (differing keys only), metrics {name: [value per run]} (null where a run lacks it), post (path
    or null)."""
    project, registry = runs.open_project()
    compared, path = runs.compare(project, registry, job_ids, post)
    views.print_comparison(compared, path, as_json)


@app.command()
@one_line_errors
def build(
    push: bool = typer.Option(False, "--push", help="Push to image_repository (skipped when it has the tag)."),
    builder: str = typer.Option(None, "--builder", help="docker | podman | buildah (default: ops.yaml, else found)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Build the image of the working tree's code, tagged by commit.

    The tag is the commit, plus a hash of the uncommitted diff when the tree is dirty; a tag the
    registry already has is not built or pushed again. Prints the image by digest."""
    views.print_image(build_image(Project(), push=push, builder=builder), as_json)


@app.command()
@one_line_errors
def pull(
    job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."),
    what: str = typer.Option("all", "--what", help=" | ".join(WHAT)),
    as_json: bool = JSON_OPTION,
) -> None:
    """Download a cloud run's files into its local run dir.

    Resumes partial downloads and skips files already present with the same checksum."""
    if what not in WHAT:
        raise OpsError(f"--what {what!r}: not allowed; one of {', '.join(WHAT)}")
    project, registry = runs.open_project()
    run = runs.find(registry, job_id)
    result = runs.pull(project, run, what, progress=None if as_json else views.print_pulled_file)
    views.print_pull(result, as_json)


# ---------------------------------------------------------------------------------------------
# config


def jobs_dir() -> Path:
    return Project().jobs_dir


@config_app.command("list")
@one_line_errors
def config_list(as_json: bool = JSON_OPTION) -> None:
    """The job specs, with task, engine and description (or why a spec does not parse)."""
    from diffusion.config import ConfigError, read_yaml  # heavy (pydantic): only the config commands import it

    rows = []
    for path in sorted(path for path in jobs_dir().glob("*.yaml") if path.is_file()):
        try:
            raw = read_yaml(path) or {}
        except ConfigError as exc:
            rows.append({"name": path.stem, "task": None, "engine": None, "description": "", "error": str(exc)})
            continue
        if not isinstance(raw, dict):
            raw = {}
        run = raw.get("run") if isinstance(raw.get("run"), dict) else {}
        rows.append(
            {
                "name": path.stem,
                "task": run.get("task", "train"),
                "engine": raw.get("engine", "local"),
                "description": " ".join(str(raw.get("description", "")).split()),
                "error": None,
            }
        )
    views.print_specs(rows, as_json)


@config_app.command("show")
@one_line_errors
def config_show(
    name: str = typer.Argument(..., help="Job spec name."),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE to apply before showing."),
    as_json: bool = JSON_OPTION,
) -> None:
    """The resolved spec: every value in effect, defaults included."""
    from ops.spec import load_spec, spec_path  # heavy (pydantic): only the commands that read specs import it

    views.print_spec(load_spec(spec_path(jobs_dir(), name), overrides).model_dump(mode="json"), as_json)


@config_app.command("validate")
@one_line_errors
def config_validate(
    names: list[str] = typer.Argument(None, help="Spec names or paths; all of configs/jobs/ when omitted."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Validate specs: a line per problem, exit 1 if any."""
    from diffusion.config import ConfigError  # heavy (pydantic): only the commands that read specs import it
    from ops.spec import load_spec, spec_path

    folder = jobs_dir()
    paths = [spec_path(folder, name) for name in names or sorted(p.stem for p in folder.glob("*.yaml") if p.is_file())]
    results = []
    for path in paths:
        try:
            load_spec(path)
            results.append({"spec": str(path), "valid": True, "error": None})
        except ConfigError as exc:
            results.append({"spec": str(path), "valid": False, "error": str(exc)})
    views.print_validation(results, as_json)
    if not all(result["valid"] for result in results):
        raise typer.Exit(1)


@config_app.command("set")
@one_line_errors
def config_set(
    name: str = typer.Argument(..., help="Job spec name."),
    assignments: list[str] = typer.Argument(..., help="KEY=VALUE ... e.g. run.train.lr=1e-4"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Edit a spec in place, keeping comments and layout.

    Validates the edited spec first; an invalid value writes nothing."""
    from ops.spec import spec_path  # heavy (pydantic, ruamel): only the commands that read specs import them
    from ops.specedit import set_values

    path = spec_path(jobs_dir(), name)
    views.print_changes(path, set_values(path, assignments), as_json)


# ---------------------------------------------------------------------------------------------
# ckpt inspect, ckpt best


@ckpt_app.command("inspect")
@one_line_errors
def ckpt_inspect(
    reference: str = typer.Argument(..., help="A run (ops id, engine job id, latest), a run dir or a .pt file."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Config, step, metrics, size, method, net and parent run of a checkpoint."""
    project, registry = runs.open_project()
    record = runs.inspect_checkpoint(project, runs.checkpoint_reference(project, registry, reference))
    views.echo_json(record) if as_json else views.print_checkpoint(record)


@ckpt_app.command("best")
@one_line_errors
def ckpt_best(
    reference: str = typer.Argument(
        ..., help="A run (ops id, engine job id, latest), a run dir, or a spec name (all its runs)."
    ),
    metric: str = typer.Option("loss", "--metric", help="A field of metrics.jsonl, e.g. loss or val_bits_per_char."),
    mode: str = typer.Option("min", "--mode", help="min or max."),
    copy_to: Path = typer.Option(None, "--copy-to", help="Copy the best checkpoint to this path."),
    as_json: bool = JSON_OPTION,
) -> None:
    """The step checkpoint with the best logged metric, among a run's or a spec's."""
    project, registry = runs.open_project()
    result = runs.best_checkpoint(project, registry, reference, metric, mode, copy_to)
    views.echo_json(result) if as_json else views.print_best(result)

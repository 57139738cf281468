"""The `ops` command line: submit, watch and record diffusion experiments.

Every command takes `--json` for agents. Stable fields:
- a run (`list`, `submit`, `monitor`, `wait`, `cancel`, `sync`): ops_id, name, engine, engine_job_id,
  state (QUEUED RUNNING SUCCEEDED FAILED CANCELLED PREEMPTED UNKNOWN), run_dir, git_commit,
  created_at, started_at, finished_at (unix seconds or null), exit_code, requeues, sweep, overrides,
  github_issue (the issue's URL), journal_post (the post's path), detail (why it is in its state,
  in the engine's words).
- `submit` and `monitor` add outbox: [{kind, error, attempts, failed_at}], the follow-ups (GitHub
  issue or comment, journal post, experiment log) that failed and wait for the next `ops sync`.
- `journal`: ops_id, state, post (path), url (in the built site), images.
- `compare`: runs, states, config {key: [value per run]} (differing keys only), metrics {name:
  [value per run]}, post (path, with --post).
- `monitor` adds elapsed_seconds, progress {step, total_steps, epoch, total_epochs, loss,
  it_per_s, eta_seconds, percent}, log_tail (with --logs), and with --full: config, provenance,
  job, paths.
Exit codes: 0 ok, 2 bad input (one line on stderr, nothing written); `ops wait` exits by the
final state: 0 SUCCEEDED, 1 FAILED, 3 CANCELLED, 75 PREEMPTED (resumable), 4 UNKNOWN.
Heavy imports live inside the commands that need them, so `ops --help` stays fast.
"""

import functools
import json
import shlex
import signal
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import typer

from ops.errors import OpsError

app = typer.Typer(help="Submit, watch and record diffusion experiments.", no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False)
config_app = typer.Typer(help="Job specs in configs/jobs/: list, show, validate, set.", no_args_is_help=True,
                         rich_markup_mode=None)
app.add_typer(config_app, name="config")

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
            typer.echo(f"error: the run registry is damaged ({exc}); `ops sync` moves it aside and rebuilds it "
                       "from the run dirs", err=True)
            raise typer.Exit(2) from None

    return wrapper


def echo_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def console():
    """Rich output for people. To a file or a pipe (a log, an agent) it never wraps a line: width
    unlimited, no soft wrapping, so that grep and parsers see each line whole."""
    from rich.console import Console

    terminal = sys.stdout.isatty()
    return Console(highlight=False, soft_wrap=not terminal, width=None if terminal else 1_000_000)


def rule(out, title: str) -> None:
    """A section rule: the console's width on a terminal, a short one elsewhere."""
    if out.is_terminal:
        out.rule(title)
    else:
        out.print(f"── {title} " + "─" * 40)


def open_project(create: bool = False):
    """The project and its registry. A command that only looks at runs writes nothing: in a project
    without a registry yet it gets an empty one in memory (no run to find, none to list)."""
    from ops.registry import Registry
    from ops.settings import Project

    project = Project()
    if create or project.registry_path.is_file():
        return project, Registry(project.registry_path)
    return project, Registry.empty()


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
    from ops.secrets import redact_words

    return shlex.join(["ops", *redact_words(sys.argv[1:])])


def when(timestamp: float | None) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(timestamp)) if timestamp else "-"


STATE_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow", "PREEMPTED": "magenta",
               "RUNNING": "cyan", "QUEUED": "blue", "UNKNOWN": "dim"}


def styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


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
    image: str = typer.Option(None, "--image", help="Container engines: run this image (REPO@sha256:...) "
                                                     "instead of building one for the code."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Validate a spec, record provenance, start the run.

    Creates the run dir and registry row, starts it on the engine, prints the ops id and the
    engine job id. --sweep makes one run per combination of values."""
    if resume_id:
        return resume(resume_id, as_json)
    if not name:
        raise OpsError("NAME: missing; give a job spec name (`ops config list`) or --resume JOB_ID")
    from ops import runs
    from ops.engines import Launch, get_engine
    from ops.settings import Project

    project = Project()
    planned = runs.plan(project, name, engine, overrides, sweeps)  # raises before anything is written
    for warning in dict.fromkeys(warning for item in planned for warning in item.warnings):
        typer.echo(f"warning: {warning}", err=True)
    if dry_run:
        return print_dry_run(project, planned, as_json, get_engine, Launch)
    from ops.registry import Registry

    registry = Registry(project.registry_path)
    with signals_interrupt():
        started = runs.submit(project, registry, planned, command_line(), allow_no_git, image)
    warn_outbox(registry, started)
    left_out = snapshot_left_out(started)
    for item in left_out:
        typer.echo(f"note: left out of the run's code snapshot: {item['path']} ({item['reason']})", err=True)
    if as_json:
        return echo_json({"runs": [run.to_json() | {"outbox": registry.failures(run.ops_id), "left_out": left_out}
                                   for run in started]})
    out = console()
    for run in started:
        values = "  " + " ".join(f"{key}={value}" for key, value in run.sweep.items()) if run.sweep else ""
        out.print(f"[bold]{run.ops_id}[/]  {run.engine} job {run.engine_job_id}  {styled(run.state)}{values}")
        out.print(f"  run dir {run.run_dir}")
    if len(started) == 1:
        out.print(f"watch it: ops monitor {started[0].ops_id} --logs --follow")


def print_dry_run(project, planned, as_json, get_engine, Launch) -> None:
    from ruamel.yaml import YAML

    rows = []
    for item in planned:
        engine = get_engine(item.spec.engine, project.settings)
        placeholder = project.runs_dir / f"{item.spec.name}-<id>"
        launch = Launch(run_dir=placeholder, project_root=project.root,
                        resources=item.spec.resources.model_dump(mode="json")[item.spec.engine])
        rows.append({"spec": item.spec.model_dump(mode="json"), "sweep": item.sweep, "overrides": item.overrides,
                     "changes": item.changes, "warnings": item.warnings, "would_start": engine.describe(launch)})
    if as_json:
        return echo_json({"dry_run": True, "runs": rows})
    yaml = YAML()
    yaml.default_flow_style = None
    for row in rows:
        typer.echo(f"# dry run: nothing written. sweep values: {row['sweep'] or 'none'}")
        for key, old, new in row["changes"]:
            typer.echo(f"# changed from the spec: {key}: {old} -> {new}")
        yaml.dump(row["spec"], sys.stdout)
        typer.echo(f"# would start on {row['spec']['engine']} {row['would_start']}\n")


def snapshot_left_out(started) -> list[dict]:
    """The untracked files that provenance kept out of diff.patch (the same for every run of a
    submit): [{path, reason, ...}]; the user should know that the run will not see them."""
    from ops.rundir import PROVENANCE, git_of, read_json

    provenance = read_json(Path(started[0].run_dir) / PROVENANCE) if started else None
    return git_of(provenance).get("skipped_untracked", [])


def warn_outbox(registry, started) -> None:
    """The run started; what could not be sent yet (GitHub down) waits for the next `ops sync`."""
    for run in started:
        for item in registry.failures(run.ops_id):
            when = "waits for `ops sync --retry` once fixed" if item["permanent"] else "waits for the next `ops sync`"
            typer.echo(f"warning: {run.ops_id}: {item['kind']} {when}: {item['error']}", err=True)


@app.command()
@one_line_errors
def resume(job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."), as_json: bool = JSON_OPTION) -> None:
    """Continue a stopped run from its last checkpoint.

    For preempted, cancelled or failed runs; the run keeps its ops id and run dir."""
    from ops import runs

    project, registry = open_project()
    with signals_interrupt():
        run = runs.resume(project, registry, runs.find(registry, job_id))
    warn_outbox(registry, [run])
    if as_json:
        return echo_json(run.to_json())
    console().print(f"[bold]{run.ops_id}[/] resumed: {run.engine} job {run.engine_job_id}  {styled(run.state)}"
                    f"  (restart {run.requeues})")


@app.command()
@one_line_errors
def rerun(job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."), as_json: bool = JSON_OPTION) -> None:
    """Run again on the recorded commit, config and diff.

    A new run with the same spec, on the recorded commit plus its diff.patch (materialised in
    RUN_DIR/code); refuses when the commit is not in the repository."""
    from ops import runs

    project, registry = open_project()
    with signals_interrupt():
        run = runs.rerun(project, registry, runs.find(registry, job_id), command_line())
    warn_outbox(registry, [run])
    if as_json:
        return echo_json(run.to_json())
    console().print(f"[bold]{run.ops_id}[/] (rerun of {job_id} at {(run.git_commit or '')[:8]}): "
                    f"{run.engine} job {run.engine_job_id}  {styled(run.state)}")


# ---------------------------------------------------------------------------------------------
# monitor, list, wait, cancel, sync


def run_view(project, run, engine_logs: bool, lines: int, full: bool) -> dict:
    from ops import monitor, rundir
    from ops.rundir import JOB, PROVENANCE, read_json

    run_dir = Path(run.run_dir)
    job = read_json(run_dir / JOB) or {}
    spec = job.get("spec") if isinstance(job.get("spec"), dict) else {}  # a damaged job.json shows less
    view = run.to_json() | {"elapsed_seconds": monitor.elapsed_seconds(run), "progress": monitor.progress(run, spec)}
    if engine_logs:
        from ops.engines import get_engine

        text, _ = get_engine(run.engine, project.settings).logs(run)
        view["log_tail"] = monitor.tail(text, lines)
    if full:
        view["job"] = job
        view["config"] = spec.get("run")
        view["provenance"] = read_json(run_dir / PROVENANCE)
        view["paths"] = {name: str(run_dir / name) for name in
                         (rundir.CONFIG, rundir.PROVENANCE, rundir.DIFF, rundir.METRICS, rundir.LOG,
                          rundir.CHECKPOINTS, rundir.SAMPLES, rundir.SUMMARY)}
    return view


def print_view(view: dict) -> None:
    from ops.monitor import format_seconds

    out = console()
    p = view["progress"]
    out.print(f"[bold]{view['ops_id']}[/]  {styled(view['state'])}  {view['engine']} job {view['engine_job_id']}"
              f"  elapsed {format_seconds(view['elapsed_seconds'])}"
              + (f"  exit code {view['exit_code']}" if view["exit_code"] is not None else "")
              + (f"  restarts {view['requeues']}" if view["requeues"] else ""))
    if p["step"] is not None:
        def shown(value, form: str) -> str:  # a field an old or damaged metrics line lacks
            return "-" if value is None else format(value, form)

        out.print(f"  step {p['step']}/{shown(p['total_steps'], '')} ({shown(p['percent'], '')}%)  "
                  f"epoch {shown(p['epoch'], '.2f')}/{shown(p['total_epochs'], '')}  loss {shown(p['loss'], '.4f')}  "
                  f"{shown(p['it_per_s'], '.1f')} it/s  eta {format_seconds(p['eta_seconds'])}")
    else:
        out.print("  no metrics yet")
    out.print(f"  run dir {view['run_dir']}")
    if view["detail"]:
        out.print(f"  {view['detail']}", markup=False)
    if view["state"] == "PREEMPTED":
        from ops.engines import get_engine
        from ops.settings import Project

        if get_engine(view["engine"], Project().settings).requeues_itself:
            out.print(f"  stopped at a checkpoint; {view['engine']} requeues it and it resumes by itself")
        else:
            out.print(f"  stopped at a checkpoint; `ops resume {view['ops_id']}` continues it")
    if view["github_issue"]:
        out.print(f"  issue {view['github_issue']}", markup=False)
    if view["journal_post"]:
        out.print(f"  journal post {view['journal_post']}", markup=False)
    for item in view.get("outbox", []):
        if item["permanent"]:
            out.print(f"  [red]stopped[/] {item['kind']} until fixed, then `ops sync --retry`: {item['error']}",
                      markup=True)
        else:
            out.print(f"  [yellow]waiting[/] {item['kind']} ({item['attempts']} tries): {item['error']}")
    if "log_tail" in view:
        rule(out, "log tail")
        typer.echo(view["log_tail"])  # as the run wrote it: rich would expand its tabs
    if "provenance" in view:
        from ruamel.yaml import YAML

        rule(out, "full record")
        YAML().dump({key: view[key] for key in ("paths", "provenance", "job")}, sys.stdout)


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
    from ops import runs

    project, registry = open_project()
    run, problems = runs.reconcile(project, registry, runs.find(registry, job_id))
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)
    if not follow:
        view = run_view(project, run, logs, lines, full) | {"outbox": registry.failures(run.ops_id)}
        return echo_json(view) if as_json else print_view(view)
    follow_run(project, registry, run, as_json, interval)


def settled(project, run) -> bool:
    from ops.engines import get_engine

    # A local PREEMPTED run waits for `ops resume`; a SLURM one comes back by itself.
    stays_stopped = not get_engine(run.engine, project.settings).requeues_itself
    return run.finished or (run.state == "PREEMPTED" and stays_stopped)


def follow_run(project, registry, run, as_json: bool, interval: float) -> None:
    from ops.engines import get_engine

    engine = get_engine(run.engine, project.settings)
    text, offset = engine.logs(run)
    try:
        follow_loop(project, registry, run, engine, text, offset, as_json, interval)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; the run goes on: ops monitor {run.ops_id} --logs", err=True)


def follow_loop(project, registry, run, engine, text: str, offset: int, as_json: bool, interval: float) -> None:
    from ops import runs

    last_state = None
    while True:
        if run.state != last_state:
            last_state = run.state
            if as_json:
                typer.echo(json.dumps({"event": "state", "state": run.state, "time": time.time()}))
            else:
                console().print(f"[bold]{run.ops_id}[/] {styled(run.state)}")
        if text:
            if as_json:
                for line in text.splitlines():
                    typer.echo(json.dumps({"event": "log", "line": line}))
            else:
                sys.stdout.write(text)
                sys.stdout.flush()
        if settled(project, run):
            break
        time.sleep(interval)
        run, _ = runs.reconcile(project, registry, registry.get(run.ops_id), engine)
        text, offset = engine.logs(run, offset)
    if as_json:
        typer.echo(json.dumps({"event": "end", "run": run.to_json()}, default=str))
    else:
        console().print(f"[bold]{run.ops_id}[/] ended {styled(run.state)}"
                        + (f" (exit code {run.exit_code})" if run.exit_code is not None else ""))


@app.command("list")
@one_line_errors
def list_runs(
    states: list[str] = typer.Option([], "--state", help="Only runs in this state (repeatable)."),
    names: list[str] = typer.Option([], "--name", help="Only runs of this spec; * matches anything (repeatable)."),
    limit: int = typer.Option(50, "--limit", help="Newest N runs; 0 for all."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Runs, newest first (unfinished ones are refreshed)."""
    from ops import runs
    from ops.registry import STATES

    for state in states:
        if state.upper() not in STATES:
            raise OpsError(f"--state {state!r}: not a state; allowed: {', '.join(STATES)}")
    project, registry = open_project()
    shown = registry.select([s.upper() for s in states], names, limit or None)
    shown = [runs.reconcile(project, registry, run)[0] if not run.finished else run for run in shown]
    if as_json:
        return echo_json([run.to_json() for run in shown])
    if not shown:
        return typer.echo("no runs" + (" match" if states or names else " yet; `ops submit NAME` starts one"))
    from ops.monitor import elapsed_seconds, format_seconds

    # Plain aligned columns: a rich table costs a fifth of a second for 50 rows.
    header = ("ops id", "state", "engine", "job", "created", "elapsed", "commit", "sweep")
    rows = [(run.ops_id, run.state, run.engine, run.engine_job_id or "-", when(run.created_at),
             format_seconds(elapsed_seconds(run)), (run.git_commit or "no git")[:8],
             " ".join(f"{k}={v}" for k, v in run.sweep.items())) for run in shown]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    color = sys.stdout.isatty()
    typer.echo("  ".join(name.ljust(width) for name, width in zip(header, widths)).rstrip())
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        if color:
            cells[1] = typer.style(cells[1], fg=STATE_STYLE.get(row[1], "white").replace("dim", "white"))
        typer.echo("  ".join(cells).rstrip())


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
    from ops import runs

    project, registry = open_project()
    run = runs.find(registry, job_id)
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        run, problems = runs.reconcile(project, registry, run)
        if settled(project, run):
            break
        if deadline and time.monotonic() > deadline:
            typer.echo(f"{run.ops_id}: still {run.state} after {timeout:g} s", err=True)
            raise typer.Exit(124)
        time.sleep(interval)
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)
    if as_json:
        echo_json(run.to_json())
    else:
        console().print(f"[bold]{run.ops_id}[/] {styled(run.state)}")
    raise typer.Exit(WAIT_EXIT_CODES.get(run.state, 4))


@app.command()
@one_line_errors
def cancel(
    job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."),
    grace: float = typer.Option(None, "--grace", help="Seconds between SIGTERM and SIGKILL (default: ops.yaml)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Stop a run: SIGTERM (it checkpoints), later SIGKILL."""
    from ops import runs
    from ops.engines import get_engine

    project, registry = open_project()
    run, _ = runs.reconcile(project, registry, runs.find(registry, job_id))
    if run.finished:
        message = f"{run.ops_id}: already {run.state}; nothing to cancel"
    else:
        engine = get_engine(run.engine, project.settings)
        engine.cancel(run, project.settings.cancel_grace_seconds if grace is None else grace)
        run, _ = runs.reconcile(project, registry, run, engine)
        message = f"{run.ops_id}: {run.state}"
    if as_json:
        return echo_json(run.to_json())
    console().print(message)


@app.command()
@one_line_errors
def sync(
    retry: bool = typer.Option(False, "--retry", help="Also retry follow-ups stopped by a permanent error "
                                                       "(a GitHub 4xx), after fixing its cause."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Reconcile unfinished runs, rebuild rows, retry follow-ups.

    Polls the engine of every unfinished run, adds registry rows for run dirs it lacks, and
    retries follow-ups (experiment log ...) that failed before."""
    from ops import runs
    from ops.registry import Registry, RegistryDamaged, move_aside
    from ops.rundir import JOB
    from ops.settings import Project

    project = Project()
    repaired = []
    try:
        _, registry = open_project(create=any(project.runs_dir.glob(f"*/{JOB}")))  # run dirs to index, or none yet
    except RegistryDamaged as exc:
        aside = move_aside(project.registry_path)
        repaired.append(f"{exc.args[0].split(';')[0]}; moved it to {aside} and rebuilt the registry from the run dirs")
        registry = Registry(project.registry_path)
    try:
        if retry:
            registry.retry_stopped()
        added, reconciled, problems = runs.sync(project, registry)
    except sqlite3.DatabaseError as exc:  # damage that opening it did not reach: rebuild all the same
        registry.close()
        aside = move_aside(project.registry_path)
        repaired.append(f"{project.registry_path}: damaged ({exc}); moved it to {aside} and rebuilt the registry "
                        "from the run dirs")
        registry = Registry(project.registry_path)
        added, reconciled, problems = runs.sync(project, registry)
    problems = repaired + problems
    if as_json:
        return echo_json({"rebuilt": added, "runs": [run.to_json() for run in reconciled], "problems": problems})
    out = console()
    for ops_id in added:
        out.print(f"rebuilt registry row for {ops_id} from its run dir")
    for run in reconciled:
        out.print(f"{run.ops_id}  {styled(run.state)}")
    for problem in problems:
        out.print(f"[yellow]warning[/] {problem}")
    out.print(f"synced {len(reconciled)} unfinished run(s)")


# ---------------------------------------------------------------------------------------------
# journal, compare


@app.command()
@one_line_errors
def journal(job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."), as_json: bool = JSON_OPTION) -> None:
    """Write the run's journal post again, from its run dir.

    The post is JOURNAL_DIR/blog/posts/DATE-OPS_ID.md, served at blog/OPS_ID/, its images in
    OPS_ID/ beside it. Everything is rewritten except the text inside the marked regions
    (Observations), which is kept. JSON: ops_id, state, post (path), url (in the site), images."""
    from ops import runs
    from ops.journal import write_post

    project, registry = open_project()
    run, problems = runs.reconcile(project, registry, runs.find(registry, job_id))
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)
    path = write_post(project, run)
    registry.update(run.ops_id, journal_post=str(path))
    images = sorted(str(image) for image in (path.parent / run.ops_id).glob("*.png"))
    if as_json:
        return echo_json({"ops_id": run.ops_id, "state": run.state, "post": str(path), "url": f"blog/{run.ops_id}/",
                          "images": images})
    typer.echo(f"{run.ops_id}: {path}")


def print_columns(title: str, ids: list[str], rows: dict[str, list]) -> None:
    from ops.journal import format_value

    def shown(value) -> str:
        text = "-" if value is None else format_value(value)
        return text if len(text) <= 40 else text[:39] + "…"

    table = [(title, *ids), *((key, *map(shown, values)) for key, values in rows.items())]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip())


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
    from ops import runs
    from ops.journal import comparison, write_comparison

    project, registry = open_project()
    found = {}
    for job_id in job_ids:
        run = runs.reconcile(project, registry, runs.find(registry, job_id))[0]
        found.setdefault(run.ops_id, run)
    if len(found) < 2:
        raise OpsError(f"JOB_ID: {', '.join(job_ids)} name {len(found)} run; compare needs two or more")
    compared = comparison(list(found.values()))
    path = write_comparison(project, list(found.values()), compared) if post else None
    if as_json:
        return echo_json(compared | {"post": str(path) if path else None})
    if compared["config"]:
        print_columns("differing settings", compared["runs"], compared["config"])
    else:
        typer.echo("no differing settings")
    typer.echo("")
    print_columns("metric", compared["runs"], {"state": compared["states"], **compared["metrics"]})
    if path:
        typer.echo(f"\npost: {path}")


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
    from ops.build import build_image
    from ops.settings import Project

    image = build_image(Project(), push=push, builder=builder)
    if as_json:
        return echo_json(image.to_json())
    state = "built and pushed" if image.pushed else "built" if image.built else "already in the registry"
    typer.echo(f"{image.reference}  {state}" + (f"\n{image.by_digest}" if image.digest else ""))


@app.command()
@one_line_errors
def pull(
    job_id: str = typer.Argument(..., help="ops id, engine job id, or latest."),
    what: str = typer.Option("all", "--what", help="checkpoints | samples | all"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Download a cloud run's files into its local run dir.

    Resumes partial downloads and skips files already present with the same checksum."""
    from ops import runs
    from ops.engines.vertex import VERTEX_FILE
    from ops.rundir import OPS_RECORDS, read_required
    from ops.storage import WHAT, pull as pull_files

    if what not in WHAT:
        raise OpsError(f"--what {what!r}: not allowed; one of {', '.join(WHAT)}")
    project, registry = open_project()
    run = runs.find(registry, job_id)
    if run.engine != "vertex":
        raise OpsError(f"{run.ops_id}: ran on {run.engine}; its run dir is already here: {run.run_dir}")
    gcs_run_dir = read_required(Path(run.run_dir) / VERTEX_FILE)["gcs_run_dir"]
    result = pull_files(gcs_run_dir, Path(run.run_dir), what, keep=OPS_RECORDS | {VERTEX_FILE},
                        progress=None if as_json else lambda name: typer.echo(f"  {name}"))
    if run.finished and result["downloaded"]:
        runs.refresh_records(project, run)  # the log's results and the post, now with the run's figures
    if as_json:
        return echo_json({"ops_id": run.ops_id, "from": gcs_run_dir, "to": run.run_dir, **result})
    typer.echo(f"{len(result['downloaded'])} downloaded, {len(result['skipped'])} unchanged, into {run.run_dir}")


# ---------------------------------------------------------------------------------------------
# config


def jobs_dir() -> Path:
    from ops.settings import Project

    return Project().jobs_dir


@config_app.command("list")
@one_line_errors
def config_list(as_json: bool = JSON_OPTION) -> None:
    """The job specs, with task, engine and description (or why a spec does not parse)."""
    from diffusion.config import ConfigError, read_yaml

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
        rows.append({"name": path.stem, "task": run.get("task", "train"), "engine": raw.get("engine", "local"),
                     "description": " ".join(str(raw.get("description", "")).split()), "error": None})
    if as_json:
        return echo_json(rows)
    from rich.table import Table

    table = Table("name", "task", "engine", "description")
    for row in rows:
        description = f"[red]{row['error']}[/]" if row["error"] else row["description"]
        table.add_row(row["name"], row["task"] or "-", row["engine"] or "-", description)
    console().print(table)


@config_app.command("show")
@one_line_errors
def config_show(
    name: str = typer.Argument(..., help="Job spec name."),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE to apply before showing."),
    as_json: bool = JSON_OPTION,
) -> None:
    """The resolved spec: every value in effect, defaults included."""
    from ruamel.yaml import YAML

    from ops.spec import load_spec, spec_path

    spec = load_spec(spec_path(jobs_dir(), name), overrides).model_dump(mode="json")
    if as_json:
        return echo_json(spec)
    yaml = YAML()
    yaml.default_flow_style = None
    yaml.dump(spec, sys.stdout)


@config_app.command("validate")
@one_line_errors
def config_validate(
    names: list[str] = typer.Argument(None, help="Spec names or paths; all of configs/jobs/ when omitted."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Validate specs: a line per problem, exit 1 if any."""
    from diffusion.config import ConfigError

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
    if as_json:
        echo_json(results)
    else:
        for result in results:
            typer.echo(f"ok    {result['spec']}" if result["valid"] else f"error {result['error']}")
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
    from ops.specedit import set_values
    from ops.spec import spec_path

    path = spec_path(jobs_dir(), name)
    changes = set_values(path, assignments)
    if as_json:
        return echo_json({"spec": str(path), "changes": [{"key": k, "old": o, "new": n} for k, o, n in changes]})
    for key, old, new in changes:
        typer.echo(f"{path.name}: {key}: {old} -> {new}")

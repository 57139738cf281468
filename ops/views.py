"""What the commands print: runs as lines, tables and styled states for people, as JSON for agents.

Rich and ruamel.yaml are imported by the views that use them, so that `ops --help` and the
`--json` answers do not wait for them.
"""

import json
import sys
import time
from pathlib import Path

import typer

from ops import monitor, rundir
from ops.engines import get_engine
from ops.journal import format_value
from ops.registry import Registry, Run
from ops.settings import Project

STATE_STYLE = {
    "SUCCEEDED": "green",
    "FAILED": "red",
    "CANCELLED": "yellow",
    "PREEMPTED": "magenta",
    "RUNNING": "cyan",
    "QUEUED": "blue",
    "UNKNOWN": "dim",
}


def echo_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def console():
    """Rich output for people. To a file or a pipe (a log, an agent) it never wraps a line: width
    unlimited, no soft wrapping, so that grep and parsers see each line whole."""
    from rich.console import Console  # a few tens of ms: not for --json or `ops --help`

    terminal = sys.stdout.isatty()
    return Console(highlight=False, soft_wrap=not terminal, width=None if terminal else 1_000_000)


def rule(out, title: str) -> None:
    """A section rule: the console's width on a terminal, a short one elsewhere."""
    if out.is_terminal:
        out.rule(title)
    else:
        out.print(f"── {title} " + "─" * 40)


def when(timestamp: float | None) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(timestamp)) if timestamp else "-"


def styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def print_yaml(data) -> None:
    from ruamel.yaml import YAML  # only the views that print YAML pay for it

    yaml = YAML()
    yaml.default_flow_style = None
    yaml.width = 1 << 16  # output to a file or a pipe never wraps a line
    yaml.dump(data, sys.stdout)


def warn(problems: list[str]) -> None:
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)


def warn_outbox(registry: Registry, started: list[Run]) -> None:
    """The run started; what could not be sent yet (GitHub down) waits for the next `ops sync`."""
    for run in started:
        for item in registry.failures(run.ops_id):
            when = "waits for `ops sync --retry` once fixed" if item["permanent"] else "waits for the next `ops sync`"
            typer.echo(f"warning: {run.ops_id}: {item['kind']} {when}: {item['error']}", err=True)


# ---------------------------------------------------------------------------------------------
# submit, resume, rerun


def print_dry_run(rows: list[dict], as_json: bool) -> None:
    if as_json:
        return echo_json({"dry_run": True, "runs": rows})
    for row in rows:
        typer.echo(f"# dry run: nothing written. sweep values: {row['sweep'] or 'none'}")
        for key, old, new in row["changes"]:
            typer.echo(f"# changed from the spec: {key}: {old} -> {new}")
        print_yaml(row["spec"])
        typer.echo(f"# would start on {row['spec']['engine']} {row['would_start']}")
        if row["missing"]:
            typer.echo(f"# note: a real submit from here needs {'; '.join(row['missing'])}")
        typer.echo("")


def print_submitted(registry: Registry, started: list[Run], left_out: list[dict], as_json: bool) -> None:
    warn_outbox(registry, started)
    for item in left_out:
        typer.echo(f"note: left out of the run's code snapshot: {item['path']} ({item['reason']})", err=True)
    if as_json:
        return echo_json(
            {
                "runs": [
                    run.to_json() | {"outbox": registry.failures(run.ops_id), "left_out": left_out} for run in started
                ]
            }
        )
    out = console()
    for run in started:
        values = "  " + " ".join(f"{key}={value}" for key, value in run.sweep.items()) if run.sweep else ""
        out.print(f"[bold]{run.ops_id}[/]  {run.engine} job {run.engine_job_id}  {styled(run.state)}{values}")
        out.print(f"  run dir {run.run_dir}")
    if len(started) == 1:
        out.print(f"watch it: ops monitor {started[0].ops_id} --logs --follow")


def print_resumed(registry: Registry, run: Run, as_json: bool) -> None:
    warn_outbox(registry, [run])
    if as_json:
        return echo_json(run.to_json())
    console().print(
        f"[bold]{run.ops_id}[/] resumed: {run.engine} job {run.engine_job_id}  {styled(run.state)}"
        f"  (restart {run.requeues})"
    )


def print_rerun(registry: Registry, run: Run, job_id: str, as_json: bool) -> None:
    warn_outbox(registry, [run])
    if as_json:
        return echo_json(run.to_json())
    console().print(
        f"[bold]{run.ops_id}[/] (rerun of {job_id} at {(run.git_commit or '')[:8]}): "
        f"{run.engine} job {run.engine_job_id}  {styled(run.state)}"
    )


# ---------------------------------------------------------------------------------------------
# monitor, list, wait, cancel, sync


def run_view(project: Project, run: Run, engine_logs: bool, lines: int, full: bool) -> dict:
    """`ops monitor`'s view of a run: the run, its elapsed time and progress, with `engine_logs`
    its log tail, with `full` its job record, config, provenance and file paths."""
    run_dir = Path(run.run_dir)
    record = rundir.read_json(run_dir / rundir.JOB)
    job = record or {}
    spec = job.get("spec") if isinstance(job.get("spec"), dict) else {}  # a damaged job.json shows less
    view = run.to_json() | {
        "elapsed_seconds": monitor.elapsed_seconds(run),
        "progress": monitor.progress(run, spec),
        "expectations": monitor.run_expectations(run, record),
        "estimate": job.get("estimate"),  # a GPU-sized run on a CPU: its duration here, from timed steps
    }
    if engine_logs:
        text, _ = get_engine(run.engine, project.settings).logs(run)
        view["log_tail"] = monitor.tail(text, lines)
    if full:
        view["job"] = job
        view["config"] = spec.get("run")
        view["provenance"] = rundir.read_json(run_dir / rundir.PROVENANCE)
        view["paths"] = {
            name: str(run_dir / name)
            for name in (
                rundir.CONFIG,
                rundir.PROVENANCE,
                rundir.DIFF,
                rundir.METRICS,
                rundir.LOG,
                rundir.CHECKPOINTS,
                rundir.SAMPLES,
                rundir.SUMMARY,
            )
        }
    return view


def print_view(project: Project, view: dict) -> None:
    out = console()
    p = view["progress"]
    out.print(
        f"[bold]{view['ops_id']}[/]  {styled(view['state'])}  {view['engine']} job {view['engine_job_id']}"
        f"  elapsed {monitor.format_seconds(view['elapsed_seconds'])}"
        + (f"  exit code {view['exit_code']}" if view["exit_code"] is not None else "")
        + (f"  restarts {view['requeues']}" if view["requeues"] else "")
    )
    if p["step"] is not None:

        def shown(value, form: str) -> str:  # a field an old or damaged metrics line lacks
            return "-" if value is None else format(value, form)

        out.print(
            f"  step {p['step']}/{shown(p['total_steps'], '')} ({shown(p['percent'], '')}%)  "
            f"epoch {shown(p['epoch'], '.2f')}/{shown(p['total_epochs'], '')}  loss {shown(p['loss'], '.4f')}  "
            f"{shown(p['it_per_s'], '.1f')} it/s  eta {monitor.format_seconds(p['eta_seconds'])}"
        )
    elif not view["removed_at"]:
        out.print("  no metrics yet")
        if view["estimate"]:
            out.print(f"  {view['estimate']['warning']}", markup=False)
    if view["removed_at"]:
        kept = ", ".join(view["removed_kept"] or []) or "nothing"
        removed = time.strftime("%Y-%m-%d %H:%M", time.localtime(view["removed_at"]))
        out.print(f"  run dir {view['run_dir']} removed by ops rm on {removed} (kept: {kept})", markup=False)
    else:
        out.print(f"  run dir {view['run_dir']}")
    expectations = view["expectations"]
    if expectations["verdict"]:
        out.print(f"  expected: {expectations['verdict']}", markup=False)
        for check in expectations["checks"]:
            out.print(f"    {check_text(check)}", markup=False)
    if view["detail"]:
        out.print(f"  {view['detail']}", markup=False)
    if view["state"] == "PREEMPTED":
        if get_engine(view["engine"], project.settings).requeues_itself:
            out.print(f"  stopped at a checkpoint; {view['engine']} requeues it and it resumes by itself")
        else:
            out.print(f"  stopped at a checkpoint; `ops resume {view['ops_id']}` continues it")
    if view["github_issue"]:
        out.print(f"  issue {view['github_issue']}", markup=False)
    if view["journal_post"]:
        out.print(f"  journal post {view['journal_post']}", markup=False)
    for item in view.get("outbox", []):
        if item["permanent"]:
            out.print(
                f"  [red]stopped[/] {item['kind']} until fixed, then `ops sync --retry`: {item['error']}", markup=True
            )
        else:
            out.print(f"  [yellow]waiting[/] {item['kind']} ({item['attempts']} tries): {item['error']}")
    if "log_tail" in view:
        rule(out, "log tail")
        typer.echo(view["log_tail"])  # as the run wrote it: rich would expand its tabs
    if "provenance" in view:
        from ruamel.yaml import YAML  # as in print_yaml, with ruamel's default block style

        rule(out, "full record")
        yaml = YAML()
        yaml.width = 1 << 16  # as in print_yaml: never a wrapped line
        yaml.dump({key: view[key] for key in ("paths", "provenance", "job")}, sys.stdout)


def print_event(event: str, value, as_json: bool) -> None:
    """One event of `ops monitor --follow` (ops.runs.follow): a state, a piece of the log, the end."""
    if event == "state":
        if as_json:
            typer.echo(json.dumps({"event": "state", "state": value.state, "time": time.time()}))
        else:
            console().print(f"[bold]{value.ops_id}[/] {styled(value.state)}")
    elif event == "log":
        if as_json:
            for line in value.splitlines():
                typer.echo(json.dumps({"event": "log", "line": line}))
        else:
            sys.stdout.write(value)
            sys.stdout.flush()
    elif as_json:
        typer.echo(json.dumps({"event": "end", "run": value.to_json()}, default=str))
    else:
        console().print(
            f"[bold]{value.ops_id}[/] ended {styled(value.state)}"
            + (f" (exit code {value.exit_code})" if value.exit_code is not None else "")
        )


def check_text(check: dict) -> str:
    """One judged `expect:` line: `scores.confident_share >= 0.7: 0.812, met`."""
    measured = "-" if check["measured"] is None else format_value(check["measured"])
    return f"{check['expect']}: {measured}, {check['verdict']}" + (f" ({check['why']})" if check.get("why") else "")


def print_runs(shown: list[Run], filtered: bool, as_json: bool) -> None:
    verdicts = {run.ops_id: monitor.run_expectations(run)["verdict"] for run in shown}
    if as_json:
        return echo_json([run.to_json() | {"verdict": verdicts[run.ops_id]} for run in shown])
    if not shown:
        return typer.echo("no runs" + (" match" if filtered else " yet; `ops submit NAME` starts one"))
    # Plain aligned columns: a rich table costs a fifth of a second for 50 rows.
    header = ("ops id", "state", "expected", "engine", "job", "created", "elapsed", "commit", "sweep")
    rows = [
        (
            run.ops_id,
            run.state
            + ((" (dir removed, checkpoint kept)" if run.removed_kept else " (dir removed)") if run.removed_at else ""),
            verdicts[run.ops_id] or "-",
            run.engine,
            run.engine_job_id or "-",
            when(run.created_at),
            monitor.format_seconds(monitor.elapsed_seconds(run)),
            (run.git_commit or "no git")[:8],
            " ".join(f"{k}={v}" for k, v in run.sweep.items()),
        )
        for run in shown
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    color = sys.stdout.isatty()
    typer.echo("  ".join(name.ljust(width) for name, width in zip(header, widths)).rstrip())
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        if color:
            cells[1] = typer.style(cells[1], fg=STATE_STYLE.get(row[1].split()[0], "white").replace("dim", "white"))
        typer.echo("  ".join(cells).rstrip())


def size_text(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def print_usage(rows: list[dict], pinned_bytes: int, as_json: bool) -> None:
    """`ops du`: bytes per run dir, biggest first, the total, and the pinned checkpoints'."""
    total = sum(row["bytes"] for row in rows)
    if as_json:
        return echo_json({"runs": rows, "total_bytes": total, "pinned_bytes": pinned_bytes})
    for row in sorted(rows, key=lambda row: -row["bytes"]):
        note = "  (run dir removed)" if row["removed_at"] and not row["bytes"] else ""
        note = note or ("  (removed; kept a checkpoint)" if row["removed_at"] else "")
        typer.echo(
            f"{size_text(row['bytes']):>10}  {size_text(row['checkpoint_bytes']):>10} in checkpoints  "
            f"{row['ops_id']}  {row['state']}{note}"
        )
    typer.echo(f"{size_text(total):>10}  total of {len(rows)} run(s)")
    if pinned_bytes:
        typer.echo(
            f"{size_text(pinned_bytes):>10}  in {rundir.PINNED}/: checkpoints of running runs that submitted runs read "
            "(hard links while the run keeps the file; delete one once no queued run reads it)"
        )


def print_removal(
    plans: list[dict], dry_run: bool, as_json: bool, pinned: list[str] = (), pinned_bytes: int = 0
) -> None:
    if as_json:
        pins = {} if dry_run else {"pinned_removed": list(pinned), "pinned_freed_bytes": pinned_bytes}
        return echo_json({"would_remove" if dry_run else "removed": plans} | pins)
    for plan in plans:
        kept = f", keeping {', '.join(plan['kept'])}" if plan["kept"] else ""
        verb = "would free" if dry_run else "freed"
        typer.echo(f"{plan['ops_id']}: {verb} {size_text(plan['freed_bytes'])} in {plan['run_dir']}{kept}")
        if remote := plan["remote"]:
            kept = f", keeping {', '.join(remote['kept'])}" if remote["kept"] else ""
            typer.echo(f"{plan['ops_id']}: {verb} {size_text(remote['freed_bytes'])} in {remote['gcs_run_dir']}{kept}")
    if pinned:
        typer.echo(f"freed {size_text(pinned_bytes)}: {len(pinned)} pinned checkpoint(s) that no remaining run reads")


def print_state(run: Run, as_json: bool) -> None:
    if as_json:
        echo_json(run.to_json())
    else:
        console().print(f"[bold]{run.ops_id}[/] {styled(run.state)}")


def print_cancelled(run: Run, stopped: bool, as_json: bool) -> None:
    if as_json:
        return echo_json(run.to_json())
    message = f"{run.ops_id}: {run.state}" if stopped else f"{run.ops_id}: already {run.state}; nothing to cancel"
    console().print(message)


def print_synced(added: list[str], reconciled: list[Run], problems: list[str], as_json: bool) -> None:
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
# journal, compare, build, pull


def print_post(run: Run, path: Path, as_json: bool) -> None:
    images = sorted(str(image) for image in (path.parent / run.ops_id).glob("*.png"))
    if as_json:
        return echo_json(
            {
                "ops_id": run.ops_id,
                "state": run.state,
                "post": str(path),
                "url": f"blog/{run.ops_id}/",
                "images": images,
            }
        )
    typer.echo(f"{run.ops_id}: {path}")


def print_columns(title: str, ids: list[str], rows: dict[str, list]) -> None:
    def shown(value) -> str:
        text = "-" if value is None else format_value(value)
        return text if len(text) <= 40 else text[:39] + "…"

    table = [(title, *ids), *((key, *map(shown, values)) for key, values in rows.items())]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip())


def print_comparison(compared: dict, path: Path | None, as_json: bool) -> None:
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


def print_image(image, as_json: bool) -> None:
    """An ops.build.Image."""
    if as_json:
        return echo_json(image.to_json())
    state = "built and pushed" if image.pushed else "built" if image.built else "already in the registry"
    typer.echo(f"{image.reference}  {state}" + (f"\n{image.by_digest}" if image.digest else ""))


def print_pulled_file(name: str) -> None:
    typer.echo(f"  {name}")


def print_pull(result: dict, as_json: bool) -> None:
    if as_json:
        return echo_json(result)
    typer.echo(f"{len(result['downloaded'])} downloaded, {len(result['skipped'])} unchanged, into {result['to']}")


# ---------------------------------------------------------------------------------------------
# config


def print_specs(rows: list[dict], as_json: bool) -> None:
    if as_json:
        return echo_json(rows)
    from rich.table import Table  # as console(): only for people

    table = Table("name", "task", "engine", "description")
    for row in rows:
        description = f"[red]{row['error']}[/]" if row["error"] else row["description"]
        table.add_row(row["name"], row["task"] or "-", row["engine"] or "-", description)
    console().print(table)


def print_spec(spec: dict, as_json: bool) -> None:
    if as_json:
        return echo_json(spec)
    print_yaml(spec)


def print_validation(results: list[dict], as_json: bool) -> None:
    if as_json:
        return echo_json(results)
    for result in results:
        typer.echo(f"ok    {result['spec']}" if result["valid"] else f"error {result['error']}")


def print_changes(path: Path, changes: list[tuple], as_json: bool) -> None:
    if as_json:
        return echo_json({"spec": str(path), "changes": [{"key": k, "old": o, "new": n} for k, o, n in changes]})
    for key, old, new in changes:
        typer.echo(f"{path.name}: {key}: {old} -> {new}")


def print_checkpoint(record: dict) -> None:
    """`ops ckpt inspect`: the checkpoint's facts, then its last metrics line."""
    data = record["data"]
    shape = "x".join(map(str, data["shape"]))
    rows = [
        ("checkpoint", record["checkpoint"]),
        ("size", f"{record['bytes'] / 1e6:,.1f} MB"),
        ("step", f"{record['step']} (epoch {record['epoch']})"),
        ("method", record["method"]),
        ("net", f"{record['net']}, {record['num_parameters']:,} parameters"),
        (
            "data",
            f"{data['dataset']} ({data['kind']}, {shape}"
            + (f", {data['num_classes']} classes" if data["num_classes"] else "")
            + (f", {data['vocab_size']} tokens" if data["vocab_size"] else "")
            + ")",
        ),
        ("built on", parent_line(record["parent"])),
        ("run dir", record["run_dir"] or "-"),
    ]
    for key, value in rows:
        typer.echo(f"{key:>13}  {value}")
    if record["metrics"]:
        typer.echo(
            f"{'last metrics':>13}  "
            + "  ".join(f"{key} {format_value(value)}" for key, value in record["metrics"].items())
        )


def parent_line(parent: dict | None) -> str:
    """The run a checkpoint builds on (an autoencoder, a run's token embeddings), in one line."""
    if parent is None:
        return "-"
    if "method" not in parent:  # an older checkpoint recorded the reference alone
        return parent["reference"]
    if parent["method"] is None:
        return f"{parent['reference']}: bare weights (described by method.autoencoder_model), sha256 {parent['sha256'][:12]}"
    return (
        f"{parent['reference']}: {parent['method']} ({parent['net']}), step {parent['step']}, "
        f"{parent['checkpoint']} (sha256 {parent['sha256'][:12]})"
    )


def print_best(result: dict) -> None:
    """`ops ckpt best`: every candidate, the best marked."""
    best = result["best"]
    typer.echo(f"{result['metric']} ({result['mode']}):")
    for candidate in result["candidates"]:
        mark = "*" if candidate is best or candidate == best else " "
        value = "-" if candidate["value"] is None else format_value(candidate["value"])
        typer.echo(f"{mark} step {candidate['step']:>8}  {value:>12}  {candidate['checkpoint']}")
    typer.echo(f"best: {best['checkpoint']} (step {best['step']}, {result['metric']} {format_value(best['value'])})")
    if result["copied_to"]:
        typer.echo(f"copied to {result['copied_to']}")

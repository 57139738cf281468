"""EXPERIMENT_LOG.md: one section per run, appended at submit, its results filled in at the end.

The results live between two HTML comments carrying the ops id, so filling them in is a
replace that can run any number of times. A file lock (in the runs folder, out of git's way) keeps
concurrent CLIs from interleaving.
"""

import json
import re
import time
from pathlib import Path

from ops.rundir import Summary, atomic_write

HEADER = """# Experiment log

One section per run, newest last: what was tried, why, exactly how, and what came of it.
Written by `ops submit` and filled in by `ops sync` / `ops monitor` when a run ends.
"""


def _markers(ops_id: str) -> tuple[str, str]:
    return f"<!-- results {ops_id} -->", f"<!-- /results {ops_id} -->"


def _locked(lock: Path):
    from filelock import FileLock  # a few tens of ms: only the commands that write the log pay it

    return FileLock(str(lock), timeout=60)


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"  # a measured figure to six digits, as the post has it; a set value as written
    return json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)


def section(run: dict) -> str:
    """`run` carries: ops_id, name, hypothesis, command, engine, engine_job_id, run_dir, commit,
    dirty, changes [(key, spec value, run value)], sweep {key: value}, created_at."""
    start, end = _markers(run["ops_id"])
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["created_at"]))
    commit = run["commit"][:8] if run["commit"] else "no git"
    lines = [
        f"## {run['ops_id']} ({run['name']})",
        "",
        f"- **Submitted:** {when} on `{run['engine']}` (job `{run['engine_job_id']}`), commit `{commit}`"
        + (" with uncommitted changes (`diff.patch`)" if run["dirty"] else ""),
        f"- **Hypothesis:** {' '.join(run['hypothesis'].split()) or '(none given in the spec)'}",
        f"- **Command:** `{run['command']}`",
        f"- **Run dir:** `{run['run_dir']}`",
    ]
    if run["changes"]:
        lines.append("- **Changed from the spec:**")
        lines += [f"    - `{key}`: {format_value(old)} → {format_value(new)}" for key, old, new in run["changes"]]
    else:
        lines.append("- **Changed from the spec:** nothing; the spec as written.")
    lines += ["", start, f"_Running. `ops monitor {run['ops_id']}` shows its progress._", end, ""]
    return "\n".join(lines) + "\n"


def append_section(path: Path, run: dict, lock: Path) -> None:
    with _locked(lock):
        text = path.read_text() if path.is_file() else HEADER
        if _markers(run["ops_id"])[0] in text:
            return  # already there: a retried follow-up
        atomic_write(path, (text.rstrip("\n") + "\n\n" + section(run)).encode())


def fill_results(path: Path, ops_id: str, results: str, lock: Path) -> bool:
    """Replace the run's results block; False when the log has no section for it."""
    start, end = _markers(ops_id)
    with _locked(lock):
        text = path.read_text() if path.is_file() else ""
        if start not in text or end not in text:
            return False
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        atomic_write(path, f"{head}{start}\n{results.strip()}\n{end}{tail}".encode())
    return True


def note_removal(path: Path, ops_id: str, line: str, lock: Path) -> bool:
    """Put `line` (in italics) below the run's results block, once; an earlier note of the same
    kind (its words before " on ") is replaced, as the post's box is. False when the log has no
    section for it."""
    end = _markers(ops_id)[1]
    with _locked(lock):
        text = path.read_text() if path.is_file() else ""
        if end not in text:
            return False
        head, tail = text.split(end, 1)
        note = f"\n\n_{line}_"
        earlier = re.match(rf"\n\n_{re.escape(line.split(' on ')[0])} on [^\n]*_", tail)
        if not tail.startswith(note):
            atomic_write(path, f"{head}{end}{note}{tail[earlier.end() if earlier else 0 :]}".encode())
    return True


def results_text(state: str, summary: Summary, duration_seconds: float | None, expected: dict | None = None) -> str:
    """The block filled in when a run ends: state, duration, the verdict of its `expect:` checks
    (`expected`: monitor.expectations') and the run's own final figures."""
    lines = [f"**Result: {state}**" + (f" after {duration_seconds / 60:.1f} min" if duration_seconds else "")]
    if expected and expected["verdict"]:
        checks = "; ".join(
            f"`{check['expect']}`: {'-' if check['measured'] is None else format_value(check['measured'])} "
            f"{check['verdict']}" + (f" ({check['why']})" if check.get("why") else "")
            for check in expected["checks"]
        )
        lines.append(f"- expected: **{expected['verdict']}** ({checks})")
    final = summary.final_metrics or {}
    if summary.step is not None:
        lines.append(
            f"- steps {summary.step}"
            + (f", epoch {summary.epoch:.2f}" if summary.epoch is not None else "")
            + (f", final loss {final['loss']:.4f}" if "loss" in final else "")
        )
    if summary.reason:
        lines.append(f"- stopped: {summary.reason}")
    if summary.scores:
        lines.append("- scores: " + ", ".join(f"{key} {format_value(value)}" for key, value in summary.scores.items()))
    if summary.error:
        lines.append(f"- error: `{summary.error}`")
    return "\n".join(lines)

"""What a run is doing, read from its run dir: progress from metrics.jsonl, the log tail.

Only json and the file system here, so `ops monitor` stays fast.
"""

import time
from pathlib import Path

from diffusion.expectations import judge
from ops.registry import Run
from ops.rundir import JOB, SUMMARY, MetricsRecord, last_metrics, read_json, read_summary

TRACEBACK = "Traceback (most recent call last):"
MAX_TRACEBACK_LINES = 400


def tail(text: str, lines: int) -> str:
    """The last `lines` lines; when they end inside a Python traceback (the run failed), from the
    traceback's first line on, so that the whole of it is shown (at most MAX_TRACEBACK_LINES)."""
    all_lines = text.rstrip("\n").splitlines()
    start = max(0, len(all_lines) - lines)
    recent = all_lines[-MAX_TRACEBACK_LINES:]
    if TRACEBACK in recent and TRACEBACK not in all_lines[start:]:
        start = len(all_lines) - len(recent) + max(i for i, line in enumerate(recent) if line == TRACEBACK)
    return "\n".join(all_lines[start:])


def elapsed_seconds(run: Run) -> float | None:
    if run.started_at is None:
        return None
    return max(0.0, (run.finished_at or time.time()) - run.started_at)  # an engine's clock may run behind ours


def progress(run: Run, spec: dict) -> dict:
    """Step/epoch of total, latest loss, it/s and ETA (the wall-clock budget may end it sooner).

    Fields: step, total_steps, epoch, total_epochs, loss, it_per_s, eta_seconds, percent; all
    None before the first metrics line."""
    fields = dict.fromkeys(
        ("step", "total_steps", "epoch", "total_epochs", "loss", "it_per_s", "eta_seconds", "percent")
    )
    record = last_metrics(run.run_dir)
    train = ((spec.get("run") or {}).get("train") or {}) if isinstance(spec.get("run"), dict) else {}
    fields["total_epochs"] = train.get("epochs")
    summary = read_summary(run.run_dir) if run.finished else None
    if summary is not None and summary.step is not None:
        # Where it ended, not the last logged step before a budget or a signal stopped it.
        record = MetricsRecord(
            **{
                **(record or MetricsRecord()).__dict__,
                "step": summary.step,
                "epoch": summary.epoch,
                "total_steps": summary.total_steps,
            }
        )
    if record is None:
        return fields
    step, total = record.step, record.total_steps
    fields.update(step=step, total_steps=total, epoch=record.epoch, loss=record.loss, it_per_s=record.it_per_s)
    if total:
        fields["percent"] = round(100 * step / total, 1)
        if not run.finished and record.it_per_s:
            eta = (total - step) / record.it_per_s
            if train.get("max_minutes") and record.train_seconds is not None:
                eta = min(eta, max(train["max_minutes"] * 60 - record.train_seconds, 0.0))
            fields["eta_seconds"] = round(eta, 1)
    return fields


def expectations(run: Run, spec: dict) -> dict:
    """The spec's `expect:` lines judged on the run's summary.json (diffusion/expectations.py):
    {verdict: met | missed | not measured | pending (not over yet) | None (no lines), checks:
    [{expect, metric, comparison, value, measured, verdict[, why]}]}. Judged here as well as by the run, so
    that a run killed before writing its summary still reads `not measured`."""
    run_section = spec.get("run") if isinstance(spec.get("run"), dict) else {}
    lines = [line for line in run_section.get("expect") or [] if isinstance(line, str)]
    if not lines:
        return {"verdict": None, "checks": []}
    checks, verdict = judge(lines, read_json(Path(run.run_dir) / SUMMARY) or {})
    return {"verdict": verdict if run.finished else "pending", "checks": checks}


def run_expectations(run: Run, job: dict | None = None) -> dict:
    """`expectations` of a run, its spec from its job.json (`job` when read already; a damaged one:
    no checks); a run whose dir `ops rm` removed: the verdict it had then, without the checks."""
    job = read_json(Path(run.run_dir) / JOB) if job is None else job
    if job is None and run.removed_at is not None:
        return {"verdict": run.removed_verdict, "checks": []}
    job = job or {}
    return expectations(run, job.get("spec") if isinstance(job.get("spec"), dict) else {})


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"

"""The run-dir files ops writes and reads, by name; what the run itself writes (metrics, summary)
is defined in diffusion.records, which ops reads through.

Every JSON file here is written atomically (diffusion.records.write_json) and read so that a
missing or torn file is "not there" (read_json) or one line naming it (read_required).
"""

from pathlib import Path
from typing import Any

from diffusion.records import (  # noqa: F401 (re-exported: ops reads the run's files through these)
    CHECKPOINTS,
    CONFIG,
    EVAL,
    FIGURES,
    LATEST,
    LOG,
    METRICS,
    SAMPLES,
    STEP_FILES,
    SUMMARY,
    MetricsRecord,
    Summary,
    atomic_write,
    checkpoint_file,
    default_cache_dir,
    last_jsonl,
    read_json,
    read_jsonl,
    step_of,
    write_json,
)
from ops.errors import OpsError

PINNED = ".pinned"  # under the runs folder: frozen checkpoints of running runs that submitted runs read

JOB = "job.json"  # what ops knows of the run: ops id, spec, engine, engine job id, overrides
PROVENANCE = "provenance.json"  # commit, dirty flag, diff stat, image, versions, host
DIFF = "diff.patch"  # uncommitted changes at submit
CODE = "code"  # the recorded commit + diff.patch, for engines whose jobs start later
IMAGE = "image.json"  # the container image a cloud run uses
FOLLOWUPS_FILE = "followups.json"  # the follow-ups done (issue URL, journal post ...), for a rebuilt registry
FINAL_SAMPLES = "final"  # the stem of the run's last samples in SAMPLES: final.png (images) or final.txt (text)
# Written by ops on this machine, which keeps their one authoritative copy (a remote run dir holds
# copies made at submit, older than these): nothing that syncs a run dir may overwrite them.
OPS_RECORDS = frozenset({CONFIG, JOB, PROVENANCE, DIFF, IMAGE, FOLLOWUPS_FILE})


def read_required(path: Path) -> dict:
    """A record ops itself wrote and cannot do without; OpsError naming it when missing or damaged."""
    data = read_json(path)
    if data is None:
        state = "damaged (not JSON)" if Path(path).is_file() else "missing"
        raise OpsError(f"{path}: {state}; `ops sync` reports the run dirs it cannot read")
    return data


JOB_FIELDS = {
    "ops_id": str,
    "name": str,
    "engine": str,
    "created_at": (int, float),
    "command": str,
    "overrides": list,
    "sweep": dict,
    "changes": list,
    "spec": dict,
}


def complete_job(job: dict | None) -> bool:
    return (
        job is not None
        and all(isinstance(job.get(key), kind) for key, kind in JOB_FIELDS.items())
        and "engine_job_id" in job
    )


def read_job(run_dir: Path) -> dict:
    """job.json, complete; OpsError naming it when it is missing or damaged."""
    path = Path(run_dir) / JOB
    job = read_required(path)
    if not complete_job(job):
        raise OpsError(f"{path}: damaged (not a complete ops record); `ops sync` reports the run dirs it cannot read")
    return job


def read_summary(run_dir: Path) -> Summary | None:
    """The run's summary.json, or None before the run has written one."""
    data = read_json(Path(run_dir) / SUMMARY)
    return None if data is None else Summary.from_json(data)


def last_metrics(run_dir: Path) -> MetricsRecord | None:
    data = last_jsonl(Path(run_dir) / METRICS)
    return None if data is None else MetricsRecord.from_json(data)


def git_of(provenance: dict | None) -> dict:
    """provenance.json's git record, {} when the run was recorded without git or the file is damaged."""
    git = (provenance or {}).get("git")
    return git if isinstance(git, dict) else {}


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested record (a spec, a config.yaml) as {dotted key: leaf}: the keys of job.json's
    `changes` and of the journal's tables."""
    if isinstance(data, dict) and data:
        items = {}
        for key, value in data.items():
            items |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return items
    return {prefix: data}


def checkpoint_candidates(run_dir: Path, metric: str) -> list[dict]:
    """Each step checkpoint of a run dir with its metric: the value logged at its step, or the last
    one logged before it (None when the run never logged the metric by then)."""
    logged = [line for line in read_jsonl(run_dir / METRICS) if isinstance(line.get(metric), (int, float))]
    candidates = []
    for path in sorted((run_dir / CHECKPOINTS).glob(STEP_FILES)):
        step = step_of(path)
        before = [line for line in logged if isinstance(line.get("step"), int) and line["step"] <= step]
        value = before[-1][metric] if before else None
        candidates.append({"run_dir": str(run_dir), "checkpoint": str(path), "step": step, "value": value})
    return candidates

"""Disk per run (`ops du`) and removing finished runs (`ops rm`).

Sizes are what `du` reports: allocated blocks, each file counted once however many links it has.
Removal never touches a run that is not over (its registry state) or whose run dir a process holds
(RUN_DIR/.lock, the lock every writer of a run dir takes, sample tasks run in place included): the
lock is held while files go. What stays consistent afterwards:
- the registry keeps the row, with removed_at and what was kept (`ops list` and `ops monitor` say so);
- EXPERIMENT_LOG.md's section and the journal post gain one line saying the run dir was removed
  (the post keeps its copied images, so it still shows what the run made);
- with --keep-checkpoints best or latest, the run dir keeps that checkpoint and the small records
  that make it usable (config, provenance, job, summary, metrics), so `run:ID` still resolves to it.
A Vertex run's copy in Cloud Storage (vertex.json's gcs_run_dir) goes too, keeping what the local
run dir keeps where the bucket has it; it goes first, so a refusal there leaves the local dir whole.
"""

import fcntl
import os
import shutil
import time
from pathlib import Path

from ops.engines.vertex import VERTEX_FILE
from ops.errors import OpsError
from ops.explog import note_removal
from ops.followups import experiment_log_lock
from ops.journal import mark_removed, post_path
from ops.monitor import run_expectations
from ops.registry import Registry, Run
from ops.rundir import (
    CHECKPOINTS,
    CONFIG,
    DIFF,
    FOLLOWUPS_FILE,
    JOB,
    LATEST,
    METRICS,
    PINNED,
    PROVENANCE,
    SUMMARY,
    checkpoint_candidates,
    read_json,
    write_json,
)
from ops.settings import Project
from ops.storage import remote_files, remove_remote

KEEP_CHOICES = ("none", "best", "latest")
# What a run dir keeps besides a kept checkpoint: small, what reading the checkpoint needs, and
# what a rebuilt registry needs (the follow-ups done, where a Vertex run's files are).
RECORDS = (CONFIG, PROVENANCE, JOB, SUMMARY, METRICS, DIFF, FOLLOWUPS_FILE, VERTEX_FILE)
LOCK = ".lock"
REMOVED_NOTE = "Run dir removed"


def disk_usage(path: Path) -> int:
    """Bytes allocated under `path` (as `du -s -B1`: blocks of 512 bytes, each inode once); 0 when gone."""
    if not path.exists():
        return 0
    seen, total = set(), 0
    entries = [path] + [Path(folder) / name for folder, folders, files in os.walk(path) for name in folders + files]
    for entry in entries:  # os.walk follows no symlink, as du
        try:
            stat = entry.lstat()
        except FileNotFoundError:  # a running run replaced it since: it is not there to count
            continue
        if (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_blocks * 512
    return total


def usage(runs: list[Run]) -> list[dict]:
    """[{ops_id, name, state, run_dir, bytes, checkpoint_bytes, removed_at}] of each run."""
    return [
        {
            "ops_id": run.ops_id,
            "name": run.name,
            "state": run.state,
            "run_dir": run.run_dir,
            "bytes": disk_usage(Path(run.run_dir)),
            "checkpoint_bytes": disk_usage(Path(run.run_dir) / CHECKPOINTS),
            "removed_at": run.removed_at,
        }
        for run in runs
    ]


def best_step_checkpoint(run_dir: Path, metric: str = "loss") -> Path | None:
    """The step checkpoint with the lowest `metric` logged at or before its step (as `ops ckpt best`)."""
    scored = [candidate for candidate in checkpoint_candidates(run_dir, metric) if candidate["value"] is not None]
    return Path(min(scored, key=lambda candidate: candidate["value"])["checkpoint"]) if scored else None


def kept_checkpoint(run_dir: Path, keep: str) -> Path | None:
    """The checkpoint that --keep-checkpoints `keep` keeps; OpsError when the run has none such."""
    if keep == "none":
        return None
    path = (run_dir / CHECKPOINTS / LATEST) if keep == "latest" else best_step_checkpoint(run_dir)
    if path is None or not path.is_file():
        what = "latest.pt" if keep == "latest" else "step checkpoint with a logged loss"
        pull = " (a Vertex run's: `ops pull ID --what checkpoints` first)" if (run_dir / VERTEX_FILE).is_file() else ""
        raise OpsError(f"--keep-checkpoints {keep}: {run_dir} has no {what}{pull}; use --keep-checkpoints none")
    return path


def refuse_unless_removable(run: Run, keep: str) -> None:
    """OpsError unless `ops rm --keep-checkpoints KEEP` may remove the run's dir: the run is over,
    and not removed already (a run removed with a kept checkpoint: only `none`, which frees it)."""
    if not run.finished:
        raise OpsError(
            f"{run.ops_id}: {run.state}, not over; ops rm never touches a run that may still write "
            f"(`ops cancel {run.ops_id}` first)"
        )
    if run.removed_at is not None and not run.removed_kept:
        raise OpsError(f"{run.ops_id}: its run dir was already removed on {stamp(run.removed_at)}")
    if run.removed_at is not None and keep != "none":
        raise OpsError(
            f"{run.ops_id}: its run dir was already removed on {stamp(run.removed_at)}, keeping "
            f"{', '.join(run.removed_kept)}; `ops rm {run.ops_id} --keep-checkpoints none` removes those too"
        )


def stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def plan_removal(run: Run, keep: str, local_only: bool = False) -> dict:
    """What `ops rm` would do to one run: {ops_id, run_dir, kept (paths), freed_bytes, remote (a Vertex
    run's bucket copy: remote_plan; None with `local_only`)}. Writes nothing but asks Cloud Storage
    what it holds."""
    refuse_unless_removable(run, keep)
    run_dir = Path(run.run_dir)
    checkpoint = kept_checkpoint(run_dir, keep) if run_dir.is_dir() else None
    kept = (
        [] if checkpoint is None else [checkpoint, *(run_dir / name for name in RECORDS if (run_dir / name).is_file())]
    )
    if keep == "best" and checkpoint is not None:
        kept.append(run_dir / CHECKPOINTS / LATEST)  # made the best step's: what run:ID and a run dir read
    kept_bytes = sum(path.lstat().st_blocks * 512 for path in kept if path.name != LATEST or keep == "latest")
    relative = [str(path.relative_to(run_dir)) for path in kept]
    gcs_run_dir = (read_json(run_dir / VERTEX_FILE) or {}).get("gcs_run_dir")
    return {
        "ops_id": run.ops_id,
        "run_dir": str(run_dir),
        "keep_checkpoints": keep,
        "kept": relative,
        "freed_bytes": disk_usage(run_dir) - kept_bytes,
        "remote": remote_plan(gcs_run_dir, relative, keep) if gcs_run_dir and not local_only else None,
    }


def remote_plan(gcs_run_dir: str, kept: list[str], keep: str) -> dict:
    """What goes from a Vertex run's copy in Cloud Storage: {gcs_run_dir, kept, latest_from, freed_bytes}.
    The bucket keeps the locally kept paths it has; with `best`, its latest.pt becomes the best
    step's (as the local one), or goes when the bucket lacks that step."""
    files = remote_files(gcs_run_dir)
    best = next((path for path in kept if path.startswith(f"{CHECKPOINTS}/") and Path(path).name != LATEST), None)
    latest_from = best if keep == "best" and best in files else None
    remote_kept = [
        path
        for path in kept
        if path in files and not (keep == "best" and Path(path).name == LATEST and not latest_from)
    ]
    freed = sum(size for path, size in files.items() if path not in remote_kept)
    return {"gcs_run_dir": gcs_run_dir, "kept": remote_kept, "latest_from": latest_from, "freed_bytes": freed}


def remove(project: Project, registry: Registry, run: Run, plan: dict) -> Run:
    """Carry out plan_removal's plan, holding the run dir's lock (OpsError, nothing removed, when a
    process holds it); then the registry, the experiment log and the journal post say so."""
    run_dir, removed_at = Path(plan["run_dir"]), time.time()
    verdict = run_expectations(run)["verdict"]  # read before its job.json and summary go
    if run_dir.is_dir():
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                raise OpsError(f"{run.ops_id}: {run_dir} is being written by {holder}; nothing removed") from None
            # Under the lock, the row again: a resume or another rm since the plan was made wins.
            current = registry.get(run.ops_id) or run
            refuse_unless_removable(current, plan["keep_checkpoints"])
            if plan["remote"]:  # first: a refusal there leaves this copy whole
                remote = plan["remote"]
                remove_remote(remote["gcs_run_dir"], set(remote["kept"]), remote["latest_from"])
            kept = {run_dir / name for name in plan["kept"]}
            if plan["keep_checkpoints"] == "best" and kept:
                best = next(path for path in kept if path.parent.name == CHECKPOINTS and path.name != LATEST)
                link = run_dir / CHECKPOINTS / f".{LATEST}.best"
                link.unlink(missing_ok=True)
                os.link(best, link)  # the same file twice: no copy
                os.replace(link, run_dir / CHECKPOINTS / LATEST)
            job = read_json(run_dir / JOB)
            if kept and job is not None:  # a rebuilt registry learns it from the run dir
                removed = {
                    "removed_at": removed_at,
                    "removed_kept": plan["kept"],
                    "removed_state": current.state,
                    "removed_verdict": verdict,
                    "finished_at": current.finished_at,
                    "exit_code": current.exit_code,
                }
                write_json(run_dir / JOB, job | removed)
            if not kept:
                shutil.rmtree(run_dir)
            else:
                holding = {parent for path in kept for parent in path.parents}
                # Bottom up, symlinks not followed: a link is removed, never what it points to.
                for folder, folders, files in os.walk(run_dir, topdown=False):
                    for name in files:
                        path = Path(folder) / name
                        if path not in kept and path != run_dir / LOCK:
                            path.unlink()
                    for name in folders:
                        path = Path(folder) / name
                        if path.is_symlink():
                            path.unlink()
                        elif path not in holding:
                            path.rmdir()
        finally:
            os.close(fd)
    registry.update(run.ops_id, removed_at=removed_at, removed_kept=plan["kept"] or None, removed_verdict=verdict)
    removed = registry.get(run.ops_id)
    line = removal_line(removed)
    note_removal(project.experiment_log, run.ops_id, line, experiment_log_lock(project))
    mark_removed(
        Path(run.journal_post) if run.journal_post else post_path(project, run), run.ops_id, REMOVED_NOTE, line
    )
    return removed


def removal_line(run: Run) -> str:
    """The line the experiment log and the journal post gain."""
    kept = ", ".join(f"`{path}`" for path in run.removed_kept or [])
    return f"{REMOVED_NOTE} on {stamp(run.removed_at)} by `ops rm`" + (f"; kept {kept}." if kept else "; nothing kept.")


def unread_pins(project: Project, registry: Registry) -> list[Path]:
    """The runs folder's pinned checkpoints (.pinned/SHA256.pt) that no run's provenance.json still
    names: each run that read one was removed (or never recorded it)."""
    folder = project.runs_dir / PINNED
    if not folder.is_dir():
        return []
    read = {
        reference.get("checkpoint")
        for run in registry.select()
        for reference in (read_json(Path(run.run_dir) / PROVENANCE) or {}).get("references") or []
        if isinstance(reference, dict)
    }
    return [path for path in sorted(folder.glob("*.pt")) if str(path) not in read]


def remove_pins(paths: list[Path]) -> int:
    """Delete pinned checkpoints; the bytes freed (a link whose run still holds the file frees none)."""
    freed = 0
    for path in paths:
        stat = path.stat()
        freed += stat.st_blocks * 512 if stat.st_nlink == 1 else 0
        path.unlink()
    return freed

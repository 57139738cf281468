"""The life of a run: plan (validate) → create (run dir, provenance, registry row) → start on an
engine → reconcile until it ends, then the follow-ups, each done once (an outbox: ops/followups.py).

Every run dir holds `job.json` (what ops knows of the run: ops id, spec, engine, engine job id,
overrides, sweep), so the registry can always be rebuilt from the run dirs (`ops sync`).
"""

import difflib
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops import fit
from ops.build import build_image
from ops.engines import Engine, EngineState, Launch, get_engine
from ops.engines.vertex import VERTEX_FILE, gcs_fuse_path
from ops.errors import OpsError
from ops.followups import columns, do_followups, do_pending, due_again, record_done, recorded, refresh_records, skip_all
from ops.ids import readable_id
from ops.journal import comparison, write_comparison, write_post
from ops.provenance import capture, restore
from ops.registry import FINAL_STATES, Registry, RegistryDamaged, Run, move_aside
from ops.rundir import (
    CHECKPOINTS,
    CODE,
    CONFIG,
    DIFF,
    IMAGE,
    JOB,
    LATEST,
    METRICS,
    OPS_RECORDS,
    PINNED,
    PROVENANCE,
    atomic_write,
    checkpoint_candidates,
    checkpoint_file,
    complete_job,
    flatten,
    git_of,
    read_job,
    read_json,
    read_jsonl,
    read_required,
    read_summary,
    write_json,
)
from ops.secrets import redact_value, redact_words
from ops.settings import Project
from ops.storage import pull as pull_files


@dataclass
class Planned:
    """One validated run waiting to be created: the resolved spec and how it came about."""

    spec: Any  # ops.spec.JobSpec
    overrides: list[str]
    sweep: dict[str, str] = field(default_factory=dict)
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)  # the checkpoints it reads (check_references)
    estimate: dict | None = None  # a GPU-sized run on this CPU: its duration here (ops/fit.py)


def spec_changes(base: dict, resolved: dict) -> list[tuple[str, Any, Any]]:
    """(key, spec value, run value) for every leaf that the overrides changed; the top-level
    `expect` once (run.expect is its copy, travelling with the run's config)."""
    old, new = flatten(base), flatten(resolved)
    copies = {"run.expect"} if new.get("expect") == new.get("run.expect") else set()
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys() - copies)
        if old.get(key) != new.get(key)
    ]


def plan(
    project: Project, name: str, engine: str | None, overrides: list[str], sweeps: list[str], dry_run: bool = False
) -> list[Planned]:
    """Resolve and validate every run a submit asks for; raises before anything is written. A dry
    run does not ask the engine whether it could submit from here (dry_run() lists what it lacks)."""
    from ops.spec import expand_sweep, load_spec, spec_path  # pydantic: only the commands that read specs

    path = spec_path(project.jobs_dir, name)
    base = load_spec(path).model_dump(mode="json")
    overrides = [*overrides, *([f"engine={engine}"] if engine else [])]
    planned = []
    for combination in expand_sweep(sweeps) or [{}]:
        run_overrides = [*overrides, *(f"{key}={value}" for key, value in combination.items())]
        spec = load_spec(path, run_overrides)
        local_device = spec.resources.local.device
        if spec.engine == "local" and local_device:
            spec.run.device = local_device
        references = check_references(project, spec, str(path))
        planned.append(
            Planned(
                spec,
                run_overrides,
                combination,
                spec_changes(base, spec.model_dump(mode="json")),
                ignored_resources(spec.engine, run_overrides),
                references,
            )
        )
    for item in planned:
        train, in_image = item.spec.run.train, get_engine(item.spec.engine, project.settings).needs_image
        if project.settings.trackers and not in_image and train.trackers is None:  # the project's; [] says none
            train.trackers = project.settings.trackers.split(",")
        if train.trackers and in_image:
            raise OpsError(
                f"run.train.trackers: {train.trackers} is not allowed on {item.spec.engine}: its image installs the "
                "base dependencies only (the run's metrics.jsonl and samples/ come back with `ops pull`)"
            )
        check_trackers(train.trackers)
    if not dry_run:
        preflight(project, planned)
        pin_references(project, planned)  # the first thing written, once nothing can refuse the submit
    if planned and (fitted := fit.estimate(planned[0].spec, project.root)):  # the first run stands for a sweep
        for item in planned:
            item.estimate = fitted
            item.warnings.append(fitted["warning"])
    return planned


def check_trackers(names: list[str] | None) -> None:
    """The trainer's own check that each tracker's package is here, at submit: OpsError, one line."""
    from diffusion.config import ConfigError, check_trackers_installed  # pydantic: only at submit

    try:
        check_trackers_installed(names)
    except ConfigError as exc:
        raise OpsError(f"run.{exc}") from None


def check_references(project: Project, spec, source: str) -> list[dict]:
    """The runs a spec reads (a run dir, a .pt, `run:SPEC` or an ops id), resolved to where the
    engine reads them and recorded so in the spec: checked here where this machine sees them
    (local and SLURM: each is there, and a sample or eval task's settings suit its checkpoint's own
    method, network and data), as /gcs/ paths for Vertex (vertex_reference). ConfigError, one line.
    The checkpoint of a run that is not over yet is marked `pinned_from`: pin_references reads it
    from a frozen copy, so that a job that starts later (queued on SLURM) reads the weights whose
    sha256 is recorded, not a later latest.pt.
    Returns what provenance.json records of each: [{key, reference, run_id, checkpoint, sha256[, pinned_from]}]."""
    from diffusion.config import (  # pydantic: only at submit
        ConfigError,
        autoencoder_conflicts,
        load_run_config,
        sampling_conflict,
    )

    run = spec.run
    sampling = run.task != "train"
    if sampling and run.sample.checkpoint is None:
        raise ConfigError(
            f"{source}: run.sample.checkpoint: required for a {run.task} task: the run dir (or .pt file) to sample from"
        )
    references = {
        "sample.checkpoint": run.sample.checkpoint if sampling else None,
        "sample.guide_checkpoint": run.sample.guide_checkpoint if sampling else None,
        "eval.scorer_checkpoint": run.eval.scorer_checkpoint,
        "method.init_embeddings": None if sampling else run.method.init_embeddings,
        "method.autoencoder": None if sampling else run.method.autoencoder,
    }
    registry = open_registry(project)
    read = []
    for key, reference in references.items():
        if reference is None:
            continue
        section, field_name = key.split(".")
        if spec.engine == "vertex":
            resolved = vertex_reference(registry, reference, f"{source}: run.{key}")
            setattr(getattr(run, section), field_name, resolved)
            named = named_run(registry, reference) if not reference.startswith("gs://") else None
            read.append(reference_record(key, reference, resolved, named))
            continue
        path = project.root / Path(reference).expanduser()  # relative: the project's
        named = None
        if checkpoint_file(path) is None:
            named = named_run(registry, reference, lambda run: checkpoint_file(run.run_dir) is not None)
            if named is None:
                raise ConfigError(
                    f"{source}: run.{key}: {reference!r} is not allowed: no checkpoint there"
                    + (spec_reference_hint(project, reference[4:]) if reference.startswith("run:") else "")
                    + f" (a run dir holding {CHECKPOINTS}/{LATEST}, a .pt file, the ops id of a run that wrote "
                    "one, or run:SPEC for the newest succeeded run of a spec)"
                )
            # Absolute: a SLURM job starts in the directory ops was called from, not the project's.
            path = Path(named.run_dir)
            setattr(getattr(run, section), field_name, named.run_dir)
        checkpoint = checkpoint_file(path)
        if not zipfile.is_zipfile(checkpoint):  # torch.save writes a zip archive; a text file is none
            raise ConfigError(
                f"{source}: run.{key}: {reference!r} is not allowed: {checkpoint} is not a checkpoint (a .pt file "
                "torch.save wrote, as a run's checkpoints/latest.pt)"
            )
        named = named or next(
            (row for row in registry.select() if Path(row.run_dir) == checkpoint_run_dir(checkpoint)), None
        )
        read.append(reference_record(key, reference, str(checkpoint), named, sha256_of(checkpoint)))
        if named is not None and not named.finished:  # pinned once every check has passed (pin_references)
            read[-1]["pinned_from"] = str(checkpoint)
    if run.method.autoencoder is not None and not sampling:  # its run's config says what it encodes
        folder = project.root / Path(run.method.autoencoder).expanduser()
        run_dir = folder.parent.parent if folder.parent.name == CHECKPOINTS else folder
        stored = run_dir / CONFIG if (run_dir / CONFIG).is_file() else None
        if stored is not None:
            problem = next(autoencoder_conflicts(run, load_run_config(stored, stored=True)), None)
            if problem:
                raise ConfigError(f"{source}: run.{problem}")
    trained = project.root / Path(run.sample.checkpoint or "").expanduser() / CONFIG
    if sampling and trained.is_file() and spec.engine != "vertex":
        problem = sampling_conflict(load_run_config(trained, stored=True), run.sample, run.task)
        if problem:
            raise ConfigError(f"{source}: run.{problem} (with the checkpoint's own config, {trained})")
    return read


def pin_references(project: Project, planned: list["Planned"]) -> None:
    """Read every checkpoint of a run that is not over (check_references marked it pinned_from)
    from a frozen copy: the spec and the provenance record name it, with its sha256. One copy per
    checkpoint for all the runs of a sweep, made after every check passed."""
    frozen = {}
    for item in planned:
        for read in item.references:
            if "pinned_from" not in read:
                continue
            if read["pinned_from"] not in frozen:
                frozen[read["pinned_from"]] = pinned(project, Path(read["pinned_from"]))
            read["checkpoint"] = str(frozen[read["pinned_from"]])
            read["sha256"] = sha256_of(frozen[read["pinned_from"]])
            section, field_name = read["key"].removeprefix("run.").split(".")
            setattr(getattr(item.spec.run, section), field_name, read["checkpoint"])
            item.warnings.append(
                f"{read['key']}: {read['run_id']} is still running; this run reads its checkpoint as it is now, "
                f"kept as {read['checkpoint']}"
            )


def pinned(project: Project, checkpoint: Path) -> Path:
    """`checkpoint` as it is now, under the runs folder's .pinned/ named by its sha256: a hard link,
    which the trainer's next latest.pt (written aside, then renamed over it) leaves as it is, or a
    copy where the file system refuses the link (another device, protected links, FUSE). The link
    is made before the hash, so the name is the content's. OpsError, one line, when neither works."""
    folder = project.runs_dir / PINNED
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{os.getpid()}-{checkpoint.name}"
    staging.unlink(missing_ok=True)
    try:
        try:
            os.link(checkpoint, staging)
        except OSError:
            shutil.copy2(checkpoint, staging)
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise OpsError(
            f"{checkpoint}: could not keep a copy of this running run's checkpoint in {folder}: {exc}"
        ) from None
    frozen = folder / f"{sha256_of(staging)}.pt"
    os.replace(staging, frozen)
    return frozen


def spec_reference_hint(project: Project, name: str) -> str:
    """Why run:NAME names no run: the spec has no succeeded run yet, or there is no such spec."""
    known = sorted(path.stem for path in project.jobs_dir.glob("*.yaml"))
    if name in known:
        return f": no succeeded {name} run yet (`ops submit {name}`, `ops list --name {name}`)"
    close = difflib.get_close_matches(name, known, n=1)
    return f": there is no spec {name!r}" + (f"; did you mean 'run:{close[0]}'?" if close else "")


def checkpoint_run_dir(checkpoint: Path) -> Path:
    """The run dir a checkpoint file lies in (RUN_DIR/checkpoints/NAME.pt), or its folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint.parent


def sha256_of(path: Path) -> str:
    """The file's sha256, hashed once per process for one version of it (a sweep's runs read the
    same checkpoint)."""
    stat = Path(path).stat()
    return file_sha256(str(path), stat.st_mtime_ns, stat.st_size)


@functools.cache
def file_sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def reference_record(key: str, reference: str, checkpoint: str, run: Run | None, sha256: str | None = None) -> dict:
    """One checkpoint a run reads, as provenance.json keeps it. `sha256`: None where ops cannot read
    the file (a Vertex run's, in Cloud Storage)."""
    return {
        "key": f"run.{key}",
        "reference": reference,
        "run_id": run.ops_id if run else None,
        "checkpoint": checkpoint,
        "sha256": sha256,
    }


def vertex_reference(registry: Registry, reference: str, key: str) -> str:
    """A checkpoint reference as a Vertex job reaches it: a gs:// URI, or a Vertex run named by
    run:SPEC or its ops id, as its /gcs/ path (Cloud Storage mounted in the container); other
    paths as given (the job's own). ConfigError when a named run's files are on this machine only."""
    from diffusion.config import ConfigError  # pydantic: only at submit

    if reference.startswith("gs://"):
        return gcs_fuse_path(reference)

    def in_cloud(run: Run) -> bool:
        return bool((read_json(Path(run.run_dir) / VERTEX_FILE) or {}).get("gcs_run_dir"))

    named = named_run(registry, reference, in_cloud) or named_run(registry, reference)
    if named is None and reference.startswith("run:"):
        raise ConfigError(f"{key}: {reference!r} is not allowed: no succeeded run of spec {reference[4:]!r}")
    if named is None:
        return reference
    if not in_cloud(named):
        raise ConfigError(
            f"{key}: {reference!r} is not allowed on Vertex: run {named.ops_id} ran on {named.engine}, so its "
            "checkpoints are not in Cloud Storage; name a Vertex run, or copy them to a gs:// path and give that"
        )
    return gcs_fuse_path(read_json(Path(named.run_dir) / VERTEX_FILE)["gcs_run_dir"])


def named_run(registry: Registry, reference: str, usable: Callable[[Run], bool] = lambda run: True) -> Run | None:
    """The run a reference names: `run:SPEC` the newest succeeded run of exactly that spec that is
    `usable` (its checkpoints where the job can read them), `run:ID` or a bare ops id (or engine
    job id) that run if usable; None when it names none."""
    name = reference.removeprefix("run:")
    if reference.startswith("run:"):
        succeeded = registry.select(states=["SUCCEEDED"], names=[name])  # LIKE: _ and % match more
        found = next((run for run in succeeded if run.name == name and usable(run)), None)
        if found:
            return found
    run = registry.get(name)
    return run if run is not None and usable(run) else None


def ignored_resources(engine: str, overrides: list[str]) -> list[str]:
    """A warning for each override of another engine's resources: valid, but this run ignores it."""
    from diffusion.config import parse_assignment  # pydantic: only at submit

    warnings = []
    for text in overrides:
        parts, value = parse_assignment(text)
        if parts[0] != "resources":
            continue
        named = [parts[1]] if len(parts) > 1 else list(value) if isinstance(value, dict) else []
        for other in [name for name in named if name != engine]:
            warnings.append(
                f"--set {text}: the run goes to the {engine} engine, which ignores resources.{other}; "
                f"add --engine {other} to use it"
            )
    return warnings


def preflight(project: Project, planned: list[Planned]) -> None:
    """Can each run's engine take it from here (settings, tools, resource names)? Writes nothing."""
    for item in planned:
        resources = item.spec.resources.model_dump(mode="json")[item.spec.engine]
        get_engine(item.spec.engine, project.settings).preflight(resources)


def launch_for(project: Project, run: Run, spec_json: dict, code_dir: Path | None = None) -> Launch:
    return Launch(
        run_dir=Path(run.run_dir),
        project_root=project.root,
        code_dir=code_dir,
        resources=spec_json["resources"][run.engine],
    )


def this_process() -> dict:
    """Who is starting a run: host, pid and the process's start time (a reused pid is another process)."""
    import psutil  # here, not at the top: the cheap commands never start a run

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def submitter_alive(submitter: dict | None) -> bool | None:
    """Whether the ops that is starting a run still runs; None when it runs on another host (unknown)."""
    import psutil  # as in this_process: only for a run that no engine has taken

    if not submitter:
        return False
    if submitter["host"] != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(submitter["pid"]).create_time() - submitter["started"]) < 0.01
    except psutil.NoSuchProcess:
        return False


def claim_run_dir(project: Project, name: str, changes: list[tuple[str, Any, Any]]) -> tuple[str, Path]:
    """A fresh readable ops id (ops/ids.py) and its run dir; mkdir is the atomic claim, so concurrent
    submits never share."""
    project.runs_dir.mkdir(parents=True, exist_ok=True)
    ignore = project.runs_dir / ".gitignore"
    if not ignore.is_file():
        ignore.write_text("# run dirs are outputs: keep them out of git and out of diff.patch\n*\n")
    while True:
        ops_id = readable_id(name, changes)
        run_dir = project.runs_dir / ops_id
        try:
            run_dir.mkdir()
            return ops_id, run_dir
        except FileExistsError:
            continue


def create(
    project: Project, registry: Registry, planned: Planned, command: str, provenance_into: Callable[[Path], dict]
) -> Run:
    """Run dir + config.yaml + provenance + job.json + registry row. Nothing is left on failure."""
    from diffusion.config import dump_yaml  # pydantic: only at submit

    spec = planned.spec
    ops_id, run_dir = claim_run_dir(project, spec.name, planned.changes)
    try:
        provenance = provenance_into(run_dir)
    except BaseException:  # an error, or Ctrl-C while a rerun restores its code: no half-made run dir
        shutil.rmtree(run_dir)
        raise
    if planned.references:
        provenance["references"] = planned.references
    write_json(run_dir / PROVENANCE, provenance)
    dump_yaml(spec.run.model_dump(mode="json"), run_dir / CONFIG)
    # What is recorded and shown (registry, job.json's record of the submit, issues, logs) hides
    # secrets given on the command line; the spec in job.json keeps them, for the engine.
    overrides = redact_words(planned.overrides)
    sweep = {key: redact_value(key, value) for key, value in planned.sweep.items()}
    changes = [(key, redact_value(key, old), redact_value(key, new)) for key, old, new in planned.changes]
    run = Run(
        ops_id=ops_id,
        name=spec.name,
        engine=spec.engine,
        run_dir=str(run_dir),
        git_commit=(provenance.get("git") or {}).get("commit"),
        sweep=sweep,
        overrides=overrides,
        submitter=this_process(),
    )
    job = {
        "ops_id": ops_id,
        "name": spec.name,
        "engine": spec.engine,
        "engine_job_id": None,
        "created_at": run.created_at,
        "command": command,
        "overrides": overrides,
        "sweep": sweep,
        "changes": changes,
        "spec": spec.model_dump(mode="json"),
        "submitter": run.submitter,
        "estimate": planned.estimate,
    }
    write_json(run_dir / JOB, job)
    if not registry.insert(run):
        raise OpsError(f"{ops_id}: already in the registry {registry.path}")
    return run


def start(project: Project, registry: Registry, run: Run, code_dir: Path | None = None) -> Run:
    """Hand one run to its engine; record the engine job id and the first state."""
    return start_many(project, registry, [run], [code_dir])[0]


def start_many(project: Project, registry: Registry, runs: list[Run], code_dirs: list[Path | None]) -> list[Run]:
    """Hand runs of one engine to it in one go (a SLURM job array for a sweep)."""
    engine = get_engine(runs[0].engine, project.settings)
    jobs = [read_job(Path(run.run_dir)) for run in runs]
    launches = [launch_for(project, run, job["spec"], code_dir) for run, job, code_dir in zip(runs, jobs, code_dirs)]
    with signals_deferred():  # the engine takes the runs and their ids are recorded, or neither
        try:
            job_ids = engine.submit_many(launches)
        except Exception as exc:
            mark_failed(registry, runs, f"not submitted: {exc}")
            if isinstance(exc, OpsError):
                raise
            raise OpsError(f"{runs[0].ops_id}: the {runs[0].engine} engine refused the job: {exc}") from exc
        for run, job, job_id in zip(runs, jobs, job_ids):
            record_start(registry, run, job_id, job)
    return [reconcile(project, registry, run, engine)[0] for run in runs]


def record_start(registry: Registry, run: Run, job_id: str, job: dict | None = None) -> None:
    """The engine has the run: its job id and start time, in job.json and the registry."""
    run.engine_job_id, run.started_at = job_id, run.started_at or time.time()  # a resume keeps the first start
    job = job or read_job(Path(run.run_dir))
    job |= {"engine_job_id": job_id, "started_at": run.started_at, "requeues": run.requeues}
    write_json(Path(run.run_dir) / JOB, job)
    registry.update(run.ops_id, engine_job_id=job_id, started_at=run.started_at)


@contextmanager
def signals_deferred():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then interrupt as they would have:
    a job the engine took is never left without its id. (Handlers, not a blocked signal mask,
    which the engine's child processes would inherit.)"""
    received = []
    previous = {
        signum: signal.signal(signum, lambda number, frame: received.append(number))
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt


def adopt_recorded_job(project: Project, registry: Registry, run: Run) -> Run:
    """A run with no job id whose engine wrote one into its run dir (its submitter died between the
    two): the run is the engine's; record it instead of calling it not started."""
    job_id = get_engine(run.engine, project.settings).recorded_job(Path(run.run_dir))
    if job_id is None:
        return run
    registry.update(run.ops_id, state="QUEUED", finished_at=None, detail=None)
    record_start(registry, registry.get(run.ops_id), job_id)
    return registry.get(run.ops_id)


def mark_failed(registry: Registry, runs: list[Run], detail: str) -> None:
    """Runs that were created but could not be started."""
    for run in runs:
        registry.update(run.ops_id, state="FAILED", finished_at=time.time(), detail=detail)


def snapshot_code(project: Project, run: Run) -> Path | None:
    """RUN_DIR/code: the recorded commit plus diff.patch, for engines whose jobs start later."""
    run_dir = Path(run.run_dir)
    provenance = read_required(run_dir / PROVENANCE)
    if not git_of(provenance):
        return None  # --allow-no-git: nothing to restore; the job imports whatever is installed
    return restore(provenance, run_dir / DIFF, project.root, run_dir / CODE)


def code_folder(run_dir: Path) -> Path | None:
    """The project's folder in a run's code snapshot (RUN_DIR/code, or a subfolder of it for a
    project that is not at its repository's root); None when the run has no snapshot."""
    git = git_of(read_json(run_dir / PROVENANCE))
    folder = run_dir / CODE / git.get("project_dir", "")
    return folder if folder.is_dir() else None


def submit(
    project: Project,
    registry: Registry,
    planned: list[Planned],
    command: str,
    allow_no_git: bool = False,
    image: str | None = None,
) -> list[Run]:
    created, started = [], []
    with failed_if_interrupted(project, registry, created):
        for item in planned:
            created.append(
                create(
                    project,
                    registry,
                    item,
                    command,
                    lambda run_dir: capture(project.root, run_dir, allow_no_git, project.not_code()),
                )
            )
        for engine_name in dict.fromkeys(run.engine for run in created):
            group = [run for run in created if run.engine == engine_name]
            engine = get_engine(engine_name, project.settings)
            if engine.needs_image:
                attach_image(project, registry, group, image)
            code_dirs = [snapshot_code(project, run) if engine.snapshots_code else None for run in group]
            started += start_many(project, registry, group, code_dirs)
    return started


@contextmanager
def failed_if_interrupted(project: Project, registry: Registry, runs: list[Run]):
    """Runs being started that no engine has taken when the command is interrupted (Ctrl-C, or
    SIGTERM / SIGHUP, which the CLI turns into it) are FAILED, resumable, never left QUEUED."""
    try:
        yield
    except KeyboardInterrupt:
        mark_failed(
            registry,
            [
                run
                for run in runs
                if registry.get(run.ops_id).engine_job_id is None
                and adopt_recorded_job(project, registry, run).engine_job_id is None
            ],
            "not started: interrupted",
        )
        raise


def attach_image(project: Project, registry: Registry, runs: list[Run], image: str | None) -> None:
    """RUN_DIR/image.json for engines that run a container: built (or found) for the recorded code."""
    if image is None:
        try:
            built = build_image(project, push=True, run_dir=Path(runs[0].run_dir))  # a sweep shares its code
        except OpsError:
            mark_failed(registry, runs, "image build failed")
            raise
        record = built.to_json()
    else:
        record = {"image": image, "built": False, "pushed": False, "given": True}
    for run in runs:
        write_json(Path(run.run_dir) / IMAGE, record)
        provenance_path = Path(run.run_dir) / PROVENANCE
        write_json(provenance_path, read_required(provenance_path) | {"image": record["image"]})


def resume(project: Project, registry: Registry, run: Run) -> Run:
    """Continue a stopped run in its own run dir (the trainer resumes from latest.pt)."""
    run = reconcile(project, registry, run)[0]
    refuse_removed(run, "resume")
    engine = get_engine(run.engine, project.settings)
    if run.state == "PREEMPTED" and engine.requeues_itself:
        raise OpsError(
            f"{run.ops_id}: is waiting for {run.engine} to requeue it, and resumes by itself; "
            f"`ops cancel {run.ops_id}` first to resume it by hand"
        )
    if run.state == "QUEUED" and run.engine_job_id is None:
        doing = "resumed" if run.requeues else "submitted"
        raise OpsError(f"{run.ops_id} is being {doing} by another ops (pid {(run.submitter or {}).get('pid')})")
    if run.state in ("RUNNING", "QUEUED"):
        raise OpsError(f"{run.ops_id}: is {run.state}; nothing to resume")
    if run.state == "SUCCEEDED":
        raise OpsError(f"{run.ops_id}: finished successfully; `ops rerun {run.ops_id}` starts a new run")
    code_dir = code_folder(Path(run.run_dir))
    # Compare-and-set: of two ops resuming at once, one wins. The old engine job id goes, so that
    # nobody reconciles this run against the job that stopped; the submitter marks it as ours.
    claimed = registry.update_if(
        run.ops_id,
        {"state": run.state, "requeues": run.requeues},
        state="QUEUED",
        engine_job_id=None,
        finished_at=None,
        exit_code=None,
        detail=None,
        requeues=run.requeues + 1,
        submitter=this_process(),
    )
    if not claimed:
        raise OpsError(f"{run.ops_id} is being resumed by another ops")
    due_again(registry, run)
    run = registry.get(run.ops_id)
    with failed_if_interrupted(project, registry, [run]):
        return start(project, registry, run, code_dir)


def refuse_removed(run: Run, command: str) -> None:
    if run.removed_at is not None:
        raise OpsError(
            f"{run.ops_id}: its run dir was removed by `ops rm` (kept: {', '.join(run.removed_kept or []) or 'nothing'}); "
            f"ops {command} needs the whole run dir"
        )


def rerun(project: Project, registry: Registry, run: Run, command: str) -> Run:
    """A new run with the recorded spec, on the recorded commit plus its diff.patch."""
    from ops.spec import validate_spec  # pydantic: only the commands that read specs

    if run.removed_at is not None and not {JOB, PROVENANCE, DIFF} <= set(run.removed_kept or []):
        refuse_removed(run, "rerun")  # a rerun needs the records only, which a kept checkpoint keeps
    old_dir = Path(run.run_dir)
    job = read_job(old_dir)
    old_provenance = read_required(old_dir / PROVENANCE)
    if not git_of(old_provenance):
        raise OpsError(f"{run.ops_id}: was recorded without git (--allow-no-git); its code cannot be restored")
    spec = validate_spec(job["spec"], f"{old_dir / JOB}")
    for read in old_provenance.get("references") or []:  # the checkpoints it read, unchanged
        checkpoint = Path(read["checkpoint"])
        if read.get("sha256") and (not checkpoint.is_file() or sha256_of(checkpoint) != read["sha256"]):
            state = "is gone" if not checkpoint.is_file() else "has changed since (sha256 differs)"
            raise OpsError(
                f"{run.ops_id}: {read['key']}: the checkpoint it read, {checkpoint} "
                f"(of {read['run_id'] or read['reference']}), {state}; a rerun would not read the same weights"
            )

    def restored_provenance(run_dir: Path) -> dict:
        restore(old_provenance, old_dir / DIFF, project.root, run_dir / CODE)
        shutil.copyfile(old_dir / DIFF, run_dir / DIFF)
        return {**old_provenance, "rerun_of": run.ops_id, "rerun_at": time.time()}

    planned = Planned(spec, job["overrides"], job["sweep"], [tuple(change) for change in job["changes"]])
    new = create(project, registry, planned, command, restored_provenance)
    with failed_if_interrupted(project, registry, [new]):
        return start(project, registry, new, code_dir=code_folder(Path(new.run_dir)))


# ---------------------------------------------------------------------------------------------
# Reconcile: engine + run dir (the truth) -> registry (the index), then the follow-ups


def records_decide(run: Run, observed: EngineState) -> EngineState:
    """The engine's word, unless the run's own complete records say otherwise: a run whose task
    completed (summary.json) is SUCCEEDED whatever a late signal made of its job (SLURM FAILED or
    PREEMPTED, a requeue), on every engine; the disagreement is kept in the detail."""
    if observed.state in ("SUCCEEDED", "RUNNING", "QUEUED"):
        return observed
    summary = read_summary(run.run_dir)
    if summary is None or summary.status != "completed":
        return observed
    said = observed.detail or observed.state
    return EngineState(
        "SUCCEEDED",
        0,
        f"the run completed (summary.json); the engine said otherwise afterwards ({said}), a late signal",
        observed.finished_at,
        observed.requeues,
    )


def reconcile(project: Project, registry: Registry, run: Run, engine: Engine | None = None) -> tuple[Run, list[str]]:
    """Bring one run's row up to date with its engine, and do its due follow-ups. A run that no
    engine took and whose submitting ops is gone (killed) is an orphan: FAILED, resumable."""
    if not run.finished and not Path(run.run_dir).is_dir():
        detail = f"its run dir {run.run_dir} is gone (moved or deleted): nothing of the run can be read"
        registry.update(run.ops_id, state="FAILED", finished_at=time.time(), detail=detail)
        skip_all(registry, run, detail)
        return registry.get(run.ops_id), [f"{run.ops_id}: {detail}"]
    if run.engine_job_id is None and run.state in ("QUEUED", "UNKNOWN", "FAILED"):
        run = adopt_recorded_job(project, registry, run)
    if not run.finished and run.engine_job_id is None and submitter_alive(run.submitter) is False:
        pid = (run.submitter or {}).get("pid")
        registry.update_if(
            run.ops_id,
            {"engine_job_id": None, "state": run.state},
            state="FAILED",
            finished_at=time.time(),
            detail=f"not started: the ops that was starting it "
            f"({'pid ' + str(pid) if pid else 'unknown'}) ended first; `ops resume {run.ops_id}` starts it",
        )
        run = registry.get(run.ops_id)
    if not run.finished and run.engine_job_id is not None:
        engine = engine or get_engine(run.engine, project.settings)
        observed = records_decide(run, engine.state(run))
        requeues = run.requeues if observed.requeues is None else max(run.requeues, observed.requeues)
        detail = observed.detail or None
        exit_code = None if observed.state in ("QUEUED", "RUNNING") else observed.exit_code  # a requeued job's last
        if (observed.state, exit_code, requeues, detail) != (run.state, run.exit_code, run.requeues, run.detail):
            changes = {"state": observed.state, "exit_code": exit_code, "requeues": requeues, "detail": detail}
            if observed.state in FINAL_STATES:
                changes["finished_at"] = observed.finished_at or time.time()
            registry.update(run.ops_id, **changes)
            run = registry.get(run.ops_id)
    return do_followups(project, registry, run)


def rebuild_missing(project: Project, registry: Registry) -> tuple[list[str], list[str]]:
    """Rows for run dirs the registry lost (deleted, damaged or older registry file), with every
    field the run dirs hold: the engine then gives the state, the exit code and the end time, and
    follow-ups done before are not done again. Returns (ops ids added, problems): a damaged run
    dir is skipped with a line naming it."""
    added, problems = [], []
    for job_path in sorted(project.runs_dir.glob(f"*/{JOB}")):
        job = read_json(job_path)
        if not complete_job(job):
            problems.append(
                f"{job_path}: damaged (not a complete ops record); skipped, so this run is not in the registry"
            )
            continue
        if registry.get(job["ops_id"]) is not None:
            continue
        if job["engine_job_id"] is None and submitter_alive(job.get("submitter")):
            continue  # being submitted right now: its submitter adds the row
        run_dir = job_path.parent
        provenance = read_json(run_dir / PROVENANCE) or {}
        if not git_of(provenance) and provenance.get("git", "missing") is not None:  # None: recorded without git
            problems.append(
                f"{run_dir / PROVENANCE}: missing or damaged; {job['ops_id']} is indexed without its commit"
            )
        done = recorded(run_dir)
        removed_state = job.get("removed_state") if job.get("removed_state") in FINAL_STATES else None
        run = Run(
            ops_id=job["ops_id"],
            name=job["name"],
            engine=job["engine"],
            run_dir=str(run_dir),
            state=removed_state or "UNKNOWN",  # `ops rm` left no engine record to ask: its row said
            finished_at=job.get("finished_at") if removed_state else None,
            exit_code=job.get("exit_code") if removed_state else None,
            engine_job_id=job["engine_job_id"],
            created_at=job["created_at"],
            started_at=job.get("started_at"),
            requeues=job.get("requeues", 0),
            git_commit=git_of(provenance).get("commit"),
            sweep=job["sweep"],
            overrides=job["overrides"],
            submitter=job.get("submitter"),
            removed_at=job.get("removed_at"),  # `ops rm` kept a checkpoint here
            removed_kept=job.get("removed_kept"),
            removed_verdict=job.get("removed_verdict"),
            **columns(done),
        )
        registry.insert(run)
        record_done(registry, run.ops_id, done)
        added.append(run.ops_id)
    return added, problems


def sync(project: Project, retry: bool = False) -> tuple[list[str], list[Run], list[str]]:
    """`ops sync`: (rebuilt ops ids, reconciled runs, problems). A damaged registry is moved aside
    and rebuilt from the run dirs; `retry` also retries the follow-ups a permanent error stopped."""
    repaired = []
    try:
        # Created when there are run dirs to index; else none yet.
        registry = open_registry(project, create=any(project.runs_dir.glob(f"*/{JOB}")))
    except RegistryDamaged as exc:
        aside = move_aside(project.registry_path)
        repaired.append(f"{exc.args[0].split(';')[0]}; moved it to {aside} and rebuilt the registry from the run dirs")
        registry = Registry(project.registry_path)
    try:
        if retry:
            registry.retry_stopped()
        added, reconciled, problems = reconcile_all(project, registry)
    except sqlite3.DatabaseError as exc:  # damage that opening it did not reach: rebuild all the same
        registry.close()
        aside = move_aside(project.registry_path)
        repaired.append(
            f"{project.registry_path}: damaged ({exc}); moved it to {aside} and rebuilt the registry from the run dirs"
        )
        registry = Registry(project.registry_path)
        added, reconciled, problems = reconcile_all(project, registry)
    return added, reconciled, repaired + problems


def reconcile_all(project: Project, registry: Registry) -> tuple[list[str], list[Run], list[str]]:
    """(rebuilt ops ids, reconciled runs, problems) for every run not yet settled."""
    added, problems = rebuild_missing(project, registry)
    runs = []
    for run in registry.unfinished():
        try:
            run, run_problems = reconcile(project, registry, run)
        except OpsError as exc:  # one run's damaged records or its engine's refusal: the others go on
            problems.append(f"{run.ops_id}: {exc}")
            continue
        runs.append(run)
        problems += run_problems
    problems += do_pending(project, registry)  # finished runs whose follow-ups a crash or outage left undone
    return added, runs, problems


def find(registry: Registry, job_id: str) -> Run:
    """A run by ops id, engine job id, or `latest` (the newest run)."""
    if job_id == "latest":
        newest = registry.select(limit=1)
        if not newest:
            raise OpsError("JOB_ID 'latest': the registry has no runs yet; `ops submit NAME` starts one")
        return newest[0]
    run = registry.get(job_id)
    if run is None:
        close = registry.ids_like(job_id)
        hint = f"did you mean {', '.join(close)}?" if close else "`ops list` shows the runs"
        raise OpsError(f"JOB_ID {job_id!r}: no such run (neither an ops id nor an engine job id); {hint}")
    return run


# ---------------------------------------------------------------------------------------------
# What the other commands do with runs


def open_registry(project: Project, create: bool = False) -> Registry:
    """The project's registry. A command that only looks at runs writes nothing: in a project
    without a registry yet it gets an empty one in memory (no run to find, none to list)."""
    if create or project.registry_path.is_file():
        return Registry(project.registry_path)
    return Registry.empty()


def open_project(create: bool = False) -> tuple[Project, Registry]:
    """The project (found from the working directory) and its registry (see open_registry)."""
    project = Project()
    return project, open_registry(project, create)


def dry_run(project: Project, planned: list[Planned]) -> list[dict]:
    """What `ops submit --dry-run` shows of each planned run: the resolved spec, how it came about,
    and what its engine would start. Writes nothing."""
    rows = []
    for item in planned:
        engine = get_engine(item.spec.engine, project.settings)
        placeholder = project.runs_dir / readable_id(item.spec.name, item.changes, tail="xxxx")
        launch = Launch(
            run_dir=placeholder,
            project_root=project.root,
            resources=item.spec.resources.model_dump(mode="json")[item.spec.engine],
        )
        rows.append(
            {
                "spec": item.spec.model_dump(mode="json"),
                "sweep": item.sweep,
                "overrides": item.overrides,
                "changes": item.changes,
                "warnings": item.warnings,
                "would_start": engine.describe(launch),
                "missing": engine.missing(launch.resources),
            }
        )
    return rows


def snapshot_left_out(started: list[Run]) -> list[dict]:
    """The untracked files that provenance kept out of diff.patch (the same for every run of a
    submit): [{path, reason, ...}]; the user should know that the run will not see them."""
    provenance = read_json(Path(started[0].run_dir) / PROVENANCE) if started else None
    return git_of(provenance).get("skipped_untracked", [])


def settled(project: Project, run: Run) -> bool:
    """Over, or stopped for good: a local PREEMPTED run waits for `ops resume`; a SLURM one comes
    back by itself."""
    stays_stopped = not get_engine(run.engine, project.settings).requeues_itself
    return run.finished or (run.state == "PREEMPTED" and stays_stopped)


def follow(project: Project, registry: Registry, run: Run, interval: float) -> Iterator[tuple[str, Any]]:
    """`ops monitor --follow`: ("state", run) at each change of state and ("log", text) for each
    new piece of the log, polling every `interval` seconds until the run settles; ("end", run)."""
    engine = get_engine(run.engine, project.settings)
    text, offset = engine.logs(run)  # now, not at the first event: an interrupt here is not "stopped following"

    def events(run: Run, text: str, offset: int) -> Iterator[tuple[str, Any]]:
        last_state = None
        while True:
            if run.state != last_state:
                last_state = run.state
                yield "state", run
            if text:
                yield "log", text
            if settled(project, run):
                break
            time.sleep(interval)
            run, _ = reconcile(project, registry, registry.get(run.ops_id), engine)
            text, offset = engine.logs(run, offset)
        yield "end", run

    return events(run, text, offset)


def cancel(project: Project, registry: Registry, run: Run, grace_seconds: float | None = None) -> tuple[Run, bool]:
    """Stop a run: its engine sends SIGTERM (the run checkpoints), SIGKILL after `grace_seconds`
    (default: ops.yaml). Returns the run as it is then, and False when it had already finished."""
    run, _ = reconcile(project, registry, run)
    if run.finished:
        return run, False
    engine = get_engine(run.engine, project.settings)
    engine.cancel(run, project.settings.cancel_grace_seconds if grace_seconds is None else grace_seconds)
    run, _ = reconcile(project, registry, run, engine)
    return run, True


def rewrite_post(project: Project, registry: Registry, run: Run) -> Path:
    """`ops journal`: the run's post written again from its run dir (keeping its Observations)."""
    if run.removed_at is not None:
        raise OpsError(
            f"{run.ops_id}: its run dir was removed (`ops rm`); its post {run.journal_post or '(none)'} keeps what it showed"
        )
    path = write_post(project, run)
    registry.update(run.ops_id, journal_post=str(path))
    return path


def compare(project: Project, registry: Registry, job_ids: list[str], post: bool) -> tuple[dict, Path | None]:
    """The runs' differing settings and their figures (journal.comparison), and with `post` the
    comparison post's path."""
    found = {}
    for job_id in job_ids:
        run = reconcile(project, registry, find(registry, job_id))[0]
        found.setdefault(run.ops_id, run)
    if len(found) < 2:
        raise OpsError(f"JOB_ID: {', '.join(job_ids)} name {len(found)} run; compare needs two or more")
    compared = comparison(list(found.values()))
    path = write_comparison(project, list(found.values()), compared) if post else None
    return compared, path


def pull(project: Project, run: Run, what: str, progress: Callable[[str], None] | None = None) -> dict:
    """`ops pull`: a Vertex run's files from Cloud Storage into its local run dir (ops' own records
    there are kept); a finished run's log results and post are rewritten with what came."""
    if run.engine != "vertex":
        raise OpsError(f"{run.ops_id}: ran on {run.engine}; its run dir is already here: {run.run_dir}")
    gcs_run_dir = read_required(Path(run.run_dir) / VERTEX_FILE)["gcs_run_dir"]
    result = pull_files(gcs_run_dir, Path(run.run_dir), what, keep=OPS_RECORDS | {VERTEX_FILE}, progress=progress)
    if run.finished and result["downloaded"]:
        refresh_records(project, run)  # the log's results and the post, now with the run's figures
    return {"ops_id": run.ops_id, "from": gcs_run_dir, "to": run.run_dir, **result}


# ---------------------------------------------------------------------------------------------
# Checkpoints: what one holds, and the best of a run's or a spec's


def checkpoint_reference(project: Project, registry: Registry, reference: str) -> Path:
    """A run (ops id, engine job id, `latest`) as its run dir, else a path (a run dir or .pt file,
    relative to the project)."""
    path = project.root / Path(reference).expanduser()
    if path.exists():
        return path
    return Path(find(registry, reference).run_dir)


def inspect_checkpoint(project: Project, reference: Path) -> dict:
    """`python -m diffusion inspect`'s record of a checkpoint: ops reads no checkpoint itself (that
    would import torch); the run's own entry point does."""
    import subprocess  # only this command starts one

    result = subprocess.run(
        [sys.executable, "-m", "diffusion", "inspect", str(reference)], cwd=project.root, capture_output=True, text=True
    )
    if result.returncode == 2:
        raise OpsError(result.stderr.strip().removeprefix("error: "))
    if result.returncode != 0:
        raise OpsError(
            f"python -m diffusion inspect {reference} failed (exit {result.returncode}): "
            f"{' '.join(result.stderr.strip().splitlines()[-1:])}"
        )
    return json.loads(result.stdout)


def best_checkpoint(
    project: Project, registry: Registry, reference: str, metric: str, mode: str, copy_to: Path | None = None
) -> dict:
    """The step checkpoint with the lowest (`min`) or highest (`max`) logged `metric` among a run's,
    or among all runs of a spec; with `copy_to`, copied there (atomically)."""
    if mode not in ("min", "max"):
        raise OpsError(f"--mode {mode!r}: not allowed; use min or max")
    path = project.root / Path(reference).expanduser()
    if path.is_dir():
        run_dirs = [path]
    elif registry.get(reference) is not None or reference == "latest":
        run_dirs = [Path(find(registry, reference).run_dir)]
    else:
        run_dirs = [Path(run.run_dir) for run in registry.select(names=[reference])]
        if not run_dirs:
            raise OpsError(
                f"RUN_OR_SPEC {reference!r}: neither a run, a run dir, nor a spec with runs; `ops list` shows the runs"
            )
    candidates = [candidate for run_dir in run_dirs for candidate in checkpoint_candidates(run_dir, metric)]
    scored = [candidate for candidate in candidates if candidate["value"] is not None]
    if not scored:
        fields = sorted({key for run_dir in run_dirs for line in read_jsonl(run_dir / METRICS)[-1:] for key in line})
        raise OpsError(
            f"--metric {metric!r}: no step checkpoint of {reference!r} has it logged "
            f"({len(candidates)} checkpoints; logged fields: {', '.join(fields) or 'none'})"
        )
    best = (min if mode == "min" else max)(scored, key=lambda candidate: candidate["value"])
    if copy_to is not None:
        target = project.root / Path(copy_to).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, Path(best["checkpoint"]).read_bytes())
    return {
        "metric": metric,
        "mode": mode,
        "best": best,
        "candidates": candidates,
        "copied_to": str(project.root / Path(copy_to).expanduser()) if copy_to else None,
    }

"""The life of a run: plan (validate) → create (run dir, provenance, registry row) → start on an
engine → reconcile until it ends, then the follow-ups, each done once (an outbox).

Every run dir holds `job.json` (what ops knows of the run: ops id, spec, engine, engine job id,
overrides, sweep), so the registry can always be rebuilt from the run dirs (`ops sync`).
"""

import os
import secrets
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ops.engines import Engine, EngineState, Launch, get_engine
from ops.monitor import elapsed_seconds
from ops.registry import FINAL_STATES, Registry, Run
from ops.errors import OpsError, PermanentError
from ops.rundir import (CODE, DIFF, FOLLOWUPS_FILE, IMAGE, JOB, PROVENANCE, Summary, git_of, read_json, read_required, read_summary, write_json)
from ops.secrets import redact_value, redact_words
from ops.settings import Project


@dataclass
class Planned:
    """One validated run waiting to be created: the resolved spec and how it came about."""

    spec: Any  # ops.spec.JobSpec
    overrides: list[str]
    sweep: dict[str, str] = field(default_factory=dict)
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        items = {}
        for key, value in data.items():
            items |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return items
    return {prefix: data}


def spec_changes(base: dict, resolved: dict) -> list[tuple[str, Any, Any]]:
    """(key, spec value, run value) for every leaf that the overrides changed."""
    old, new = flatten(base), flatten(resolved)
    return [(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def plan(project: Project, name: str, engine: str | None, overrides: list[str], sweeps: list[str]) -> list[Planned]:
    """Resolve and validate every run a submit asks for; raises before anything is written."""
    from ops.spec import expand_sweep, load_spec, spec_path

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
        check_references(project, spec, str(path))
        planned.append(Planned(spec, run_overrides, combination, spec_changes(base, spec.model_dump(mode="json")),
                               ignored_resources(spec.engine, run_overrides)))
    preflight(project, planned)
    return planned


def check_references(project: Project, spec, source: str) -> None:
    """The runs a spec reads, checked at submit where this machine sees them (local and SLURM;
    Vertex jobs read theirs in the cloud): each is there, and a sample or eval task's settings suit
    its checkpoint's own method, network and data (that run's config.yaml). ConfigError, one line."""
    from diffusion.config import ConfigError, load_run_config, sampling_conflict
    from diffusion.records import checkpoint_file

    run = spec.run
    sampling = run.task != "train"
    if sampling and run.sample.checkpoint is None:
        raise ConfigError(f"{source}: run.sample.checkpoint: required for a {run.task} task: the run dir (or .pt "
                          "file) to sample from")
    if spec.engine == "vertex":
        return
    references = {"sample.checkpoint": run.sample.checkpoint if sampling else None,
                  "sample.guide_checkpoint": run.sample.guide_checkpoint if sampling else None,
                  "eval.scorer_checkpoint": run.eval.scorer_checkpoint,
                  "method.init_embeddings": None if sampling else run.method.init_embeddings}
    for key, reference in references.items():
        if reference is None:
            continue
        if checkpoint_file(project.root / Path(reference).expanduser()) is None:  # relative: the project's
            raise ConfigError(f"{source}: run.{key}: {reference!r} is not allowed: no checkpoint there (a run dir "
                              "holding checkpoints/latest.pt, or a .pt file)")
    trained = project.root / Path(run.sample.checkpoint or "").expanduser() / "config.yaml"
    if sampling and trained.is_file():
        problem = sampling_conflict(load_run_config(trained), run.sample)
        if problem:
            raise ConfigError(f"{source}: run.{problem} (with the checkpoint's own config, {trained})")


def ignored_resources(engine: str, overrides: list[str]) -> list[str]:
    """A warning for each override of another engine's resources: valid, but this run ignores it."""
    from diffusion.config import parse_assignment

    warnings = []
    for text in overrides:
        parts, value = parse_assignment(text)
        if parts[0] != "resources":
            continue
        named = [parts[1]] if len(parts) > 1 else list(value) if isinstance(value, dict) else []
        for other in [name for name in named if name != engine]:
            warnings.append(f"--set {text}: the run goes to the {engine} engine, which ignores resources.{other}; "
                            f"add --engine {other} to use it")
    return warnings


def preflight(project: Project, planned: list[Planned]) -> None:
    """Can each run's engine take it from here (settings, tools, resource names)? Writes nothing."""
    for item in planned:
        resources = item.spec.resources.model_dump(mode="json")[item.spec.engine]
        get_engine(item.spec.engine, project.settings).preflight(resources)


def launch_for(project: Project, run: Run, spec_json: dict, code_dir: Path | None = None) -> Launch:
    return Launch(run_dir=Path(run.run_dir), project_root=project.root, code_dir=code_dir,
                  resources=spec_json["resources"][run.engine])


def read_job(run_dir: Path) -> dict:
    """job.json, complete; OpsError naming it when it is missing or damaged."""
    path = Path(run_dir) / JOB
    job = read_required(path)
    if not complete_job(job):
        raise OpsError(f"{path}: damaged (not a complete ops record); `ops sync` reports the run dirs it cannot read")
    return job


JOB_FIELDS = {"ops_id": str, "name": str, "engine": str, "created_at": (int, float), "command": str,
              "overrides": list, "sweep": dict, "changes": list, "spec": dict}


def complete_job(job: dict | None) -> bool:
    return job is not None and all(isinstance(job.get(key), kind) for key, kind in JOB_FIELDS.items()) \
        and "engine_job_id" in job


def this_process() -> dict:
    """Who is starting a run: host, pid and the process's start time (a reused pid is another process)."""
    import socket

    import psutil  # only here: the cheap commands never start a run

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def submitter_alive(submitter: dict | None) -> bool | None:
    """Whether the ops that is starting a run still runs; None when it runs on another host (unknown)."""
    import socket

    import psutil

    if not submitter:
        return False
    if submitter["host"] != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(submitter["pid"]).create_time() - submitter["started"]) < 0.01
    except psutil.NoSuchProcess:
        return False


def claim_run_dir(project: Project, name: str) -> tuple[str, Path]:
    """A fresh ops id and its run dir; mkdir is the atomic claim, so concurrent submits never share."""
    project.runs_dir.mkdir(parents=True, exist_ok=True)
    ignore = project.runs_dir / ".gitignore"
    if not ignore.is_file():
        ignore.write_text("# run dirs are outputs: keep them out of git and out of diff.patch\n*\n")
    while True:
        ops_id = f"{name}-{secrets.token_hex(3)}"
        run_dir = project.runs_dir / ops_id
        try:
            run_dir.mkdir()
            return ops_id, run_dir
        except FileExistsError:
            continue


def create(project: Project, registry: Registry, planned: Planned, command: str,
           provenance_into: Callable[[Path], dict]) -> Run:
    """Run dir + config.yaml + provenance + job.json + registry row. Nothing is left on failure."""
    from diffusion.config import dump_yaml

    spec = planned.spec
    ops_id, run_dir = claim_run_dir(project, spec.name)
    try:
        provenance = provenance_into(run_dir)
    except BaseException:  # an error, or Ctrl-C while a rerun restores its code: no half-made run dir
        shutil.rmtree(run_dir)
        raise
    write_json(run_dir / PROVENANCE, provenance)
    dump_yaml(spec.run.model_dump(mode="json"), run_dir / "config.yaml")
    # What is recorded and shown (registry, job.json's record of the submit, issues, logs) hides
    # secrets given on the command line; the spec in job.json keeps them, for the engine.
    overrides = redact_words(planned.overrides)
    sweep = {key: redact_value(key, value) for key, value in planned.sweep.items()}
    changes = [(key, redact_value(key, old), redact_value(key, new)) for key, old, new in planned.changes]
    run = Run(ops_id=ops_id, name=spec.name, engine=spec.engine, run_dir=str(run_dir),
              git_commit=(provenance.get("git") or {}).get("commit"), sweep=sweep,
              overrides=overrides, submitter=this_process())
    job = {"ops_id": ops_id, "name": spec.name, "engine": spec.engine, "engine_job_id": None,
           "created_at": run.created_at, "command": command, "overrides": overrides,
           "sweep": sweep, "changes": changes, "spec": spec.model_dump(mode="json"),
           "submitter": run.submitter}
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
    previous = {signum: signal.signal(signum, lambda number, frame: received.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
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
    from ops.provenance import restore

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


def submit(project: Project, registry: Registry, planned: list[Planned], command: str,
           allow_no_git: bool = False, image: str | None = None) -> list[Run]:
    from ops.provenance import capture

    created, started = [], []
    with failed_if_interrupted(project, registry, created):
        for item in planned:
            created.append(create(project, registry, item, command,
                                  lambda run_dir: capture(project.root, run_dir, allow_no_git, project.not_code())))
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
        mark_failed(registry, [run for run in runs if registry.get(run.ops_id).engine_job_id is None
                               and adopt_recorded_job(project, registry, run).engine_job_id is None],
                    "not started: interrupted")
        raise


def attach_image(project: Project, registry: Registry, runs: list[Run], image: str | None) -> None:
    """RUN_DIR/image.json for engines that run a container: built (or found) for the recorded code."""
    from ops.build import build_image

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
    engine = get_engine(run.engine, project.settings)
    if run.state == "PREEMPTED" and engine.requeues_itself:
        raise OpsError(f"{run.ops_id}: is waiting for {run.engine} to requeue it, and resumes by itself; "
                       f"`ops cancel {run.ops_id}` first to resume it by hand")
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
    claimed = registry.update_if(run.ops_id, {"state": run.state, "requeues": run.requeues}, state="QUEUED",
                                 engine_job_id=None, finished_at=None, exit_code=None, detail=None,
                                 requeues=run.requeues + 1, submitter=this_process())
    if not claimed:
        raise OpsError(f"{run.ops_id} is being resumed by another ops")
    again = [followup.kind for followup in FOLLOWUPS if followup.when == "finished"]
    for kind in again:  # it ends again: its end-of-run follow-ups are due again, here and in a rebuild
        registry.forget_followup(run.ops_id, kind)
    done_path = Path(run.run_dir) / FOLLOWUPS_FILE
    write_json(done_path, {kind: detail for kind, detail in (read_json(done_path) or {}).items() if kind not in again})
    run = registry.get(run.ops_id)
    with failed_if_interrupted(project, registry, [run]):
        return start(project, registry, run, code_dir)


def rerun(project: Project, registry: Registry, run: Run, command: str) -> Run:
    """A new run with the recorded spec, on the recorded commit plus its diff.patch."""
    from ops.provenance import restore
    from ops.spec import validate_spec

    old_dir = Path(run.run_dir)
    job = read_job(old_dir)
    old_provenance = read_required(old_dir / PROVENANCE)
    if not git_of(old_provenance):
        raise OpsError(f"{run.ops_id}: was recorded without git (--allow-no-git); its code cannot be restored")
    spec = validate_spec(job["spec"], f"{old_dir / JOB}")

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


def log_entry(project: Project, run: Run, job: dict, provenance: dict) -> dict:
    git = git_of(provenance)
    return {"ops_id": run.ops_id, "name": run.name, "hypothesis": job["spec"].get("hypothesis", ""),
            "command": job["command"], "engine": run.engine, "engine_job_id": run.engine_job_id,
            "run_dir": os.path.relpath(run.run_dir, project.root), "commit": git.get("commit"), "dirty": git.get("dirty", False),
            "changes": job["changes"], "created_at": run.created_at}


def followup_experiment_log_submit(project: Project, run: Run) -> str:
    from ops.explog import append_section

    run_dir = Path(run.run_dir)
    provenance = read_required(run_dir / PROVENANCE)
    append_section(project.experiment_log, log_entry(project, run, read_job(run_dir), provenance),
                   project.runs_dir / ".experiment_log.lock")
    return str(project.experiment_log)


def followup_experiment_log_result(project: Project, run: Run) -> str:
    from ops.explog import fill_results, results_text

    summary = read_summary(run.run_dir) or Summary()
    duration = elapsed_seconds(run) if run.finished_at else None
    results = results_text(run.state, summary, duration)
    if not fill_results(project.experiment_log, run.ops_id, results, project.runs_dir / ".experiment_log.lock"):
        raise OpsError(f"{project.experiment_log}: no section for {run.ops_id} to fill in")
    return str(project.experiment_log)


def refresh_records(project: Project, run: Run) -> None:
    """Rewrite what a finished run's local records say (the experiment log's results, the journal
    post, which keeps its Observations) from its run dir: after `ops pull` brought its figures."""
    followup_experiment_log_result(project, run)
    followup_journal_post(project, run)


def followup_journal_post(project: Project, run: Run) -> str:
    from ops.journal import write_post

    return str(write_post(project, run))


def followup_github_issue(project: Project, run: Run) -> str | None:
    from ops.github import open_run_issue

    return open_run_issue(project, run)


def followup_github_result(project: Project, run: Run) -> str | None:
    from ops.github import comment_run_result

    return comment_run_result(project, run)


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
    Followup("experiment_log_submit", "started", followup_experiment_log_submit),
    Followup("github_issue", "started", followup_github_issue, column="github_issue"),
    Followup("experiment_log_result", "finished", followup_experiment_log_result, after=("experiment_log_submit",)),
    Followup("journal_post", "finished", followup_journal_post, column="journal_post"),
    Followup("github_result", "finished", followup_github_result, after=("github_issue",)),
]
SKIPPED = "skipped: not in use"


def followup_lock(project: Project, ops_id: str):
    """The claim on a run's follow-ups: one ops at a time does them. Another reconciling command
    (sync, wait, monitor, list) waits here, then finds them done; a crashed holder's claim goes
    with its process (an fcntl lock)."""
    from filelock import FileLock

    folder = project.runs_dir / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{ops_id}.followups.lock"), timeout=FOLLOWUP_LOCK_SECONDS)


FOLLOWUP_LOCK_SECONDS = 600  # a GitHub at its slowest takes a few requests of 15 s each


def do_followups(project: Project, registry: Registry, run: Run) -> tuple[Run, list[str]]:
    """Each due follow-up once, under the run's follow-up claim; a failure is reported and retried
    by the next reconcile, a permanent one (a GitHub 4xx) waits for `ops sync --retry`. Returns
    the run as the follow-ups left it (its issue URL, its post) and the failures."""
    from filelock import Timeout

    def pending(followup: Followup) -> bool:
        return (followup.due(run) and not registry.followup_done(run.ops_id, followup.kind)
                and not registry.followup_stopped(run.ops_id, followup.kind))

    if not any(pending(followup) for followup in FOLLOWUPS):
        return run, []
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
                    problems.append(f"{run.ops_id}: {followup.kind} failed, " + (
                        "stopped until it is fixed (then `ops sync --retry`)" if permanent else
                        "will retry on the next sync") + f": {exc}")
                    continue
                if followup.column and detail is not None:
                    registry.update(run.ops_id, **{followup.column: detail})
                    run = registry.get(run.ops_id)
                registry.record_followup(run.ops_id, followup.kind, SKIPPED if detail is None else detail)
                done_path = Path(run.run_dir) / FOLLOWUPS_FILE  # so that a rebuilt registry does not redo it
                write_json(done_path, (read_json(done_path) or {}) | {followup.kind: detail})
    except Timeout:
        problems.append(f"{run.ops_id}: its follow-ups are being done by another ops for over "
                        f"{FOLLOWUP_LOCK_SECONDS} s; the next sync looks again")
    return run, problems


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
    return EngineState("SUCCEEDED", 0, f"the run completed (summary.json); the engine said otherwise "
                                       f"afterwards ({said}), a late signal", observed.finished_at, observed.requeues)


def reconcile(project: Project, registry: Registry, run: Run, engine: Engine | None = None) -> tuple[Run, list[str]]:
    """Bring one run's row up to date with its engine, and do its due follow-ups. A run that no
    engine took and whose submitting ops is gone (killed) is an orphan: FAILED, resumable."""
    if not run.finished and not Path(run.run_dir).is_dir():
        detail = f"its run dir {run.run_dir} is gone (moved or deleted): nothing of the run can be read"
        registry.update(run.ops_id, state="FAILED", finished_at=time.time(), detail=detail)
        for followup in FOLLOWUPS:  # there is nothing to report from, now or later
            registry.record_followup(run.ops_id, followup.kind, f"skipped: {detail}")
        return registry.get(run.ops_id), [f"{run.ops_id}: {detail}"]
    if run.engine_job_id is None and run.state in ("QUEUED", "UNKNOWN", "FAILED"):
        run = adopt_recorded_job(project, registry, run)
    if not run.finished and run.engine_job_id is None and submitter_alive(run.submitter) is False:
        pid = (run.submitter or {}).get("pid")
        registry.update_if(run.ops_id, {"engine_job_id": None, "state": run.state}, state="FAILED",
                           finished_at=time.time(), detail=f"not started: the ops that was starting it "
                           f"({'pid ' + str(pid) if pid else 'unknown'}) ended first; `ops resume {run.ops_id}` starts it")
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
            problems.append(f"{job_path}: damaged (not a complete ops record); skipped, so this run is not in "
                            "the registry")
            continue
        if registry.get(job["ops_id"]) is not None:
            continue
        if job["engine_job_id"] is None and submitter_alive(job.get("submitter")):
            continue  # being submitted right now: its submitter adds the row
        run_dir = job_path.parent
        provenance = read_json(run_dir / PROVENANCE) or {}
        if not git_of(provenance) and provenance.get("git", "missing") is not None:  # None: recorded without git
            problems.append(f"{run_dir / PROVENANCE}: missing or damaged; {job['ops_id']} is indexed without its commit")
        done = {kind: detail for kind, detail in (read_json(run_dir / FOLLOWUPS_FILE) or {}).items()
                if kind in {followup.kind for followup in FOLLOWUPS} and isinstance(detail, (str, type(None)))}
        run = Run(ops_id=job["ops_id"], name=job["name"], engine=job["engine"], run_dir=str(run_dir),
                  state="UNKNOWN", engine_job_id=job["engine_job_id"], created_at=job["created_at"],
                  started_at=job.get("started_at"), requeues=job.get("requeues", 0),
                  git_commit=git_of(provenance).get("commit"), sweep=job["sweep"],
                  overrides=job["overrides"], submitter=job.get("submitter"),
                  **{followup.column: done.get(followup.kind) for followup in FOLLOWUPS if followup.column})
        registry.insert(run)
        for kind, detail in done.items():
            registry.record_followup(run.ops_id, kind, SKIPPED if detail is None else detail)
        added.append(run.ops_id)
    return added, problems


def sync(project: Project, registry: Registry) -> tuple[list[str], list[Run], list[str]]:
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
    # Finished runs whose follow-ups an earlier crash or outage left undone.
    for ops_id in registry.pending_followups([followup.kind for followup in FOLLOWUPS]):
        problems += do_followups(project, registry, registry.get(ops_id))[1]
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

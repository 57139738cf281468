"""Project-wide settings: `ops.yaml` at the repo root, each key overridable by `OPS_<KEY>`.

The repo root is the nearest folder, from the working directory up, that holds `ops.yaml` or
`configs/jobs/`. Relative paths in the settings are relative to it.
"""

import difflib
import os
from dataclasses import dataclass, fields
from pathlib import Path

from ops.errors import OpsError

SETTINGS_FILE = "ops.yaml"


TRACKERS = ("tensorboard", "trackio")  # diffusion/trackers.py


# A dataclass, not pydantic: every `ops` command reads these, and importing pydantic would cost
# a third of the 0.3 s that `ops list` may take. A dozen flat keys are checked by hand below.
@dataclass(frozen=True)
class Settings:
    jobs_dir: str = "configs/jobs"  # where job specs live
    runs_dir: str = "runs"  # run directories (local and SLURM)
    registry: str = "runs/registry.sqlite"  # the SQLite run index
    experiment_log: str = "EXPERIMENT_LOG.md"  # the human-readable experiment history
    journal_dir: str = "docs"  # the mkdocs journal (posts in blog/posts/)
    cancel_grace_seconds: float = 30.0  # SIGTERM to SIGKILL wait on cancel
    gcp_project: str | None = None
    gcp_region: str = "us-central1"
    gcs_bucket: str | None = None  # gs://bucket/prefix for Vertex run dirs
    image_repository: str | None = None  # e.g. us-central1-docker.pkg.dev/P/R/diffusion
    image_builder: str | None = None  # docker | podman | buildah; None: the first one found
    image_base: str | None = None  # the Dockerfile's BASE_IMAGE; None: the Dockerfile's default
    image_tls_verify: bool = True  # False for a plain-HTTP registry (a local one)
    vertex_api_endpoint: str | None = None  # None: REGION-aiplatform.googleapis.com; a URL: a stand-in
    vertex_logs: str = "run-dir"  # where `ops monitor --logs` reads a Vertex job: run-dir | cloud-logging
    logging_api_endpoint: str | None = None  # None: logging.googleapis.com; a URL: a stand-in
    github_repo: str | None = None  # owner/name for experiment issues; None: the git remote, if on github.com
    github_issues: bool = True  # False: no experiment issues, even with a GitHub remote
    github_api_url: str = "https://api.github.com"  # GitHub Enterprise: https://HOST/api/v3
    github_timeout_seconds: float = 15.0  # per request; a slower GitHub leaves the action in the outbox
    journal_url: str | None = None  # where the built journal is published (links from issue comments)
    trackers: str | None = None  # tensorboard, trackio or both (comma-separated): for runs whose spec names none


def check_settings(raw: dict, source: str) -> Settings:
    known = {field.name: field for field in fields(Settings)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(known)}"
            raise OpsError(f"{source}: {key}: unknown key; {hint}")
        if isinstance(known[key].default, bool):
            text = str(value).lower()
            if text not in ("true", "false"):
                raise OpsError(f"{source}: {key}: {value!r} is not allowed: must be true or false")
            value = text == "true"
        elif isinstance(known[key].default, float):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise OpsError(f"{source}: {key}: {value!r} is not allowed: must be a number of seconds") from None
            if not 0 <= value <= 86400:  # also refuses nan and inf
                raise OpsError(f"{source}: {key}: {value!r} is not allowed: must be between 0 and 86400 seconds")
        elif key == "trackers":
            names = value if isinstance(value, list) else str(value or "").split(",")
            names = [str(name).strip() for name in names if str(name).strip()]
            if unknown := [name for name in names if name not in TRACKERS]:
                raise OpsError(f"{source}: {key}: {unknown[0]!r} is not allowed: {' or '.join(TRACKERS)}")
            value = ",".join(names) or None
        elif value is not None and not isinstance(value, str):
            raise OpsError(f"{source}: {key}: {value!r} is not allowed: must be a string")
        elif key == "vertex_logs" and value not in ("run-dir", "cloud-logging"):
            raise OpsError(f"{source}: {key}: {value!r} is not allowed: run-dir or cloud-logging")
        elif value is None and known[key].default is not None:
            raise OpsError(f"{source}: {key}: null is not allowed: must be a string")
        values[key] = value
    return Settings(**values)


def find_root(start: Path | None = None) -> Path:
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / SETTINGS_FILE).is_file() or (folder / "configs" / "jobs").is_dir():
            return folder
    raise OpsError(f"{start}: no {SETTINGS_FILE} or configs/jobs/ here or above; run ops inside the project")


def read_settings_file(path: Path) -> dict:
    """ops.yaml as a mapping ({} when there is none); OpsError, one line with the place, when it
    does not parse or holds what a settings file never needs (anchors, tags, deep nesting)."""
    from diffusion.yamlfile import ConfigError, parse_yaml  # ruamel: read when a command runs, not for `ops --help`

    if not path.exists():
        return {}
    if not path.is_file():
        raise OpsError(f"{path}: not a file; ops.yaml holds the project's settings as YAML")
    try:
        return parse_yaml(path.read_bytes(), str(path)) or {}
    except ConfigError as exc:
        raise OpsError(str(exc)) from None


def load_settings(root: Path) -> Settings:
    path = root / SETTINGS_FILE
    raw = read_settings_file(path)
    if not isinstance(raw, dict):
        raise OpsError(f"{path}: expected a mapping of settings")
    settings = check_settings(raw, str(path))
    environment = {
        field.name: os.environ[f"OPS_{field.name.upper()}"]
        for field in fields(Settings)
        if f"OPS_{field.name.upper()}" in os.environ
    }
    return check_settings({**raw, **environment}, f"{path} + OPS_* environment") if environment else settings


class Project:
    """The repo root and its settings, with the settings' paths made absolute."""

    def __init__(self, root: Path | None = None):
        self.root = find_root(root)
        self.settings = load_settings(self.root)

    def path(self, value: str) -> Path:
        return (self.root / value).resolve()

    @property
    def jobs_dir(self) -> Path:
        return self.path(self.settings.jobs_dir)

    @property
    def runs_dir(self) -> Path:
        return self.path(self.settings.runs_dir)

    @property
    def registry_path(self) -> Path:
        return self.path(self.settings.registry)

    @property
    def experiment_log(self) -> Path:
        return self.path(self.settings.experiment_log)

    def not_code(self) -> tuple[str, ...]:
        """Files ops writes into the repo: their changes are records, not code, and stay out of
        diff.patch (else every submit would make the next one "dirty", and its image new)."""
        return (self.settings.experiment_log, f"{self.settings.journal_dir}/blog/posts")

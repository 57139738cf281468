"""What a run dir holds, for the code that writes it (diffusion) and the code that reads it (ops).

The file names, the fields of `metrics.jsonl` and `summary.json`, and writing and reading that
survive a crash mid-write: every JSON file is replaced atomically (a temp file, fsync, rename),
metrics lines are appended whole, and readers drop a torn last line and take a missing file as
"not written yet". A field renamed here breaks its writers and readers alike. Standard library
only: `ops monitor` reads these and must start in a fraction of a second.
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOG = "log.txt"
CHECKPOINTS = "checkpoints"
LATEST = "latest.pt"  # in CHECKPOINTS: the newest checkpoint
STEP_FILES = "step_*.pt"  # in CHECKPOINTS: one per saved step, step_00001234.pt


def step_file(step: int) -> str:
    return f"step_{step:08d}.pt"


def step_of(path: Path) -> int:
    """The step of a step checkpoint's file name."""
    return int(Path(path).stem.removeprefix("step_"))


SAMPLES = "samples"
EVAL = "eval"
FIGURES = "figures"  # pictures a run draws of its model besides samples (an autoencoder's latent space)
TASKS = "tasks"  # records of sample and eval tasks run inside another task's run dir


def default_cache_dir() -> Path:
    """This machine's cache (DIFFUSION_CACHE_DIR, else ~/.cache/diffusion): the scorers' trained
    classifiers, ops' timings of steps."""
    return Path(os.environ.get("DIFFUSION_CACHE_DIR", Path.home() / ".cache" / "diffusion"))


def checkpoint_file(reference: str | Path) -> Path | None:
    """The checkpoint a reference names: a .pt file, a checkpoints/ folder's latest.pt, or a run
    dir's; None when there is none."""
    path = Path(reference).expanduser()
    return next(
        (candidate for candidate in (path, path / LATEST, path / CHECKPOINTS / LATEST) if candidate.is_file()), None
    )


def atomic_write(path: Path, data: bytes) -> None:
    """`path` holds either its old content or `data`, never a part: a temp file beside it, fsync,
    rename, fsync of the folder (else a power cut can bring back the old name). On any error
    (a full disk) the temp file is removed and the error raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def read_json(path: Path) -> dict | None:
    """A JSON record, or None when it is missing or damaged: does not parse (a crash of an older
    writer), is not an object, or is not a readable file."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) else None


def append_jsonl(path: Path, record: dict) -> None:
    """One line in a single write, so that a crash can tear at most the last line."""
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def parse_lines(data: bytes) -> list[dict]:
    """The complete records in JSON-lines bytes: a last line without its newline is torn (a
    writer died, or is halfway through it) and is dropped, as is any line that does not parse."""
    records = []
    for line in data.split(b"\n")[:-1]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_jsonl(path: Path) -> list[dict]:
    """Every complete record of a JSON-lines file; [] when it is missing."""
    try:
        return parse_lines(Path(path).read_bytes())
    except OSError:  # missing, or not a readable file
        return []


def last_jsonl(path: Path, chunk: int = 8192) -> dict | None:
    """The last complete record, read from the end (metrics files grow long); None when none."""
    try:
        f = Path(path).open("rb")
        f.seek(0, os.SEEK_END)  # a directory opens, and fails here
    except OSError:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        data = b""
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            data = f.read(end - start) + data
            complete = data if start == 0 else data[data.find(b"\n") + 1 :]  # drop a partial first line
            records = parse_lines(complete)
            if records:
                return records[-1]
            end = start
    return None


# What a field may hold, by its annotation; a value of another type is damage and reads as missing.
FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,)}


def fits(value: Any, annotation) -> bool:
    """Whether `value` is of the field's type: `int | None`, `dict[str, Any] | None`, `str` ..."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    names = {part.strip().split("[")[0] for part in text.split("|")}
    allowed = tuple(t for name in names for t in FIELD_TYPES.get(name, ()))
    # bool is an int to Python, not to a record: True is no step count.
    return value is None or (isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool)))


class Record:
    """A dataclass that reads from JSON written by any version: unknown keys are ignored (or kept
    in `extras`, where the class has it), missing ones take their defaults, and a value of the
    wrong type (a damaged file) counts as missing."""

    @classmethod
    def from_json(cls, data: dict | None):
        data = data or {}
        annotations = {f.name: f.type for f in fields(cls)}
        known = {
            key: value
            for key, value in data.items()
            if key in annotations and key != "extras" and fits(value, annotations[key])
        }
        if "extras" in annotations:
            known["extras"] = {key: value for key, value in data.items() if key not in annotations}
        return cls(**known)

    def to_json(self) -> dict:
        data = {key: value for key, value in asdict(self).items() if value is not None and key != "extras"}
        return data | getattr(self, "extras", {})


@dataclass
class MetricsRecord(Record):
    """One line of metrics.jsonl, written every train.log_every steps (and at validation points)."""

    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None  # fractional: step / steps per epoch
    loss: float | None = None  # mean training loss since the previous line
    lr: float | None = None
    grad_norm: float | None = None  # before clipping
    it_per_s: float | None = None
    examples_per_s: float | None = None
    train_seconds: float | None = None  # wall clock of the whole run so far, resumes included
    val_bits_per_char: float | None = None  # text, at train.val_every_steps
    extras: dict[str, Any] = field(default_factory=dict)  # a method's own training metrics


@dataclass
class Summary(Record):
    """summary.json: how the run dir's own task ended. Tasks run inside another task's run dir
    write theirs under tasks/ instead, so that they never rewrite the run's result."""

    status: str = ""  # completed | preempted | failed
    reason: str | None = None  # why it stopped: all steps done, a budget, a signal, a non-finite loss, a full disk
    signal: str | None = None  # the signal that stopped it (engines requeue on theirs, not on a cancel)
    exit_code: int | None = None
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    train_seconds: float | None = None
    num_parameters: int | None = None
    device: str | None = None
    final_metrics: dict[str, Any] | None = None  # the last metrics.jsonl line
    scores: dict[str, Any] | None = None  # a text run's end scores, an eval's or a sample task's
    collapsed: bool | None = None  # text: the samples degenerated (scores["collapsed"] says why)
    result: dict[str, Any] | None = None  # a sample or eval task: what it made (checkpoint, samples ...)
    evaluation: dict[str, Any] | None = None  # eval.after_train: the record of the evaluation after training
    expectations: list[dict[str, Any]] | None = None  # the config's `expect:` lines, each judged (expectations.judge)
    verdict: str | None = None  # met | missed | not measured: all of them together
    error: str | None = None  # an exception that ended it
    traceback: list[str] | None = None
    written_at: str | None = None
    pid: int | None = None

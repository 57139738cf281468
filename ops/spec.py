"""Job specs: `configs/jobs/NAME.yaml` = what to run (`run:`, checked by diffusion.config) + where.

Every problem is one line: file, key path, bad value, what is allowed, nearest valid key.
`--set KEY=VALUE` takes spec paths (`run.train.epochs=5`, `resources.slurm.partition=gpu`,
`engine=slurm`); a path that does not start with a spec key is read as inside `run:`.
"""

import copy
import difflib
import itertools
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffusion.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    describe_error,
    parse_assignment,
    parse_yaml,
    read_yaml,
    spec_run,
    validate_run,
)

ENGINES = ("local", "slurm", "vertex")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # timeouts of .inf hours are typos


class LocalResources(Section):
    device: Literal["auto", "cpu", "cuda", "mps"] | None = Field(None, description="Overrides run.device.")
    threads: int | None = Field(None, ge=1, le=1024, description="OMP/torch CPU threads (OMP_NUM_THREADS).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")


class SlurmResources(Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_minutes: int = Field(60, ge=1, le=525_600)  # a year
    nodes: int = Field(1, ge=1, le=10_000)
    tasks_per_node: int = Field(1, ge=1, le=1024)
    gpus_per_node: int = Field(0, ge=0, le=64)
    cpus_per_task: int = Field(2, ge=1, le=1024)
    mem_gb: float | None = Field(
        None, ge=0.01, le=100_000, description="Per node; sbatch --mem in MB (0 would mean all of it)."
    )
    constraint: str | None = None
    exclude: str | None = None
    additional_parameters: dict[str, Any] = Field(default_factory=dict, description="Extra sbatch options.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run first (module load ...).")
    signal_delay_s: int = Field(120, ge=0, le=86_400, description="USR2 this long before the time limit.")
    max_requeues: int = Field(3, ge=0, le=1000)


# Vertex AI's own rules for a CustomJob, checked at validation rather than after an upload and an
# image build. GPU machine types and the accelerator counts each offers (Compute Engine's GPU
# machine types); n1 machines take T4, V100, P100 and P4 GPUs, the other families come with theirs.
N1_GPUS = {
    "NVIDIA_TESLA_T4": (1, 2, 4),
    "NVIDIA_TESLA_V100": (1, 2, 4, 8),
    "NVIDIA_TESLA_P100": (1, 2, 4),
    "NVIDIA_TESLA_P4": (1, 2, 4),
}
GPU_MACHINES = {
    "NVIDIA_TESLA_A100": {
        "a2-highgpu-1g": 1,
        "a2-highgpu-2g": 2,
        "a2-highgpu-4g": 4,
        "a2-highgpu-8g": 8,
        "a2-megagpu-16g": 16,
    },
    "NVIDIA_A100_80GB": {"a2-ultragpu-1g": 1, "a2-ultragpu-2g": 2, "a2-ultragpu-4g": 4, "a2-ultragpu-8g": 8},
    "NVIDIA_L4": {
        "g2-standard-4": 1,
        "g2-standard-8": 1,
        "g2-standard-12": 1,
        "g2-standard-16": 1,
        "g2-standard-32": 1,
        "g2-standard-24": 2,
        "g2-standard-48": 4,
        "g2-standard-96": 8,
    },
    "NVIDIA_H100_80GB": {"a3-highgpu-1g": 1, "a3-highgpu-2g": 2, "a3-highgpu-4g": 4, "a3-highgpu-8g": 8},
    "NVIDIA_H100_MEGA_80GB": {"a3-megagpu-8g": 8},
    "NVIDIA_H200_141GB": {"a3-ultragpu-8g": 8},
    "NVIDIA_B200": {"a4-highgpu-8g": 8},
}
MAX_LABELS = 64
OPS_LABELS = ("ops-id", "commit")  # the labels ops adds to every job


def label_problem(text: str, what: str) -> str | None:
    """Why a Vertex label key or value is refused: at most 63 characters of lowercase letters
    (international ones too), digits, `_` and `-`; a key starts with a letter."""
    if len(text) > 63:
        return f"{what} {text!r} is longer than 63 characters"
    # Lowercase letters, international ones included; letters without case (CJK ...), numerals.
    bad = [c for c in text if not (c in "_-" or c.isnumeric() or (c.isalpha() and c == c.lower()))]
    if bad:
        return f"{what} {text!r} has {bad[0]!r}: only lowercase letters, digits, '_' and '-' are allowed"
    if what == "key" and not (text[:1].isalpha()):
        return f"key {text!r} must start with a lowercase letter"
    return None


class VertexResources(Section):
    machine_type: str = Field(
        "n1-standard-8",
        pattern=r"^[a-z][a-z0-9-]*$",
        description="A Compute Engine machine type, lowercase: n1-standard-8, a2-highgpu-1g, g2-standard-8 ...",
    )
    accelerator_type: str | None = Field(None, description="e.g. NVIDIA_TESLA_T4, NVIDIA_TESLA_V100")
    accelerator_count: int = Field(0, ge=0, le=16, description="GPUs per replica; > 1 trains data-parallel (torchrun).")
    replica_count: int = Field(1, ge=1, le=1000, description="Machines; > 1 trains data-parallel across them.")
    boot_disk_gb: int = Field(100, ge=100, le=64000, description="Vertex takes 100 to 64,000 GB.")
    spot: bool = Field(False, description="Spot VMs: cheaper, may be preempted.")
    restart_job_on_worker_restart: bool = Field(True, description="Restart after a worker restart; resumes.")
    timeout_hours: float = Field(24.0, ge=1 / 60, le=24 * 30, description="Between a minute and 30 days.")
    service_account: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="Extra job labels (ops id and commit are added).")

    @field_validator("accelerator_type")
    @classmethod
    def _placeable_gpu(cls, accelerator: str | None) -> str | None:
        """A GPU ops knows where to place; withdrawn ones (K80), TPUs and newer types are not."""
        known = [*N1_GPUS, *GPU_MACHINES]
        if accelerator is not None and accelerator not in known:
            close = difflib.get_close_matches(accelerator, known, n=1)
            raise ValueError(f"did you mean {close[0]!r}?" if close else f"one of {', '.join(known)}")
        return accelerator

    @field_validator("labels", mode="before")
    @classmethod
    def _values_as_text(cls, labels):
        """`version: 2` and `preemptible: true` are labels too: Vertex's values are text."""
        if not isinstance(labels, dict):
            return labels
        return {
            key: str(value).lower()
            if isinstance(value, bool)
            else str(value)
            if isinstance(value, (int, float))
            else value
            for key, value in labels.items()
        }

    @field_validator("labels")
    @classmethod
    def _vertex_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            problem = label_problem(key, "key") or label_problem(value, "value")
            if problem:
                raise ValueError(problem)
            if key in OPS_LABELS:
                raise ValueError(f"key {key!r} is one that ops sets itself ({', '.join(OPS_LABELS)})")
        if len(labels) + len(OPS_LABELS) > MAX_LABELS:
            raise ValueError(f"{len(labels)} labels and the {len(OPS_LABELS)} of ops are over Vertex's {MAX_LABELS}")
        return labels

    @model_validator(mode="after")
    def _machine_takes_the_accelerator(self) -> "VertexResources":
        machine, accelerator, count = self.machine_type, self.accelerator_type, self.accelerator_count
        if accelerator and not count:
            raise ValueError(f"accelerator_count 0 is not allowed with accelerator_type {accelerator}: set 1 or more")
        if count and not accelerator:
            raise ValueError(f"accelerator_count {count} is not allowed without accelerator_type: name the GPU")
        family = next((name for name, machines in GPU_MACHINES.items() if machine in machines), None)
        if family and accelerator != family:
            raise ValueError(
                f"machine_type {machine!r} comes with {GPU_MACHINES[family][machine]} x {family}: set "
                f"accelerator_type {family} and accelerator_count {GPU_MACHINES[family][machine]}"
            )
        if accelerator in GPU_MACHINES:
            machines = GPU_MACHINES[accelerator]
            if machines.get(machine) != count:
                fits = ", ".join(f"{name} ({gpus})" for name, gpus in machines.items())
                raise ValueError(f"accelerator_type {accelerator} x {count} needs its machine type, one of {fits}")
        if accelerator in N1_GPUS:
            if not machine.startswith("n1-"):
                raise ValueError(
                    f"accelerator_type {accelerator} attaches to n1 machine types (n1-standard-8 ...), not {machine!r}"
                )
            if count not in N1_GPUS[accelerator]:
                raise ValueError(
                    f"accelerator_count {count} is not offered for {accelerator}: "
                    f"{', '.join(map(str, N1_GPUS[accelerator]))}"
                )
        return self


class Resources(Section):
    local: LocalResources = Field(default_factory=LocalResources)
    slurm: SlurmResources = Field(default_factory=SlurmResources)
    vertex: VertexResources = Field(default_factory=VertexResources)


class JobSpec(Section):
    # At most 50: the ops id (NAME-xxxxxx) is a Vertex label value, which may have 63 characters.
    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=50, description="Lowercase letters, digits and dashes."
    )
    description: str = Field("", description="What the job is, in a sentence.")
    hypothesis: str = Field("", description="What the run is meant to show, and why.")
    expected: str = Field("", description="The outcome that would confirm the hypothesis (figures, if any).")
    expect: list[str] = Field(
        default_factory=list,
        description="The expected outcome as checks, METRIC OP VALUE each (scores.confident_share >= 0.7): met, "
        "missed or not measured when the run ends.",
    )
    cpu_variant: str | None = Field(
        None,
        description="For a GPU-sized spec: what to run on a CPU instead, a spec name or --set overrides "
        "(ops submit says so on a machine without a GPU).",
    )
    engine: Literal["local", "slurm", "vertex"] = "local"
    resources: Resources = Field(default_factory=Resources)
    run: RunConfig


SPEC_KEYS = list(JobSpec.model_fields)


def spec_path(jobs_dir: Path, name: str) -> Path:
    """NAME -> jobs_dir/NAME.yaml (a path to a .yaml is taken as it is)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else jobs_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in jobs_dir.glob("*.yaml"))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known specs: {', '.join(known) or 'none'}"
        raise ConfigError(f"{path}: no such job spec; {hint}")
    cwd = Path.cwd()
    return path.relative_to(cwd) if path.is_relative_to(cwd) else path  # short paths in messages


def spec_override(text: str) -> str:
    """Let `train.epochs=3` mean `run.train.epochs=3`; spec keys stay as they are."""
    key = text.partition("=")[0].strip()
    return text if key.split(".")[0] in SPEC_KEYS else f"run.{text}"


def validate_spec(raw: Any, source: str) -> JobSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with keys {', '.join(SPEC_KEYS)}")
    # The run section first, so its errors carry diffusion.config's own key paths and hints.
    if raw.get("run") is None:
        raise ConfigError(f"{source}: run: required section is missing (what to compute: task, data, model ...)")
    if not isinstance(raw["run"], dict):
        raise ConfigError(f"{source}: run: {raw['run']!r} is not allowed: must be a mapping (task, data, model ...)")
    run = spec_run(raw, source)
    try:
        validate_run(run, source, prefix="run")
    except ConfigError as exc:
        if not raw.get("expect"):  # as spec_run: only lines given at the top level are named there
            raise
        # The spec's checks are written at its top level: named where they were written (a line: expect[i]).
        where = re.compile(rf"^{re.escape(source)}: run\.expect(?:\[(\d+)\]|\.(\d+))?:")
        message = where.sub(
            lambda match: f"{source}: expect" + (f"[{match[1] or match[2]}]" if match[1] or match[2] else "") + ":",
            str(exc),
            count=1,
        )
        raise ConfigError(message) from None
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_error(exc.errors()[0], JobSpec)}") from None
    spec.run.expect = spec.expect or spec.run.expect  # the checks travel with the run's config.yaml
    slurm = spec.resources.slurm
    if spec.engine == "slurm" and slurm.gpus_per_node and slurm.tasks_per_node > slurm.gpus_per_node:
        raise ConfigError(
            f"{source}: resources.slurm.tasks_per_node: {slurm.tasks_per_node} is not allowed with "
            f"gpus_per_node {slurm.gpus_per_node}: each task trains on a GPU of its own; set "
            "tasks_per_node to at most gpus_per_node"
        )
    ranks, how = data_parallel_ranks(spec)
    if spec.run.task == "train" and spec.run.train.batch_size % ranks:
        raise ConfigError(
            f"{source}: run.train.batch_size: {spec.run.train.batch_size} is not allowed on "
            f"{spec.engine}: must be a multiple of its {ranks} data-parallel ranks ({how})"
        )
    return spec


def data_parallel_ranks(spec: JobSpec) -> tuple[int, str]:
    """How many training processes the spec's engine starts, each taking an equal share of every
    batch, and which resources say so."""
    if spec.engine == "slurm":
        slurm = spec.resources.slurm
        return (
            slurm.nodes * slurm.tasks_per_node,
            f"resources.slurm.nodes {slurm.nodes} x tasks_per_node {slurm.tasks_per_node}",
        )
    if spec.engine == "vertex":
        vertex = spec.resources.vertex
        gpus = vertex.accelerator_count if vertex.accelerator_type else 0
        return vertex.replica_count * max(
            gpus, 1
        ), f"resources.vertex.replica_count {vertex.replica_count} x accelerator_count {max(gpus, 1)}"
    return 1, "one process"


def load_spec(path: Path, overrides: list[str] = ()) -> JobSpec:
    raw = read_yaml(path)
    if overrides and isinstance(raw, dict):
        raw = apply_overrides(copy.deepcopy(raw), [spec_override(text) for text in overrides], parse_assignment)
    spec = validate_spec(raw, str(path))
    check_name(spec, path)
    return spec


def check_name(spec: JobSpec, path: Path) -> None:
    """A spec in a jobs folder is called by its file name; its `name` must say the same."""
    if spec.name != path.stem and path.parent.name == "jobs":
        raise ConfigError(f"{path}: name: {spec.name!r} is not allowed: must equal the file name '{path.stem}'")


def split_values(text: str) -> list[str]:
    """`1e-3,1e-4` -> ['1e-3', '1e-4']; commas inside [...] stay (`[1,2],[1,2,2]`)."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [*values, current]


def expand_sweep(sweeps: list[str]) -> list[dict[str, str]]:
    """`--sweep a=1,2 --sweep b=x,y` -> the 4 combinations, each {key: value-text}."""
    axes = []
    for text in sweeps:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--sweep {text!r}: expected KEY=V1,V2,..., e.g. run.train.lr=1e-3,1e-4")
        for value in split_values(values):  # each value parses, or the line names the --sweep it came from
            parse_yaml(value, f"--sweep {text!r}", inline=True)
        axes.append([(key.strip(), value.strip()) for value in split_values(values)])
    return [dict(combination) for combination in itertools.product(*axes)]

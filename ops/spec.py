"""Job specs: `configs/jobs/NAME.yaml` = what to run (`run:`, checked by diffusion.config) + where.

Every problem is one line: file, key path, bad value, what is allowed, nearest valid key.
`--set KEY=VALUE` takes spec paths (`run.train.epochs=5`, `resources.slurm.partition=gpu`,
`engine=slurm`); a path that does not start with a spec key is read as inside `run:`.
"""

import copy
import difflib
import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffusion.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    parse_assignment,
    describe_error,
    read_yaml,
    validate_run,
)

ENGINES = ("local", "slurm", "vertex")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # timeouts of .inf hours are typos


class LocalResources(Section):
    device: Literal["auto", "cpu", "cuda", "mps"] | None = Field(None, description="Overrides run.device.")
    threads: int | None = Field(None, ge=1, description="OMP/torch CPU threads (OMP_NUM_THREADS).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")


class SlurmResources(Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_minutes: int = Field(60, ge=1)
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(2, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    constraint: str | None = None
    exclude: str | None = None
    additional_parameters: dict[str, Any] = Field(default_factory=dict, description="Extra sbatch options.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run first (module load ...).")
    signal_delay_s: int = Field(120, ge=0, description="USR2 this long before the time limit.")
    max_requeues: int = Field(3, ge=0)


class VertexResources(Section):
    machine_type: str = "n1-standard-8"
    accelerator_type: str | None = Field(None, description="e.g. NVIDIA_TESLA_T4, NVIDIA_TESLA_V100")
    accelerator_count: int = Field(0, ge=0, description="GPUs per replica; > 1 trains data-parallel (torchrun).")
    replica_count: int = Field(1, ge=1, description="Machines; > 1 trains data-parallel across them.")
    boot_disk_gb: int = Field(100, ge=10)
    spot: bool = Field(False, description="Spot VMs: cheaper, may be preempted.")
    restart_job_on_worker_restart: bool = Field(True, description="Restart after a worker restart; resumes.")
    timeout_hours: float = Field(24.0, gt=0)
    service_account: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="Extra job labels (ops id and commit are added).")


class Resources(Section):
    local: LocalResources = Field(default_factory=LocalResources)
    slurm: SlurmResources = Field(default_factory=SlurmResources)
    vertex: VertexResources = Field(default_factory=VertexResources)


class JobSpec(Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="Lowercase letters, digits and dashes.")
    description: str = Field("", description="What the job is, in a sentence.")
    hypothesis: str = Field("", description="What the run is meant to show, and why.")
    expected: str = Field("", description="The outcome that would confirm the hypothesis (figures, if any).")
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
    validate_run(raw["run"], source, prefix="run")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_error(exc.errors()[0], JobSpec)}") from None
    ranks, how = data_parallel_ranks(spec)
    if spec.run.task == "train" and spec.run.train.batch_size % ranks:
        raise ConfigError(f"{source}: run.train.batch_size: {spec.run.train.batch_size} is not allowed on "
                          f"{spec.engine}: must be a multiple of its {ranks} data-parallel ranks ({how})")
    return spec


def data_parallel_ranks(spec: JobSpec) -> tuple[int, str]:
    """How many training processes the spec's engine starts, each taking an equal share of every
    batch, and which resources say so."""
    if spec.engine == "slurm":
        slurm = spec.resources.slurm
        return slurm.nodes * slurm.tasks_per_node, \
            f"resources.slurm.nodes {slurm.nodes} x tasks_per_node {slurm.tasks_per_node}"
    if spec.engine == "vertex":
        vertex = spec.resources.vertex
        gpus = vertex.accelerator_count if vertex.accelerator_type else 0
        return vertex.replica_count * max(gpus, 1), \
            f"resources.vertex.replica_count {vertex.replica_count} x accelerator_count {max(gpus, 1)}"
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
        axes.append([(key.strip(), value.strip()) for value in split_values(values)])
    return [dict(combination) for combination in itertools.product(*axes)]

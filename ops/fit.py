"""Fit to the machine: a GPU-sized spec submitted to the local engine of a machine without a GPU
says so at submit, with its duration here estimated from a few timed steps, and the CPU-sized
variant to run instead; `ops monitor` shows the estimate until the first metrics arrive.

A spec is GPU-sized when its own resources ask for a GPU elsewhere (resources.slurm.gpus_per_node,
resources.vertex.accelerator_type) or its run asks for CUDA (run.device: cuda). The timing is
`python -m diffusion estimate` on the run's resolved config: ops itself never imports torch. A
timing is kept for a week in this machine's cache (DIFFUSION_CACHE_DIR, else ~/.cache/diffusion:
fit-estimates.json, outside the project, so a dry run writes nothing there), keyed by the resolved
config, the code of diffusion/ and this machine, so that a second submit or dry run of the same run
costs nothing.
"""

import hashlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from ops.rundir import atomic_write, default_cache_dir, read_json

ESTIMATE_TIMEOUT_SECONDS = 180
CACHE_SECONDS = 7 * 24 * 3600
UNTIMED = ("sample", "eval", "expect")  # the run config's sections that do not change a training step's time
TIMING_FIELDS = ("seconds_per_step", "total_steps", "timed_steps", "max_minutes")  # what estimate() reads


CACHE_FILE = "fit-estimates.json"  # in this machine's cache folder (default_cache_dir)


def has_gpu() -> bool:
    """An NVIDIA GPU the driver lists, or Apple silicon (MPS); without importing torch."""
    nvidia = Path("/proc/driver/nvidia/gpus")
    if nvidia.is_dir() and any(nvidia.iterdir()):
        return True
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def gpu_sized(spec) -> str | None:
    """Why the spec is sized for a GPU (the setting that says so), or None."""
    if spec.resources.vertex.accelerator_type:
        return f"resources.vertex.accelerator_type {spec.resources.vertex.accelerator_type}"
    if spec.resources.slurm.gpus_per_node:
        return f"resources.slurm.gpus_per_node {spec.resources.slurm.gpus_per_node}"
    if spec.run.device == "cuda":
        return "run.device cuda"
    return None


def code_dir(cwd: Path) -> Path:
    """The diffusion package `python -m diffusion` runs from `cwd`: the project's own, else the
    installed one (found, not imported)."""
    if (cwd / "diffusion" / "__init__.py").is_file():
        return cwd / "diffusion"
    return Path(importlib.util.find_spec("diffusion").origin).parent


def timing_key(run: dict, code: Path) -> str:
    """What a timing depends on: the resolved run config, the code that trains it (the sources
    under `code`) and this machine (its name, the cores this process may use, Python and torch)."""
    sources = hashlib.sha256()
    for path in sorted(code.rglob("*.py")):
        sources.update(path.relative_to(code).as_posix().encode() + b"\0" + path.read_bytes())
    cores = len(os.sched_getaffinity(0)) if sys.platform == "linux" else os.cpu_count()  # a cgroup's, on Linux
    machine = [platform.node(), platform.machine(), cores, sys.version, metadata.version("torch")]
    return hashlib.sha256(json.dumps([run, sources.hexdigest(), machine], sort_keys=True).encode()).hexdigest()


def usable(entry, now: float) -> bool:
    """A cache entry this version can read, younger than CACHE_SECONDS (a damaged one is not)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("at"), int | float) or now - entry["at"] > CACHE_SECONDS:
        return False
    timing = entry.get("timing")
    if not isinstance(timing, dict) or not all(name in timing for name in TIMING_FIELDS):
        return False
    return all(isinstance(timing[name], int | float) for name in TIMING_FIELDS if name != "max_minutes")


def cached_time_here(spec, cwd: Path, cache: Path) -> dict:
    """time_here, read from `cache` when this run was timed on this machine within CACHE_SECONDS
    (`cached_at` then says when); a timing that failed is not kept."""
    run = spec.run.model_dump(mode="json") | {"device": "cpu"}
    trains = {section: value for section, value in run.items() if section not in UNTIMED}
    key, now = timing_key(trains, code_dir(cwd)), time.time()
    entries = {k: v for k, v in (read_json(cache) or {}).items() if usable(v, now)}
    if key in entries:
        return entries[key]["timing"] | {
            "cached_at": time.strftime("%Y-%m-%d %H:%M", time.localtime(entries[key]["at"]))
        }
    timing = time_here(run, cwd)
    if "error" not in timing:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps(entries | {key: {"at": now, "timing": timing}}, indent=1).encode())
    return timing


def time_here(run: dict, cwd: Path) -> dict:
    """`python -m diffusion estimate` on a resolved run config (a dict): {seconds_per_step,
    total_steps, max_minutes, ...}, or {"error": why} when it could not time it."""
    from diffusion.config import dump_yaml  # pydantic: only at submit

    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.yaml"
        dump_yaml(run, config)
        # SIGTERM to ops (a kill, a closed terminal) ends the timing too: subprocess.run kills its
        # child on the exception, where the default action would leave it running, orphaned.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            result = subprocess.run(
                [sys.executable, "-m", "diffusion", "estimate", str(config)],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=ESTIMATE_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timing a few steps took over {ESTIMATE_TIMEOUT_SECONDS} s"}
        finally:
            signal.signal(signal.SIGTERM, previous)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"its timing printed no JSON ({lines[-1][:200]!r})"}


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(spec, cwd: Path) -> dict | None:
    """For a GPU-sized spec going to the local engine on a machine without a GPU: {why, timing,
    seconds (the estimated duration here, the time budget included), warning}; else None. The
    timing is read from this machine's cache when it holds one of this run (cached_time_here)."""
    why = gpu_sized(spec)
    if spec.engine != "local" or spec.run.task != "train" or why is None or has_gpu():
        return None
    timing = cached_time_here(spec, cwd, default_cache_dir() / CACHE_FILE)
    warning = f"{spec.name} is sized for a GPU ({why}) and this machine has none"
    seconds = None
    if "error" in timing:
        warning += f"; its duration here is unknown ({timing['error']})"
    else:
        seconds = timing["seconds_per_step"] * timing["total_steps"]
        warning += (
            f": on this CPU a step takes {timing['seconds_per_step']:.2f} s ({timing['timed_steps']} timed), "
            f"so its {timing['total_steps']:,} steps would take about {duration_text(seconds)}"
            + (f" (timed {timing['cached_at']})" if "cached_at" in timing else "")
        )
        budget = timing["max_minutes"] * 60 if timing["max_minutes"] else None
        if budget is not None and seconds > budget:
            steps = int(budget / timing["seconds_per_step"])
            warning += (
                f"; train.max_minutes {timing['max_minutes']:g} stops it after about {steps:,} steps "
                f"({steps / timing['total_steps']:.1%} of them)"
            )
            seconds = budget
    if spec.cpu_variant:
        variant = spec.cpu_variant if spec.cpu_variant.startswith("--") else None
        command = f"ops submit {spec.name} {variant}" if variant else f"ops submit {spec.cpu_variant}"
        warning += f"; for a CPU: {command}"
    return {"why": why, "timing": timing, "seconds": seconds, "warning": warning}

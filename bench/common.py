"""What the flow benchmarks share: the machine they ran on and beside what, the training budget
their header states, a target's verdict. The bench scripts import it from their own folder (run as
`python bench/NAME.py`, which puts bench/ on the path)."""

import os
from pathlib import Path

import torch


def machine(note: str) -> dict:
    """What the numbers ran on, and beside what."""
    return {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        "running_alongside": note,
    }


def print_machine(info: dict, root: Path) -> None:
    load = " ".join(f"{value:.2f}" for value in info["load_average_at_start"])
    print(
        f"{info['cpus']} CPUs, torch {info['torch']}, {info['torch_threads']} threads"
        + (f", {info['cuda']}" if info["cuda"] else ", no GPU")
        + f", load average {load} at start; run root {root}; running alongside: {info['running_alongside']}",
        flush=True,
    )


def budget(runs: dict) -> str:
    """The training budget the runs were given (train.max_minutes), as the header says it."""
    budgets = {run["budget_minutes"] for run in runs.values()}
    if len(budgets) == 1 and None not in budgets:
        return f"{budgets.pop():g} training minutes each"
    return "training budgets " + ", ".join(f"{job} {run['budget_minutes']} min" for job, run in runs.items())


def verdict(met: bool) -> str:
    return "PASS" if met else "FAIL"

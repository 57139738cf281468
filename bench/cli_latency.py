"""Cold-start latency of the `ops` CLI: `ops --help`, `ops list` over 10,000 runs, `ops monitor`.

    .venv/bin/python bench/cli_latency.py [--repeats 15] [--runs 10000]

Builds a throwaway project whose registry holds --runs finished runs plus one run with a
metrics file, then times fresh processes (median of --repeats, after one warm-up that writes
the .pyc files: a researcher's machine has them, even where PYTHONDONTWRITEBYTECODE is set
here) next to a bare `python -c pass` measured in the same run. Target on these machines: each
ops command under 0.3 s.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ops.registry import Registry, Run

OPS = [str(Path(sys.executable).with_name("ops"))]


def build_project(root: Path, num_runs: int) -> str:
    (root / "configs/jobs").mkdir(parents=True)
    registry = Registry(root / "runs/registry.sqlite")
    registry.db.execute("BEGIN")
    now = time.time()
    for index in range(num_runs):
        registry.insert(
            Run(
                ops_id=f"old-{index:06d}",
                name="old",
                engine="local",
                run_dir=str(root / "runs/x"),
                state="SUCCEEDED",
                engine_job_id=str(100000 + index),
                created_at=now - num_runs + index,
                started_at=now - num_runs + index,
                finished_at=now - num_runs + index + 1,
                exit_code=0,
            )
        )
    registry.db.execute("COMMIT")
    run_dir = root / "runs/watched-000001"
    run_dir.mkdir(parents=True)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step in range(1, 2001):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "epoch": step / 100,
                        "loss": 1 / step,
                        "it_per_s": 20.0,
                        "train_seconds": step / 20,
                        "total_steps": 5000,
                    }
                )
                + "\n"
            )
    (run_dir / "job.json").write_text(json.dumps({"spec": {"run": {"train": {"epochs": 50}}}}))
    registry.insert(
        Run(
            ops_id="watched-000001",
            name="watched",
            engine="local",
            run_dir=str(run_dir),
            state="SUCCEEDED",
            engine_job_id="1",
            created_at=now,
            started_at=now - 100,
            finished_at=now,
            exit_code=0,
        )
    )
    for kind in ("experiment_log_submit", "experiment_log_result"):  # a finished run has had its follow-ups
        registry.record_followup("watched-000001", kind)
    registry.close()
    return "watched-000001"


def median_seconds(command: list[str], cwd: Path, repeats: int) -> float:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(command, cwd=cwd, capture_output=True, env=env)  # warm-up: writes the .pyc files
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run(command, cwd=cwd, capture_output=True, env=env)
        times.append(time.perf_counter() - started)
        assert result.returncode == 0, result.stderr.decode()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--runs", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        watched = build_project(root, args.runs)
        baseline = median_seconds([sys.executable, "-c", "pass"], root, args.repeats)
        rows = [
            ("python -c pass (baseline)", baseline),
            ("ops --help", median_seconds([*OPS, "--help"], root, args.repeats)),
            (f"ops list ({args.runs:,} runs)", median_seconds([*OPS, "list"], root, args.repeats)),
            (f"ops list --json ({args.runs:,} runs)", median_seconds([*OPS, "list", "--json"], root, args.repeats)),
            ("ops monitor RUN", median_seconds([*OPS, "monitor", watched], root, args.repeats)),
            ("ops monitor RUN --json", median_seconds([*OPS, "monitor", watched, "--json"], root, args.repeats)),
        ]
    print(f"median of {args.repeats} cold starts each")
    print(f"{'command':<34}{'seconds':>9}{'x baseline':>12}  target < 0.3 s")
    for name, seconds in rows:
        verdict = "" if name.startswith("python") else ("met" if seconds < 0.3 else "NOT met")
        print(f"{name:<34}{seconds:>9.3f}{seconds / baseline:>12.1f}  {verdict}")


if __name__ == "__main__":
    main()

"""python -m diffusion train|sample|eval CONFIG_OR_RUN_DIR [--set KEY=VALUE ...] [--out RUN_DIR] [--device D]
python -m diffusion RUN_DIR          run the task in RUN_DIR/config.yaml, in place (what every engine calls)
python -m diffusion inspect CHECKPOINT_OR_RUN_DIR   what a checkpoint holds, as JSON (`ops ckpt inspect`)
python -m diffusion estimate CONFIG [--set ...]      seconds per training step here and the total steps, as JSON

A CONFIG is a run config or a job spec (configs/jobs/NAME.yaml, whose `run:` section is used).
A RUN_DIR given to `train` resumes it; given to `sample` or `eval`, samples from its checkpoint and
writes into it. Exit codes: 0 done, 2 bad input (nothing written), 75 preempted (resumable).
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from diffusion.config import ConfigError, RunConfig, load_run_config, read_yaml
from diffusion.records import CONFIG, Summary
from diffusion.rundir import RunDir

TASKS = ("train", "sample", "eval")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if argv and argv[0] in TASKS:
        parser.add_argument("task", choices=TASKS)
    parser.add_argument("target", help="a config / job spec YAML, or a run directory")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=1 (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="run directory to write (default: runs/NAME-TIMESTAMP)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="overrides the config's device")
    args = parser.parse_args(argv)
    args.task = getattr(args, "task", None)
    return args


def default_run_dir(config_path: Path) -> Path:
    raw = read_yaml(config_path)
    name = raw.get("name") if isinstance(raw, dict) and raw.get("name") else config_path.stem
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve(args: argparse.Namespace) -> tuple[RunConfig, Path, bool]:
    """(config, run dir, whether to write into another task's run dir, e.g. sample a training run)."""
    target = Path(args.target)
    if target.is_dir():
        config_path = target / CONFIG
        if not config_path.is_file():
            raise ConfigError(f"{target}: not a run directory (no config.yaml); pass a config file instead")
        run_dir = args.out or target
    else:
        config_path = target
        run_dir = args.out or default_run_dir(target)
    config = load_run_config(config_path, args.overrides, stored=target.is_dir())
    if args.task:
        config.task = args.task
    if args.device:
        config.device = args.device
    if target.is_dir() and config.task != "train" and config.sample.checkpoint is None:
        config.sample.checkpoint = str(target)  # sample the run named, wherever --out puts the samples
    # The run dir belongs to the task its config.yaml names, whatever --set, a task word or --out
    # ask for: another task run there writes beside it, never over its config or summary.
    existing = Path(run_dir) / CONFIG
    stored = read_yaml(existing) if existing.is_file() else None
    owner = stored.get("task", "train") if isinstance(stored, dict) else config.task
    return config, run_dir, owner != config.task


def run_task(config: RunConfig, run: RunDir) -> int:
    # torch loads only here, once the config is valid: bad input is answered at once.
    from diffusion.runtime import DataParallel
    from diffusion.tasks import eval_task, evaluate_after_training, sample_task
    from diffusion.train import train

    if config.task == "train":
        code = train(config, run.path)
        if code == 0 and config.eval.after_train and DataParallel().is_main:
            code = evaluate_after_training(config, run)  # 0, or EXIT_PREEMPTED: resumable
        return code
    if config.task == "sample":
        return sample_task(config, run)
    return eval_task(config, run)


def estimate(argv: list[str]) -> int:
    """`python -m diffusion estimate CONFIG [--set KEY=VALUE ...]`: one JSON line, train.time_steps'."""
    args = parse_args(argv)
    try:
        config, _, _ = resolve(args)
        # torch loads only here, as for the tasks.
        from diffusion.train import time_steps

        print(json.dumps(time_steps(config)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def inspect(target: str) -> int:
    # torch loads only here, as for the tasks.
    from diffusion.trained import inspect_checkpoint

    try:
        print(json.dumps(inspect_checkpoint(target), default=str))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:
        if len(argv) != 2:
            print("usage: python -m diffusion inspect CHECKPOINT_OR_RUN_DIR", file=sys.stderr)
            return 2
        return inspect(argv[1])
    if argv[:1] == ["estimate"]:
        return estimate(argv[1:])
    args = parse_args(argv)
    run = None
    try:
        config, run_dir, in_place = resolve(args)
        run = RunDir(run_dir, config.task, in_place)
        return run_task(config, run)
    except ConfigError as exc:  # a DatasetNotFoundError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Record the failure where engines and `ops monitor` look for this task's outcome (a task run
        # inside another task's run dir has its own record), then fail loudly.
        if run is not None and run.path.is_dir():
            tail = traceback.format_exc().strip().splitlines()[-20:]
            run.write_record(Summary(status="failed", error=repr(exc), traceback=tail))
        raise
    finally:
        if run is not None:
            run.unlock()


if __name__ == "__main__":
    sys.exit(main())

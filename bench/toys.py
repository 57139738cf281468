"""Flow matching against MeanFlow on a 2-D toy at an equal training budget, as one table.

Trains `flow-toy` and `meanflow-toy` on `--dataset` for `--minutes` of wall clock each
(train.max_minutes), then runs the sample task on each checkpoint with one seed and `--num-samples`
points in one batch, scored against the toy's held-out split (the energy distance beside its
real-vs-real floor at the same N, written to RUN_DIR/eval/NAME.json):

- flow matching with Euler-100 and with dopri5 (rtol = atol = 1e-5; its NFE is the solver's own count);
- MeanFlow with 1 and 2 average-velocity jumps (sampler meanflow).

meanflow-toy pairs noise with data by minibatch optimal transport (method.coupling, groups of
64); flow-toy keeps independent noise, as its Euler-100 is at the floor either way (2026-12-01, 2
minutes: mean of 20 draws 1.14 independent, 1.15 with groups of 64, where dopri5 took 32 NFE
against 50), so the comparison stands against either.

`--set JOB:KEY=VALUE` changes one job's spec, e.g. MeanFlow without its minibatch-OT pairing:
`--only meanflow-toy --set meanflow-toy:method.coupling=independent --set
meanflow-toy:method.coupling_group_size=null` (the group size goes back to its default: it is read only under OT).

Each sampler is also drawn `--draws` times (seeds --seed, --seed + 1, ...; the first is the row's
own draw) and scored the same way: one draw is a noisy measure. Its energy distance sits on a bias
of O(1/N) that the floor measures, and the draw's own scatter is of the same order: thirty
2000-point draws of eight Gaussians itself score 0.34-2.71 of the floor (mean 0.83), and one
MeanFlow checkpoint's expected score, estimated from single draws of 20,000 points, came out
anywhere in 1.43-1.74. The targets are judged on the mean ratio over the draws (20 by default: a
standard error of ~0.1 of the floor); the first draw's ratios are printed beside it. One training
seed is one run: seeds of one spec differ by more than that (MeanFlow's one step with a 256-wide
net, seeds 0-2: 1.55-2.05, the expected score of a draw).

Targets: flow matching's Euler-100 energy distance within 2x the real floor; MeanFlow's 1-step
energy distance within 1.5x flow matching's Euler-100. Every number also goes to a JSON file.

    python bench/toys.py [--dataset eight_gaussians] [--minutes 2] [--note "what else ran"]
    python bench/toys.py --reuse --run-root runs/bench-toys-eight_gaussians-DATE   # rescore, no training
"""

import argparse
import json
import os
import time
from pathlib import Path

from common import budget, machine, print_machine, verdict

from diffusion.config import ConfigError, load_run_config
from diffusion.data import load_validation
from diffusion.data.toys import TOYS
from diffusion.methods import build_method
from diffusion.records import CONFIG, Summary, read_json
from diffusion.rundir import RunDir
from diffusion.scores import point_scores
from diffusion.tasks import generate, load_trained, sample_task
from diffusion.train import train

REPO = Path(__file__).resolve().parents[1]
JOBS = ("flow-toy", "meanflow-toy")
# (label, job, the sample settings of the row)
SAMPLERS = (
    ("flow matching Euler-100", "flow-toy", {"sampler": "euler", "num_inference_steps": 100}),
    ("flow matching dopri5", "flow-toy", {"sampler": "dopri5", "rtol": 1e-5, "atol": 1e-5}),
    ("MeanFlow 1-step", "meanflow-toy", {"sampler": "meanflow", "num_inference_steps": 1}),
    ("MeanFlow 2-step", "meanflow-toy", {"sampler": "meanflow", "num_inference_steps": 2}),
)
FLOOR_TARGET = 2.0  # flow matching Euler-100: energy distance / real floor
MEANFLOW_TARGET = 1.5  # MeanFlow 1-step: energy distance / flow matching Euler-100's


def score(run_dir: Path, settings: dict, num_samples: int, seed: int) -> dict:
    """The sample task in place on the run's checkpoint (as `python -m diffusion sample RUN_DIR --set
    sample.KEY=VALUE ...`), all points in one batch; its eval/NAME.json record."""
    overrides = [f"sample.{key}={value}" for key, value in settings.items()]
    overrides += [f"sample.num_samples={num_samples}", f"sample.batch_size={num_samples}", f"sample.seed={seed}"]
    config = load_run_config(run_dir / CONFIG, overrides, stored=True)
    config.task, config.sample.checkpoint = "sample", str(run_dir)
    run = RunDir(run_dir, "sample", in_place=True)
    try:
        sample_task(config, run)
    finally:
        run.unlock()
    name = build_method(config).sample_name(config.sample)
    command = f"python -m diffusion sample {run_dir} " + " ".join(f"--set {override}" for override in overrides)
    return {**read_json(run.eval / f"{name}.json"), "name": name, "command": command}


def draw_ratios(run_dir: Path, settings: dict, num_samples: int, seeds: list[int]) -> list[float]:
    """energy distance / real floor of one draw of num_samples points per seed, as the sample task
    scores them (`point_scores` against the held-out split), without writing anything."""
    overrides = [f"sample.{key}={value}" for key, value in settings.items()]
    overrides += [f"sample.num_samples={num_samples}", f"sample.batch_size={num_samples}"]  # as `score` draws
    config = load_run_config(run_dir / CONFIG, overrides, stored=True)
    config.sample.checkpoint = str(run_dir)
    trained, held_out = load_trained(config, run_dir), load_validation(config.data).points
    ratios = []
    for seed in seeds:
        config.sample.seed = seed
        ratios.append(point_scores(generate(trained, config.sample, num_samples), held_out)["ratio_to_floor"])
    return ratios


def warm_up(run_dir: Path, num_samples: int = 64) -> None:
    """One untimed draw of the run's checkpoint (nothing written), so that the first timed sampler
    does not pay for the process's first forward passes."""
    config = load_run_config(run_dir / CONFIG, [f"sample.num_samples={num_samples}"], stored=True)
    config.sample.checkpoint = str(run_dir)
    generate(load_trained(config, run_dir), config.sample, num_samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=TOYS, default="eight_gaussians")
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget of each model")
    parser.add_argument(
        "--run-root", type=Path, help="where the two run dirs go (default runs/bench-toys-DATASET-DATE)"
    )
    parser.add_argument("--num-samples", type=int, default=2000, help="points per sampler (held-out split: 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="sample.seed of every sampler")
    parser.add_argument("--draws", type=int, default=20, help="draws of each sampler the targets average over")
    parser.add_argument(
        "--reuse", "--skip-train", action="store_true", help="rescore the run dirs under --run-root, no training"
    )
    parser.add_argument("--only", choices=JOBS, help="train only this one (again), then score both")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="JOB:KEY=VALUE",
        help="an override of one job's spec (repeatable), e.g. meanflow-toy:method.coupling=independent",
    )
    parser.add_argument("--json", type=Path, help="where every number goes (default RUN_ROOT/toys-DATASET.json)")
    parser.add_argument("--note", default="nothing else", help="what else ran on the machine meanwhile")
    args = parser.parse_args()
    if args.draws < 1:
        parser.error(f"--draws must be 1 or more, got {args.draws}")
    if args.reuse and args.run_root is None:
        parser.error("--reuse needs --run-root, the folder holding flow-toy/ and meanflow-toy/")

    job_overrides = {job: [] for job in JOBS}
    for assignment in args.set:
        job, _, override = assignment.partition(":")
        if job not in JOBS or "=" not in override:
            parser.error(f"--set {assignment!r}: expected JOB:KEY=VALUE with JOB one of {', '.join(JOBS)}")
        job_overrides[job].append(override)
        if args.reuse or args.only not in (None, job):
            parser.error(
                f"--set {assignment!r}: {job} is not trained in this run (--reuse or --only), so it would not apply"
            )

    # Set by the bench for both jobs alike: a --set of them would undo the equal comparison.
    bench_overrides = [f"train.max_minutes={args.minutes}", f"data.dataset={args.dataset}"]
    bench_keys = [override.split("=", 1)[0] for override in bench_overrides]
    configs = {}  # every job's config, with its overrides checked before any training
    for job, overrides in job_overrides.items():
        for override in overrides:
            if override.split("=", 1)[0].strip() in bench_keys:
                parser.error(
                    f"--set {job}:{override}: {' and '.join(bench_keys)} are the bench's (--dataset, --minutes)"
                )
        try:
            configs[job] = load_run_config(REPO / f"configs/jobs/{job}.yaml", [*bench_overrides, *overrides])
        except ConfigError as error:
            parser.error(f"--set {job}: {error}")

    root = args.run_root or REPO / "runs" / f"bench-toys-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    info = machine(args.note)
    print_machine(info, root)

    for job in JOBS:
        if args.reuse or args.only not in (None, job):
            continue
        config = configs[job]
        config.train.progress = "lines"
        if (root / job).exists():  # trained again from scratch; the earlier run kept beside it
            aside = root / f"{job}.before-{time.strftime('%Y%m%d-%H%M%S')}"
            (root / job).rename(aside)
            print(f"{root / job}: an earlier run, moved to {aside}", flush=True)
        if train(config, root / job):
            print(f"warning: training {job} did not complete; scoring its last checkpoint", flush=True)

    runs = {}
    for job in JOBS:
        summary = Summary.from_json(read_json(root / job / "summary.json"))
        stored = load_run_config(root / job / CONFIG, stored=True)
        if stored.data.dataset != args.dataset:
            raise SystemExit(f"{root / job}: trained on {stored.data.dataset}, not {args.dataset}")
        runs[job] = {
            "run_dir": str(root / job),
            "status": summary.status,
            "reason": summary.reason,
            "step": summary.step,
            "budget_minutes": stored.train.max_minutes,
            "train_minutes": summary.train_seconds / 60 if summary.train_seconds is not None else None,
            "num_parameters": summary.num_parameters,
            "final_loss": (summary.final_metrics or {}).get("loss"),
            # The spec's sampler (flow-toy: Euler-100) on the spec's preview count, in one batch.
            "scores_at_end_of_training": summary.scores,
            "sample_seed": stored.sample.seed,
            "coupling": stored.method.coupling,
            "coupling_group_size": stored.method.coupling_group_size,
        }
    for job in JOBS:
        warm_up(root / job)
    rows = [
        {"label": label, "job": job, **score(root / job, settings, args.num_samples, args.seed)}
        for label, job, settings in SAMPLERS
    ]
    seeds = list(range(args.seed, args.seed + args.draws))
    for row, (_, job, settings) in zip(rows, SAMPLERS):
        row["draw_seeds"] = seeds
        # The first seed is the row's own draw: the same points, so the same ratio.
        row["draw_ratios"] = [row["scores"]["ratio_to_floor"]] + draw_ratios(
            root / job, settings, args.num_samples, seeds[1:]
        )
        row["mean_ratio"] = sum(row["draw_ratios"]) / len(row["draw_ratios"])

    print(f"\n== {args.dataset}: {budget(runs)}, {args.num_samples} points per sampler")
    print(f"{'':<16}{'params':>10}{'steps':>8}{'train min':>11}{'final loss':>12}  {'coupling':<17}status")
    for job, run in runs.items():
        minutes = f"{run['train_minutes']:.2f}" if run["train_minutes"] is not None else "-"
        loss = f"{run['final_loss']:.4f}" if run["final_loss"] is not None else "-"
        coupling = run["coupling"] + (f"/{run['coupling_group_size']}" if run["coupling_group_size"] else "")
        print(
            f"{job:<16}{run['num_parameters'] or 0:>10,}{run['step']:>8}{minutes:>11}{loss:>12}  {coupling:<17}{run['status']}"
        )
    print(
        f"\n{'sampler':<26}{'NFE':>7}{'energy dist':>13}{'real floor':>12}{'ratio':>8}{'sample s':>10}{'nonfinite':>11}"
        f"{f'mean of {args.draws}':>12}  {'draws':<}"
    )
    for row in rows:
        scores = row["scores"]
        print(
            f"{row['label']:<26}{row['nfe'] or 0:>7.0f}{scores['energy_distance']:>13.5f}{scores['real_floor']:>12.5f}"
            f"{scores['ratio_to_floor']:>8.2f}{row['sample_seconds']:>10.2f}{scores['nonfinite']:>11.1%}"
            f"{row['mean_ratio']:>12.2f}  {' '.join(f'{ratio:.2f}' for ratio in row['draw_ratios'])}"
        )
    print(
        f"(seed {args.seed}, all {args.num_samples} points in one batch; ratio = energy distance / real floor, "
        f"the floor what real draws of {rows[0]['scores']['num_samples']} points score against the same held-out "
        f"ones; dopri5's NFE is its own count at "
        f"rtol = atol = 1e-5; mean of {args.draws}: the ratio over draws of seeds {seeds[0]}-{seeds[-1]})"
    )

    by_label = {row["label"]: row for row in rows}
    euler, one_step = by_label["flow matching Euler-100"], by_label["MeanFlow 1-step"]
    end = runs["flow-toy"]["scores_at_end_of_training"] or {}
    same_draw = end.get("num_samples") == euler["scores"]["num_samples"]
    same_draw = same_draw and runs["flow-toy"]["sample_seed"] == args.seed
    if same_draw and abs(end["energy_distance"] - euler["scores"]["energy_distance"]) > 1e-9:
        print(
            f"note: flow-toy's own end-of-training score (energy distance {end['energy_distance']:.5f}, the same "
            f"{end['num_samples']} points and seed) differs from the Euler-100 row's"
        )
    floor_ratio = euler["mean_ratio"]
    # With every sample finite the floor is the same for both (one reference, one N): a ratio of the
    # ratios is one of the distances.
    meanflow_ratio = one_step["mean_ratio"] / euler["mean_ratio"]
    first_draw_meanflow_over_euler = one_step["scores"]["energy_distance"] / euler["scores"]["energy_distance"]
    targets = [
        {
            "target": f"flow matching Euler-100 within {FLOOR_TARGET:g}x the real floor",
            "value": floor_ratio,
            "limit": FLOOR_TARGET,
            "met": floor_ratio <= FLOOR_TARGET,
        },
        {
            "target": f"MeanFlow 1-step within {MEANFLOW_TARGET:g}x flow matching Euler-100's energy distance",
            "value": meanflow_ratio,
            "limit": MEANFLOW_TARGET,
            "met": meanflow_ratio <= MEANFLOW_TARGET,
        },
    ]
    print()
    for target in targets:
        print(f"{verdict(target['met'])}  {target['target']}: x{target['value']:.2f} (mean of {args.draws} draws)")
    print(
        f"(the first draw alone: flow matching x{euler['scores']['ratio_to_floor']:.2f} the floor, MeanFlow "
        f"x{first_draw_meanflow_over_euler:.2f} flow matching's)"
    )

    info["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    out = args.json or root / f"toys-{args.dataset}.json"
    result = {
        "bench": "toys",
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": args.dataset,
        "minutes": args.minutes if not args.reuse else None,  # under --reuse, runs[JOB].budget_minutes
        "num_samples": args.num_samples,
        "seed": args.seed,
        "draws": args.draws,
        "reused": args.reuse,
        "overrides": job_overrides,
        "machine": info,
        "runs": runs,
        "rows": rows,
        "targets": targets,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nevery number -> {out}")


if __name__ == "__main__":
    main()

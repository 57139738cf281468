"""DDPM, flow matching, MeanFlow and a DiT on MNIST at an equal CPU training budget, as one table.

Trains, for `--minutes` of wall clock each (train.max_minutes) and with the CPU overrides their
descriptions give:
- `mnist-conditional` (DDPM, its small UNet, batch 32 as the spec has it);
- `flow-mnist` (flow matching, the larger UNet; batch 32);
- `meanflow-mnist` (MeanFlow, that UNet with a second time; batch 32, warmup 100, uniform times;
  guidance w = 2 trained in);
- `dit-mnist` with dit_size tiny (flow matching, a DiT of about the flow UNet's size; batch 32,
  warmup 100, lr 6e-4);

then draws `--num-samples` images per sampler with one seed and prints LeNet FID beside the
real-vs-real floor at the same N, the confident share, the class accuracy, sampling seconds per
image and the NFE (network calls per batch; dopri5's own count):
DDPM-1000 (`--ddpm1000-samples`, fewer: it is slow on a CPU), DDIM-50 and DPM-Solver++ 2M 20 on the
DDPM run; Euler 10, Euler 50, Heun 10 and dopri5 (rtol = atol = 1e-5) on flow matching; 1 and 2
MeanFlow steps; Euler 50 on the DiT. Guidance: each spec's sample.guidance_scale (mnist-conditional:
w = 2, DDIM eta 1; the others w = 1, the conditional model), or `--guidance-scale` for all; DDIM-50
at w = 1 is added as the DDPM run's conditional-model row.

Target: MeanFlow 1-step FID within 2x of DDIM-50's. Every number also goes to a JSON file.

    DIFFUSION_DATA_ROOT=../shared/data python bench/flows.py [--minutes 10] [--note "what else ran"]
    ... --reuse --run-root runs/bench-flows-DATE [--reuse-evals]     # rescore, no training
    ... --only dit-mnist --run-root runs/bench-flows-DATE              # train one (again), score all
"""

import argparse
import json
import os
import time
from pathlib import Path

from common import budget, machine, print_machine, verdict

from diffusion.config import load_run_config
from diffusion.methods import build_method
from diffusion.progress import track
from diffusion.records import CONFIG, Summary, read_json
from diffusion.tasks import evaluate_checkpoint
from diffusion.train import train

REPO = Path(__file__).resolve().parents[1]
# Each job's CPU overrides (the specs' descriptions), besides train.max_minutes.
JOBS = {
    "mnist-conditional": [],  # CPU-sized already: batch 32
    "flow-mnist": ["train.batch_size=32"],
    # The GPU specs warm up over 500 and 1000 steps: most of a CPU budget of 600 to 1600 steps.
    "meanflow-mnist": ["train.batch_size=32", "train.warmup_steps=100", "method.time_sampling=uniform"],
    "dit-mnist": ["model.dit_size=tiny", "train.batch_size=32", "train.warmup_steps=100", "train.lr=6e-4"],
}
MEANFLOW_TARGET = 2.0  # MeanFlow 1-step FID / DDIM-50's
SPEC_RATIO = 1.5  # flow-mnist's and dit-mnist's expected lines
SIMILAR_SIZE = 1.5  # parameter counts within this factor of each other count as similar


def samplers(ddpm1000_samples: int, num_samples: int) -> list[tuple[str, str, dict, int]]:
    """(label, job, sample settings, samples) of every row."""
    return [
        ("DDPM-1000", "mnist-conditional", {"sampler": "ddpm", "num_inference_steps": 1000}, ddpm1000_samples),
        ("DDIM-50", "mnist-conditional", {"sampler": "ddim", "num_inference_steps": 50}, num_samples),
        ("DPM-Solver++ 20", "mnist-conditional", {"sampler": "dpmsolver++", "num_inference_steps": 20}, num_samples),
        (
            "DDIM-50 w=1",
            "mnist-conditional",
            {"sampler": "ddim", "num_inference_steps": 50, "guidance_scale": 1.0},
            num_samples,
        ),
        ("FM Euler-10", "flow-mnist", {"sampler": "euler", "num_inference_steps": 10}, num_samples),
        ("FM Euler-50", "flow-mnist", {"sampler": "euler", "num_inference_steps": 50}, num_samples),
        ("FM Heun-10", "flow-mnist", {"sampler": "heun", "num_inference_steps": 10}, num_samples),
        ("FM dopri5", "flow-mnist", {"sampler": "dopri5", "rtol": 1e-5, "atol": 1e-5}, num_samples),
        ("MeanFlow 1-step", "meanflow-mnist", {"sampler": "meanflow", "num_inference_steps": 1}, num_samples),
        ("MeanFlow 2-step", "meanflow-mnist", {"sampler": "meanflow", "num_inference_steps": 2}, num_samples),
        ("DiT-tiny FM Euler-50", "dit-mnist", {"sampler": "euler", "num_inference_steps": 50}, num_samples),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of each model")
    parser.add_argument("--run-root", type=Path, help="where the four run dirs go (default runs/bench-flows-DATE)")
    parser.add_argument("--num-samples", type=int, default=1000, help="eval.num_samples of every sampler")
    parser.add_argument(
        "--ddpm1000-samples", type=int, default=200, help="DDPM-1000's samples (1000 network calls per batch)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sample.seed of every sampler")
    parser.add_argument(
        "--guidance-scale", type=float, help="sample.guidance_scale of every row (default: each spec's own)"
    )
    parser.add_argument(
        "--reuse", "--skip-train", action="store_true", help="rescore the run dirs under --run-root, no training"
    )
    parser.add_argument(
        "--only", help=f"comma-separated jobs to train (again), the others as they are: {', '.join(JOBS)}"
    )
    parser.add_argument(
        "--reuse-evals",
        action="store_true",
        help="take a sampler's record from its eval/NAME.json when it is of this checkpoint and this many samples",
    )
    parser.add_argument("--json", type=Path, help="where every number goes (default RUN_ROOT/flows.json)")
    parser.add_argument("--note", default="nothing else", help="what else ran on the machine meanwhile")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else list(JOBS)
    if unknown := [job for job in only if job not in JOBS]:
        parser.error(f"--only: unknown job {', '.join(unknown)}; the jobs are {', '.join(JOBS)}")
    if args.reuse and args.run_root is None:
        parser.error("--reuse needs --run-root, the folder holding the four run dirs")

    root = args.run_root or REPO / "runs" / f"bench-flows-{time.strftime('%Y%m%d-%H%M%S')}"
    info = machine(args.note)
    print_machine(info, root)

    def config(job: str):
        loaded = load_run_config(REPO / f"configs/jobs/{job}.yaml", [*JOBS[job], f"train.max_minutes={args.minutes}"])
        loaded.train.progress = "lines"
        loaded.sample.batch_size, loaded.sample.seed = 500, args.seed
        if args.guidance_scale is not None:
            loaded.sample.guidance_scale = args.guidance_scale
        return loaded

    if not args.reuse:
        for job in only:
            if (root / job).exists():  # trained again from scratch; the earlier run kept beside it
                aside = root / f"{job}.before-{time.strftime('%Y%m%d-%H%M%S')}"
                (root / job).rename(aside)
                print(f"{root / job}: an earlier run, moved to {aside}", flush=True)
            if train(config(job), root / job):
                print(f"warning: training {job} did not complete; scoring its last checkpoint", flush=True)

    runs = {}
    for job in JOBS:
        summary_json = read_json(root / job / "summary.json")
        if summary_json is None:
            print(f"{root / job}: no trained run; its rows are left out", flush=True)
            continue
        summary, stored = Summary.from_json(summary_json), load_run_config(root / job / CONFIG, stored=True)
        runs[job] = {
            "run_dir": str(root / job),
            "net": stored.model.name if stored.model.name != "dit" else f"dit {stored.model.dit_size}",
            "method": stored.method.name,
            "training_guidance_scale": stored.method.training_guidance_scale
            if stored.method.name == "meanflow"
            else None,
            "batch_size": stored.train.batch_size,
            "status": summary.status,
            "reason": summary.reason,
            "step": summary.step,
            "budget_minutes": stored.train.max_minutes,
            "train_minutes": summary.train_seconds / 60 if summary.train_seconds is not None else None,
            "num_parameters": summary.num_parameters,
            "final_loss": (summary.final_metrics or {}).get("loss"),
        }

    def evaluate(label: str, job: str, settings: dict, num_samples: int) -> dict:
        evaluated = config(job)
        for key, value in settings.items():
            setattr(evaluated.sample, key, value)
        evaluated.eval.num_samples = num_samples
        name = build_method(evaluated).sample_name(evaluated.sample)
        written = read_json(root / job / "eval" / f"{name}.json")
        if (
            args.reuse_evals
            and written
            and (written["step"], written["num_samples"]) == (runs[job]["step"], num_samples)
        ):
            record = written  # this checkpoint, this many samples
        else:
            record = evaluate_checkpoint(evaluated, root / job, progress=track)
        return {"label": label, "job": job, "name": name, **record}

    rows = [
        evaluate(label, job, settings, count)
        for label, job, settings, count in samplers(args.ddpm1000_samples, args.num_samples)
        if job in runs and not (label == "DDIM-50 w=1" and config(job).sample.guidance_scale == 1)
    ]

    print(f"\n== MNIST: {budget(runs)}")
    print(f"{'':<20}{'net':>10}{'params':>11}{'batch':>7}{'steps':>8}{'train min':>11}{'final loss':>12}  status")
    for job, run in runs.items():
        minutes = f"{run['train_minutes']:.1f}" if run["train_minutes"] is not None else "-"
        loss = f"{run['final_loss']:.4f}" if run["final_loss"] is not None else "-"
        print(
            f"{job:<20}{run['net']:>10}{run['num_parameters'] or 0:>11,}{run['batch_size']:>7}{run['step']:>8}"
            f"{minutes:>11}{loss:>12}  {run['status']}"
        )

    print(
        f"\n{'sampler':<22}{'w':>11}{'NFE':>7}{'N':>6}{'FID':>9}{'floor':>8}{'FID/floor':>11}{'confident':>11}"
        f"{'class acc':>11}{'s/img':>8}"
    )
    for row in rows:
        scores, floor = row["scores"], row["real_floor"]
        trained_w = runs[row["job"]]["training_guidance_scale"]
        w = "-" if row["guidance_scale"] is None else f"{row['guidance_scale']:g}"
        if trained_w not in (None, 1):
            w += f" (tr. {trained_w:g})"
        accuracy = f"{scores['class_accuracy']:.1%}" if "class_accuracy" in scores else "-"
        nfe = f"{row['nfe']:.0f}" if row.get("nfe") is not None else "?"
        print(
            f"{row['label']:<22}{w:>11}{nfe:>7}{row['num_samples']:>6}{scores['fid']:>9.3f}{floor['fid']:>8.3f}"
            f"{scores['fid'] / floor['fid']:>11.2f}{scores['confident_share']:>11.1%}{accuracy:>11}"
            f"{row['seconds_per_sample']:>8.3f}"
        )
    others = sorted({row["num_samples"] for row in rows} - {args.num_samples})
    notes = [
        f"seed {args.seed}; floor: LeNet FID of train against test images at the row's N (FID grows as N shrinks: "
        "compare FID/floor across rows of another N)"
        + (f"; DDPM-1000 draws {args.ddpm1000_samples} only, for time" if args.ddpm1000_samples in others else ""),
        "w: sample.guidance_scale (1: the conditional model; "
        + ("each spec's own" if args.guidance_scale is None else f"--guidance-scale {args.guidance_scale:g}")
        + "); tr.: the w MeanFlow was trained with, which its samples carry at w = 1"
        + f"; DDIM's eta {config('mnist-conditional').sample.eta:g} (the spec's)",
        "NFE: network calls per batch (at w != 1 each is one pass over the batch twice); dopri5's own count at "
        "rtol = atol = 1e-5, averaged over its batches of 500",
    ]
    print("\n".join(f"({note})" for note in notes))

    by_label = {row["label"]: row for row in rows}
    targets = []

    def ratio_target(kind: str, text: str, label: str, reference: str, limit: float) -> None:
        if label in by_label and reference in by_label:
            value = by_label[label]["scores"]["fid"] / by_label[reference]["scores"]["fid"]
            targets.append({"kind": kind, "target": text, "value": value, "limit": limit, "met": value <= limit})

    ratio_target(
        "target",
        f"MeanFlow 1-step FID within {MEANFLOW_TARGET:g}x DDIM-50's",
        "MeanFlow 1-step",
        "DDIM-50",
        MEANFLOW_TARGET,
    )
    ratio_target("spec", f"FM Euler-50 FID within {SPEC_RATIO:g}x DDIM-50's", "FM Euler-50", "DDIM-50", SPEC_RATIO)
    ratio_target(
        "spec",
        f"DiT-tiny Euler-50 FID within {SPEC_RATIO:g}x the flow-mnist UNet's Euler-50",
        "DiT-tiny FM Euler-50",
        "FM Euler-50",
        SPEC_RATIO,
    )
    ratio_target("spec", "MeanFlow 2-step FID below 1-step's", "MeanFlow 2-step", "MeanFlow 1-step", 1.0)
    print()
    for target in targets:
        prefix = "" if target["kind"] == "target" else "(spec's expected line) "
        print(f"{verdict(target['met'])}  {prefix}{target['target']}: x{target['value']:.2f}")
    if "DDIM-50" in by_label and "DDIM-50 w=1" in by_label and "MeanFlow 1-step" in by_label:
        fid = by_label["MeanFlow 1-step"]["scores"]["fid"]
        print(
            f"      MeanFlow 1-step against DDIM-50 at w = 1 instead: x{fid / by_label['DDIM-50 w=1']['scores']['fid']:.2f}"
        )

    size = None
    if "dit-mnist" in runs and "flow-mnist" in runs:
        dit, unet = runs["dit-mnist"]["num_parameters"], runs["flow-mnist"]["num_parameters"]
        size = {"dit_tiny": dit, "flow_unet": unet, "ratio": dit / unet}
        size["similar"] = 1 / SIMILAR_SIZE <= size["ratio"] <= SIMILAR_SIZE
        print(
            f"\nparameters: DiT tiny {dit:,}, flow-mnist UNet {unet:,} (x{size['ratio']:.2f}"
            + (", a similar count)" if size["similar"] else f": NOT similar, more than {SIMILAR_SIZE:g}x apart)")
        )

    info["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    out = args.json or root / "flows.json"
    result = {
        "bench": "flows",
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "minutes": args.minutes if not args.reuse else None,  # under --reuse, runs[JOB].budget_minutes
        "num_samples": args.num_samples,
        "ddpm1000_samples": args.ddpm1000_samples,
        "seed": args.seed,
        "guidance_scale": args.guidance_scale,  # None: each spec's own
        "reused": args.reuse,
        "machine": info,
        "runs": runs,
        "parameters": size,
        "rows": rows,
        "targets": targets,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nevery number -> {out}")


if __name__ == "__main__":
    main()

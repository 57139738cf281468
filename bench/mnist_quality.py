"""Quality and speed of the CPU-sized MNIST job, as figures.

Trains `configs/jobs/mnist-quick.yaml` for its wall-clock budget (or --minutes), then draws
1,000 samples with DDIM-50 and with DDPM-1000 and prints, for each, the offline FID on LeNet
features, the share of confident samples and the class entropy next to the real-vs-real floor
measured in the same run. Target on a 2-core CPU after 10 minutes: >= 70% confident, all ten
digits present.

    DIFFUSION_DATA_ROOT=../shared/data python bench/mnist_quality.py [--minutes 10] [--run-dir DIR]
"""

import argparse
import math
import time
from pathlib import Path

import torch

from diffusion.config import load_run_config
from diffusion.progress import track
from diffusion.records import Summary, read_json
from diffusion.rundir import RunDir
from diffusion.tasks import evaluate_checkpoint
from diffusion.train import train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/jobs/mnist-quick.yaml")
    parser.add_argument("--minutes", type=float, help="training budget (default: the config's max_minutes)")
    parser.add_argument("--run-dir", type=Path, help="reuse or write this run dir (default: runs/bench-DATE)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument(
        "--samplers",
        default="ddim:50:1,ddim:50:0,ddpm:1000",
        help="comma-separated SAMPLER:STEPS[:ETA] (ETA for DDIM; default the config's)",
    )
    parser.add_argument("--skip-train", action="store_true", help="evaluate the run dir as it is")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    overrides = list(args.overrides)
    if args.minutes:
        overrides.append(f"train.max_minutes={args.minutes}")
    config = load_run_config(args.config, overrides)
    run_dir = args.run_dir or REPO / "runs" / f"bench-mnist-quick-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, run dir {run_dir}", flush=True)

    if not args.skip_train:
        config.train.progress = "lines"
        train(config, run_dir)
    run = RunDir(run_dir)
    summary = Summary.from_json(read_json(run.summary))
    records = run.read_metrics()
    throughput = sum(r.examples_per_s for r in records[1:]) / max(1, len(records) - 1)

    print("\n== training")
    print(f"parameters           {summary.num_parameters:,}")
    print(f"steps                {summary.step} ({summary.epoch:.2f} epochs) in {summary.train_seconds / 60:.1f} min")
    print(f"throughput           {throughput:.0f} images/s (mean over logged windows after the first)")
    print(f"final loss           {records[-1].loss:.4f}")

    rows = []
    for spec in args.samplers.split(","):
        sampler, steps, *eta = spec.split(":")
        config.sample.sampler, config.sample.num_inference_steps = sampler, int(steps)
        if eta:
            config.sample.eta = float(eta[0])
        config.sample.batch_size = 500
        config.eval.num_samples = args.num_samples
        rows.append(evaluate_checkpoint(config, run_dir, progress=track))

    floor = rows[0]["real_floor"]
    print(f"\n== samples ({args.num_samples} each) vs the real-vs-real floor (train vs test, same N)")
    print(
        f"{'sampler':<16}{'seconds':>9}{'img/s':>8}{'FID':>9}{'FID/floor':>11}{'confident':>11}{'entropy':>9}{'classes':>9}"
    )
    print(
        f"{'real floor':<16}{'':>9}{'':>8}{floor['fid']:>9.3f}{1.0:>11.1f}{floor['confident_share']:>11.1%}"
        f"{floor['class_entropy_bits']:>9.3f}{sum(c > 0 for c in floor['class_counts']):>9}"
    )
    for row in rows:
        scores = row["scores"]
        name = f"{row['sampler']}-{row['num_inference_steps']}"
        if row["sampler"] == "ddim":
            name += f" eta{row['eta']:g}"
        print(
            f"{name:<16}{row['sample_seconds']:>9.1f}{row['num_samples'] / row['sample_seconds']:>8.1f}"
            f"{scores['fid']:>9.3f}{scores['fid'] / floor['fid']:>11.1f}{scores['confident_share']:>11.1%}"
            f"{scores['class_entropy_bits']:>9.3f}{sum(c > 0 for c in scores['class_counts']):>9}"
        )
    print(f"(class entropy is in bits; all ten digits equally present gives {math.log2(10):.3f})")
    for row in rows:
        met = row["scores"]["confident_share"] >= 0.7 and min(row["scores"]["class_counts"]) > 0
        print(
            f"target (>= 70% confident, all ten digits) with {row['sampler']}-{row['num_inference_steps']}"
            f" eta {row['eta']:g}: {'met' if met else 'NOT met'}"
        )


if __name__ == "__main__":
    main()

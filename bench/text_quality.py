"""Text diffusion against its autoregressive yardstick on tiny-shakespeare, as figures.

Trains the three CPU-sized text jobs (`shakespeare-ar-quick`, `shakespeare-quick` (masked
diffusion), `shakespeare-embedding-quick`) with the same transformer size and the same wall-clock
budget, then prints one table: parameters, steps, validation bits per character (exact for AR,
the variational bound for the two diffusion models),
perplexity per character of the samples under the AR model, distinct-2 and the collapse
detector's verdict; a few lines of each model's samples; and AR-guided sampling (logits mixed with
weight alpha on the diffusion model) swept over alpha for both diffusion models.
Targets: masked diffusion within 0.3 bits per character of AR; no sampler collapsed.

    DIFFUSION_DATA_ROOT=../shared/data python bench/text_quality.py [--minutes 10 | --steps 2000] [--val-every 100]

With `--set data.subset=12500` (the first ~100k characters) AR overfits within a 2000-step budget:
the data-constrained regime, where the early-stopped comparison (`--val-every`) is the fair one.
"""

import argparse
import math
import time
from pathlib import Path

import torch

from diffusion.config import load_run_config
from diffusion.data import decode, load_dataset
from diffusion.records import METRICS, read_jsonl
from diffusion.scores.likelihood import evaluate_text
from diffusion.tasks import generate
from diffusion.train import train
from diffusion.trained import TrainedModel, resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
JOBS = {
    "autoregressive": "shakespeare-ar-quick",
    "masked": "shakespeare-quick",
    "embedding": "shakespeare-embedding-quick",
}
# --full: the GPU-sized specs (6 layers, 384 wide, 256-character blocks), for a GPU budget.
FULL_JOBS = {"autoregressive": "shakespeare-ar", "masked": "shakespeare-training", "embedding": "shakespeare-embedding"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of each model")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="a budget in optimizer steps instead of minutes: the same compute for AR and masked "
        "diffusion (same net, same batch) on a machine whose load varies",
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / f"bench-text-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="guidance weights of the diffusion logits")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the run dirs under --out as they are")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for all three jobs, e.g. train.max_steps=50 for a smoke test",
    )
    parser.add_argument("--full", action="store_true", help="the GPU-sized specs instead of the CPU-sized ones")
    parser.add_argument(
        "--methods",
        default="autoregressive,masked,embedding",
        help="which to train and compare (autoregressive is always needed: it scores)",
    )
    parser.add_argument(
        "--val-every",
        type=int,
        default=None,
        metavar="N",
        help="validation bits/char every N steps (train.val_every_steps), and each model's best "
        "point on that curve: the early-stopped comparison once AR overfits",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    jobs = {method: (FULL_JOBS if args.full else JOBS)[method] for method in args.methods.split(",")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, out {args.out}", flush=True)

    trained = {}
    for method, job in jobs.items():
        run_dir = args.out / method
        budget = (
            [f"train.max_minutes={args.minutes}"]
            if args.steps is None
            else [f"train.max_steps={args.steps}", "train.max_minutes=null"]
        )
        curve = [] if args.val_every is None else [f"train.val_every_steps={args.val_every}"]
        config = load_run_config(
            REPO / "configs/jobs" / f"{job}.yaml",
            [*budget, *curve, "train.progress=lines", f"device={args.device}", *args.overrides],
        )
        if not args.skip_train:
            print(f"\n== training {job} ({method}) for {budget[0]}", flush=True)
            train(config, run_dir)
        trained[method] = TrainedModel(resolve_checkpoint(run_dir), use_ema=True, device=device)

    ar = trained["autoregressive"]
    validation = load_dataset(ar.config.data, "val")
    rows, samples = [], {}
    for method, model in trained.items():
        sample = model.config.sample.model_copy(update={"num_samples": args.num_samples})
        started = time.monotonic()
        texts = decode(model.data, generate(model, sample, args.num_samples))
        seconds = time.monotonic() - started
        scores = evaluate_text(model.method, model.model, validation, texts, device, scorer=ar)
        bits = scores["val_bits_per_char"]
        rows.append(
            (
                method,
                sum(p.numel() for p in model.model.parameters()),
                model.step,
                bits,
                scores["ar_perplexity"],
                scores["distinct_2"],
                seconds,
                scores["collapsed"],
            )
        )
        samples[method] = texts

    budget = f"{args.minutes:g} min" if args.steps is None else f"{args.steps} steps"
    print(f"\n== same size, same budget ({budget} each on {args.device})")
    print(
        f"{'method':16}{'params':>9}{'steps':>7}{'val bits/char':>15}{'AR ppl/char':>13}{'distinct-2':>12}"
        f"{'sample s':>10}  collapsed"
    )
    for method, params, steps, bits, ppl, distinct, seconds, collapsed in rows:
        print(
            f"{method:16}{params:>9,}{steps:>7}{bits:>15.3f}{ppl:>13.2f}{distinct:>12.3f}{seconds:>10.1f}  "
            f"{'; '.join(collapsed) or 'no'}"
        )
    bits = {row[0]: row[3] for row in rows}
    if "masked" in bits:
        gap = bits["masked"] - bits["autoregressive"]
        print(f"masked - AR: {gap_verdict(gap)}")
    print(f"collapsed samplers: {sum(bool(row[7]) for row in rows)} (target 0)")

    print_validation_curves(args.out, list(trained))
    print_learning_curves(args.out, list(trained))

    for method, texts in samples.items():
        print(f"\n== {method} samples")
        for text in texts[:3]:
            print("  " + " / ".join(line for line in text.splitlines() if line.strip())[:200])

    print("\n== AR-guided sampling: diffusion logits weighted alpha, AR logits 1 - alpha")
    print(f"{'model':12}{'alpha':>7}{'AR ppl/char':>13}{'distinct-2':>12}{'sample s':>10}  collapsed")
    for method in [name for name in ("masked", "embedding") if name in trained]:
        model = trained[method]
        for alpha in map(float, args.alphas.split(",")):
            sample = model.config.sample.model_copy(update={"num_samples": args.num_samples, "guidance_alpha": alpha})
            started = time.monotonic()
            texts = decode(model.data, generate(model, sample, args.num_samples, guide=ar))
            seconds = time.monotonic() - started
            scores = evaluate_text(model.method, model.model, validation, texts, device, scorer=ar)
            print(
                f"{method:12}{alpha:>7.2f}{scores['ar_perplexity']:>13.2f}{scores['distinct_2']:>12.3f}"
                f"{seconds:>10.1f}  {'; '.join(scores['collapsed']) or 'no'}"
            )


def gap_verdict(gap: float) -> str:
    return f"{gap:+.3f} bits/char (target <= 0.3: {'met' if gap <= 0.3 else 'NOT met'})"


def metrics_rows(out: Path, method: str) -> list[dict]:
    return read_jsonl(out / method / METRICS)


def print_validation_curves(out: Path, methods: list[str]) -> None:
    """Each model's validation curve (train.val_every_steps), where one was logged: its best point,
    where early stopping would have kept it, and its last; then masked - AR at their best points."""
    best = {}
    for method in methods:
        rows = metrics_rows(out, method)
        curve = {row["step"]: row["val_bits_per_char"] for row in rows if "val_bits_per_char" in row}
        if not curve:
            continue
        step = min(curve, key=curve.get)
        best[method] = curve[step]
        points = " ".join(f"{s}:{v:.3f}" for s, v in curve.items())
        print(f"{method:16} best {curve[step]:.3f} at step {step}, last {curve[max(curve)]:.3f}   ({points})")
    if {"autoregressive", "masked"} <= set(best):
        gap = best["masked"] - best["autoregressive"]
        print(f"masked - AR, each at its best step: {gap_verdict(gap)}")


def print_learning_curves(out: Path, methods: list[str], points: int = 6) -> None:
    """Training loss in bits per token against steps, each point the mean of the logged losses
    around it: exact NLL for AR, the NELBO estimate for masked diffusion (an MSE plus rounding
    loss for embedding diffusion, not a likelihood, so left out). Shows whether a gap is closing."""
    curves = {}
    for method in methods:
        if method == "embedding":
            continue
        rows = metrics_rows(out, method)
        curves[method] = {row["step"]: row["loss"] / math.log(2) for row in rows if "loss" in row}
    last = min(max(curve) for curve in curves.values())
    milestones = [round(last * (i + 1) / points) for i in range(points)]
    print("\n== training loss, bits/token, by step (mean of the logged values within 10% of the step)")
    print(f"{'step':>7}" + "".join(f"{method:>16}" for method in curves) + ("      gap" if len(curves) == 2 else ""))
    for milestone in milestones:
        means = []
        for curve in curves.values():
            near = [loss for step, loss in curve.items() if abs(step - milestone) <= 0.1 * milestone]
            means.append(sum(near) / len(near))
        print(
            f"{milestone:>7}"
            + "".join(f"{mean:>16.3f}" for mean in means)
            + (f"{means[1] - means[0]:>+9.3f}" if len(means) == 2 else "")
        )


if __name__ == "__main__":
    main()

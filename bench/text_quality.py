"""Text diffusion against its autoregressive yardstick on tiny-shakespeare, as figures.

Trains the three CPU-sized text jobs (`shakespeare-ar-quick`, `shakespeare-quick` (masked
diffusion), `shakespeare-embedding-quick`) with the same transformer size and the same wall-clock
budget, then prints one table: parameters, steps, validation bits per character (exact for AR,
the variational bound for the two diffusion models),
perplexity per character of the samples under the AR model, distinct-2 and the collapse
detector's verdict; a few lines of each model's samples; and AR-guided sampling (logits mixed with
weight alpha on the diffusion model) swept over alpha for both diffusion models.
Targets: masked diffusion within 0.3 bits per character of AR; no sampler collapsed.

    DIFFUSION_DATA_ROOT=../shared/data python bench/text_quality.py [--minutes 10] [--out runs/bench-text]
"""

import argparse
import time
from pathlib import Path

import torch

from diffusion.config import load_run_config
from diffusion.data import load_dataset
from diffusion.evaluate_text import evaluate_text, generate_text
from diffusion.sample import TrainedModel, resolve_checkpoint
from diffusion.train import train

REPO = Path(__file__).resolve().parents[1]
JOBS = {"autoregressive": "shakespeare-ar-quick", "masked": "shakespeare-quick", "embedding": "shakespeare-embedding-quick"}
# --full: the GPU-sized specs (6 layers, 384 wide, 256-character blocks), for a GPU budget.
FULL_JOBS = {"autoregressive": "shakespeare-ar", "masked": "shakespeare-training", "embedding": "shakespeare-embedding"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of each model")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / f"bench-text-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="guidance weights of the diffusion logits")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the run dirs under --out as they are")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for all three jobs, e.g. train.max_steps=50 for a smoke test")
    parser.add_argument("--full", action="store_true", help="the GPU-sized specs instead of the CPU-sized ones")
    parser.add_argument("--methods", default="autoregressive,masked,embedding",
                        help="which to train and compare (autoregressive is always needed: it scores)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    jobs = {method: (FULL_JOBS if args.full else JOBS)[method] for method in args.methods.split(",")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, out {args.out}", flush=True)

    trained = {}
    for method, job in jobs.items():
        run_dir = args.out / method
        config = load_run_config(REPO / "configs/jobs" / f"{job}.yaml",
                                 [f"train.max_minutes={args.minutes}", "train.progress=lines", f"device={args.device}",
                                  *args.overrides])
        if not args.skip_train:
            print(f"\n== training {job} ({method}) for {args.minutes} min", flush=True)
            train(config, run_dir)
        trained[method] = TrainedModel(resolve_checkpoint(run_dir), use_ema=True, device=device)

    ar = trained["autoregressive"]
    validation = load_dataset(ar.config.data, "val")
    rows, samples = [], {}
    for method, model in trained.items():
        sample = model.config.sample.model_copy(update={"num_samples": args.num_samples})
        started = time.monotonic()
        texts = generate_text(model.method, model.model, model.meta, sample, args.num_samples, device)
        seconds = time.monotonic() - started
        scores = evaluate_text(model.method, model.model, model.meta, validation, texts, device, scorer=ar)
        bits = scores["val_bits_per_char"]
        rows.append((method, sum(p.numel() for p in model.model.parameters()), model.step, bits,
                     scores["ar_perplexity"], scores["distinct_2"], seconds, scores["collapsed"]))
        samples[method] = texts

    print(f"\n== same size, same budget ({args.minutes:g} min each on {args.device})")
    print(f"{'method':16}{'params':>9}{'steps':>7}{'val bits/char':>15}{'AR ppl/char':>13}{'distinct-2':>12}"
          f"{'sample s':>10}  collapsed")
    for method, params, steps, bits, ppl, distinct, seconds, collapsed in rows:
        print(f"{method:16}{params:>9,}{steps:>7}{bits:>15.3f}{ppl:>13.2f}{distinct:>12.3f}{seconds:>10.1f}  "
              f"{'; '.join(collapsed) or 'no'}")
    bits = {row[0]: row[3] for row in rows}
    if "masked" in bits:
        gap = bits["masked"] - bits["autoregressive"]
        print(f"masked - AR: {gap:+.3f} bits/char (target <= 0.3: {'met' if gap <= 0.3 else 'NOT met'})")
    print(f"collapsed samplers: {sum(bool(row[7]) for row in rows)} (target 0)")

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
            texts = generate_text(model.method, model.model, model.meta, sample, args.num_samples, device, guide=ar)
            seconds = time.monotonic() - started
            scores = evaluate_text(model.method, model.model, model.meta, validation, texts, device, scorer=ar)
            print(f"{method:12}{alpha:>7.2f}{scores['ar_perplexity']:>13.2f}{scores['distinct_2']:>12.3f}"
                  f"{seconds:>10.1f}  {'; '.join(scores['collapsed']) or 'no'}")


if __name__ == "__main__":
    main()

"""Classifier-free guidance and DPM-Solver++ on MNIST, as one table.

Trains `mnist-quick` (unconditional) and `mnist-conditional` (label dropout 0.1) for the same
wall-clock budget each, then draws `--num-samples` images from each and prints LeNet FID, the
confident share and the class accuracy (the offline LeNet agrees with the asked digit) next to the
real-vs-real floor measured in the same run:

- unconditional DDIM-50 against conditional DDIM-50 with w = 1, 2, 4;
- on the conditional checkpoint (at `--solver-w`), DPM-Solver++ 2M at 10 and 20 steps against
  DDIM-50 with eta 0 (both deterministic) and with the spec's eta 1.

Targets: class accuracy >= 95% at some w; DPM-Solver++ 20 steps within 10% of DDIM-50's FID at
less than half its sampling time.

    DIFFUSION_DATA_ROOT=../shared/data python bench/guidance.py [--minutes 10] [--skip-train --run-root DIR]
"""

import argparse
import time
from pathlib import Path

import torch

from diffusion.config import load_run_config
from diffusion.methods import build_method
from diffusion.progress import track
from diffusion.records import read_json
from diffusion.tasks import evaluate_checkpoint
from diffusion.train import train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of each model")
    parser.add_argument("--run-root", type=Path, help="where the two run dirs go (default runs/bench-guidance-DATE)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--solver-w", type=float, default=2.0, help="guidance scale of the solver comparison")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the run dirs as they are")
    parser.add_argument(
        "--train", choices=("mnist-quick", "mnist-conditional"), help="train only this one (again), then evaluate both"
    )
    parser.add_argument(
        "--reuse-evals", action="store_true", help="take a sampler's scores from its eval/NAME.json when there is one"
    )
    parser.add_argument("--note", default="nothing else", help="what else ran on the machine meanwhile")
    args = parser.parse_args()

    root = args.run_root or REPO / "runs" / f"bench-guidance-{time.strftime('%Y%m%d-%H%M%S')}"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, run root {root}; running alongside: {args.note}",
        flush=True,
    )
    configs = {}
    for name in ("mnist-quick", "mnist-conditional"):
        config = load_run_config(REPO / f"configs/jobs/{name}.yaml", [f"train.max_minutes={args.minutes}"])
        config.train.progress = "lines"
        config.sample.batch_size, config.eval.num_samples = 500, args.num_samples
        configs[name] = config
        if not args.skip_train and args.train in (None, name):
            train(config, root / name)

    def evaluate(name: str, label: str, **sample) -> dict:
        config = configs[name].model_copy(deep=True)
        for key, value in sample.items():
            setattr(config.sample, key, value)
        written = read_json(root / name / "eval" / f"{build_method(config).sample_name(config.sample)}.json")
        trained_step = (read_json(root / name / "summary.json") or {}).get("step")
        if (
            args.reuse_evals
            and written
            and (written["step"], written["num_samples"]) == (trained_step, args.num_samples)
        ):
            return {"label": label, **written}  # this checkpoint, this many samples
        record = evaluate_checkpoint(config, root / name, progress=track)
        return {"label": label, **record}

    guidance = [evaluate("mnist-quick", "uncond DDIM-50 eta1", sampler="ddim", num_inference_steps=50, eta=1.0)]
    for w in (1.0, 2.0, 4.0):
        guidance.append(
            evaluate(
                "mnist-conditional", f"cond w={w:g} DDIM-50 eta1", num_inference_steps=50, eta=1.0, guidance_scale=w
            )
        )
    w = args.solver_w
    solvers = [
        evaluate("mnist-conditional", f"w={w:g} DDIM-50 eta1", sampler="ddim", eta=1.0, guidance_scale=w),
        evaluate("mnist-conditional", f"w={w:g} DDIM-50 eta0", sampler="ddim", eta=0.0, guidance_scale=w),
        *(
            evaluate(
                "mnist-conditional",
                f"w={w:g} DPM++2M-{steps}",
                sampler="dpmsolver++",
                num_inference_steps=steps,
                guidance_scale=w,
            )
            for steps in (10, 20)
        ),
    ]

    floor = guidance[0]["real_floor"]
    header = f"{'':<24}{'seconds':>9}{'FID':>9}{'FID/floor':>11}{'confident':>11}{'class acc':>11}"
    print(f"\n== {args.num_samples} samples each, {args.minutes:g} training minutes per model")
    print(header)
    print(f"{'real vs real floor':<24}{'':>9}{floor['fid']:>9.3f}{1.0:>11.2f}{floor['confident_share']:>11.1%}")
    for rows in (guidance, solvers):
        for row in rows:
            scores = row["scores"]
            accuracy = f"{scores['class_accuracy']:.1%}" if "class_accuracy" in scores else "-"
            print(
                f"{row['label']:<24}{row['sample_seconds']:>9.1f}{scores['fid']:>9.3f}"
                f"{scores['fid'] / floor['fid']:>11.2f}{scores['confident_share']:>11.1%}{accuracy:>11}"
            )
        print()

    best = max(row["scores"]["class_accuracy"] for row in guidance[1:])
    print(f"target class accuracy >= 95% at some w: {'met' if best >= 0.95 else 'NOT met'} (best {best:.1%})")
    ddim = {row["label"]: row for row in solvers}
    for reference in (f"w={w:g} DDIM-50 eta0", f"w={w:g} DDIM-50 eta1"):
        base, fast = ddim[reference], ddim[f"w={w:g} DPM++2M-20"]
        fid_ratio = fast["scores"]["fid"] / base["scores"]["fid"]
        time_ratio = fast["sample_seconds"] / base["sample_seconds"]
        met = fid_ratio <= 1.1 and time_ratio < 0.5
        print(
            f"DPM++2M-20 vs {reference}: FID x{fid_ratio:.2f}, time x{time_ratio:.2f}: "
            f"target (FID within 10%, under half the time) {'met' if met else 'NOT met'}"
        )


if __name__ == "__main__":
    main()

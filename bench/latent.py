"""Latent against pixel diffusion on MNIST at an equal training budget, the autoencoder included.

Trains `autoencoder-mlp` for `--ae-minutes`, then `latent-diffusion` on its latents for the rest of
`--minutes`, and `mnist-conditional` (the pixel UNet) for all of `--minutes`; then draws
`--num-samples` images from each with the specs' sampler (DDIM-50, eta 1, guidance w = 2) and
prints LeNet FID (with the real-vs-real floor of the same run), the confident share, the class
accuracy and sampling images/s.

    DIFFUSION_DATA_ROOT=../shared/data python bench/latent.py [--minutes 10] [--ae-minutes 3]
"""

import argparse
import time
from pathlib import Path

import torch

from diffusion.config import load_run_config
from diffusion.progress import track
from diffusion.records import Summary, read_json
from diffusion.tasks import evaluate_checkpoint
from diffusion.train import train

REPO = Path(__file__).resolve().parents[1]


def trained_minutes(run_dir: Path) -> float:
    return Summary.from_json(read_json(run_dir / "summary.json")).train_seconds / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of each, autoencoder included")
    parser.add_argument("--ae-minutes", type=float, default=3.0, help="the autoencoder's share of the latent budget")
    parser.add_argument("--run-root", type=Path, help="where the run dirs go (default runs/bench-latent-DATE)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--skip-train", action="store_true", help="evaluate the run dirs as they are")
    parser.add_argument("--note", default="nothing else", help="what else ran on the machine meanwhile")
    args = parser.parse_args()

    root = args.run_root or REPO / "runs" / f"bench-latent-{time.strftime('%Y%m%d-%H%M%S')}"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, run root {root}; running alongside: {args.note}",
        flush=True,
    )
    autoencoder, latent, pixel = root / "autoencoder-mlp", root / "latent-diffusion", root / "mnist-conditional"

    def config(name: str, *overrides: str):
        loaded = load_run_config(REPO / f"configs/jobs/{name}.yaml", list(overrides))
        loaded.train.progress = "lines"
        loaded.sample.batch_size, loaded.eval.num_samples = 500, args.num_samples
        return loaded

    if not args.skip_train:
        train(config("autoencoder-mlp", f"train.max_minutes={args.ae_minutes}"), autoencoder)
        left = args.minutes - trained_minutes(autoencoder)
        train(config("latent-diffusion", f"method.autoencoder={autoencoder}", f"train.max_minutes={left}"), latent)
        train(config("mnist-conditional", f"train.max_minutes={args.minutes}"), pixel)

    rows = []
    for label, name, run_dir in (
        ("latent (MLP AE + FiLM MLP)", "latent-diffusion", latent),
        ("pixel UNet", "mnist-conditional", pixel),
    ):
        record = evaluate_checkpoint(config(name), run_dir, progress=track)  # the checkpoint's own method and nets
        summary = Summary.from_json(read_json(run_dir / "summary.json"))
        minutes = summary.train_seconds / 60 + (trained_minutes(autoencoder) if run_dir == latent else 0)
        rows.append({"label": label, "record": record, "summary": summary, "minutes": minutes})

    floor = rows[0]["record"]["real_floor"]
    print(f"\n== {args.num_samples} samples each, DDIM-50 eta 1, w = 2; training budget {args.minutes:g} min each")
    print(
        f"{'':<28}{'train min':>10}{'params':>10}{'steps':>8}{'FID':>9}{'FID/floor':>11}{'confident':>11}"
        f"{'class acc':>11}{'img/s':>9}"
    )
    print(
        f"{'real vs real floor':<28}{'':>10}{'':>10}{'':>8}{floor['fid']:>9.3f}{1.0:>11.2f}{floor['confident_share']:>11.1%}"
    )
    for row in rows:
        scores, record, summary = row["record"]["scores"], row["record"], row["summary"]
        print(
            f"{row['label']:<28}{row['minutes']:>10.1f}{summary.num_parameters:>10,}{summary.step:>8}"
            f"{scores['fid']:>9.3f}{scores['fid'] / floor['fid']:>11.2f}{scores['confident_share']:>11.1%}"
            f"{scores['class_accuracy']:>11.1%}{record['num_samples'] / record['sample_seconds']:>9.1f}"
        )
    latent_row, pixel_row = rows
    speed = pixel_row["record"]["sample_seconds"] / latent_row["record"]["sample_seconds"]
    print(
        f"\nlatent / pixel: FID x{latent_row['record']['scores']['fid'] / pixel_row['record']['scores']['fid']:.2f}, "
        f"sampling {speed:.1f}x as fast (autoencoder: {trained_minutes(autoencoder):.1f} min, "
        f"{Summary.from_json(read_json(autoencoder / 'summary.json')).step} steps; the latent params include it)"
    )


if __name__ == "__main__":
    main()

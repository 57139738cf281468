"""The sample and eval tasks: draw samples from a trained run, write them, score them.

Both read the run through `TrainedModel` (its checkpoint's own config, method and data spec) and
write into `run` (a RunDir): the trained run's own samples/ and eval/ when run in place, else a
new run dir, created only once every reference (checkpoint, guide, scorer) was found.
"""

import io
import json
import shutil
import signal
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

from diffusion.config import ConfigError, RunConfig, SampleConfig, eval_sample
from diffusion.data import has_validation, load_images, load_validation, write_samples
from diffusion.methods import Progress, no_progress
from diffusion.methods.guided import guided_sample
from diffusion.progress import console, track
from diffusion.records import Summary, atomic_write, checkpoint_file, read_json, write_json
from diffusion.runtime import EXIT_PREEMPTED, PreemptionFlag, pick_device
from diffusion.scores import sample_scores
from diffusion.scores.images import (
    inception_fid,
    inception_unavailable,
    load_or_train_classifier,
    real_floor,
    reference_features,
)
from diffusion.scores.images import sample_scores as image_scores
from diffusion.trained import TrainedModel, load_scorer, resolve_checkpoint


def generate(
    trained: TrainedModel,
    sample: SampleConfig,
    num_samples: int,
    guide: TrainedModel | None = None,
    progress: Progress = no_progress,
    stats: dict | None = None,
) -> torch.Tensor:
    """`num_samples` samples on the CPU, reproducible from `sample.seed`; with `guide` (an
    autoregressive run), decoded left to right with its logits mixed in at weight
    1 - `sample.guidance_alpha`. `stats` gets the method's sampling cost (Method.sample)."""
    generator = torch.Generator().manual_seed(sample.seed)
    trained.model.eval()
    if guide is None:
        samples = trained.method.sample(
            trained.model, num_samples, trained.data, sample, generator, trained.device, progress, stats
        )
    else:
        samples = guided_sample(
            guide.method,
            guide.model,
            trained.method,
            trained.model,
            num_samples,
            sample.length or trained.data.block_size,
            sample.guidance_alpha,
            generator,
            trained.device,
            greedy=False,
            temperature=sample.temperature,
            top_k=sample.top_k,
            progress=progress,
        )
    return samples.cpu()


def load_trained(config: RunConfig, run_dir: Path) -> TrainedModel:
    """The checkpoint that `sample.checkpoint` (else the run dir) names, checked against the
    `sample` settings: ConfigError, one line, before any work."""
    if config.sample.checkpoint is None and checkpoint_file(run_dir) is None:
        raise ConfigError(
            "sample.checkpoint: not set, and there is no trained run to sample in place; set it "
            "to a run dir or a .pt file, or give the run dir itself"
        )
    checkpoint_path = resolve_checkpoint(config.sample.checkpoint or run_dir)
    trained = TrainedModel(checkpoint_path, config.sample.use_ema, pick_device(config.device))
    trained.check_sampling(config.sample, config.task)
    return trained


def sample_task(config: RunConfig, run, trained: TrainedModel | None = None) -> int:
    """Draw `sample.num_samples` samples into `run`'s samples/: a PNG grid and an .npz of images,
    or the decoded texts with their scores (also in eval/NAME.json). `trained`: the run, when the
    caller loaded it already."""
    trained = trained or load_trained(config, run.path)
    guide = load_scorer(
        config.sample.guide_checkpoint, trained.device, "sample.guide_checkpoint", tokenizer=trained.data.tokenizer
    )
    scorer = load_scorer(config.eval.scorer_checkpoint, trained.device) or guide
    if not run.in_place:
        run.create(config)  # after every reference was found: a bad one writes nothing
    validation = load_validation(trained.config.data)
    started, stats = time.monotonic(), {}
    samples = generate(trained, config.sample, config.sample.num_samples, guide, progress=track, stats=stats)
    seconds = time.monotonic() - started
    name = trained.method.sample_name(config.sample)
    labels = trained.method.class_labels(len(samples), trained.data, config.sample)
    written = write_samples(trained.data, samples, run.samples, name, labels=labels)
    path = written.get("grid") or written.get("scatter") or written["samples"]
    scores = sample_scores(
        trained.method,
        trained.model,
        validation,
        {**written, "values": samples},
        trained.device,
        config.sample.seed,
        config.eval.val_blocks,
        scorer,
    )
    if scores is None:
        summary = Summary(
            status="completed",
            step=trained.step,
            result={"checkpoint": str(trained.path), "num_samples": len(samples), "grid": str(path)},
        )
    else:
        record = {
            "checkpoint": str(trained.path),
            "step": trained.step,
            "sampler": config.sample.sampler,
            "num_inference_steps": config.sample.num_inference_steps,
            "num_samples": len(samples),
            "sample_seconds": round(seconds, 2),
            "seconds_per_sample": seconds / len(samples),
            "nfe": stats.get("nfe"),
            "guidance_alpha": config.sample.guidance_alpha if guide else None,
            "scores": scores,
            "samples": str(path),
        }
        run.eval.mkdir(exist_ok=True)
        write_json(run.eval / f"{name}.json", record)
        result = {key: value for key, value in record.items() if key not in ("step", "scores")}
        summary = Summary(
            status="completed", step=trained.step, scores=scores, collapsed=bool(scores["collapsed"]), result=result
        )
        print(json.dumps(scores, indent=2))
    run.write_record(summary, config.expect)
    print(f"{len(samples)} samples from {trained.path} (step {trained.step}) -> {path}", flush=True)
    return 0


def eval_task(config: RunConfig, run) -> int:
    """Score a trained run into `run`: text on `eval.num_samples` samples and its held-out bits
    per character (the sample task's scores); images against real ones (FID and more). Which,
    the checkpoint's data decides, not this task's config."""
    trained = load_trained(config, run.path)
    if has_validation(trained.config.data):  # text: scored on its samples and held-out likelihood, as `sample` does
        sample = config.sample.model_copy(update={"num_samples": config.eval.num_samples})
        return sample_task(config.model_copy(update={"sample": sample}), run, trained)
    if not run.in_place:
        run.create(config)
    record = evaluate_checkpoint(config, run.path, progress=track, trained=trained)
    print_record(record)
    result = {key: value for key, value in record.items() if key not in ("step", "scores")}
    summary = Summary(status="completed", step=record["step"], scores=headline_scores(record), result=result)
    run.write_record(summary, config.expect)
    return 0


def evaluate_checkpoint(
    config: RunConfig,
    run_dir: Path,
    progress: Progress = no_progress,
    trained: TrainedModel | None = None,
    drawn: tuple[torch.Tensor, torch.Tensor | None, float, float | None] | None = None,
) -> dict:
    """Sample `eval.num_samples` images from the run's checkpoint (or `trained`, from load_trained)
    with the `sample` settings, score them with a LeNet trained on the run's dataset (and cached),
    against real images of that dataset, and write the record to RUN_DIR/eval/NAME.json (with a
    grid beside it). Samples of an upscaled run are scored at the dataset's own size. `drawn`:
    (samples, their class labels, seconds, nfe) drawn already (evaluate_after_training's chunks)."""
    trained = trained or load_trained(config, run_dir)
    device = trained.device
    # The trained run's data, found where this task's settings say.
    data = trained.config.data.model_copy(update={"root": config.data.root, "download": config.data.download})
    train_images, train_labels = load_images(data, "train")
    test_images, test_labels = load_images(data, "test")
    classifier_images, classifier_labels = train_images, train_labels
    if config.eval.classifier_subset:  # a seeded random subset: files may be sorted by class
        chosen = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))
        chosen = chosen[: config.eval.classifier_subset].sort().values
        classifier_images, classifier_labels = train_images[chosen], train_labels[chosen]
    classifier = load_or_train_classifier(
        classifier_images, classifier_labels, epochs=config.eval.classifier_epochs, device=device, progress=progress
    )
    # A one-digit run is compared with that digit, not with all ten.
    if trained.config.data.only_digit is not None:
        train_images = train_images[train_labels == trained.config.data.only_digit]
        test_images = test_images[test_labels == trained.config.data.only_digit]
    num_samples = min(config.eval.num_samples, len(train_images), len(test_images))

    if drawn is None:
        started, stats = time.monotonic(), {}
        samples = generate(trained, config.sample, num_samples, progress=progress, stats=stats)
        sample_seconds = time.monotonic() - started
        labels = trained.method.class_labels(num_samples, trained.data, config.sample)
    else:
        samples, labels, sample_seconds, nfe = drawn
        samples, labels, stats = samples[:num_samples], None if labels is None else labels[:num_samples], {"nfe": nfe}
        num_samples = len(samples)
    scored = samples
    if samples.shape[-1] != train_images.shape[-1]:
        scored = F.interpolate(samples, size=train_images.shape[-2:], mode="area")
    reference = reference_features(classifier, train_images, num_samples, device=device)
    record = {
        "checkpoint": str(trained.path),
        "step": trained.step,
        "sampler": config.sample.sampler,
        "num_inference_steps": config.sample.num_inference_steps,
        "nfe": stats.get("nfe"),  # network evaluations per batch: an adaptive solver's own count
        "eta": config.sample.eta,
        "guidance_scale": config.sample.guidance_scale if labels is not None else None,
        "num_samples": num_samples,
        "sample_seconds": round(sample_seconds, 2),
        "seconds_per_sample": sample_seconds / num_samples,
        "scores": image_scores(classifier, scored, reference, config.eval.confidence, device=device, labels=labels),
        "real_floor": real_floor(classifier, train_images, test_images, num_samples, device=device),
    }
    unavailable = inception_unavailable() if scored.shape[1] == 3 else "it scores colour images"
    if unavailable is None:
        test_subset = test_images[torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))]
        record["inception_fid"] = inception_fid(scored, test_subset[:num_samples], device=device)
    else:
        record["inception_fid"] = None
        if scored.shape[1] == 3:
            print(f"Inception FID: skipped: {unavailable}", flush=True)
    eval_dir = Path(run_dir) / "eval"
    name = trained.method.sample_name(config.sample)
    write_samples(trained.data, samples, eval_dir, name, labels=labels)
    write_json(eval_dir / f"{name}.json", record)
    return record


PARTIAL = "partial"  # RUN_DIR/eval/partial/NAME/: the chunks of an evaluation after training not finished yet


def evaluate_after_training(config: RunConfig, run) -> int:
    """eval.after_train: score the completed training run in `run` (a RunDir) as the eval task
    would, with eval_sample(config)'s sampler, and put the record into summary.json (`evaluation`)
    and its headline figures into its `scores`, where the journal, the GitHub comment and the
    experiment log read them. Images only: text and 2-D points are scored when training ends
    (train.finish), an autoencoder by its latent space. Idempotent: a summary that holds this
    step's evaluation is left alone, and the samples are drawn in chunks kept on disk
    (draw_in_chunks), so a stopped evaluation continues. The exit code."""
    run.lock()  # one writer of the run dir, as while training (`ops rm` waits for it too)
    summary = Summary.from_json(read_json(run.summary))
    done = summary.evaluation or {}
    if summary.status != "completed" or (done.get("step") == summary.step and "error" not in done):
        return 0  # nothing to score, or scored already (a failed evaluation is tried again)
    evaluated = config.model_copy(update={"sample": eval_sample(config), "task": "eval"})
    try:
        trained = load_trained(evaluated, run.path)
        if has_validation(trained.config.data) or trained.method.learns_latents:
            return 0
        name = trained.method.sample_name(evaluated.sample)
        # Named by what it draws: chunks of another size, count or first chunk are not reused.
        layout = f"n{config.eval.num_samples}-b{evaluated.sample.batch_size}-p{PROBE_SAMPLES}"
        folder = run.eval / PARTIAL / f"{name}-{layout}"
        with PreemptionFlag() as preemption:
            drawn, budget = draw_in_chunks(trained, evaluated, folder, stop=lambda: preemption.signal is not None)
        if drawn is None:  # a preemption (or a cancel) between chunks: resumed, training is done and this continues
            summary.status, summary.exit_code = "preempted", EXIT_PREEMPTED
            summary.signal = signal.Signals(preemption.signal).name
            summary.reason = f"{summary.signal} during the evaluation after training; its samples so far are kept"
            run.write_record(summary)
            return EXIT_PREEMPTED
        record = evaluate_checkpoint(evaluated, run.path, progress=track, trained=trained, drawn=drawn) | budget
    # The training's result stands whatever the evaluation meets (a missing test split, no memory):
    # the error goes into the summary beside it, the checks read `not measured`, and the run ends completed.
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        summary.evaluation = {"step": summary.step, "error": repr(exc)}
        run.write_record(summary, config.expect)
        return 0
    print_record(record)
    summary.evaluation = record
    summary.scores = (summary.scores or {}) | headline_scores(record)
    run.write_record(summary, config.expect)
    shutil.rmtree(folder)
    return 0


# The evaluation's first chunk: it times the sampler before a whole batch is risked on eval.max_minutes.
PROBE_SAMPLES = 16


class SamplingStopped(Exception):
    """`stop()` said so between two steps of a sampler."""


def stopping(stop) -> Progress:
    """A sampler's progress that raises SamplingStopped before the next step once `stop()` is true."""

    def steps(items, description: str):
        for item in items:
            if stop():
                raise SamplingStopped
            yield item

    return steps


def draw_in_chunks(
    trained: TrainedModel, config: RunConfig, folder: Path, stop=lambda: False
) -> tuple[tuple | None, dict]:
    """eval.num_samples samples in chunks of sample.batch_size, chunk i from seed sample.seed + i,
    each saved to `folder` as soon as it is drawn: a stopped evaluation continues from the chunks
    on disk and ends with the same samples. eval.max_minutes bounds the sampling (summed over
    restarts): once the next chunk would not fit at the seconds per sample so far, fewer samples
    are scored, and said so. The first chunk is small (PROBE_SAMPLES), so that even one batch
    that would not fit is not drawn.
    ((samples, class labels or None, seconds, mean nfe), the budget's record); (None, {}) when
    `stop()` said so (a preemption signal) before a chunk or between two sampler steps: the chunk
    in hand is dropped, and drawn again, the same, when the evaluation continues."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted, size = config.eval.num_samples, config.sample.batch_size
    first = min(size, wanted, PROBE_SAMPLES)
    sizes = [first] + [min(size, wanted - start) for start in range(first, wanted, size)]
    budget = config.eval.max_minutes * 60 if config.eval.max_minutes else None
    print(
        f"evaluation after training: {wanted} samples, {config.sample.sampler}-{config.sample.num_inference_steps}"
        + (f", sampling within eval.max_minutes {config.eval.max_minutes:g}" if budget else ""),
        flush=True,
    )
    chunks, seconds, drawn = [], 0.0, 0
    for index, count in enumerate(sizes):
        path = folder / f"chunk_{index:05d}.pt"
        if path.is_file():
            chunks.append(torch.load(path, weights_only=True))
            seconds, drawn = seconds + chunks[-1]["seconds"], drawn + len(chunks[-1]["samples"])
            continue
        if stop():
            return None, {}
        if budget is not None and drawn and seconds + count * seconds / drawn > budget:
            print(
                f"eval.max_minutes {config.eval.max_minutes:g}: scoring {drawn} of {wanted} samples "
                f"(the next batch of {count} would take about {count * seconds / drawn:.0f} s more, "
                f"{seconds:.0f} s spent)",
                flush=True,
            )
            break
        sample = config.sample.model_copy(update={"seed": config.sample.seed + index})
        started, stats = time.monotonic(), {}
        try:
            samples = generate(trained, sample, count, progress=stopping(stop), stats=stats)
        except SamplingStopped:  # mid-chunk: a chunk can outlast a scheduler's grace period; redrawn the same
            return None, {}
        chunk = {
            "samples": samples,
            "labels": trained.method.class_labels(count, trained.data, sample),
            "seconds": time.monotonic() - started,
            "nfe": stats.get("nfe"),
        }
        buffer = io.BytesIO()
        torch.save(chunk, buffer)
        atomic_write(path, buffer.getvalue())
        chunks.append(chunk)
        seconds, drawn = seconds + chunk["seconds"], drawn + count
        print(f"evaluation samples: {drawn}/{wanted}", flush=True)
    samples = torch.cat([chunk["samples"] for chunk in chunks])
    labels = None if chunks[0]["labels"] is None else torch.cat([chunk["labels"] for chunk in chunks])
    nfes = [chunk["nfe"] for chunk in chunks if chunk["nfe"] is not None]
    drawn = (samples, labels, seconds, sum(nfes) / len(nfes) if nfes else None)
    return drawn, {"planned_samples": wanted, "budget_minutes": config.eval.max_minutes, "cut": len(samples) < wanted}


def headline_scores(record: dict) -> dict:
    """An image evaluation's figures for summary.json's scores (and `expect:` checks)."""
    scores, floor = record["scores"], record["real_floor"]
    headline = {
        "fid": scores["fid"],
        "real_floor_fid": floor["fid"],
        "fid_over_floor": scores["fid"] / floor["fid"] if floor["fid"] > 0 else None,
        "confident_share": scores["confident_share"],
        "class_entropy_bits": scores["class_entropy_bits"],
        "classes_present": sum(count > 0 for count in scores["class_counts"]),
        "class_accuracy": scores.get("class_accuracy"),
        "inception_fid": record.get("inception_fid"),
        "eval_num_samples": record["num_samples"],
    }
    return {key: value for key, value in headline.items() if value is not None}


def print_record(record: dict) -> None:
    scores, floor = record["scores"], record["real_floor"]
    table = Table(
        title=f"{record['sampler']}-{record['num_inference_steps']}, {record['num_samples']} samples, "
        f"step {record['step']}" + (f", {record['nfe']:g} network evaluations" if record.get("nfe") else "")
    )
    for column in ("", "FID", "confident", "class entropy (bits)", "classes present", "class accuracy"):
        table.add_column(column, justify="right")
    for label, row in (("samples", scores), ("real vs real", floor)):
        accuracy = f"{row['class_accuracy']:.1%}" if "class_accuracy" in row else "-"
        table.add_row(
            label,
            f"{row['fid']:.3f}",
            f"{row['confident_share']:.1%}",
            f"{row['class_entropy_bits']:.3f}",
            str(sum(count > 0 for count in row["class_counts"])),
            accuracy,
        )
    console().print(table)

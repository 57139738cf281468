"""One trainer for every method: AdamW, EMA, grad clipping, bf16 on CUDA, checkpoints, signals.

Exact resume: the data order is a permutation seeded by (seed, epoch), so the position in the
data is the step count; the checkpoint holds model, EMA, optimizer, scaler, step and every RNG
state, and is written only between steps. N steps in one go equal N/2 + resume + N/2, bitwise.

Preemption: SIGTERM, SIGUSR1 or SIGUSR2 finish the current step, write a checkpoint and exit with
EXIT_PREEMPTED; a second SIGTERM exits at once (the last checkpoint stays valid), a repeated
SIGUSR1/2 changes nothing.

Data parallel: when RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT are set (torchrun, or the SLURM
engine), every rank takes the same global batch, computes the loss on its shard of it, and DDP
averages the gradients, so N ranks follow the same trajectory as one process with the same
global batch. Rank 0 alone writes the run dir.
"""

import contextlib
import copy
import errno
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusion.checkpoint import (
    capture_rng_state,
    load_latest,
    remove_partial_writes,
    restore_rng_state,
    save_checkpoint,
)
from diffusion.config import ConfigError, RunConfig, to_dict, validate_run
from diffusion.data import load_dataset
from diffusion.methods import build_method
from diffusion.nets import build_net
from diffusion.progress import TrainProgress
from diffusion.records import MetricsRecord, Summary
from diffusion.rundir import RunDir

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; engines requeue or resume on it
EXIT_FAILED = 1
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionFlag:
    """The first signal asks for a checkpoint at the end of the step. A second SIGTERM exits now
    (someone insists); a repeated preemption notice (SIGUSR1/2, which schedulers may send more than
    once) changes nothing: the checkpoint is already on its way."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> "PreemptionFlag":
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            if signum == signal.SIGTERM:
                sys.exit(128 + signum)
            return
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: checkpointing after this step", flush=True)


class DataParallel:
    """This process's place among the ranks (one rank, world size 1, when not distributed)."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.is_main = self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def start(self, device: torch.device) -> torch.device:
        if not self.enabled:
            return device
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def stop(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag true on some rank: every rank must take the same decision (stop, checkpoint)."""
        if not self.enabled:
            return flags
        import torch.distributed as dist

        tensor = torch.tensor([float(flag) for flag in flags], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(value) for value in tensor.tolist()]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' is not allowed: no CUDA device is visible")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("device: 'mps' is not allowed: MPS is not available")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator)


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema_model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


@contextlib.contextmanager
def signals_ignored(signals):
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def first_nonfinite_loss(first_step: torch.Tensor, first_loss: torch.Tensor, ranks: "DataParallel",
                         device: torch.device) -> str | None:
    """`loss is NaN at step N` for the first step whose loss was not finite (on any rank), else None.
    The step is tracked on the device and read only here, where the trainer decides something
    (log, sample, checkpoint): reading it every step would wait for the GPU every step."""
    step = int(first_step.item())
    if not ranks.any([step >= 0], device)[0]:
        return None
    if step < 0:  # another rank diverged; this one stops with it
        return "loss is not finite on another data-parallel rank"
    return f"loss is {'NaN' if math.isnan(first_loss.item()) else first_loss.item()} at step {step}"


def ema_decay_at(step: int, max_decay: float) -> float:
    # Warm-up so a short run's EMA is not dominated by its random initialisation.
    return min(max_decay, (1 + step) / (10 + step))


def learning_rate_at(step: int, config) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


def build_model(config: RunConfig, method, meta: dict) -> torch.nn.Module:
    """The network for the data `meta` describes: a UNet for images; for text the method decides
    (a causal or bidirectional transformer, or one wrapped with the embeddings it diffuses)."""
    if meta["kind"] == "text":
        return method.build_model(config.model, meta)
    return build_net(config.model, in_channels=meta["image_shape"][0], num_classes=meta["num_classes"])


# fp32 weights and gradients, AdamW's two moments and the EMA copy: 5 x 4 bytes. Activations come
# on top, so this is a floor, enough to refuse a model that cannot fit before anything is built.
BYTES_PER_PARAMETER = 20


def check_memory(config: RunConfig, method, meta: dict, device: torch.device) -> int:
    """The network's parameter count, counted on the meta device (no memory, no RNG draws); raises
    ConfigError when training it cannot fit in the device's free memory."""
    with torch.device("meta"):
        num_params = sum(p.numel() for p in build_model(config, method, meta).parameters())
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil  # only here: the trainer's one use of it

        free = psutil.virtual_memory().available
    needed = num_params * BYTES_PER_PARAMETER
    if needed > free:
        raise ConfigError(f"model: {num_params:,} parameters are not allowed on {device}: training needs at least "
                          f"{needed / 1e9:,.1f} GB (weights, gradients, AdamW moments and EMA) and "
                          f"{free / 1e9:,.1f} GB is free; make the model smaller")
    return num_params


@torch.no_grad()
def save_sample_grid(method, model, config: RunConfig, image_shape, path: Path, device, num_classes: int) -> None:
    from torchvision.utils import save_image

    generator = torch.Generator().manual_seed(config.sample.seed)  # fixed: grids are comparable over time
    num_samples = min(config.sample.num_samples, 64)
    class_labels = None
    if config.model.class_conditional:
        class_labels = torch.arange(num_samples, device=device) % num_classes
    images = method.sample(
        model,
        num_samples,
        image_shape,
        sampler=config.sample.sampler,
        num_inference_steps=config.sample.num_inference_steps,
        eta=config.sample.eta,
        timestep_spacing=config.sample.timestep_spacing,
        generator=generator,
        class_labels=class_labels,
        device=device,
    )
    save_image((images + 1) / 2, path, nrow=int(math.ceil(math.sqrt(num_samples))))


def train(config: RunConfig, run_dir: Path, device: torch.device | None = None) -> int:
    """Train (or resume) the run in `run_dir`. Returns the process exit code."""
    ranks = DataParallel()
    device = ranks.start(device or pick_device(config.device))
    run = RunDir(run_dir)
    try:
        return train_loop(config, run, device, ranks)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return disk_full(run, exc)
    finally:
        run.unlock()
        ranks.stop()


def disk_full(run: RunDir, exc: OSError) -> int:
    """One line naming the last good checkpoint (every checkpoint file is complete: they are
    written atomically), and the summary, if the disk still takes it."""
    saved = sorted(run.checkpoints.glob("step_*.pt"))
    last = f"{saved[-1]} (step {int(saved[-1].stem.removeprefix('step_'))})" if saved else "none (none was written)"
    reason = f"disk full ({exc.filename or exc.strerror}): the last good checkpoint is {last}"
    print(f"failed: {reason}", file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):  # the disk may take the small summary, or not
        run.write_record(Summary(status="failed", reason=reason, exit_code=EXIT_FAILED))
    return EXIT_FAILED


def train_loop(config: RunConfig, run: RunDir, device: torch.device, ranks: DataParallel) -> int:
    dataset = load_dataset(config.data, "train")  # before writing anything: a missing dataset fails clean
    meta = dataset.meta()
    validation = load_dataset(config.data, "val") if meta["kind"] == "text" else None
    tc = config.train
    if tc.batch_size % ranks.world_size:
        raise ConfigError(f"train.batch_size: {tc.batch_size} is not allowed: must divide among "
                          f"{ranks.world_size} data-parallel ranks")
    method = build_method(config.method)
    num_params = check_memory(config, method, meta, device)  # before writing anything, like the dataset
    scorer = None
    if config.eval.scorer_checkpoint is not None:  # text: the final samples' perplexity under an AR run
        from diffusion.evaluate_text import load_scorer

        scorer = load_scorer(config.eval.scorer_checkpoint, device)
    if ranks.is_main:
        run.create(config)
        remove_partial_writes(run.checkpoints)
    ranks.barrier()

    seed_everything(tc.seed)
    model = build_model(config, method, meta).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    trained_model = model
    if ranks.enabled:
        from torch.nn.parallel import DistributedDataParallel

        trained_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    use_bf16 = device.type == "cuda" and tc.precision in ("auto", "bf16")

    batch_size = min(tc.batch_size, len(dataset))
    shard_size = batch_size // ranks.world_size
    shard = slice(ranks.rank * shard_size, (ranks.rank + 1) * shard_size) if ranks.enabled else None
    steps_per_epoch = len(dataset) // batch_size  # drop the ragged last batch
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)

    step, train_seconds = 0, 0.0
    latest = load_latest(run.checkpoints)
    if latest:
        checkpoint_path, checkpoint = latest
        trained = validate_run(checkpoint["config"], f"{checkpoint_path} (config)")
        for section in ("data", "model", "method"):
            if getattr(trained, section) != getattr(config, section):
                raise ConfigError(f"{checkpoint_path}: was trained with another '{section}' section than "
                                  f"{run.config} now holds; put that section back, or train in another run dir")
        model.load_state_dict(checkpoint["model"])
        ema_model.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, train_seconds = checkpoint["step"], checkpoint["train_seconds"]
        restore_rng_state(checkpoint["rng"])
        if ranks.is_main:
            run.truncate_metrics(after_step=step)
        print(f"resumed from {checkpoint_path} at step {step} (epoch {step // steps_per_epoch})", flush=True)

    def checkpoint_now() -> None:
        if not ranks.is_main:
            return
        state = {
            "model": model.state_dict(),
            "ema": ema_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "epoch": step // steps_per_epoch,
            "batch_in_epoch": step % steps_per_epoch,
            "train_seconds": train_seconds,
            "rng": capture_rng_state(),
            "config": to_dict(config),
            "data": meta,  # what sampling needs without the dataset: image shape, or tokenizer
        }
        save_checkpoint(state, run.checkpoints, step, keep=tc.keep_checkpoints)

    def write_samples(stem: str) -> list[str] | None:
        """A PNG grid, or for text the decoded samples (returned, to be scored at the end)."""
        if not ranks.is_main:
            return None
        if meta["kind"] == "text":
            from diffusion.evaluate_text import generate_text, save_text_samples

            texts = generate_text(method, ema_model, meta, config.sample, min(config.sample.num_samples, 8), device)
            save_text_samples(texts, run.samples / f"{stem}.txt")
            return texts
        save_sample_grid(method, ema_model, config, tuple(meta["image_shape"]), run.samples / f"{stem}.png",
                         device, meta["num_classes"])
        return None

    print(f"training on {device}: {len(dataset)} examples, {num_params / 1e6:.2f}M parameters "
          f"(at least {num_params * BYTES_PER_PARAMETER / 1e6:,.0f} MB to train), "
          f"{steps_per_epoch} steps/epoch, {total_steps} steps"
          + (f", rank {ranks.rank} of {ranks.world_size}" if ranks.enabled else ""), flush=True)

    status, stop_reason = "completed", "finished all steps"
    final_texts = None
    last_checkpoint_time, checkpointed_step = time.monotonic(), step
    loss_sum, loss_count, window_start, window_steps = torch.zeros((), device=device), 0, time.monotonic(), 0
    nonfinite_step, nonfinite_loss = torch.full((), -1, device=device), torch.zeros((), device=device)
    permutation, permutation_epoch = None, -1
    model.train()
    seconds_left = tc.max_minutes * 60 - train_seconds if tc.max_minutes else None
    progress_mode = tc.progress if ranks.is_main else "quiet"
    with PreemptionFlag() as preemption, TrainProgress(progress_mode, total_steps, step, seconds_left) as progress:
        loop_started, seconds_before = time.monotonic(), train_seconds
        while step < total_steps:
            epoch, batch_in_epoch = divmod(step, steps_per_epoch)
            if epoch != permutation_epoch:
                permutation, permutation_epoch = epoch_permutation(len(dataset), tc.seed, epoch), epoch
            indices = permutation[batch_in_epoch * batch_size : (batch_in_epoch + 1) * batch_size]
            batch = dataset.batch(indices, device)
            labels = batch.pop("labels", None)
            if config.model.class_conditional:
                batch["class_labels"] = labels

            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, tc)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = method.loss(trained_model, batch, shard)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
            optimizer.step()
            update_ema(ema_model, model, ema_decay_at(step, tc.ema_decay))
            step += 1
            # Wall clock of the whole loop (grids and checkpoints included), summed over resumes.
            train_seconds = seconds_before + time.monotonic() - loop_started
            loss_sum += loss.detach()
            loss_count += 1
            window_steps += 1
            newly_nonfinite = (nonfinite_step < 0) & ~torch.isfinite(loss.detach())
            nonfinite_step = torch.where(newly_nonfinite, step, nonfinite_step)
            nonfinite_loss = torch.where(newly_nonfinite, loss.detach().float(), nonfinite_loss)

            validation_due = tc.val_every_steps is not None and step % tc.val_every_steps == 0
            log_due = step % tc.log_every == 0 or step == total_steps or validation_due
            end_of_epoch = step % steps_per_epoch == 0
            if log_due or end_of_epoch:  # before a NaN is logged or sampled from
                diverged = first_nonfinite_loss(nonfinite_step, nonfinite_loss, ranks, device)
                if diverged:
                    status, stop_reason = "failed", diverged
                    break
            if log_due:
                window_seconds = time.monotonic() - window_start
                record = MetricsRecord(
                    step=step,
                    total_steps=total_steps,
                    epoch=round(step / steps_per_epoch, 4),
                    loss=ranks.mean(loss_sum / loss_count).item(),
                    lr=optimizer.param_groups[0]["lr"],
                    grad_norm=grad_norm.item(),
                    it_per_s=window_steps / window_seconds,
                    examples_per_s=window_steps * batch_size / window_seconds,
                    train_seconds=round(train_seconds, 3),
                )
                if config.method.name == "embedding":  # the collapse this method is prone to, as it happens
                    record.extras["embedding_norm"] = method.embedding_norm(model)
                    record.extras["embedding_spread"] = method.embedding_spread(model)  # 0: all tokens alike
                if validation_due:
                    from diffusion.evaluate_text import validation_bits_per_char

                    # The EMA weights, as scored at the end. Its own seeded generator leaves the training
                    # RNG alone, so a resumed run stays bit for bit.
                    record.val_bits_per_char = validation_bits_per_char(
                        method, ema_model, validation, device, config.eval.val_blocks, config.sample.seed)
                if ranks.is_main:
                    run.log_metrics(record)
                progress.log(record)
                loss_sum.zero_()
                loss_count, window_start, window_steps = 0, time.monotonic(), 0
            progress.advance(step)

            if end_of_epoch and tc.sample_every_epochs and (step // steps_per_epoch) % tc.sample_every_epochs == 0:
                write_samples(f"epoch_{step // steps_per_epoch:04d}")
                model.train()

            out_of_time = tc.max_minutes is not None and train_seconds >= tc.max_minutes * 60
            due_by_steps = tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0
            due_by_time = (
                tc.checkpoint_every_minutes
                and time.monotonic() - last_checkpoint_time >= tc.checkpoint_every_minutes * 60
            )
            flags = [preemption.signal is not None, bool(out_of_time), bool(due_by_time)]
            preempted, out_of_time, due_by_time = ranks.any(flags, device)
            if preempted and preemption.signal is None:
                preemption.signal = signal.SIGUSR2  # another rank was signalled; stop at the same step
            if preempted or out_of_time or due_by_steps or due_by_time:
                diverged = first_nonfinite_loss(nonfinite_step, nonfinite_loss, ranks, device)
                if diverged:  # the weights are not finite either: keep the last good checkpoint
                    status, stop_reason = "failed", diverged
                    break
                checkpoint_now()
                last_checkpoint_time, checkpointed_step = time.monotonic(), step
            if preemption.signal is not None:
                status = "preempted"
                stop_reason = f"{signal.Signals(preemption.signal).name} at step {step}"
                break
            if out_of_time:
                stop_reason = f"time budget of {tc.max_minutes} min reached at step {step}"
                break

        if status == "completed":
            if checkpointed_step != step:
                checkpoint_now()
            final_texts = write_samples("final")

    # A completed run stays completed: a signal that comes now (a late preemption, a time limit)
    # is ignored while the scores and the summary are written, as it would be after the exit.
    with signals_ignored(PREEMPT_SIGNALS) if status == "completed" else contextlib.nullcontext():
        exit_code = {"completed": 0, "preempted": EXIT_PREEMPTED, "failed": EXIT_FAILED}[status]
        if status == "failed":
            stop_reason += f"; the last good checkpoint is step {checkpointed_step}" if checkpointed_step else \
                "; no checkpoint was written"
        print(f"{status}: {stop_reason}", flush=True)
        if not ranks.is_main:
            return exit_code
        logged = run.read_metrics()
        scores = {}
        if final_texts is not None:
            from diffusion.evaluate_text import evaluate_text

            # Validation bits per character and how healthy the samples look; `collapsed` lists why not.
            scores = evaluate_text(method, ema_model, meta, validation, final_texts, device, seed=config.sample.seed,
                                   num_blocks=config.eval.val_blocks, scorer=scorer)
            if scores["collapsed"]:
                print(f"samples collapsed: {'; '.join(scores['collapsed'])}", flush=True)
        run.write_record(Summary(
            status=status,
            reason=stop_reason,
            signal=signal.Signals(preemption.signal).name if status == "preempted" else None,
            exit_code=exit_code,
            step=step,
            total_steps=total_steps,
            epoch=round(step / steps_per_epoch, 4),
            train_seconds=round(train_seconds, 3),
            num_parameters=num_params,
            device=str(device),
            final_metrics=logged[-1].to_json() if logged else {},
            scores=scores or None,
            collapsed=bool(scores["collapsed"]) if scores else None,
        ))
        return exit_code

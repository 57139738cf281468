"""One trainer for every method: AdamW, EMA, grad clipping, bf16 on CUDA, checkpoints, signals.

Exact resume: the data order is a permutation seeded by (seed, epoch), so the position in the
data is the step count; the checkpoint holds model, EMA, optimizer, step and every RNG state, and
is written only between steps. N steps in one go equal N/2 + resume + N/2, bitwise.

Preemption: SIGTERM, SIGUSR1 or SIGUSR2 finish the current step, write a checkpoint and exit with
EXIT_PREEMPTED; a second SIGTERM exits at once (the last checkpoint stays valid), a repeated
SIGUSR1/2 changes nothing.

Data parallel: when RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT are set (torchrun, or the SLURM
engine), every rank takes the same global batch, computes the loss on its shard of it, and DDP
averages the gradients, so N ranks follow the same trajectory as one process with the same
global batch. Rank 0 alone writes the run dir.

The trainer sees a method only through `diffusion.methods.Method` and the data only through its
dataset's `spec()` and `batch()`: it asks neither which it has.
"""

import contextlib
import copy
import errno
import math
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from diffusion.checkpoint import (
    capture_rng_state,
    load_latest,
    remove_partial_writes,
    restore_rng_state,
    save_checkpoint,
    step_files,
)
from diffusion.config import ConfigError, RunConfig, TrainConfig, check_trackers_installed, to_dict, validate_stored_run
from diffusion.data import DataSpec, load_dataset, load_validation, write_flow, write_samples
from diffusion.methods import Method, Parent, build_method
from diffusion.progress import TrainProgress
from diffusion.records import MetricsRecord, Summary
from diffusion.rundir import RunDir
from diffusion.runtime import (
    EXIT_FAILED,
    EXIT_PREEMPTED,
    PREEMPT_SIGNALS,
    DataParallel,
    PreemptionFlag,
    pick_device,
    seed_everything,
    signals_ignored,
)
from diffusion.scores import sample_scores, validation_bits_per_char
from diffusion.scores.images import overfit_report
from diffusion.scores.latents import LATENT_SPACE, format_score, latent_space_report
from diffusion.trackers import Trackers
from diffusion.trained import build_network, load_parent, load_scorer

# fp32 weights and gradients, AdamW's two moments and the EMA copy: 5 x 4 bytes. Activations come
# on top, so this is a floor, enough to refuse a model that cannot fit before anything is built.
BYTES_PER_PARAMETER = 20
# Fixed training examples kept on the device: previews of a method that draws no samples, and
# data-dependent set-up (a latent run's scale).
EXAMPLES = 256


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


def train_loop(config: RunConfig, run: RunDir, device: torch.device, ranks: DataParallel) -> int:
    tc = config.train
    dataset = load_dataset(config.data, "train")  # before writing anything: a missing dataset fails clean
    validation = load_validation(config.data)
    data = dataset.spec()
    plan = Plan.of(len(dataset), tc, ranks)
    method = build_method(config)
    # Read before building: a resumed run's parent (an autoencoder) comes from its own checkpoint.
    latest = load_latest(run.checkpoints)
    parent = load_parent(method, latest[1].get("parent") if latest else None)
    num_params = check_memory(config, method, data, parent, device)  # before writing anything, like the dataset
    scorer = load_scorer(config.eval.scorer_checkpoint, device)  # text: the final samples' perplexity under it
    check_trackers_installed(tc.trackers)  # like the dataset: a missing package stops the run before it writes
    if ranks.is_main:
        run.create(config)
        remove_partial_writes(run.checkpoints)
    ranks.barrier()

    seed_everything(tc.seed)
    # Fixed training examples: what a preview shows a method that draws no samples, and the data a
    # fresh network is set up on (Method.initialize).
    examples = dataset.batch(torch.arange(min(len(dataset), EXAMPLES)), device)
    state = TrainState.build(config, method, data, parent, device, ranks, None if latest else examples)
    if latest:
        resume(state, latest, run, config, plan, ranks)
    del latest  # the whole checkpoint: not kept in memory for the rest of the run
    print(
        f"training on {device}: {len(dataset)} examples, {num_params / 1e6:.2f}M parameters "
        f"(at least {num_params * BYTES_PER_PARAMETER / 1e6:,.0f} MB to train), "
        f"{plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps"
        + (f", rank {ranks.rank} of {ranks.world_size}" if ranks.enabled else ""),
        flush=True,
    )

    trackers = Trackers((tc.trackers or []) if ranks.is_main else [], run.path, to_dict(config), state.step)
    status, stop_reason, final_samples = "completed", "finished all steps", None
    checkpointed_step, last_checkpoint_time = state.step, time.monotonic()
    window = LossWindow(device)
    batches = Batches(dataset, plan, tc.seed, config.model.class_conditional, device)
    use_bf16 = device.type == "cuda" and tc.precision in ("auto", "bf16")
    seconds_left = tc.max_minutes * 60 - state.train_seconds if tc.max_minutes else None
    with (
        PreemptionFlag() as preemption,
        TrainProgress(tc.progress if ranks.is_main else "quiet", plan.total_steps, state.step, seconds_left) as bar,
    ):
        loop_started, seconds_before = time.monotonic(), state.train_seconds
        while state.step < plan.total_steps:
            loss, grad_norm = train_step_or_uncompiled(
                state, method, batches.at(state.step), plan.shard, tc, device, use_bf16
            )
            # Wall clock of the whole loop (grids and checkpoints included), summed over resumes.
            state.train_seconds = seconds_before + time.monotonic() - loop_started
            window.add(loss, state.step)
            step = state.step

            validation_due = tc.val_every_steps is not None and step % tc.val_every_steps == 0
            log_due = step % tc.log_every == 0 or step == plan.total_steps or validation_due
            end_of_epoch = step % plan.steps_per_epoch == 0
            if log_due or end_of_epoch:  # before a NaN is logged or sampled from
                diverged = window.first_nonfinite(ranks)
                if diverged:
                    status, stop_reason = "failed", diverged
                    break
            if log_due:
                record = window.record(state, plan, grad_norm, ranks)
                record.extras |= method.training_metrics(state.model)
                if validation_due:
                    # The EMA weights, as scored at the end. Its own seeded generator leaves the training
                    # RNG alone, so a resumed run stays bit for bit.
                    record.val_bits_per_char = validation_bits_per_char(
                        method, state.ema_model, validation, device, config.eval.val_blocks, config.sample.seed
                    )
                if ranks.is_main:
                    run.log_metrics(record)
                    trackers.scalars(record)
                bar.log(record)
            bar.advance(step)

            epoch = step // plan.steps_per_epoch
            if end_of_epoch and tc.sample_every_epochs and epoch % tc.sample_every_epochs == 0:
                written = preview(state, method, data, config, run, f"epoch_{epoch:04d}", ranks, examples)
                trackers.picture("samples", written or {}, step)
                state.model.train()

            due, preempted, out_of_time = checkpoint_due(
                tc, step, last_checkpoint_time, preemption, state, ranks, device
            )
            if due:
                diverged = window.first_nonfinite(ranks)
                if diverged:  # the weights are not finite either: keep the last good checkpoint
                    status, stop_reason = "failed", diverged
                    break
                save(state, run, config, plan, data, ranks)
                last_checkpoint_time, checkpointed_step = time.monotonic(), step
            if preempted:
                status, stop_reason = "preempted", f"{signal.Signals(preemption.signal).name} at step {step}"
                break
            if out_of_time:
                stop_reason = f"time budget of {tc.max_minutes} min reached at step {step}"
                break

        if status == "completed":
            if checkpointed_step != state.step:
                save(state, run, config, plan, data, ranks)
            final_samples = preview(state, method, data, config, run, "final", ranks, examples)
            trackers.picture("samples", final_samples or {}, state.step)
            picture_flow(state, method, data, config, run, ranks)
    trackers.close()

    return finish(
        status,
        stop_reason,
        checkpointed_step,
        state,
        plan,
        method,
        run,
        config,
        dataset,
        validation,
        final_samples,
        scorer,
        num_params,
        preemption.signal,
        ranks,
        device,
    )


@dataclass
class Plan:
    """How the data is cut into steps: drop the ragged last batch; each rank takes `shard` of every
    global batch."""

    batch_size: int
    steps_per_epoch: int
    total_steps: int
    shard: slice | None

    @classmethod
    def of(cls, num_examples: int, tc: TrainConfig, ranks: DataParallel) -> "Plan":
        if tc.batch_size % ranks.world_size:
            raise ConfigError(
                f"train.batch_size: {tc.batch_size} is not allowed: must divide among "
                f"{ranks.world_size} data-parallel ranks"
            )
        batch_size = min(tc.batch_size, num_examples)
        shard_size = batch_size // ranks.world_size
        shard = slice(ranks.rank * shard_size, (ranks.rank + 1) * shard_size) if ranks.enabled else None
        steps_per_epoch = num_examples // batch_size
        total_steps = tc.epochs * steps_per_epoch
        if tc.max_steps is not None:
            total_steps = min(total_steps, tc.max_steps)
        return cls(batch_size, steps_per_epoch, total_steps, shard)


@dataclass
class TrainState:
    """What a step changes and a checkpoint keeps (with the RNG states)."""

    model: torch.nn.Module
    ema_model: torch.nn.Module
    trained_model: torch.nn.Module  # the model, or its DDP wrapper: what the loss is computed with
    optimizer: torch.optim.Optimizer
    parent: Parent | None = None  # the run the network builds on; its record goes into every checkpoint
    compiling: bool = False  # the trained model is torch.compile'd and its first step is yet to run
    step: int = 0
    train_seconds: float = 0.0

    @classmethod
    def build(
        cls,
        config: RunConfig,
        method: Method,
        data: DataSpec,
        parent: Parent | None,
        device: torch.device,
        ranks: DataParallel,
        examples: dict[str, torch.Tensor] | None,
    ) -> "TrainState":
        """The network (set up on `examples` when given: a fresh run), its EMA copy and optimizer."""
        model = build_network(config, method, data, parent).to(device)
        if examples is not None:
            method.initialize(model, examples)
        ema_model = copy.deepcopy(model).requires_grad_(False)
        trained_model = model
        if ranks.enabled:
            trained_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if config.train.compile:
            # Lazy: it compiles on the first step, where `train_step_or_uncompiled` catches a failure.
            trained_model = torch.compile(trained_model)
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]  # not a frozen parent
        optimizer = torch.optim.AdamW(trainable, lr=config.train.lr, weight_decay=config.train.weight_decay)
        return cls(model, ema_model, trained_model, optimizer, parent, compiling=config.train.compile)


def resume(
    state: TrainState, latest: tuple[Path, dict], run: RunDir, config: RunConfig, plan: Plan, ranks: DataParallel
) -> None:
    """Load the run dir's newest checkpoint (`load_latest`) into `state`: weights, optimizer, step
    and RNG states; the metrics logged after it are dropped (they will be logged again)."""
    checkpoint_path, checkpoint = latest
    trained = validate_stored_run(checkpoint["config"], f"{checkpoint_path} (config)")
    for section in ("data", "model", "method"):
        if getattr(trained, section) != getattr(config, section):
            raise ConfigError(
                f"{checkpoint_path}: was trained with another '{section}' section than "
                f"{run.config} now holds; put that section back, or train in another run dir"
            )
    state.model.load_state_dict(checkpoint["model"])
    state.ema_model.load_state_dict(checkpoint["ema"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.step, state.train_seconds = checkpoint["step"], checkpoint["train_seconds"]
    restore_rng_state(checkpoint["rng"])
    if ranks.is_main:
        run.truncate_metrics(after_step=state.step)
    print(
        f"resumed from {checkpoint_path} at step {state.step} (epoch {state.step // plan.steps_per_epoch})", flush=True
    )


class Batches:
    """The batch of each step: indices from the epoch's seeded permutation, so that a step count
    alone says where in the data a run is."""

    def __init__(self, dataset, plan: Plan, seed: int, class_conditional: bool, device: torch.device):
        self.dataset, self.plan, self.seed, self.device = dataset, plan, seed, device
        self.class_conditional = class_conditional
        self.permutation, self.epoch = None, -1

    def at(self, step: int) -> dict[str, torch.Tensor]:
        epoch, batch_in_epoch = divmod(step, self.plan.steps_per_epoch)
        if epoch != self.epoch:
            self.permutation, self.epoch = epoch_permutation(len(self.dataset), self.seed, epoch), epoch
        size = self.plan.batch_size
        batch = self.dataset.batch(self.permutation[batch_in_epoch * size : (batch_in_epoch + 1) * size], self.device)
        labels = batch.pop("labels", None)
        if self.class_conditional:
            batch["class_labels"] = labels
        return batch


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator)


def train_step_or_uncompiled(
    state: TrainState,
    method: Method,
    batch: dict,
    shard: slice | None,
    tc: TrainConfig,
    device: torch.device,
    use_bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`train_step`; the first step of a torch.compile'd model compiles it, and if compilation
    fails (no C++ compiler, an operation dynamo cannot trace), the run says why in one line and
    takes the same step uncompiled, from the same random state: a compiled run and its fallback
    follow the uncompiled trajectory. Only the first step falls back: a recompilation later (new
    shapes) that fails stops the run with its error, as does any error of the uncompiled retry."""
    if not state.compiling:
        return train_step(state, method, batch, shard, tc, device, use_bf16)
    state.compiling = False
    rng = capture_rng_state()
    try:
        return train_step(state, method, batch, shard, tc, device, use_bf16)
    # torch.compile raises many types (BackendCompilerFailed, Unsupported, InternalTorchDynamoError
    # ...) and compiles only here, lazily; the same step is taken again uncompiled, so that a real
    # fault in the model still surfaces from the uncompiled step.
    except Exception as exc:  # noqa: BLE001
        reason = " ".join(str(exc).split())[:300]
        print(
            f"train.compile: torch.compile failed ({type(exc).__name__}: {reason}); training uncompiled",
            flush=True,
        )
        restore_rng_state(rng)
        state.trained_model = state.trained_model._orig_mod  # the model (or its DDP wrapper) it compiled
        state.optimizer.zero_grad(set_to_none=True)
        return train_step(state, method, batch, shard, tc, device, use_bf16)


def train_step(
    state: TrainState,
    method: Method,
    batch: dict,
    shard: slice | None,
    tc: TrainConfig,
    device: torch.device,
    use_bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One AdamW step with warm-up, gradient clipping and the EMA update; (loss, grad norm), both
    left on the device."""
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate_at(state.step, tc)
    batch = method.training_batch(state.model, batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        loss = method.loss(state.trained_model, batch, shard)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), tc.grad_clip or float("inf"))
    state.optimizer.step()
    update_ema(state.ema_model, state.model, ema_decay_at(state.step, tc.ema_decay))
    state.step += 1
    return loss.detach(), grad_norm


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema_model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def ema_decay_at(step: int, max_decay: float) -> float:
    # Warm-up so a short run's EMA is not dominated by its random initialisation.
    return min(max_decay, (1 + step) / (10 + step))


def learning_rate_at(step: int, config: TrainConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


class LossWindow:
    """The losses since the last log line, and the first step whose loss was not finite. Both stay
    on the device and are read only where the trainer decides something (log, sample, checkpoint):
    reading them every step would wait for the GPU every step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum, self.count, self.started, self.steps = torch.zeros((), device=device), 0, time.monotonic(), 0
        self.nonfinite_step, self.nonfinite_loss = torch.full((), -1, device=device), torch.zeros((), device=device)

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.loss_sum += loss
        self.count += 1
        self.steps += 1
        newly_nonfinite = (self.nonfinite_step < 0) & ~torch.isfinite(loss)
        self.nonfinite_step = torch.where(newly_nonfinite, step, self.nonfinite_step)
        self.nonfinite_loss = torch.where(newly_nonfinite, loss.float(), self.nonfinite_loss)

    def first_nonfinite(self, ranks: DataParallel) -> str | None:
        """`loss is NaN at step N` for the first step whose loss was not finite (on any rank), else None."""
        step = int(self.nonfinite_step.item())
        if not ranks.any([step >= 0], self.device)[0]:
            return None
        if step < 0:  # another rank diverged; this one stops with it
            return "loss is not finite on another data-parallel rank"
        loss = self.nonfinite_loss.item()
        return f"loss is {'NaN' if math.isnan(loss) else loss} at step {step}"

    def record(self, state: TrainState, plan: Plan, grad_norm: torch.Tensor, ranks: DataParallel) -> MetricsRecord:
        """The metrics line of this window (the loss averaged over it and over the ranks); starts the next."""
        seconds = time.monotonic() - self.started
        record = MetricsRecord(
            step=state.step,
            total_steps=plan.total_steps,
            epoch=round(state.step / plan.steps_per_epoch, 4),
            loss=ranks.mean(self.loss_sum / self.count).item(),
            lr=state.optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm.item(),
            it_per_s=self.steps / seconds,
            examples_per_s=self.steps * plan.batch_size / seconds,
            train_seconds=round(state.train_seconds, 3),
        )
        self.loss_sum.zero_()
        self.count, self.started, self.steps = 0, time.monotonic(), 0
        return record


def checkpoint_due(
    tc: TrainConfig,
    step: int,
    last_checkpoint_time: float,
    preemption: PreemptionFlag,
    state: TrainState,
    ranks: DataParallel,
    device: torch.device,
) -> tuple[bool, bool, bool]:
    """(checkpoint now, preempted, out of time), the same on every rank: a signal or the time
    budget on one rank stops them all at the same step."""
    out_of_time = tc.max_minutes is not None and state.train_seconds >= tc.max_minutes * 60
    due_by_steps = bool(tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0)
    due_by_time = bool(
        tc.checkpoint_every_minutes and time.monotonic() - last_checkpoint_time >= tc.checkpoint_every_minutes * 60
    )
    preempted, out_of_time, due_by_time = ranks.any([preemption.signal is not None, out_of_time, due_by_time], device)
    if preempted and preemption.signal is None:
        preemption.signal = signal.SIGUSR2  # another rank was signalled; stop at the same step
    return preempted or out_of_time or due_by_steps or due_by_time, preempted, out_of_time


def save(state: TrainState, run: RunDir, config: RunConfig, plan: Plan, data: DataSpec, ranks: DataParallel) -> None:
    if not ranks.is_main:
        return
    checkpoint = {
        "model": state.model.state_dict(),
        "ema": state.ema_model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "step": state.step,
        "epoch": state.step // plan.steps_per_epoch,
        "batch_in_epoch": state.step % plan.steps_per_epoch,
        "train_seconds": state.train_seconds,
        "rng": capture_rng_state(),
        "config": to_dict(config),
        "data": data.to_json(),  # what sampling needs without the dataset: image shape, or tokenizer
        "parent": state.parent.record if state.parent else None,  # its config: resuming needs no parent run
    }
    save_checkpoint(checkpoint, run.checkpoints, state.step, keep=config.train.keep_checkpoints)


@torch.no_grad()
def preview(
    state: TrainState,
    method: Method,
    data: DataSpec,
    config: RunConfig,
    run: RunDir,
    stem: str,
    ranks: DataParallel,
    examples: dict[str, torch.Tensor],
) -> dict | None:
    """A few samples of the EMA model (`Method.preview`: for an autoencoder, reconstructions of
    `examples`) into samples/STEM (a grid, or texts), from the fixed sample seed, so that they are
    comparable over training; `write_samples`' record."""
    if not ranks.is_main:
        return None
    count = min(config.sample.num_samples, data.preview_count)
    # One batch whatever sample.batch_size says, and every class in turn whatever sample.class_label says.
    sample = config.sample.model_copy(update={"batch_size": count, "class_label": None})
    generator = torch.Generator().manual_seed(config.sample.seed)
    state.ema_model.eval()
    device = next(state.ema_model.parameters()).device
    samples = method.preview(state.ema_model, count, data, sample, generator, device, examples)
    written = write_samples(
        data, samples, run.samples, stem, keep_arrays=False, labels=method.class_labels(count, data, sample)
    )
    return {**written, "values": samples}


@torch.no_grad()
def picture_flow(
    state: TrainState, method: Method, data: DataSpec, config: RunConfig, run: RunDir, ranks: DataParallel
) -> None:
    """figures/flow.*: the way `data.flow_count` samples of the EMA model go from noise to data
    (`Method.trajectory`, drawn by `write_flow`: an animation and a strip of frames); nothing for a
    method that draws no such path."""
    if not ranks.is_main or not data.flow_count:
        return
    count = data.flow_count
    sample = config.sample.model_copy(update={"batch_size": count, "class_label": None})
    generator = torch.Generator().manual_seed(config.sample.seed)
    device = next(state.ema_model.parameters()).device
    trajectory = method.trajectory(state.ema_model, count, data, sample, generator, device)
    if trajectory is None:
        return
    labels = method.class_labels(count, data, sample)
    written = write_flow(data, *trajectory, run.figures, "flow", labels=labels)
    print(f"the flow from noise to data -> {', '.join(map(str, written))}", flush=True)


def finish(
    status: str,
    stop_reason: str,
    checkpointed_step: int,
    state: TrainState,
    plan: Plan,
    method: Method,
    run: RunDir,
    config: RunConfig,
    dataset,
    validation,
    final_samples: dict | None,
    scorer,
    num_params: int,
    signum: int | None,
    ranks: DataParallel,
    device: torch.device,
) -> int:
    """Score the final samples (in overfit mode, against the training images) and write
    summary.json; the exit code. A completed run stays
    completed: a signal that comes now (a late preemption, a time limit) is ignored while the
    scores and the summary are written, as it would be after the exit."""
    with signals_ignored(PREEMPT_SIGNALS) if status == "completed" else contextlib.nullcontext():
        exit_code = {"completed": 0, "preempted": EXIT_PREEMPTED, "failed": EXIT_FAILED}[status]
        if status == "failed":
            stop_reason += (
                f"; the last good checkpoint is step {checkpointed_step}"
                if checkpointed_step
                else "; no checkpoint was written"
            )
        print(f"{status}: {stop_reason}", flush=True)
        if not ranks.is_main:
            return exit_code
        logged = run.read_metrics()
        scores = None
        if final_samples is not None:
            # Text: validation bits per character and how healthy the samples look; `collapsed` lists why not.
            scores = sample_scores(
                method,
                state.ema_model,
                validation,
                final_samples,
                device,
                config.sample.seed,
                config.eval.val_blocks,
                scorer,
            )
            if scores and scores["collapsed"]:
                print(f"samples collapsed: {'; '.join(scores['collapsed'])}", flush=True)
            if method.learns_latents:
                scores = (scores or {}) | {
                    "latent_space": picture_latents(method, state.ema_model, config, run, device)
                }
            if config.data.limit_per_class is not None and logged:  # overfit mode: memorised?
                training_images = dataset.batch(torch.arange(len(dataset)), torch.device("cpu"))["images"]
                overfit = overfit_report(final_samples["values"], training_images, logged[-1].loss)
                scores = (scores or {}) | {"overfit": overfit}
                print(
                    f"overfit mode: final loss {overfit['final_loss']:.4g} (near zero: "
                    f"{'yes' if overfit['loss_near_zero'] else 'no'}), samples' RMS distance to the nearest "
                    f"training image {max(overfit['nearest_train_rms']):.3f} at most (reproduced: "
                    f"{'yes' if overfit['reproduced'] else 'no'})",
                    flush=True,
                )
        summary = Summary(
            status=status,
            reason=stop_reason,
            signal=signal.Signals(signum).name if status == "preempted" else None,
            exit_code=exit_code,
            step=state.step,
            total_steps=plan.total_steps,
            epoch=round(state.step / plan.steps_per_epoch, 4),
            train_seconds=round(state.train_seconds, 3),
            num_parameters=num_params,
            device=str(device),
            final_metrics=logged[-1].to_json() if logged else {},
            scores=scores or None,
            collapsed=bool(scores["collapsed"]) if scores and "collapsed" in scores else None,
        )
        run.write_record(summary, config.expect)
        return exit_code


@torch.no_grad()
def picture_latents(method: Method, model: torch.nn.Module, config: RunConfig, run: RunDir, device) -> dict:
    """The latents of `eval.num_samples` held-out images of every class (a seeded subset of the
    test split), pictured into figures/latent_space.png; their scores (scores/latents.py)."""
    every_class = config.data.model_copy(update={"only_digit": None, "limit_per_class": None, "subset": None})
    held_out = load_dataset(every_class, "test")
    generator = torch.Generator().manual_seed(config.sample.seed)
    chosen = torch.randperm(len(held_out), generator=generator)[: config.eval.num_samples].sort().values
    batches = [held_out.batch(indices, device) for indices in chosen.split(256)]
    latents = torch.cat([method.encode(model, batch["images"]).cpu() for batch in batches])
    labels = torch.cat([batch["labels"].cpu() for batch in batches])
    out = run.figures / LATENT_SPACE
    scores = latent_space_report(latents, labels, out, seed=config.sample.seed)
    print(
        f"latent space of {len(latents)} held-out images: silhouette {format_score(scores['silhouette'])}, "
        f"Calinski-Harabasz {format_score(scores['calinski_harabasz'], '.1f')} -> {out}",
        flush=True,
    )
    return scores


def time_steps(config: RunConfig, steps: int = 2, device: torch.device | None = None) -> dict:
    """What a run of `config` costs on this machine: the seconds per training step (the median of
    `steps` steps after an untimed first one, which pays for warm-up), its total steps, its time
    budget and parameter count. Trains a throwaway copy; writes nothing. `ops submit` estimates a
    GPU-sized run's duration on a machine without a GPU from it."""
    device = device or pick_device(config.device)
    ranks = DataParallel()
    dataset = load_dataset(config.data, "train")
    data = dataset.spec()
    plan = Plan.of(len(dataset), config.train, ranks)
    method = build_method(config)
    parent = load_parent(method, None)
    seed_everything(config.train.seed)
    examples = dataset.batch(torch.arange(min(len(dataset), EXAMPLES)), device)
    state = TrainState.build(config, method, data, parent, device, ranks, examples)
    batches = Batches(dataset, plan, config.train.seed, config.model.class_conditional, device)
    use_bf16 = device.type == "cuda" and config.train.precision in ("auto", "bf16")
    seconds = []
    for step in range(steps + 1):
        started = time.perf_counter()
        loss, _ = train_step(state, method, batches.at(step), plan.shard, config.train, device, use_bf16)
        loss.item()  # waits for the device
        seconds.append(time.perf_counter() - started)
    return {
        "seconds_per_step": statistics.median(seconds[1:]),
        "timed_steps": steps,
        "total_steps": plan.total_steps,
        "max_minutes": config.train.max_minutes,
        "num_parameters": sum(p.numel() for p in state.model.parameters()),
        "device": str(device),
    }


def check_memory(config: RunConfig, method: Method, data: DataSpec, parent: Parent | None, device: torch.device) -> int:
    """The network's parameter count, counted on the meta device (no memory, no RNG draws); raises
    ConfigError when training it cannot fit in the device's free memory."""
    with torch.device("meta"):
        num_params = sum(p.numel() for p in build_network(config, method, data, parent).parameters())
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    needed = num_params * BYTES_PER_PARAMETER
    if needed > free:
        raise ConfigError(
            f"model: {num_params:,} parameters are not allowed on {device}: training needs at least "
            f"{needed / 1e9:,.1f} GB (weights, gradients, AdamW moments and EMA) and "
            f"{free / 1e9:,.1f} GB is free; make the model smaller"
        )
    return num_params


def disk_full(run: RunDir, exc: OSError) -> int:
    """One line naming the last good checkpoint (every checkpoint file is complete: they are
    written atomically), and the summary, if the disk still takes it."""
    saved = step_files(run.checkpoints)
    last = f"{saved[-1][1]} (step {saved[-1][0]})" if saved else "none (none was written)"
    reason = f"disk full ({exc.filename or exc.strerror}): the last good checkpoint is {last}"
    print(f"failed: {reason}", file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):  # the disk may take the small summary, or not
        run.write_record(Summary(status="failed", reason=reason, exit_code=EXIT_FAILED))
    return EXIT_FAILED

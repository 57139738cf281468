"""Where and how a process runs: device, seeding, data-parallel ranks, the preemption flag and the
exit codes that engines read (0 done, 1 failed, 2 bad input, 75 preempted and resumable)."""

import contextlib
import os
import random
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

from diffusion.config import ConfigError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; engines requeue or resume on it
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2  # nothing was written
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
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def stop(self) -> None:
        if self.enabled:
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag true on some rank: every rank must take the same decision (stop, checkpoint)."""
        if not self.enabled:
            return flags
        tensor = torch.tensor([float(flag) for flag in flags], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(value) for value in tensor.tolist()]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
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


@contextlib.contextmanager
def signals_ignored(signals):
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

"""Checkpoints that survive crashes and resume bit-for-bit.

Each save writes `step_XXXXXXXX.pt` and `latest.pt`, each atomically (temp file in the same
folder, fsync, os.replace, fsync of the folder), so a crash at any moment leaves `latest.pt`
pointing at the last complete checkpoint. Only the newest `keep` step files are kept.
"""

import io
import random
from pathlib import Path

import numpy as np
import torch

from diffusion.config import ConfigError
from diffusion.records import LATEST, STEP_FILES, atomic_write, step_file, step_of


def step_files(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step checkpoint in the folder, oldest first."""
    return [(step_of(path), path) for path in sorted(checkpoint_dir.glob(STEP_FILES))]


def save_checkpoint(state: dict, checkpoint_dir: Path, step: int, keep: int) -> Path:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    step_path = checkpoint_dir / step_file(step)
    atomic_write(step_path, data)
    atomic_write(checkpoint_dir / LATEST, data)
    for _, old in step_files(checkpoint_dir)[:-keep]:
        old.unlink()
    return step_path


def remove_partial_writes(checkpoint_dir: Path) -> None:
    """Temp files left by a process that died mid-write; never loadable, only taking space."""
    for tmp in checkpoint_dir.glob(".*.tmp"):
        tmp.unlink()


class UnreadableCheckpoint(Exception):
    """A file that does not load as a checkpoint: torn, not a checkpoint at all, or holding objects
    besides weights (which the weights-only loader refuses); the message says which."""


UNREADABLE = (UnreadableCheckpoint,)


def load_latest(checkpoint_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads: latest.pt, else the step files newest first (every file
    is written atomically, so only damage from outside can break one). None when there is none;
    ConfigError naming the folder when none of them loads."""
    candidates = [checkpoint_dir / LATEST, *[path for _, path in reversed(step_files(checkpoint_dir))]]
    problems = []
    for path in (path for path in candidates if path.is_file()):
        try:
            checkpoint = load_checkpoint(path)
        except UNREADABLE as exc:
            problems.append(f"{path.name}: {' '.join(str(exc).split())[:120]}")
            continue
        if problems:
            print(f"warning: damaged checkpoint skipped ({'; '.join(problems)}); resuming from {path}", flush=True)
        return path, checkpoint
    if problems:
        raise ConfigError(
            f"{checkpoint_dir}: no checkpoint loads ({'; '.join(problems)}); remove the folder to "
            "start over, or resume from a copy"
        )
    return None


def load_checkpoint(path: Path):
    """A checkpoint read by torch's weights-only loader, so that a file from elsewhere (a .pt
    given to sample, inspect or build on; bare weights from another code base) can run no code;
    the numpy RNG state of our own checkpoints is allowed by name. UnreadableCheckpoint when the
    file does not load."""
    # The function numpy pickles arrays with (numpy._core's in numpy 2, numpy.core's before).
    reconstruct = np.zeros(0).__reduce__()[0]
    numpy_state = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct]
    try:
        with torch.serialization.safe_globals(numpy_state):
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # bytes that are not a checkpoint fail torch's parsers in many ways
        raise UnreadableCheckpoint(f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

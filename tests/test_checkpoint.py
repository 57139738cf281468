import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from diffusion.checkpoint import (
    capture_rng_state,
    load_latest,
    remove_partial_writes,
    restore_rng_state,
    save_checkpoint,
)
from tests.conftest import REPO


def test_retention_keeps_the_newest_step_files_and_latest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint({"step": step}, tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000030.pt", "step_00000040.pt"]
    assert load_latest(tmp_path)[1]["step"] == 40


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])


CRASHING_WRITER = """
import sys, torch
from pathlib import Path
from diffusion.checkpoint import save_checkpoint
folder = Path(sys.argv[1])
save_checkpoint({"step": 1, "weights": torch.ones(10)}, folder, 1, keep=3)
print("first done", flush=True)
# Large enough that writing it takes a while: we get killed in the middle of it.
save_checkpoint({"step": 2, "weights": torch.randn(100_000_000)}, folder, 2, keep=3)
print("second done", flush=True)
"""


def test_crash_in_the_middle_of_a_write_leaves_latest_at_the_previous_checkpoint(tmp_path):
    writer = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "first done"
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 0 for p in tmp_path.glob(".*.tmp")):  # a write is under way
        assert time.monotonic() < deadline and writer.poll() is None, "the second write never started"
        time.sleep(0.001)
    writer.send_signal(signal.SIGKILL)
    writer.wait()

    assert list(tmp_path.glob(".*.tmp")), "the crash left no partial file: the kill came too late"
    checkpoint = load_latest(tmp_path)[1]
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.ones(10))
    remove_partial_writes(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))

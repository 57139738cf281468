"""Data-parallel training: two gloo ranks on CPU follow the same trajectory as one process."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from diffusion.data import DataSpec
from diffusion.methods import build_method
from diffusion.runtime import seed_everything
from diffusion.trained import build_network
from tests.conftest import REPO, write_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_with_ranks(config_path, run_dir, world_size: int) -> None:
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        if world_size == 1:
            env = {key: value for key, value in env.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "diffusion", "train", str(config_path), "--out", str(run_dir)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs


@pytest.mark.parametrize("method", ["ddpm", "meanflow"])
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(method, tiny_config, tmp_path):
    """MeanFlow too: its forward-mode product goes through the DDP wrapper."""
    if method == "meanflow":
        tiny_config.method.name = "meanflow"
        tiny_config.sample.sampler = "meanflow"
        tiny_config.method.num_train_timesteps = 1000  # flows refuse a changed discrete-timestep count
    tiny_config.train.max_steps = 6
    tiny_config.train.log_every = 2
    config_path = write_config(tiny_config, tmp_path / "config.yaml")
    train_with_ranks(config_path, tmp_path / "one", world_size=1)
    train_with_ranks(config_path, tmp_path / "two", world_size=2)

    one = torch.load(tmp_path / "one/checkpoints/latest.pt", weights_only=False)
    two = torch.load(tmp_path / "two/checkpoints/latest.pt", weights_only=False)
    assert one["step"] == two["step"] == 6
    # MeanFlow differentiates only its r < t pairs, a selection of another size in each process than in
    # one: the convolutions sum in another order, and Adam turns that float noise on weights of near-zero
    # gradient into differences of ~2e-5 after six steps.
    atol = 1e-4 if method == "meanflow" else 1e-5
    for key in ("model", "ema"):
        for name, value in one[key].items():
            torch.testing.assert_close(two[key][name], value, rtol=1e-4, atol=atol, msg=f"{key}.{name}")
    # The tolerance is tight: six steps moved the weights by far more than it (over 1e-3).
    seed_everything(tiny_config.train.seed)
    data = DataSpec("image", (1, 28, 28), num_classes=10)
    initial = build_network(tiny_config, build_method(tiny_config), data).state_dict()
    assert max((one["model"][name] - value).abs().max().item() for name, value in initial.items()) > 1e-3

    # Rank 0 alone wrote the run dir: one metrics line per logged step, losses equal to one process's.
    lines_one = [json.loads(line) for line in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    lines_two = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines_two] == [2, 4, 6]
    for a, b in zip(lines_one, lines_two):
        assert abs(a["loss"] - b["loss"]) < 1e-4
    assert json.loads((tmp_path / "two/summary.json").read_text())["status"] == "completed"

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffusion.checkpoint import load_checkpoint
from diffusion.runtime import EXIT_PREEMPTED, PreemptionFlag
from diffusion.train import epoch_permutation, train
from tests.conftest import REPO, run_diffusion, write_config


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_training_state(a, b):
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), f"optimizer {index}.{key} differs"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_a_few_dozen_steps_lower_the_loss(tiny_config, tmp_path):
    tiny_config.train.max_steps = 48
    assert train(tiny_config, tmp_path / "run") == 0
    losses = [record["loss"] for record in metrics(tmp_path / "run")]
    assert len(losses) == 48
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8])


def test_run_dir_holds_config_metrics_checkpoints_grids_and_summary(tiny_config, tmp_path):
    tiny_config.train.max_steps = 8
    tiny_config.train.sample_every_epochs = 1
    tiny_config.train.checkpoint_every_steps = 2
    tiny_config.train.keep_checkpoints = 2
    run = tmp_path / "run"
    assert train(tiny_config, run) == 0
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == ["step_00000006.pt", "step_00000008.pt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_0001.png", "epoch_0002.png", "final.png"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 8
    record = metrics(run)[-1]
    assert {"step", "epoch", "loss", "lr", "it_per_s", "grad_norm"} <= record.keys()
    checkpoint = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert checkpoint["config"]["model"]["base_channels"] == 8 and checkpoint["step"] == 8


def test_resume_in_two_halves_equals_one_go_bitwise(tiny_config, tmp_path):
    tiny_config.train.max_steps = 12
    train(tiny_config, tmp_path / "one-go")
    tiny_config.train.max_steps = 6
    train(tiny_config, tmp_path / "halves")
    tiny_config.train.max_steps = 12
    train(tiny_config, tmp_path / "halves")
    assert_same_training_state(
        load_checkpoint(tmp_path / "one-go/checkpoints/latest.pt"),
        load_checkpoint(tmp_path / "halves/checkpoints/latest.pt"),
    )
    assert [r["step"] for r in metrics(tmp_path / "halves")] == list(range(1, 13))


def test_sigterm_checkpoints_exits_resumable_and_resume_is_bitwise_exact(tiny_config, tmp_path):
    tiny_config.train.max_steps = 40
    tiny_config.train.epochs = 20
    config = write_config(tiny_config, tmp_path / "config.yaml")
    assert run_diffusion("train", config, "--out", tmp_path / "one-go").returncode == 0

    run = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusion", "train", str(config), "--out", str(run)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 5):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output
    summary = json.loads((run / "summary.json").read_text())
    stopped_at = load_checkpoint(run / "checkpoints/latest.pt")["step"]
    assert summary["status"] == "preempted" and 5 <= stopped_at < 40 and summary["step"] == stopped_at

    resumed = run_diffusion("train", run)  # a run dir: resume it in place
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and f"at step {stopped_at}" in resumed.stdout
    assert_same_training_state(
        load_checkpoint(tmp_path / "one-go/checkpoints/latest.pt"), load_checkpoint(run / "checkpoints/latest.pt")
    )
    assert [r["step"] for r in metrics(run)] == list(range(1, 41))


def test_a_second_sigterm_exits_at_once_and_a_repeated_preemption_notice_changes_nothing():
    with PreemptionFlag() as flag:
        flag._handle(signal.SIGUSR2, None)
        flag._handle(signal.SIGUSR2, None)  # schedulers may notify twice: the checkpoint is on its way
        flag._handle(signal.SIGUSR1, None)
        assert flag.signal == signal.SIGUSR2
        with pytest.raises(SystemExit) as exit_info:
            flag._handle(signal.SIGTERM, None)  # someone insists
    assert exit_info.value.code == 128 + signal.SIGTERM


def test_time_budget_stops_with_a_checkpoint(tiny_config, tmp_path):
    tiny_config.train.max_minutes = 1e-4
    assert train(tiny_config, tmp_path / "run") == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "completed" and "time budget" in summary["reason"]
    assert summary["step"] < summary["total_steps"]
    assert load_checkpoint(tmp_path / "run/checkpoints/latest.pt")["step"] == summary["step"]


def test_data_order_is_a_fixed_permutation_per_epoch():
    first = epoch_permutation(100, seed=0, epoch=0)
    assert torch.equal(first, epoch_permutation(100, seed=0, epoch=0))
    assert not torch.equal(first, epoch_permutation(100, seed=0, epoch=1))
    assert sorted(first.tolist()) == list(range(100))


def test_only_digit_trains_on_one_class(tiny_config):
    from diffusion.data import load_dataset

    tiny_config.data.only_digit = 7
    dataset = load_dataset(tiny_config.data)
    assert len(dataset) == 64 and set(dataset.labels.tolist()) == {7}


def test_sample_command_writes_grid_and_all_samples(tiny_config, tmp_path):
    tiny_config.train.max_steps = 4
    run = tmp_path / "run"
    train(tiny_config, run)
    result = run_diffusion(
        "sample",
        run,
        "--set",
        "sample.num_samples=6",
        "--set",
        "sample.sampler=ddpm",
        "--set",
        "sample.num_inference_steps=5",
    )
    assert result.returncode == 0, result.stderr
    saved = np.load(run / "samples/ddpm5-seed0.npz")["images"]
    assert saved.shape == (6, 1, 28, 28) and saved.dtype == np.uint8
    assert (run / "samples/ddpm5-seed0.png").is_file()


def test_a_run_dir_alone_runs_its_configured_task_in_place(tiny_config, tmp_path):
    """`python -m diffusion RUN_DIR` is how every engine starts a run."""
    tiny_config.train.max_steps = 3
    run = tmp_path / "run"
    write_config(tiny_config, tmp_path / "config.yaml")
    run.mkdir()
    (run / "config.yaml").write_text((tmp_path / "config.yaml").read_text())
    result = run_diffusion(run)
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "summary.json").read_text())["step"] == 3


def test_a_non_finite_loss_stops_the_run_failed_at_its_first_step(tiny_config, tmp_path):
    """A checkpoint whose weights went NaN (as a diverged run leaves them) is resumed: the first step's
    loss is NaN, the run stops there, failed, with no NaN logged and no checkpoint written after."""
    run = tmp_path / "run"
    tiny_config.train.max_steps = 2
    tiny_config.train.log_every = 3  # the stop must not wait for a log step to be due
    tiny_config.train.sample_every_epochs = None
    assert train(tiny_config, run) == 0
    checkpoint = load_checkpoint(run / "checkpoints/latest.pt")
    checkpoint["model"] = {
        key: torch.full_like(value, float("nan")) if value.is_floating_point() else value
        for key, value in checkpoint["model"].items()
    }
    torch.save(checkpoint, run / "checkpoints/latest.pt")
    lines_before = (run / "metrics.jsonl").read_text()

    tiny_config.train.max_steps = 12
    tiny_config.train.checkpoint_every_steps = 1
    assert train(tiny_config, run) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 1
    assert summary["reason"] == "loss is NaN at step 3; the last good checkpoint is step 2"
    assert summary["step"] == 3
    assert (run / "metrics.jsonl").read_text() == lines_before
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == ["step_00000002.pt"]


def test_infinite_and_huge_values_are_refused_before_any_work(tiny_config, tmp_path):
    from diffusion.config import ConfigError, validate_run

    raw = tiny_config.model_dump(mode="json")
    for section, key, value, rule in [
        ("train", "lr", float("inf"), "must be a finite number"),
        ("train", "lr", float("nan"), "must be a finite number"),
        ("train", "lr", 1e30, "must be less than or equal to 1"),
        ("sample", "eta", float("inf"), "must be a finite number"),
        ("model", "base_channels", 1_000_000, "must be less than or equal to 2048"),
        ("model", "channel_mults", [1, 1000], "must be less than or equal to 16"),
    ]:
        with pytest.raises(ConfigError) as error:
            validate_run({**raw, section: {**raw[section], key: value}})
        assert rule in str(error.value) and f"{section}.{key}" in str(error.value), str(error.value)


def test_a_model_that_cannot_fit_is_refused_before_anything_is_written(tiny_config, tmp_path):
    """Within every field's bound, but 3.5 trillion parameters: counted on the meta device, refused."""
    from diffusion.config import ConfigError

    tiny_config.model.base_channels, tiny_config.model.num_res_blocks = 2048, 16
    tiny_config.model.channel_mults, tiny_config.model.norm_groups = [16, 16, 16, 16], 8
    with pytest.raises(ConfigError) as error:
        train(tiny_config, tmp_path / "run")
    assert str(error.value).startswith(
        "model: 3,527,368,687,617 parameters are not allowed on cpu: training needs at least 70,547.4 GB"
    )
    assert not (tmp_path / "run").exists()

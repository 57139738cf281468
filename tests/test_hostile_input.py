"""Inputs a break-test found after the first round of fixes, one kind per test: each is refused in
one line before any work (or survived, for damaged run files), and nothing is written or lost."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from diffusion.config import ConfigError, validate_run
from tests.conftest import run_diffusion, write_config
from tests.ops_project import ops, ops_json

TEXT = {
    "data": {"dataset": "shakespeare"},
    "model": {"name": "transformer"},
    "method": {"name": "masked"},
    "sample": {"sampler": "ancestral"},
}


def tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
        if ".git" not in path.parts
    }


@pytest.fixture
def probe(tiny_config, tmp_path) -> Path:
    """A finished two-step image run, checkpointed at steps 1 and 2."""
    from diffusion.train import train

    tiny_config.train.max_steps = 2
    tiny_config.train.checkpoint_every_steps = 1
    run = tmp_path / "probe"
    assert train(tiny_config, run) == 0
    return run


@pytest.mark.parametrize(
    "raw, line",
    [
        ({"method": {"beta_start": 0.9, "beta_end": 0.9}}, "alpha_bar runs from 0.1 to 0; it must stay within [1e-20"),
        ({"method": {"num_train_timesteps": 20000, "clip_sample": False}}, "num_train_timesteps 20000: alpha_bar runs"),
        ({"method": {"beta_start": 1e-17}}, "method.beta_start: 1e-17 is not allowed: must be greater than or equal"),
        ({"sample": {"eta": 1e200}}, "sample.eta: 1e+200 is not allowed: must be less than or equal to 1"),
        (
            {**TEXT, "sample": {"sampler": "ancestral", "temperature": 1e-300}},
            "sample.temperature: 1e-300 is not allowed",
        ),
        ({"train": {"seed": -1}}, "train.seed: -1 is not allowed"),
        ({"sample": {"seed": 10**23}}, "sample.seed: 100000000000000000000000 is not allowed"),
        ({"data": {"root": "a\0b"}}, "data.root: 'a\\x00b' is not allowed: must not contain a NUL byte"),
        ({"sample": {"batch_size": 10**11}}, "sample.batch_size: 100000000000 is not allowed"),
        ({**TEXT, "eval": {"num_samples": 10**15}}, "eval.num_samples: 1000000000000000 is not allowed"),
        ({"sample": {"top_k": 5}}, "sample.top_k: 5 is not allowed with method.name 'ddpm'"),
    ],
)
def test_values_that_failed_after_training_are_refused_at_validation(raw, line):
    with pytest.raises(ConfigError) as error:
        validate_run(raw)
    assert line in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_the_validation_bound_on_alpha_bar_is_the_schedules_own():
    from diffusion.config import MethodConfig, alpha_bar_range
    from diffusion.schedulers import NoiseSchedule

    for schedule in ("linear", "cosine", "sqrt"):
        for T in (2, 7, 1000, 4000):
            method = MethodConfig(beta_schedule=schedule, num_train_timesteps=T, beta_start=3e-4, beta_end=0.03)
            first, last = alpha_bar_range(method)
            alphas_cumprod = NoiseSchedule(T, schedule, 3e-4, 0.03).alphas_cumprod
            assert first == pytest.approx(alphas_cumprod[0].item(), rel=1e-12)
            assert last == pytest.approx(alphas_cumprod[-1].item(), rel=1e-9)


def test_another_task_in_a_run_dir_never_rewrites_its_config_or_summary(probe, tmp_path):
    before = {name: (probe / name).read_bytes() for name in ("config.yaml", "summary.json")}
    for args in (["--set", "task=sample"], ["--out", str(probe)]):
        target = (
            [str(probe)]
            if args[0] == "--set"
            else [
                "sample",
                str(
                    write_config(
                        validate_run(
                            {
                                "task": "sample",
                                "device": "cpu",
                                "sample": {"checkpoint": str(probe)},
                                "data": {"subset": 64},
                            }
                        ),
                        tmp_path / "sample.yaml",
                    )
                ),
            ]
        )
        result = run_diffusion(
            *target, *args, "--set", "sample.num_samples=2", "--set", "sample.num_inference_steps=2", "--device", "cpu"
        )
        assert result.returncode == 0, result.stderr
        assert {name: (probe / name).read_bytes() for name in before} == before
    assert len(list((probe / "tasks").glob("sample-*.json"))) == 2
    resumed = run_diffusion("train", probe, "--set", "train.max_steps=3")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout  # still a training run


def test_a_sample_spec_is_checked_against_its_checkpoints_config_at_submit(git_project):
    """Not against the spec's own method section (a false refusal), and a missing checkpoint is
    found at submit, not when the job runs."""
    trained = git_project / "runs-elsewhere/long-schedule"
    (trained / "checkpoints").mkdir(parents=True)
    torch.save({"weights": "none"}, trained / "checkpoints/latest.pt")  # a checkpoint's form; its config is what counts
    (trained / "config.yaml").write_text("method: {num_train_timesteps: 2000}\n")
    spec = git_project / "configs/jobs/sampling.yaml"
    spec.write_text(
        "name: sampling\nrun:\n  task: sample\n  device: cpu\n  sample: {checkpoint: runs-elsewhere/"
        "long-schedule, num_inference_steps: 1500}\n"
    )
    assert ops(git_project, "submit", "sampling", "--dry-run").returncode == 0
    refused = ops(git_project, "submit", "sampling", "--dry-run", "--set", "run.sample.num_inference_steps=2500")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    assert (
        "run.sample.num_inference_steps: 2500 is not allowed: must be <= method.num_train_timesteps (2000) "
        f"(with the checkpoint's own config, {trained}/config.yaml)" in refused.stderr
    )
    missing = ops(git_project, "submit", "sampling", "--dry-run", "--set", "run.sample.checkpoint=runs/nope")
    assert missing.returncode == 2
    assert "run.sample.checkpoint: 'runs/nope' is not allowed: no checkpoint there" in missing.stderr
    scorer = ops(git_project, "submit", "sampling", "--dry-run", "--set", "run.eval.scorer_checkpoint=runs/nope")
    assert scorer.returncode == 2 and "run.eval.scorer_checkpoint: 'runs/nope' is not allowed" in scorer.stderr


def test_a_text_sample_with_a_missing_guide_writes_nothing_and_names_the_guide(tmp_path, shakespeare_root):
    from diffusion.train import train

    config = validate_run(
        {
            **TEXT,
            "device": "cpu",
            "data": {"dataset": "shakespeare", "root": str(shakespeare_root), "block_size": 16, "subset": 32},
            "model": {"name": "transformer", "n_layer": 1, "n_head": 2, "n_embd": 16},
            "train": {"max_steps": 1, "batch_size": 8, "sample_every_epochs": None, "checkpoint_every_minutes": None},
            "sample": {"sampler": "ancestral", "num_samples": 2, "num_inference_steps": 2},
            "eval": {"val_blocks": 2},
        }
    )
    assert train(config, tmp_path / "text") == 0
    out = tmp_path / "sampled"
    for key in ("sample.guide_checkpoint", "eval.scorer_checkpoint"):
        result = run_diffusion("sample", tmp_path / "text", "--set", f"{key}={tmp_path}/nope", "--out", out)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith(f"error: {key}: '{tmp_path}/nope' is not allowed: no checkpoint there")
        assert not out.exists()


@pytest.mark.parametrize("where", ["set", "spec", "ops.yaml"])
def test_deep_nesting_is_one_line_wherever_it_is(git_project, where):
    deep = "[" * 600 + "]" * 600
    before = tree(git_project)
    if where == "set":
        result = ops(git_project, "submit", "tiny", "--dry-run", "--set", f"run.model.channel_mults={deep}")
    elif where == "spec":
        (git_project / "configs/jobs/deep.yaml").write_text(f"name: deep\nrun:\n  model: {{channel_mults: {deep}}}\n")
        before = tree(git_project)
        result = ops(git_project, "config", "validate")
        listed = ops(git_project, "config", "list", "--json")
        assert listed.returncode == 0
        rows = {row["name"]: row for row in json.loads(listed.stdout)}
        assert rows["tiny"]["error"] is None and "nested more than 64 levels deep" in rows["deep"]["error"]
    else:
        (git_project / "ops.yaml").write_text(f"gcp_region: {deep}\n")
        before = tree(git_project)
        result = ops(git_project, "list")
    assert "nested more than 64 levels deep" in (result.stderr + result.stdout)
    assert "Traceback" not in result.stderr and result.returncode in (1, 2)
    assert tree(git_project) == before


@pytest.mark.parametrize("value", ["!custom 1e-3", "!!python/object/apply:os.system [echo]", "<<", "!!set {1, 2}"])
def test_config_set_refuses_tags_and_merge_keys_in_one_line_and_keeps_the_file(git_project, value):
    spec = git_project / "configs/jobs/tiny.yaml"
    before = spec.read_bytes()
    result = ops(git_project, "config", "set", "tiny", f"run.train.lr={value}")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert spec.read_bytes() == before


def test_config_set_keeps_typed_spellings_indentation_line_endings_and_bom(git_project):
    spec = git_project / "configs/jobs/four.yaml"
    spec.write_bytes(
        b"\xef\xbb\xbfname: four\r\nrun:\r\n    train:\r\n        lr: 2.0e-4   # kept\r\n"
        b"    model:\r\n        channel_mults:\r\n          - 1\r\n          - 2\r\n"
    )
    result = ops(
        git_project,
        "config",
        "set",
        "four",
        "run.train.lr=.5e-3",
        "run.model.attention=FALSE",
        "run.train.weight_decay=1.23456789012345678e-4",
    )
    assert result.returncode == 0, result.stderr
    assert spec.read_bytes() == (
        b"\xef\xbb\xbfname: four\r\nrun:\r\n    train:\r\n        lr: .5e-3    # kept\r\n"
        b"        weight_decay: 1.23456789012345678e-4\r\n    model:\r\n        channel_mults:\r\n"
        b"          - 1\r\n          - 2\r\n        attention: FALSE\r\n"
    )
    shown = ops_json(git_project, "config", "show", "four")["run"]
    assert (shown["train"]["lr"], shown["model"]["attention"]) == (5e-4, False)


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["--engine", "slurm", "--set", "resources.slurm.mem_gb=1e308"],
            "resources.slurm.mem_gb: 1e+308 is not allowed",
        ),
        (
            ["--engine", "slurm", "--set", "resources.slurm.mem_gb=1e-300"],
            "resources.slurm.mem_gb: 1e-300 is not allowed",
        ),
        (
            [
                "--engine",
                "slurm",
                "--set",
                "resources.slurm.tasks_per_node=2",
                "--set",
                "resources.slurm.gpus_per_node=1",
            ],
            "resources.slurm.tasks_per_node: 2 is not allowed with gpus_per_node 1",
        ),
        (["--set", "resources.vertex.timeout_hours=1e308"], "resources.vertex.timeout_hours: 1e+308 is not allowed"),
        (["--set", "resources.slurm.time_minutes=100000000000000000000000"], "resources.slurm.time_minutes:"),
    ],
)
def test_absurd_resources_are_refused_before_anything_is_written(git_project, args, line):
    result = ops(git_project, "submit", "tiny", *args)
    assert result.returncode == 2 and line in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert not (git_project / "runs").exists()


def test_a_whole_resources_mapping_of_another_engine_warns(git_project):
    result = ops(git_project, "submit", "tiny", "--dry-run", "--set", "resources={slurm: {partition: gpu}}")
    assert result.returncode == 0
    assert (
        "warning: --set resources={slurm: {partition: gpu}}: the run goes to the local engine, which ignores "
        "resources.slurm" in result.stderr
    )


def test_one_liners_for_odd_arguments_and_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    for args, line in (
        (
            ["train", "configs/jobs/mnist-quick.yaml", "--set", "run=5"],
            "error: --set 'run=5': the run section as a whole cannot be set",
        ),
        (["train", str(empty)], f"error: {empty}: empty; a run config holds at least one section"),
    ):
        result = run_diffusion(*args)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[0].startswith(line), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_damaged_run_files_are_survived_by_every_reader(ops_project):
    root = ops_project
    runs = [ops_json(root, "submit", "tiny", "--set", "run.train.max_steps=2")["runs"][0] for _ in range(2)]
    for run in runs:
        assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    damaged, healthy = Path(runs[0]["run_dir"]), Path(runs[1]["run_dir"])
    (damaged / "exit_status.json").write_text("{}")  # valid JSON, no returncode
    (damaged / "metrics.jsonl").write_text('{"step": 2, "total_steps": 2, "loss": 0.5, "epoch": 1.0}\n')
    (damaged / "summary.json").write_text('{"status": "completed", "final_metrics": "x", "step": "two"}')
    (damaged / "provenance.json").unlink()
    (damaged / "provenance.json").mkdir()
    (damaged / "config.yaml").write_bytes(b"\xff\xfe broken")
    import sqlite3

    db = sqlite3.connect(root / "runs/registry.sqlite")  # as if the run had not been seen to end
    db.execute("UPDATE runs SET state = 'RUNNING', finished_at = NULL WHERE ops_id = ?", (runs[0]["ops_id"],))
    db.commit()
    db.close()
    for command in (
        ["monitor", runs[0]["ops_id"]],
        ["monitor", runs[0]["ops_id"], "--full"],
        ["list"],
        ["sync"],
        ["journal", runs[0]["ops_id"]],
        ["compare", runs[0]["ops_id"], runs[1]["ops_id"]],
    ):
        result = ops(root, *command)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr)
    (healthy / "job.json").write_text('{"ops_id": "x"}')  # incomplete
    db = sqlite3.connect(root / "runs/registry.sqlite")
    db.execute("UPDATE runs SET state = 'RUNNING', finished_at = NULL")
    db.commit()
    db.close()
    synced = ops(root, "sync", "--json")
    assert synced.returncode == 0, synced.stderr  # the other run is reconciled; this one is reported
    report = json.loads(synced.stdout)
    assert any(f"{healthy}/job.json: damaged" in problem for problem in report["problems"])
    assert runs[0]["ops_id"] in {run["ops_id"] for run in report["runs"]}


def test_a_damaged_latest_checkpoint_resumes_from_the_newest_step_file(probe):
    latest = probe / "checkpoints/latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    result = run_diffusion("train", probe, "--set", "train.max_steps=3")
    assert result.returncode == 0, result.stderr
    assert "damaged checkpoint skipped (latest.pt:" in result.stdout
    assert f"resumed from {probe}/checkpoints/step_00000002.pt at step 2" in result.stdout
    assert torch.load(latest, weights_only=False)["step"] == 3
    for path in (probe / "checkpoints").glob("*.pt"):
        path.write_bytes(b"torn")
    result = run_diffusion("train", probe, "--set", "train.max_steps=4")
    assert result.returncode == 2 and "no checkpoint loads" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_checkpoint_of_another_model_is_one_line(probe):
    config = probe / "config.yaml"
    config.write_text(config.read_text().replace("base_channels: 8", "base_channels: 16"))
    result = run_diffusion("train", probe, "--set", "train.max_steps=3")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "was trained with another 'model' section than" in result.stderr


def test_sync_writes_nothing_when_the_runs_folder_holds_no_run(git_project):
    (git_project / "runs/junk").mkdir(parents=True)
    before = tree(git_project)
    assert ops(git_project, "sync").returncode == 0
    assert tree(git_project) == before


def test_a_folder_named_like_a_spec_is_not_a_spec(git_project):
    (git_project / "configs/jobs/notes.yaml").mkdir()
    result = ops(git_project, "config", "validate")
    assert result.returncode == 0 and result.stdout.strip() == "ok    configs/jobs/tiny.yaml"
    assert [row["name"] for row in ops_json(git_project, "config", "list")] == ["tiny"]
    shutil.rmtree(git_project / "configs/jobs/notes.yaml")
    assert os.listdir(git_project / "configs/jobs") == ["tiny.yaml"]

"""Limits between fields are found when a config is validated, never after training.

Each limit that a method, sampler, net or dataset enforces at run time has a case here: the value
just inside passes validation, the one just outside gives one line naming the key, the value and
the rule. Where the limit comes from a net or a sampler, the test also asks that part itself, so
that validation and run time cannot drift apart.
"""

import hashlib
import json

import pytest
import torch

from diffusion.config import ConfigError, RunConfig, conflict, validate_run
from tests.conftest import run_diffusion
from tests.ops_project import ops

TEXT = {
    "data": {"dataset": "shakespeare"},
    "model": {"name": "transformer"},
    "method": {"name": "masked"},
    "sample": {"sampler": "ancestral"},
}
EMBEDDING = {**TEXT, "method": {"name": "embedding"}, "sample": {"sampler": "ddim"}}


def merged(base: dict, **sections) -> dict:
    return {key: {**base.get(key, {}), **sections.get(key, {})} for key in base.keys() | sections.keys()}


# (config, the one line) for each limit, and a config just inside the same limit.
CASES = [
    (
        merged({}, method={"num_train_timesteps": 20}, sample={"num_inference_steps": 50}),
        "sample.num_inference_steps: 50 is not allowed: must be <= method.num_train_timesteps (20)",
        merged({}, method={"num_train_timesteps": 20}, sample={"num_inference_steps": 20}),
    ),
    (
        merged(
            EMBEDDING, method={"name": "embedding", "num_train_timesteps": 100}, sample={"num_inference_steps": 101}
        ),
        "sample.num_inference_steps: 101 is not allowed: must be <= method.num_train_timesteps (100)",
        merged(
            EMBEDDING, method={"name": "embedding", "num_train_timesteps": 100}, sample={"num_inference_steps": 100}
        ),
    ),
    (
        merged({}, model={"base_channels": 12, "channel_mults": [1, 2], "norm_groups": 4, "attention_heads": 5}),
        "model.attention_heads: 5 is not allowed: must divide the lowest level's channels "
        "(base_channels * channel_mults[-1] = 24)",
        merged({}, model={"base_channels": 12, "channel_mults": [1, 2], "norm_groups": 4, "attention_heads": 6}),
    ),
    (
        merged({}, sample={"class_label": 3}),
        "sample.class_label: 3 is not allowed with model.class_conditional false",
        merged({}, sample={"class_label": 3}, model={"class_conditional": True}),
    ),
    (
        merged({}, sample={"class_label": 10}, model={"class_conditional": True}),
        "sample.class_label: 10 is not allowed: mnist has classes 0 to 9",
        merged({}, sample={"class_label": 9}, model={"class_conditional": True}),
    ),
    (
        merged({}, sample={"guide_checkpoint": "runs/ar"}),
        "sample.guide_checkpoint: 'runs/ar' is not allowed with data.dataset 'mnist': it is for text",
        {},
    ),
    (
        merged(TEXT, data={"dataset": "shakespeare", "only_digit": 3}),
        "data.only_digit: 3 is not allowed with data.dataset 'shakespeare': it is for images",
        TEXT,
    ),
    (
        merged(TEXT, model={"name": "transformer", "class_conditional": True}),
        "model.class_conditional: true is not allowed with data.dataset 'shakespeare'",
        TEXT,
    ),
    (
        merged(TEXT, model={"name": "transformer", "n_embd": 96, "n_head": 5}),
        "model.n_embd: 96 is not allowed: must be a multiple of model.n_head (5)",
        merged(TEXT, model={"name": "transformer", "n_embd": 96, "n_head": 6}),
    ),
    (
        merged(TEXT, model={"name": "transformer", "n_embd": 96, "n_head": 32}),
        "model.n_embd: 96 is not allowed with model.positions 'rotary': the head size n_embd / n_head (3) must be even",
        merged(TEXT, model={"name": "transformer", "n_embd": 96, "n_head": 32, "positions": "learned"}),
    ),
    (
        merged(TEXT, data={"dataset": "shakespeare", "block_size": 64}, sample={"sampler": "ancestral", "length": 65}),
        "sample.length: 65 is not allowed: must be <= data.block_size (64)",
        merged(
            TEXT,
            data={"dataset": "shakespeare", "block_size": 64},
            sample={"sampler": "ancestral", "length": 200, "block_length": 64},
        ),
    ),
    (
        merged(
            TEXT,
            data={"dataset": "shakespeare", "block_size": 64},
            sample={"sampler": "ancestral", "length": 200, "block_length": 65},
        ),
        "sample.block_length: 65 is not allowed: must be <= data.block_size (64)",
        merged(TEXT, data={"dataset": "shakespeare", "block_size": 64}, sample={"sampler": "ancestral", "length": 64}),
    ),
    (
        merged(EMBEDDING, data={"dataset": "shakespeare", "block_size": 64}, sample={"sampler": "ddim", "length": 65}),
        "sample.length: 65 is not allowed: must be <= data.block_size (64) for embedding diffusion",
        merged(
            EMBEDDING,
            data={"dataset": "shakespeare", "block_size": 64},
            sample={"sampler": "ddim", "length": 65, "guide_checkpoint": "runs/ar"},
        ),
    ),
    (
        merged(TEXT, sample={"sampler": "ancestral", "guidance_alpha": 0.5}),
        "sample.guidance_alpha: 0.5 is not allowed without sample.guide_checkpoint",
        merged(TEXT, sample={"sampler": "ancestral", "guidance_alpha": 0.5, "guide_checkpoint": "runs/ar"}),
    ),
    (
        merged(
            EMBEDDING,
            method={"name": "embedding", "prefix_fraction": 0.0},
            sample={"sampler": "ddim", "guide_checkpoint": "runs/ar"},
        ),
        "method.prefix_fraction: 0 is not allowed with sample.guide_checkpoint",
        merged(
            EMBEDDING,
            method={"name": "embedding", "prefix_fraction": 0.1},
            sample={"sampler": "ddim", "guide_checkpoint": "runs/ar"},
        ),
    ),
    (
        merged(TEXT, data={"dataset": "shakespeare", "block_size": 11_155, "val_fraction": 0.01}),
        "data.block_size: 11155 is not allowed: must be <= the validation split's 11154 characters",
        merged(TEXT, data={"dataset": "shakespeare", "block_size": 11_154, "val_fraction": 0.01}),
    ),
    (
        merged(TEXT, method={"name": "masked", "init_embeddings": "runs/ar"}),
        "method.init_embeddings: 'runs/ar' is not allowed with method.name 'masked'",
        merged(EMBEDDING, method={"name": "embedding", "init_embeddings": "runs/ar"}),
    ),
]


@pytest.mark.parametrize("raw, expected, inside", CASES, ids=lambda value: value[:40] if isinstance(value, str) else "")
def test_each_limit_refuses_the_value_outside_and_takes_the_one_inside(raw, expected, inside):
    with pytest.raises(ConfigError) as error:
        validate_run(raw)
    assert str(error.value).startswith(f"config: {expected}"), str(error.value)
    assert "\n" not in str(error.value)
    validate_run(inside)


def test_the_validation_split_holds_the_characters_the_limit_counts(shakespeare_root):
    from diffusion.data.shakespeare import split_text

    text = (shakespeare_root / "tinyshakespeare/input.txt").read_text()
    assert len(split_text(text, "val", 0.01)) == 11_154


@pytest.mark.parametrize(
    "base_channels, channel_mults, heads",
    [(12, [1, 2], 5), (12, [1, 2], 6), (8, [1, 3], 3), (8, [1, 3], 16), (16, [1], 4)],
)
def test_attention_head_limit_agrees_with_the_unet(base_channels, channel_mults, heads):
    from diffusion.nets.unet import UNet

    config = RunConfig.model_validate(
        {
            "model": {
                "base_channels": base_channels,
                "channel_mults": channel_mults,
                "norm_groups": 4,
                "attention_heads": heads,
            }
        }
    )
    refused = conflict(config) is not None
    try:
        UNet(base_channels=base_channels, channel_mults=channel_mults, norm_groups=4, attention_heads=heads)
        built = True
    except ValueError:
        built = False
    assert refused != built


@pytest.mark.parametrize(
    "n_embd, n_head, positions",
    [
        (96, 5, "learned"),
        (96, 6, "rotary"),
        (96, 32, "rotary"),
        (96, 32, "learned"),
        (64, 4, "rotary"),
        (30, 5, "rotary"),
    ],
)
def test_transformer_limits_agree_with_the_transformer(n_embd, n_head, positions):
    from diffusion.nets.transformer import Transformer

    config = RunConfig.model_validate(
        merged(TEXT, model={"name": "transformer", "n_embd": n_embd, "n_head": n_head, "positions": positions})
    )
    refused = conflict(config) is not None
    try:
        Transformer(vocab_size=10, block_size=8, n_layer=1, n_head=n_head, n_embd=n_embd, positions=positions)
        built = True
    except ValueError:
        built = False
    assert refused != built


@pytest.mark.parametrize("steps, allowed", [(20, True), (21, False)])
def test_step_limit_agrees_with_the_scheduler(steps, allowed):
    from diffusion.schedulers import DDIMScheduler

    config = RunConfig.model_validate(
        merged({}, method={"num_train_timesteps": 20}, sample={"num_inference_steps": steps})
    )
    assert (conflict(config) is None) == allowed
    scheduler = DDIMScheduler(num_train_timesteps=20)
    if allowed:
        scheduler.set_timesteps(steps)
    else:
        with pytest.raises(ValueError):
            scheduler.set_timesteps(steps)


TINY = [
    "--device",
    "cpu",
    "--set",
    "data.subset=64",
    "--set",
    "train.batch_size=32",
    "--set",
    "train.max_minutes=null",
    "--set",
    "model.base_channels=8",
    "--set",
    "model.channel_mults=[1,2]",
    "--set",
    "model.num_res_blocks=1",
    "--set",
    "model.attention=false",
    "--set",
    "model.norm_groups=4",
    "--set",
    "sample.num_samples=4",
    "--set",
    "sample.num_inference_steps=2",
]


def test_python_m_diffusion_refuses_before_training_and_writes_nothing(tmp_path):
    out = tmp_path / "probe"
    result = run_diffusion(
        "train",
        "configs/jobs/mnist-quick.yaml",
        *TINY,
        "--set",
        "train.max_steps=2",
        "--set",
        "sample.num_inference_steps=50",
        "--set",
        "method.num_train_timesteps=20",
        "--out",
        out,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: configs/jobs/mnist-quick.yaml: sample.num_inference_steps: 50 is not allowed: must be <= "
        "method.num_train_timesteps (20)"
    ]
    assert not out.exists()


def test_ops_refuses_a_limit_in_submit_dry_run_config_set_and_validate(git_project):
    spec = git_project / "configs/jobs/tiny.yaml"
    before = hashlib.sha256(spec.read_bytes()).hexdigest()
    line = "run.sample.num_inference_steps: 5 is not allowed: must be <= method.num_train_timesteps (4)"
    for args in (
        ["submit", "tiny", "--set", "run.method.num_train_timesteps=4"],
        ["submit", "tiny", "--set", "run.method.num_train_timesteps=4", "--dry-run"],
        ["config", "set", "tiny", "run.method.num_train_timesteps=4"],
    ):
        result = ops(git_project, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.strip().splitlines() == [f"error: configs/jobs/tiny.yaml: {line}"], args
    assert hashlib.sha256(spec.read_bytes()).hexdigest() == before
    assert not (git_project / "runs").exists() and not (git_project / "EXPERIMENT_LOG.md").exists()

    spec.write_text(spec.read_text().replace("method: {num_train_timesteps: 50}", "method: {num_train_timesteps: 4}"))
    result = ops(git_project, "config", "validate", "tiny", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)[0]["error"] == f"configs/jobs/tiny.yaml: {line}"


@pytest.mark.parametrize(
    "engine, resources, ranks",
    [
        (
            "slurm",
            ["resources.slurm.nodes=2", "resources.slurm.tasks_per_node=3"],
            "6 data-parallel ranks (resources.slurm.nodes 2 x tasks_per_node 3)",
        ),
        (
            "vertex",
            [
                "resources.vertex.accelerator_type=NVIDIA_TESLA_T4",
                "resources.vertex.accelerator_count=1",
                "resources.vertex.replica_count=3",
            ],
            "3 data-parallel ranks (resources.vertex.replica_count 3 x accelerator_count 1)",
        ),
    ],
)
def test_batch_size_must_split_evenly_among_the_engines_ranks(git_project, engine, resources, ranks):
    args = [f"--set={item}" for item in resources]
    result = ops(git_project, "submit", "tiny", "--engine", engine, "--dry-run", *args)
    assert result.returncode == 2
    assert f"run.train.batch_size: 16 is not allowed on {engine}: must be a multiple of its {ranks}" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_sample_task_checks_the_checkpoints_own_method(tmp_path, tiny_config):
    """The sampling spec's method section may say anything: the checkpoint's is the one that runs."""
    from diffusion.train import train
    from tests.conftest import write_config

    tiny_config.train.max_steps = 1
    assert train(tiny_config, tmp_path / "trained") == 0
    summary = (tmp_path / "trained/summary.json").read_bytes()
    spec = write_config(
        RunConfig.model_validate(
            {
                "task": "sample",
                "device": "cpu",
                "method": {"num_train_timesteps": 1000},
                "sample": {"checkpoint": str(tmp_path / "trained"), "num_inference_steps": 51},
            }
        ),
        tmp_path / "sample.yaml",
    )
    result = run_diffusion(spec, "--out", tmp_path / "sampled")
    assert result.returncode == 2
    assert "sample.num_inference_steps: 51 is not allowed: must be <= method.num_train_timesteps (50)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sampled").exists()
    assert (tmp_path / "trained/summary.json").read_bytes() == summary
    assert torch.load(tmp_path / "trained/checkpoints/latest.pt", weights_only=False)["step"] == 1

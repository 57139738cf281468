import subprocess
import sys

import pytest

from diffusion.config import ConfigError, apply_overrides, load_run_config, parse_override, validate_run
from tests.conftest import REPO, run_diffusion

JOB_SPECS = sorted((REPO / "configs" / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.stem)
def test_every_job_spec_validates(path):
    config = load_run_config(path)
    assert config.task in ("train", "sample", "eval")


def test_mnist_job_specs_are_what_their_names_say():
    quick = load_run_config(REPO / "configs/jobs/mnist-quick.yaml")
    full = load_run_config(REPO / "configs/jobs/mnist-training.yaml")
    assert quick.train.max_minutes == 10
    assert full.model.base_channels > quick.model.base_channels
    assert load_run_config(REPO / "configs/jobs/mnist-sampling.yaml").task == "sample"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"train": {"epoch": 3}}, "config: train.epoch: unknown key; did you mean 'train.epochs'?"),
        ({"modle": {}}, "config: modle: unknown key; did you mean 'model'?"),
        ({"train": {"batch_size": "big"}}, "config: train.batch_size: 'big' is not allowed: must be a valid integer"),
        ({"train": {"lr": -1.0}}, "config: train.lr: -1.0 is not allowed: must be greater than 0"),
        ({"data": {"only_digit": 10}}, "config: data.only_digit: 10 is not allowed: must be less than or equal to 9"),
        (
            {"method": {"prediction_type": "x0"}},
            "config: method.prediction_type: 'x0' is not allowed: must be 'epsilon', 'sample' or 'v_prediction'",
        ),
        (
            {"model": {"base_channels": 36}},
            "config: model.norm_groups: 8 is not allowed: must divide every level's channels",
        ),
    ],
)
def test_bad_values_give_one_line_naming_key_value_and_rule(raw, expected):
    with pytest.raises(ConfigError) as error:
        validate_run(raw)
    message = str(error.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_overrides_parse_yaml_scalars_and_accept_job_spec_paths():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("run.train.lr=1e-3") == (["train", "lr"], 1e-3)
    assert parse_override("model.channel_mults=[1,2]") == (["model", "channel_mults"], [1, 2])
    assert parse_override("train.max_steps=null") == (["train", "max_steps"], None)
    raw = apply_overrides({"train": {"epochs": 1}}, ["train.epochs=5", "data.only_digit=3"])
    assert raw == {"train": {"epochs": 5}, "data": {"only_digit": 3}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.epochs")


def test_job_spec_with_an_unknown_top_level_key_is_rejected(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\nhypotesis: y\nrun:\n  train:\n    epochs: 1\n")
    with pytest.raises(ConfigError, match="hypotesis: unknown key; did you mean 'hypothesis'"):
        load_run_config(spec)


def test_importing_the_config_does_not_import_torch():
    code = "import sys, diffusion.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epoch=1", "train.epoch: unknown key; did you mean 'train.epochs'?"),
        ("train.batch_size=many", "train.batch_size: 'many' is not allowed"),
        ("train.ema_decay=1.5", "train.ema_decay: 1.5 is not allowed: must be less than 1"),
    ],
)
def test_cli_rejects_bad_config_and_writes_nothing(tmp_path, override, expected):
    out = tmp_path / "run"
    result = run_diffusion("train", REPO / "configs/jobs/mnist-quick.yaml", "--set", override, "--out", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not out.exists()


def test_cli_missing_dataset_says_where_and_how_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    empty = tmp_path / "no-data"
    result = run_diffusion(
        "train",
        REPO / "configs/jobs/mnist-quick.yaml",
        "--set",
        f"data.root={empty}",
        "--set",
        "data.download=false",
        "--out",
        out,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(empty / "MNIST" / "raw") in lines[0] and "DIFFUSION_DATA_ROOT" in lines[0]
    assert not out.exists()


def test_diffusion_reads_the_same_job_spec_keys_as_ops():
    """diffusion/ may not import ops/, so it keeps its own list of a spec's top-level keys."""
    from diffusion.config import JOB_SPEC_KEYS
    from ops.spec import JobSpec

    assert JOB_SPEC_KEYS == set(JobSpec.model_fields)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            b"name: x\nrun: {train: {lr: 1e-3}\n",
            "job.yaml:3:1: not valid YAML: expected ',' or '}', but got '<stream end>' "
            "while parsing a flow mapping begun at 2:6",
        ),
        (b"run:\n\ttrain: {}\n", "job.yaml:2:1: not valid YAML: found character '\\t' that cannot start any token"),
        (b"train: {epochs: 1}\ntrain: {lr: 1}\n", 'job.yaml:2:1: not valid YAML: found duplicate key "train"'),
        (b"description: \xff\n", "job.yaml:1: byte 0xff is not UTF-8; save the file as UTF-8"),
        (b"a: &a [1, 1]\nb: [*a, *a]\n", "job.yaml:1:4: YAML anchors and aliases (&name, *name) are not allowed"),
    ],
)
def test_yaml_that_does_not_parse_is_one_line_with_its_place_and_writes_nothing(tmp_path, capsys, text, expected):
    from diffusion.__main__ import main

    (tmp_path / "job.yaml").write_bytes(text)
    out = tmp_path / "out"
    assert main(["train", str(tmp_path / "job.yaml"), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path}/{expected}"), lines
    assert not out.exists()


def test_a_set_value_that_does_not_parse_names_the_item(tmp_path):
    with pytest.raises(ConfigError) as error:
        parse_override("model.channel_mults=[1,2")
    assert str(error.value) == (
        "--set 'model.channel_mults=[1,2' (column 5): not valid YAML: expected ',' or ']', "
        "but got '<stream end>' while parsing a flow sequence begun at column 1"
    )


def test_a_broken_ops_yaml_is_one_line_with_its_place(tmp_path):
    from ops.errors import OpsError
    from ops.settings import Project

    (tmp_path / "ops.yaml").write_text("runs_dir: runs\ngithub_repo: [a\n")
    with pytest.raises(OpsError) as error:
        Project(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / 'ops.yaml'}:3:1: not valid YAML: expected ',' or ']', but got "
        "'<stream end>' while parsing a flow sequence begun at 2:14"
    )
    (tmp_path / "ops.yaml").write_text("gcp_region: &r europe-west4\ngcs_bucket: *r\n")
    with pytest.raises(OpsError, match=r"ops.yaml:1:13: YAML anchors and aliases \(&name, \*name\) are not allowed"):
        Project(tmp_path)
    (tmp_path / "ops.yaml").unlink()
    (tmp_path / "configs/jobs").mkdir(parents=True)  # the project is found by its specs
    (tmp_path / "ops.yaml").mkdir()
    with pytest.raises(OpsError, match="ops.yaml: not a file"):
        Project(tmp_path)
    (tmp_path / "ops.yaml").rmdir()
    for value in (".nan", ".inf", "1e308"):
        (tmp_path / "ops.yaml").write_text(f"cancel_grace_seconds: {value}\n")
        with pytest.raises(OpsError, match="cancel_grace_seconds: .* is not allowed: must be between 0 and 86400"):
            Project(tmp_path)

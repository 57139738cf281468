import json

from typer.testing import CliRunner

from ops.cli import app
from tests.conftest import REPO


def test_config_validate_reports_every_spec(monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["config", "validate", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {row["spec"] for row in rows} >= {"configs/jobs/mnist-quick.yaml", "configs/jobs/mnist-training.yaml"}
    assert all(row["valid"] for row in rows)


def test_config_validate_names_the_bad_key_and_fails(tmp_path, monkeypatch):
    (tmp_path / "configs/jobs").mkdir(parents=True)
    (tmp_path / "configs/jobs/bad.yaml").write_text("name: bad\nrun:\n  train:\n    epocs: 3\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["config", "validate", "bad"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error configs/jobs/bad.yaml: run.train.epocs: unknown key; did you mean 'run.train.epochs'?"
    )


def test_config_list_json_has_name_task_and_description(monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["config", "list", "--json"])
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["mnist-sampling"]["task"] == "sample"
    assert rows["mnist-quick"]["description"].startswith("CPU-sized pixel DDPM")

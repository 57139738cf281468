"""A project in a subfolder of its repository behaves as one at the root: its own records stay out
of diff.patch (no run after the first is dirty), and a rerun or a SLURM job imports the code of its
snapshot (RUN_DIR/code/SUB), not the installed working tree.

The project vendors the diffusion package, whose __init__ writes where it was imported from into
$IMPORT_MARK: that is how the test sees which copy a run used."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.ops_project import TINY_SPEC, git, ops, ops_json

MARKER = """
import os as _os, sys as _sys
if _os.environ.get("IMPORT_MARK"):
    with open(_os.environ["IMPORT_MARK"], "a") as _mark:
        _mark.write(__file__ + " " + " ".join(_sys.argv) + "\\n")
"""


@pytest.fixture
def nested(tmp_path, mnist_root, monkeypatch) -> Path:
    """repo/ with the project in repo/sub/; returns the project folder."""
    repo = tmp_path / "repo"
    project = repo / "sub"
    (project / "configs/jobs").mkdir(parents=True)
    (project / "configs/jobs/tiny.yaml").write_text(TINY_SPEC)
    shutil.copytree(REPO / "diffusion", project / "diffusion", ignore=shutil.ignore_patterns("__pycache__"))
    init = project / "diffusion/__init__.py"
    init.write_text(init.read_text() + MARKER)
    (repo / "README.md").write_text("# a repository with a project inside\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "Test")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(mnist_root.resolve()))
    monkeypatch.setenv("IMPORT_MARK", str(tmp_path / "imports.txt"))
    return project


def imported_by(project: Path, run_dir: str) -> set[str]:
    """Where `diffusion` came from, in the processes that ran this run dir."""
    lines = (project.parent.parent / "imports.txt").read_text().splitlines()
    return {line.split(" ", 1)[0] for line in lines if run_dir in line}


def test_a_project_in_a_subfolder_keeps_its_records_out_of_the_patch_and_reruns_its_snapshot(nested):
    project = nested
    first = ops_json(project, "submit", "tiny", "--set", "run.train.max_steps=1")["runs"][0]
    assert ops(project, "wait", first["ops_id"], "--interval", "0.3").returncode == 0
    assert (project / "EXPERIMENT_LOG.md").is_file() and list(project.glob("docs/blog/posts/*.md"))
    second = ops_json(project, "submit", "tiny", "--set", "run.train.max_steps=1")["runs"][0]
    provenance = json.loads((Path(second["run_dir"]) / "provenance.json").read_text())
    assert provenance["git"]["dirty"] is False and provenance["git"]["project_dir"] == "sub"
    assert (Path(second["run_dir"]) / "diff.patch").read_bytes() == b""
    assert ops(project, "wait", second["ops_id"], "--interval", "0.3").returncode == 0

    # A change after the first run: the rerun must run the first run's code, from its snapshot.
    train = project / "diffusion/train.py"
    train.write_text(train.read_text().replace("def train_loop(", "def train_loop_renamed("))
    rerun = ops_json(project, "rerun", first["ops_id"])
    assert ops(project, "wait", rerun["ops_id"], "--interval", "0.3").returncode == 0
    code = Path(rerun["run_dir"]) / "code/sub"
    assert imported_by(project, rerun["run_dir"]) == {str(code / "diffusion/__init__.py")}
    assert "def train_loop(" in (code / "diffusion/train.py").read_text()


def test_a_slurm_job_of_a_project_in_a_subfolder_imports_its_snapshot(nested, slurm_cluster):
    project = nested
    run = ops_json(
        project,
        "submit",
        "tiny",
        "--engine",
        "slurm",
        "--set",
        "run.train.max_steps=1",
        "--set",
        "resources.slurm.cpus_per_task=1",
    )["runs"][0]
    result = ops(project, "wait", run["ops_id"], "--interval", "1", timeout=600)
    assert result.returncode == 0, ops(project, "monitor", run["ops_id"], "--logs").stdout
    assert imported_by(project, run["run_dir"]) == {str(Path(run["run_dir"]) / "code/sub/diffusion/__init__.py")}
    assert os.path.isdir(Path(run["run_dir"]) / "code/sub/configs")


def test_records_kept_outside_the_project_folder_stay_out_of_the_patch(nested):
    project = nested
    (project / "ops.yaml").write_text("experiment_log: ../EXPERIMENT_LOG.md\njournal_dir: ../docs\n")
    from tests.ops_project import git

    git(project.parent, "add", "-A")
    git(project.parent, "commit", "-qm", "records at the repository's root")
    first = ops_json(project, "submit", "tiny", "--set", "run.train.max_steps=1")["runs"][0]
    assert ops(project, "wait", first["ops_id"], "--interval", "0.3").returncode == 0
    assert (project.parent / "EXPERIMENT_LOG.md").is_file() and list(project.parent.glob("docs/blog/posts/*.md"))
    second = ops_json(project, "submit", "tiny", "--set", "run.train.max_steps=1")["runs"][0]
    provenance = json.loads((Path(second["run_dir"]) / "provenance.json").read_text())
    assert provenance["git"]["dirty"] is False and provenance["git"]["skipped_untracked"] == []
    assert ops(project, "wait", second["ops_id"], "--interval", "0.3").returncode == 0

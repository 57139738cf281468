"""`ops submit shakespeare-training`, the users' first named command, end to end on the local engine
with the real spec (shrunk by overrides to seconds of CPU): the run, its scores, its journal post."""

import json
import shutil
from pathlib import Path

from tests.ops_project import git, make_project, ops, ops_json

REPO = Path(__file__).resolve().parents[1]
SHRINK = [
    "run.model.n_layer=1",
    "run.model.n_head=2",
    "run.model.n_embd=32",
    "run.data.block_size=32",
    "run.data.subset=64",
    "run.train.batch_size=16",
    "run.train.max_steps=4",
    "run.train.log_every=2",
    "run.train.sample_every_epochs=null",
    "run.sample.num_inference_steps=4",
    "run.sample.num_samples=2",
    "run.device=cpu",
]


def test_ops_submit_shakespeare_training_runs_scores_and_journals(tmp_path, shakespeare_root, monkeypatch):
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(Path(shakespeare_root).resolve()))  # ops runs in the project
    root = make_project(tmp_path / "project")
    shutil.copy(REPO / "configs/jobs/shakespeare-training.yaml", root / "configs/jobs")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "the real shakespeare spec")
    args = [item for override in SHRINK for item in ("--set", override)]
    [run] = ops_json(root, "submit", "shakespeare-training", *args)["runs"]
    waited = ops(root, "wait", run["ops_id"], "--interval", "0.3")
    assert waited.returncode == 0, waited.stdout + waited.stderr

    run_dir = Path(run["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 4
    assert 1 < summary["scores"]["val_bits_per_char"] < 12  # masked diffusion's bound, per character
    samples = (run_dir / "samples/final.txt").read_text()
    assert samples.count(" sample ") == 2

    # The journal post shows the samples as text, and the metrics table has the text scores.
    post = Path(ops_json(root, "monitor", run["ops_id"])["journal_post"])
    text = post.read_text()
    assert samples.splitlines()[1][:20] in text
    assert "| val_bits_per_char |" in text and "| distinct_2 |" in text
    log = (root / "EXPERIMENT_LOG.md").read_text()
    assert "val_bits_per_char" in log

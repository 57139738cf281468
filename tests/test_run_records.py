"""The files a run writes survive crashes, and every reader survives a torn or missing one.

- a torn last line of metrics.jsonl: resume drops it and goes on; ops monitor, the journal's loss
  figure and progress read the complete lines;
- every JSON file is replaced atomically, and a failed write (a full disk) leaves the old file
  and no temp file; a full disk during training ends with one line naming the last good checkpoint;
- a sample or eval task run inside a training run's dir writes only its own outputs and its own
  record (tasks/), never the run's summary.json;
- the fields of metrics.jsonl and summary.json are defined once (diffusion.records): the trainer
  writes through that definition and ops reads through it (the experiment log's stop reason).
"""

import errno
import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import torch

from diffusion.records import MetricsRecord, Summary, atomic_write, last_jsonl, read_json, read_jsonl, write_json
from diffusion.train import train
from tests.conftest import run_diffusion, write_config

TORN = '{"step": 3, "epoch": 1.5, "lo'


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def probe(tiny_config, tmp_path) -> Path:
    """A finished two-step run, checkpointed at its end."""
    tiny_config.train.max_steps = 2
    tiny_config.train.sample_every_epochs = None
    run = tmp_path / "probe"
    assert train(tiny_config, run) == 0
    return run


def test_a_torn_last_metrics_line_is_dropped_and_the_resume_goes_on(probe):
    with (probe / "metrics.jsonl").open("a") as f:
        f.write(TORN)
    result = run_diffusion("train", probe, "--set", "train.max_steps=4")
    assert result.returncode == 0, result.stderr
    lines = (probe / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert json.loads((probe / "summary.json").read_text())["step"] == 4


def test_readers_take_the_complete_lines_of_a_torn_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == [] and last_jsonl(path) is None  # not written yet
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 2001)]
    path.write_text("\n".join(lines) + "\n" + TORN)
    assert [record["step"] for record in read_jsonl(path)] == list(range(1, 2001))
    assert last_jsonl(path, chunk=64)["step"] == 2000  # read from the end, over many chunks
    path.write_text(TORN)
    assert read_jsonl(path) == [] and last_jsonl(path) is None
    assert MetricsRecord.from_json({"step": 5, "embedding_norm": 1.5}).extras == {"embedding_norm": 1.5}


def test_a_torn_or_missing_json_record_reads_as_not_written(tmp_path):
    assert read_json(tmp_path / "summary.json") is None
    (tmp_path / "summary.json").write_text('{"status": "compl')
    assert read_json(tmp_path / "summary.json") is None
    (tmp_path / "summary.json").write_bytes(b"\xff\xfe")
    assert read_json(tmp_path / "summary.json") is None


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"status": "completed"})
    before = digest(path)
    # The temp file's name is known; pointing it at /dev/full makes the kernel answer ENOSPC.
    tmp = tmp_path / f".summary.json.{os.getpid()}.tmp"
    tmp.symlink_to("/dev/full")
    with pytest.raises(OSError) as error:
        atomic_write(path, b"x" * 100_000)
    assert error.value.errno == errno.ENOSPC
    assert digest(path) == before
    assert not tmp.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_full_disk_during_training_ends_with_one_line_naming_the_last_good_checkpoint(tiny_config, tmp_path, capfd):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "samples/epoch_0002.png").symlink_to("/dev/full")  # the grid after step 8 hits a full disk
    tiny_config.train.max_steps = 12
    tiny_config.train.checkpoint_every_steps = 2
    tiny_config.train.sample_every_epochs = 2  # 4 steps per epoch
    assert train(tiny_config, run) == 1
    last = f"the last good checkpoint is {run}/checkpoints/step_00000006.pt (step 6)"
    errors = capfd.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("failed: disk full (") and errors[0].endswith(last), errors
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"].endswith(last)


def test_a_failed_sample_task_in_a_training_run_leaves_its_summary_alone(probe):
    summary = digest(probe / "summary.json")
    done = run_diffusion("sample", probe, "--set", "sample.num_samples=2")
    assert done.returncode == 0, done.stderr
    [record] = (probe / "tasks").glob("sample-*.json")
    assert json.loads(record.read_text())["status"] == "completed"
    assert digest(probe / "summary.json") == summary

    latest = probe / "checkpoints/latest.pt"
    intact = latest.read_bytes()
    latest.write_bytes(intact[:1000])  # a torn checkpoint: bad input, one line, before any work
    torn = run_diffusion("sample", probe, "--set", "sample.num_samples=2")
    assert torn.returncode == 2 and len(torn.stderr.strip().splitlines()) == 1
    assert "sample.checkpoint: " in torn.stderr and "not a checkpoint of a run" in torn.stderr
    checkpoint = torch.load(io.BytesIO(intact), weights_only=False)
    checkpoint["ema"].popitem()  # weights that do not fit the network fail the task at run time
    torch.save(checkpoint, latest)
    failed = run_diffusion("sample", probe, "--set", "sample.num_samples=2")
    assert failed.returncode == 1
    assert digest(probe / "summary.json") == summary
    records = [json.loads(path.read_text()) for path in sorted((probe / "tasks").glob("sample-*.json"))]
    assert sorted(record["status"] for record in records) == ["completed", "failed"]
    assert any("error" in record for record in records)


def test_an_eval_task_into_its_own_run_dir_writes_its_summary_there(probe, tmp_path, tiny_config):
    spec = tiny_config.model_copy(deep=True)
    spec.task = "eval"
    spec.sample.checkpoint = str(probe)
    spec.eval.num_samples, spec.eval.classifier_subset, spec.eval.classifier_epochs = 8, 256, 1
    result = run_diffusion(write_config(spec, tmp_path / "eval.yaml"), "--out", tmp_path / "scored")
    assert result.returncode == 0, result.stderr
    summary = Summary.from_json(read_json(tmp_path / "scored/summary.json"))
    assert summary.status == "completed" and summary.step == 2 and "fid" in summary.scores
    assert summary.result["checkpoint"].startswith(str(probe))
    assert not (probe / "tasks").exists()


def test_the_experiment_log_shows_the_reason_the_trainer_gives(probe):
    from ops.explog import results_text
    from ops.rundir import read_summary

    summary = read_summary(probe)
    assert summary.reason == "finished all steps"
    assert "- stopped: finished all steps" in results_text("SUCCEEDED", summary, 60.0)


def test_what_the_trainer_writes_is_what_the_records_define(probe):
    """Every key of summary.json and metrics.jsonl is a field of its record (no silent extras)."""
    from dataclasses import fields

    summary_keys = set(json.loads((probe / "summary.json").read_text()))
    assert summary_keys <= {field.name for field in fields(Summary)}
    metric_fields = {field.name for field in fields(MetricsRecord)} - {"extras"}
    for line in read_jsonl(probe / "metrics.jsonl"):
        assert set(line) <= metric_fields, set(line) - metric_fields


def test_ops_monitor_reads_progress_past_a_torn_line(probe):
    from ops.monitor import progress
    from ops.registry import Run

    with (probe / "metrics.jsonl").open("a") as f:
        f.write(TORN)
    run = Run(ops_id="probe-1", name="probe", engine="local", run_dir=str(probe), state="RUNNING", started_at=1.0)
    shown = progress(run, {"run": {"train": {"epochs": 1}}})
    assert shown["step"] == 2 and shown["total_steps"] == 2 and shown["percent"] == 100.0


def test_a_log_tail_that_ends_in_a_traceback_shows_all_of_it():
    from ops.monitor import tail

    log = "\n".join(["step 1", "Traceback (most recent call last):", *[f'  File "f{i}.py"' for i in range(40)], "E: x"])
    shown = tail(log, 30).splitlines()
    assert shown[0] == "Traceback (most recent call last):" and shown[-1] == "E: x" and len(shown) == 42
    assert tail("a\nb\nc\n", 2) == "b\nc"  # no traceback: the last lines only

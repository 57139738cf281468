"""eval.after_train: a finished training run scores itself into summary.json, within its own
budget, and a stopped evaluation continues to the same samples."""

import json
import os

import pytest

import diffusion.tasks
from diffusion.config import ConfigError, load_run_config
from tests.conftest import REPO, run_diffusion, write_config


@pytest.fixture
def evaluated_config(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_CACHE_DIR", str(tmp_path / "cache"))
    tiny_config.train.max_steps = 3
    tiny_config.eval.after_train = True
    tiny_config.eval.num_samples = 24
    tiny_config.eval.classifier_subset = 1000
    tiny_config.eval.classifier_epochs = 1
    tiny_config.eval.sampler, tiny_config.eval.num_inference_steps = "dpmsolver++", 3
    tiny_config.sample.batch_size = 10  # three chunks: 10, 10, 4
    return tiny_config


def test_training_ends_with_its_evaluation_in_the_summary(evaluated_config, tmp_path):
    config = write_config(evaluated_config, tmp_path / "config.yaml")
    result = run_diffusion("train", config, "--out", tmp_path / "run", env={**os.environ})
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    evaluation, scores = summary["evaluation"], summary["scores"]
    assert evaluation["step"] == summary["step"] == 3 and evaluation["sampler"] == "dpmsolver++"
    assert evaluation["num_inference_steps"] == 3 and evaluation["num_samples"] == 24 and not evaluation["cut"]
    assert scores["fid"] == evaluation["scores"]["fid"] and scores["eval_num_samples"] == 24
    assert scores["fid_over_floor"] == pytest.approx(scores["fid"] / evaluation["real_floor"]["fid"])
    assert scores["classes_present"] == sum(count > 0 for count in evaluation["scores"]["class_counts"])
    assert 0 <= scores["confident_share"] <= 1
    assert (tmp_path / "run/eval/dpmsolver++3-seed0.json").is_file()
    assert not (tmp_path / "run/eval/partial").exists() or not any((tmp_path / "run/eval/partial").iterdir())
    assert "evaluation after training: 24 samples, dpmsolver++-3" in result.stdout


def test_a_stopped_evaluation_continues_to_the_same_samples(evaluated_config, tmp_path, monkeypatch):
    from diffusion.rundir import RunDir
    from diffusion.train import train

    def evaluate(name: str) -> int:  # in a RunDir whose lock goes as the process that held it would
        run = RunDir(tmp_path / name)
        try:
            return diffusion.tasks.evaluate_after_training(evaluated_config, run)
        finally:
            run.unlock()

    for name in ("whole", "stopped"):
        assert train(evaluated_config, tmp_path / name) == 0
    assert evaluate("whole") == 0

    real_generate, calls = diffusion.tasks.generate, []

    def crashing_generate(*args, **kwargs):  # the process dies while drawing the third chunk
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(diffusion.tasks, "generate", crashing_generate)
    with pytest.raises(KeyboardInterrupt):
        evaluate("stopped")
    assert len(list((tmp_path / "stopped/eval/partial").rglob("chunk_*.pt"))) == 2
    monkeypatch.setattr(diffusion.tasks, "generate", real_generate)
    assert evaluate("stopped") == 0

    whole = json.loads((tmp_path / "whole/summary.json").read_text())["evaluation"]
    stopped = json.loads((tmp_path / "stopped/summary.json").read_text())["evaluation"]
    assert stopped["scores"] == whole["scores"]  # the same 24 samples, scored the same
    # Evaluated already: a second call changes nothing.
    before = (tmp_path / "stopped/summary.json").read_bytes()
    assert evaluate("stopped") == 0
    assert (tmp_path / "stopped/summary.json").read_bytes() == before


def test_its_own_budget_scores_fewer_samples_and_says_so(evaluated_config, tmp_path, capsys, monkeypatch):
    """The first chunk is a small probe: a budget too short for one whole batch draws no batch."""
    from diffusion.rundir import RunDir
    from diffusion.train import train

    monkeypatch.setattr(diffusion.tasks, "PROBE_SAMPLES", 4)
    evaluated_config.sample.batch_size = 24  # chunks of 4 (the probe) and 20
    evaluated_config.eval.max_minutes = 1e-6  # the probe always; no time for the batch after it
    evaluated_config.expect = ["scores.fid_over_floor < 1000", "scores.eval_num_samples >= 1"]
    assert train(evaluated_config, tmp_path / "run") == 0
    assert diffusion.tasks.evaluate_after_training(evaluated_config, RunDir(tmp_path / "run")) == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    evaluation = summary["evaluation"]
    assert evaluation["cut"] and evaluation["num_samples"] == 4 and evaluation["planned_samples"] == 24
    # FID at 4 samples is no measurement of what 24 would say: not judged, and said why.
    fid, count = summary["expectations"]
    assert fid["verdict"] == "not measured" and fid["measured"] > 0 and "cut to 4 of 24 samples" in fid["why"]
    assert count["verdict"] == "met" and summary["verdict"] == "not measured"
    assert "eval.max_minutes 1e-06: scoring 4 of 24 samples (the next batch of 20 would take" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["eval.after_train=true", "eval.sampler=euler"], "eval.sampler: 'euler' is not allowed with method.name"),
        (["eval.after_train=true", "eval.num_inference_steps=5000"], "eval.num_inference_steps: 5000 is not allowed"),
    ],
)
def test_its_settings_are_checked_with_the_config(overrides, line):
    with pytest.raises(ConfigError, match=line):
        load_run_config(REPO / "configs/jobs/mnist-quick.yaml", overrides)


def test_switching_it_off_leaves_the_specs_evaluation_settings_standing():
    """A spec sizes its evaluation (max_minutes, sampler); a run that switches it off need not unset them."""
    config = load_run_config(REPO / "configs/jobs/mnist-quick.yaml", ["eval.after_train=false"])
    assert not config.eval.after_train and config.eval.max_minutes is not None


def test_an_evaluation_that_fails_leaves_the_training_result_standing(evaluated_config, tmp_path, monkeypatch):
    """The test split missing at the end (or any other failure): the summary stays completed, with
    the error beside it and the checks of what it would have measured `not measured`."""
    from diffusion.rundir import RunDir
    from diffusion.train import train

    evaluated_config.expect = ["scores.fid_over_floor < 100", "step == 3"]
    assert train(evaluated_config, tmp_path / "run") == 0

    def missing(*args, **kwargs):
        raise FileNotFoundError("t10k-images-idx3-ubyte")

    monkeypatch.setattr(diffusion.tasks, "load_images", missing)
    run = RunDir(tmp_path / "run")
    try:
        assert diffusion.tasks.evaluate_after_training(evaluated_config, run) == 0
    finally:
        run.unlock()
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 3 and summary["final_metrics"]["loss"] > 0
    assert summary["evaluation"] == {"step": 3, "error": "FileNotFoundError('t10k-images-idx3-ubyte')"}
    assert [check["verdict"] for check in summary["expectations"]] == ["not measured", "met"]
    assert summary["verdict"] == "not measured"


def test_a_preemption_during_the_evaluation_is_resumable_like_training(evaluated_config, tmp_path, monkeypatch):
    """SIGUSR1 while drawing: the sampler stops at its next step (the chunk in hand is dropped, the
    chunks before it kept), the summary says preempted (exit 75, so that engines requeue it);
    resumed, training is done and the evaluation continues to the same samples."""
    import os
    import signal

    from diffusion.rundir import RunDir
    from diffusion.runtime import EXIT_PREEMPTED
    from diffusion.train import train

    def evaluate() -> int:
        run = RunDir(tmp_path / "run")
        try:
            return diffusion.tasks.evaluate_after_training(evaluated_config, run)
        finally:
            run.unlock()

    assert train(evaluated_config, tmp_path / "run") == 0
    real_generate, calls = diffusion.tasks.generate, []

    def signalled_generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # the scheduler's notice, mid-chunk
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(diffusion.tasks, "generate", signalled_generate)
    assert evaluate() == EXIT_PREEMPTED
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "preempted" and summary["signal"] == "SIGUSR1" and summary["exit_code"] == 75
    # Stopped before the chunk's first sampler step (a chunk may outlast the grace period): the first kept.
    assert len(list((tmp_path / "run/eval/partial").rglob("chunk_*.pt"))) == 1

    monkeypatch.setattr(diffusion.tasks, "generate", real_generate)
    assert train(evaluated_config, tmp_path / "run") == 0  # the resume: all steps were done
    assert evaluate() == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "completed" and summary["evaluation"]["num_samples"] == 24

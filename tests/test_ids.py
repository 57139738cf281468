"""Readable ops ids: the spec name plus what the run changes, safe as a Vertex label, still unique."""

import re

import pytest

from ops.ids import MAX_LENGTH, number, readable_id

LABEL_VALUE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # a Vertex label value


@pytest.mark.parametrize(
    ("value", "text"),
    [(1e-4, "1e-4"), (3e-4, "3e-4"), (0.001, "1e-3"), (0.5, "0p5"), (0.25, "0p25"), (50, "50"), (2.0, "2"),
     (200000, "2e5"), (123456, "123456"), (1.5e-6, "1p5e-6"), (0.9999, "0p9999"), (-1, "-1")],
)  # fmt: skip
def test_numbers_take_their_shorter_form_without_dots(value, text):
    assert number(value) == text


def test_the_issue_example_and_the_kinds_of_value():
    changes = [("run.train.lr", 1e-3, 1e-4), ("run.train.epochs", 20, 50)]
    assert readable_id("mnist-training", changes, tail="3f2a") == "mnist-training-lr1e-4-ep50-3f2a"
    changes = [
        ("run.data.dataset", "eight_gaussians", "two_moons"),  # a value that names itself
        ("run.train.compile", False, True),
        ("run.train.compile_fallback", True, False),
        ("run.model.channel_mults", [1, 2], [1, 2, 2]),
        ("run.sample.checkpoint", None, "runs/x"),
        ("engine", "local", "slurm"),  # where it runs: not in the id
        ("resources.vertex.machine_type", "n1-standard-4", "n1-standard-8"),
    ]
    # The checkpoint no longer fits in 63 characters: left to job.json, the ones before it kept.
    assert readable_id("t", changes, tail="0000") == "t-two-moons-channelmults1x2x2-compile-nocompilefallback-0000"
    changes = [("run.method.coupling", "independent", "minibatch_ot"), ("run.method.coupling_group_size", None, 64)]
    assert readable_id("flow-toy", changes, tail="0000") == "flow-toy-minibatch-ot-otgroup64-0000"


def test_what_is_trained_goes_first_and_eval_settings_say_so():
    changes = [  # sorted by key, as job.json has them
        ("run.eval.num_samples", 1000, 2),
        ("run.eval.val_blocks", 64, 2),
        ("run.expect", [], ["step > 1"]),
        ("run.sample.num_inference_steps", 256, 8),
        ("run.sample.num_samples", 16, 2),
        ("run.train.log_every", 100, 1),
        ("run.train.max_steps", None, 5),
        ("run.train.trackers", None, []),
    ]
    # How a run reports (log_every, trackers, its checks) is not what it computes: not in the id.
    expected = "shakespeare-training-steps5-nfe8-n2-evaln2-evalvalblocks2-79fe"
    assert readable_id("shakespeare-training", changes, tail="79fe") == expected


def test_ids_are_capped_label_values_and_never_hold_a_secret():
    changes = [(f"run.train.setting_{index}", 0, index * 1000.5) for index in range(30)]
    changes.append(("resources.vertex.env.WANDB_API_KEY", None, "abc123"))
    changes.append(("run.sample.checkpoint", None, "ghp_" + "a" * 36))  # looks like a GitHub token
    identifier = readable_id("a-rather-long-spec-name-of-forty-characters", changes)
    assert len(identifier) <= MAX_LENGTH and LABEL_VALUE.fullmatch(identifier), identifier
    assert "abc123" not in identifier and "ghp" not in identifier
    assert identifier.startswith("a-rather-long-spec-name-of-forty-characters-setting00-")
    # The prose of a spec is no value of the run.
    assert readable_id("x", [("hypothesis", "", "The loss goes down.")], tail="beef") == "x-beef"

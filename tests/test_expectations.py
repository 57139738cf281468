"""`expect:` lines: parsed, checked against the metrics a run of that data writes, judged."""

from pathlib import Path

import pytest

from diffusion.expectations import Expectation, judge, metrics, problems

REPO = Path(__file__).resolve().parents[1]


def test_judged_met_missed_and_not_measured_with_the_measured_values():
    summary = {"step": 40, "collapsed": False, "scores": {"confident_share": 0.81, "overfit": {"reproduced": True}}}
    lines = ["scores.confident_share >= 0.7", "step > 100", "scores.fid < 3", "collapsed == false",
             "scores.overfit.reproduced == true"]  # fmt: skip
    checks, verdict = judge(lines, summary)
    assert [(check["measured"], check["verdict"]) for check in checks] == [
        (0.81, "met"), (40, "missed"), (None, "not measured"), (False, "met"), (True, "met")
    ]  # fmt: skip
    assert verdict == "missed"
    assert judge(["scores.fid < 3", "step > 1"], summary)[1] == "not measured"
    assert judge(["step > 1"], summary)[1] == "met"
    assert judge([], summary) == ([], None)
    assert judge(["scores.confident_share >= 0.7"], {"scores": {"confident_share": "0.9"}})[0][0]["verdict"] == (
        "not measured"  # a damaged value is no measurement
    )
    assert checks[2]["why"] == "summary.json has no scores.fid" and "why" not in checks[0]
    # Cancelled (preempted at a checkpoint) or failed: its partial figures are not judged.
    cancelled, verdict = judge(["final_metrics.loss < 0.5", "step > 100"], summary | {"status": "preempted"})
    assert verdict == "not measured" and {check["why"] for check in cancelled} == {"the run ended preempted at step 40"}
    assert judge(["step > 1"], {})[0][0]["why"] == "the run wrote no summary.json"


def test_a_cut_evaluation_leaves_its_figures_unjudged_with_why():
    """eval.max_minutes scored 10 of 24 samples: FID and its floor both grow at small N and their
    ratio drifts towards 1, so an `fid_over_floor < 3` check would pass on noise; the class figures
    depend on the chunks drawn. What training measured is judged as ever."""
    scores = {"fid": 40.0, "real_floor_fid": 30.0, "fid_over_floor": 1.33, "confident_share": 0.9}
    lines = ["scores.fid_over_floor < 3", "scores.fid < 50", "scores.confident_share >= 0.7", "step >= 10"]
    cut = {"step": 40, "scores": scores, "evaluation": {"cut": True, "num_samples": 10, "planned_samples": 24}}
    checks, verdict = judge(lines, cut)
    assert [(check["measured"], check["verdict"]) for check in checks] == [
        (1.33, "not measured"), (40.0, "not measured"), (0.9, "not measured"), (40, "met")
    ]  # fmt: skip
    assert checks[0]["why"].startswith("the evaluation was cut to 10 of 24 samples by eval.max_minutes")
    assert "why" not in checks[3] and verdict == "not measured"
    whole = {"step": 40, "scores": scores, "evaluation": {"cut": False, "num_samples": 24, "planned_samples": 24}}
    assert judge(lines, whole)[1] == "met" and all("why" not in check for check in judge(lines, whole)[0])


def test_every_report_of_a_check_says_why_it_was_not_judged():
    from ops.explog import results_text
    from ops.github import check_row
    from ops.journal import measured_text
    from ops.rundir import Summary
    from ops.views import check_text

    summary = {
        "scores": {"fid_over_floor": 1.33},
        "evaluation": {"cut": True, "num_samples": 10, "planned_samples": 24},
    }
    checks, verdict = judge(["scores.fid_over_floor < 3"], summary)
    why = "the evaluation was cut to 10 of 24 samples by eval.max_minutes"
    for text in (
        check_text(checks[0]),  # ops monitor, ops list
        measured_text(checks[0]),  # the journal post
        check_row(checks[0]),  # the GitHub result comment
        results_text("SUCCEEDED", Summary(), None, {"verdict": verdict, "checks": checks}),  # EXPERIMENT_LOG.md
    ):
        assert "1.33" in text and "not measured" in text and why in text, text


def test_top_level_checks_are_named_where_they_were_written():
    """`ops config set NAME expect=...` and a spec's own lines: errors say expect / expect[i], never run.expect."""
    from ruamel.yaml import YAML

    from diffusion.config import ConfigError
    from ops.spec import validate_spec

    raw = YAML(typ="safe").load((REPO / "configs/jobs/mnist-quick.yaml").read_text())
    for value, line in [
        ("scores.fid_over_floor < 3", "spec.yaml: expect: 'scores.fid_over_floor < 3' is not allowed: must be a valid list"),
        ([1], "spec.yaml: expect[0]: 1 is not allowed: must be a valid string"),
        (["step > 1", "scores.fid_ovr < 3"], "spec.yaml: expect[1]: 'scores.fid_ovr' is not a metric; did you mean"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as error:
            validate_spec(raw | {"expect": value}, "spec.yaml")
        assert str(error.value).startswith(line), str(error.value)


@pytest.mark.parametrize(
    ("line", "kind", "problem"),
    [
        ("scores.fid_over_flor < 3", "image", "'scores.fid_over_flor' is not a metric; did you mean 'scores.fid_over_floor'?"),
        ("scores.energy_distance < 1", "image", "'scores.energy_distance' is not a metric (not measured for this data)"),
        ("collapsed == false", "image", "'collapsed' is not a metric (not measured for this data)"),
        ("scores.fid lt 3", "image", "'scores.fid lt 3' is not allowed: must be METRIC OP VALUE"),
        ("scores.fid < three", "image", "'scores.fid < three' is not allowed"),
        ("scores.fid < nan", "image", "'scores.fid < nan' is not allowed: VALUE must be a finite number"),
        ("scores.fid < 1e400", "image", "VALUE must be a finite number"),
        ("scores.classes_present == true", "image", "scores.classes_present is compared with a number"),
        ("collapsed == 1", "text", "collapsed is compared with true or false"),
        ("scores.confident_share >= 7", "image", "scores.confident_share is a share, in [0, 1]"),
        ("scores.classes_present == 10.5", "image", "scores.classes_present is a count, a whole number"),
        ("step  >  0", "image", "'step > 0' is given twice (expect[0] too)"),
    ],
)  # fmt: skip
def test_a_line_that_cannot_be_checked_is_one_line_naming_it(line, kind, problem):
    [found] = problems(["step > 0", line], kind)
    assert found.startswith("expect[1]: ") and problem in found


def test_every_kind_has_its_own_names_and_values_parse():
    assert "scores.val_bits_per_char" in metrics("text") and "scores.val_bits_per_char" not in metrics("image")
    assert "scores.ratio_to_floor" in metrics("points") and "collapsed" in metrics("points")
    assert Expectation.parse("  scores.fid   <=  1e2 ").value == 100.0
    assert Expectation.parse("collapsed != TRUE").value is True

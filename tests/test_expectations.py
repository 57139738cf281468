"""`expect:` lines: parsed, checked against the metrics a run of that data writes, judged."""

import pytest

from diffusion.expectations import Expectation, judge, metrics, problems


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

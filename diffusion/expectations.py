"""Machine-checked expectations: a spec's `expect:` lines, each a metric of summary.json, a
comparison and a value, checked when the run ends.

    expect:
      - scores.confident_share >= 0.7
      - scores.classes_present == 10
      - scores.fid_over_floor < 3
      - final_metrics.loss < 0.05

A metric is a dotted path into summary.json: `scores.NAME` (what the run scored: images after
eval.after_train, text and 2-D points when training ends), `final_metrics.NAME` (the last logged
metrics), or a summary field (`step`, `train_seconds` ...). Which names exist depends on the data
(METRICS); an unknown one is refused when the config is validated, naming the nearest. When the
run ends each line is `met`, `missed` or `not measured` (the run never wrote that metric, or it
did not complete: failed, preempted or cancelled, whose partial figures are not the run's), with
the value measured and, when not measured, why; the verdict is `missed` if any line is, else `not
measured` if any line is, else `met`.

An evaluation that eval.max_minutes cut to fewer samples than planned is not the evaluation the
checks were written for: FID at a smaller N grows for the samples and the real floor alike (their
ratio drifts towards 1), and classes present, class entropy and accuracy depend on which classes
the drawn chunks asked for. A check on its figures (EVALUATION_METRICS) is then `not measured`,
its value shown with why.
"""

import difflib
import math
import operator
import re
from dataclasses import dataclass

COMPARISONS = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
LINE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*$")

SUMMARY_FIELDS = ("step", "epoch", "train_seconds", "num_parameters")
COLLAPSE_KINDS = ("points", "text")  # summary.json's `collapsed`: the samples degenerated (non-finite, repetitive)
FINAL_METRICS = ("loss", "lr", "grad_norm", "it_per_s", "examples_per_s", "val_bits_per_char")
# scores.NAME by data kind (diffusion/scores and tasks.headline_scores write them).
SCORES = {
    "image": (
        "fid",
        "real_floor_fid",
        "fid_over_floor",
        "confident_share",
        "class_entropy_bits",
        "classes_present",
        "class_accuracy",
        "inception_fid",
        "eval_num_samples",
        "latent_space.silhouette",  # an autoencoder's
        "latent_space.calinski_harabasz",
        "latent_space.pca_explained_variance",
        "overfit.final_loss",  # overfit mode (data.limit_per_class)
        "overfit.loss_near_zero",
        "overfit.reproduced",
    ),
    "points": ("energy_distance", "real_floor", "ratio_to_floor", "num_samples", "nonfinite"),
    "text": (
        "val_bits_per_char",
        "distinct_1",
        "distinct_2",
        "distinct_3",
        "longest_repeat_share",
        "top_token_share",
        "punctuation_share",
        "mean_word_length",
        "ar_perplexity",
    ),
}
VERDICTS = ("met", "missed", "not measured")
# An image evaluation's figures: judged only on an evaluation of the planned sample count.
EVALUATION_METRICS = {
    f"scores.{name}"
    for name in ("fid", "real_floor_fid", "fid_over_floor", "inception_fid", "confident_share", "class_entropy_bits",
                 "classes_present", "class_accuracy")
}  # fmt: skip
BOOLEAN_METRICS = {"collapsed", "scores.overfit.loss_near_zero", "scores.overfit.reproduced"}
# Shares lie in [0, 1] and counts are whole: a check outside that cannot be met (or cannot be missed).
SHARE_METRICS = {
    f"scores.{name}"
    for name in ("confident_share", "class_accuracy", "distinct_1", "distinct_2", "distinct_3", "longest_repeat_share",
                 "top_token_share", "punctuation_share", "nonfinite")
}  # fmt: skip
COUNT_METRICS = {"step", "scores.classes_present", "scores.num_samples", "scores.eval_num_samples"}


def metrics(kind: str) -> list[str]:
    """Every metric path an `expect:` line may name for data of `kind` (image, points, text)."""
    return [
        *SUMMARY_FIELDS,
        *(["collapsed"] if kind in COLLAPSE_KINDS else []),
        *(f"final_metrics.{name}" for name in FINAL_METRICS),
        *(f"scores.{name}" for name in SCORES[kind]),
    ]


@dataclass(frozen=True)
class Expectation:
    metric: str
    comparison: str
    value: float | bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Expectation":
        """`METRIC OP VALUE`; ValueError, saying the form, when `text` is not one."""
        match = LINE.match(text)
        value = match and match.group(3).lower()
        if not match or not (value in ("true", "false") or is_number(value)):
            raise ValueError(
                f"{text!r} is not allowed: must be METRIC OP VALUE, OP one of {' '.join(COMPARISONS)} and VALUE a "
                "number, true or false (e.g. scores.confident_share >= 0.7)"
            )
        parsed = value == "true" if value in ("true", "false") else float(value)
        if not isinstance(parsed, bool) and not math.isfinite(parsed):
            raise ValueError(f"{text!r} is not allowed: VALUE must be a finite number, true or false")
        return cls(match.group(1), match.group(2), parsed, " ".join(text.split()))


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def problems(lines: list[str], kind: str):
    """Why each of `lines` cannot be checked on data of `kind`: `expect[i]: ...`, one line each."""
    known, seen = metrics(kind), {}
    for index, line in enumerate(lines):
        try:
            expectation = Expectation.parse(line)
        except ValueError as exc:
            yield f"expect[{index}]: {exc}"
            continue
        if expectation.text in seen:
            yield f"expect[{index}]: {expectation.text!r} is given twice (expect[{seen[expectation.text]}] too)"
            continue
        seen[expectation.text] = index
        value = expectation.value
        if expectation.metric in SHARE_METRICS and not isinstance(value, bool) and not 0 <= value <= 1:
            yield f"expect[{index}]: {expectation.text!r} is not allowed: {expectation.metric} is a share, in [0, 1]"
            continue
        if expectation.metric in COUNT_METRICS and not isinstance(value, bool) and not float(value).is_integer():
            yield f"expect[{index}]: {expectation.text!r} is not allowed: {expectation.metric} is a count, a whole number"
            continue
        flag = expectation.metric in BOOLEAN_METRICS
        if expectation.metric in known and flag != isinstance(expectation.value, bool):
            wanted = "true or false" if flag else "a number"
            yield f"expect[{index}]: {expectation.text!r} is not allowed: {expectation.metric} is compared with {wanted}"
            continue
        if expectation.metric not in known:
            other = [
                name for name in (set(metrics("image")) | set(metrics("points")) | set(metrics("text"))) - set(known)
            ]
            close = difflib.get_close_matches(expectation.metric, known, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
            measured_elsewhere = " (not measured for this data)" if expectation.metric in other else ""
            yield f"expect[{index}]: {expectation.metric!r} is not a metric{measured_elsewhere}; {hint}"


def measured(summary: dict, metric: str):
    """The value at `metric`'s dotted path in summary.json, or None when it is not there."""
    value = summary
    for part in metric.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, int | float | bool) else None


def judge(lines: list[str], summary: dict) -> tuple[list[dict], str | None]:
    """([{expect, metric, comparison, value, measured, verdict[, why]}], overall verdict or None
    without lines). `why` says why a line is not measured: no such value, a run that did not
    complete, a cut evaluation."""
    results = []
    cut, ended = cut_evaluation(summary), unfinished(summary)
    for line in lines:
        try:
            expectation = Expectation.parse(line)
        except ValueError:  # checked when the config was validated: a line edited by hand since
            results.append(
                dict.fromkeys(("metric", "comparison", "value", "measured"))
                | {"expect": line, "verdict": "not measured"}
            )
            continue
        value = measured(summary, expectation.metric)
        if ended:  # a partial loss or step count says nothing of what the finished run would
            unjudged = ended
        elif value is None:
            unjudged = f"summary.json has no {expectation.metric}" if summary else "the run wrote no summary.json"
        else:
            unjudged = cut if expectation.metric in EVALUATION_METRICS else None
        if unjudged:
            verdict = "not measured"
        else:
            verdict = "met" if COMPARISONS[expectation.comparison](value, expectation.value) else "missed"
        results.append(
            {
                "expect": expectation.text,
                "metric": expectation.metric,
                "comparison": expectation.comparison,
                "value": expectation.value,
                "measured": value,
                "verdict": verdict,
            }
            | ({"why": unjudged} if unjudged else {})
        )
    if not results:
        return [], None
    verdicts = {result["verdict"] for result in results}
    return results, "missed" if "missed" in verdicts else "not measured" if "not measured" in verdicts else "met"


def unfinished(summary: dict) -> str | None:
    """Why a run's checks are not judged at all: it ended without completing (failed, or preempted
    or cancelled at a checkpoint), or None."""
    status = summary.get("status")
    if status in ("failed", "preempted"):
        return f"the run ended {status} at step {summary.get('step')}" if summary.get("step") else f"the run {status}"
    return None


def cut_evaluation(summary: dict) -> str | None:
    """Why the figures of `summary`'s evaluation are not judged (eval.max_minutes scored fewer
    samples than planned), or None."""
    evaluation = summary.get("evaluation")
    if not isinstance(evaluation, dict) or evaluation.get("cut") is not True:
        return None
    return (
        f"the evaluation was cut to {evaluation.get('num_samples')} of {evaluation.get('planned_samples')} samples "
        "by eval.max_minutes; its figures are not the planned evaluation's"
    )

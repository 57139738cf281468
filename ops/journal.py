"""The journal: a mkdocs-material blog post per run, written when the run ends (`ops journal`
rewrites it), and comparison posts (`ops compare --post`).

Posts live in `{journal_dir}/blog/posts/`: `{YYYY-MM-DD}-{ops_id}.md` with its images in
`{ops_id}/`, served at `blog/{ops_id}/` (the blog's post_url_format is "{slug}"). A post is
rewritten whole from the run dir, except what a person wrote inside a marked region, kept verbatim:

    <!-- observations: write below; ops journal keeps this -->
    ...
    <!-- /observations -->

The posts use tables, and `??? note` (admonition + pymdownx.details) for the full config.
"""

import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from ops.engines.vertex import VERTEX_FILE
from ops.errors import OpsError
from ops.monitor import elapsed_seconds, expectations, format_seconds
from ops.registry import Run
from ops.rundir import (
    CONFIG,
    EVAL,
    FIGURES,
    FINAL_SAMPLES,
    METRICS,
    PROVENANCE,
    SAMPLES,
    Summary,
    atomic_write,
    flatten,
    git_of,
    read_job,
    read_json,
    read_jsonl,
    read_summary,
)
from ops.secrets import redact_value
from ops.settings import Project

KEEP = re.compile(r"(<!-- ([\w-]+): write below; ops journal keeps this -->\n?)(.*?)(<!-- /\2 -->)", re.DOTALL)
KEEP_START = re.compile(r"<!-- ([\w-]+): write below; ops journal keeps this -->")

# A run's post keeps its images in OPS_ID/ beside it: the loss curve and a copy of the last sample grid.
LOSS_IMAGE, SAMPLES_IMAGE = "loss.png", "samples.png"

# Sample grids are a few pixels per digit: shown large, and sharp rather than blurred.
PIXELS = 'width="360" style="image-rendering: pixelated"'


def posts_dir(project: Project) -> Path:
    return project.path(project.settings.journal_dir) / "blog" / "posts"


def post_path(project: Project, run: Run) -> Path:
    """The run's post: the one it has (whatever time zone dated it), else DAY-OPS_ID.md in UTC."""
    existing = [
        path
        for path in sorted(posts_dir(project).glob(f"*-{run.ops_id}.md"))
        if path.name[len("YYYY-MM-DD-") :] == f"{run.ops_id}.md"
    ]
    if existing:
        return existing[0]
    day = time.strftime("%Y-%m-%d", time.gmtime(run.created_at))
    return posts_dir(project) / f"{day}-{run.ops_id}.md"


def keep_regions(new: str, old: str, source: Path) -> str:
    """`new`, with the text a person wrote inside the marked regions of `old` put back."""
    kept = {match[2]: match[3] for match in KEEP.finditer(old)}
    broken = [name for name in KEEP_START.findall(old) if name not in kept]
    if broken:
        raise OpsError(
            f"{source}: the '{broken[0]}' region has lost its end marker <!-- /{broken[0]} -->; "
            "put it back, else rewriting the post would drop the text written there"
        )
    return KEEP.sub(lambda match: match[1] + kept.get(match[2], match[3]) + match[4], new)


def region(name: str, placeholder: str) -> list[str]:
    return [f"<!-- {name}: write below; ops journal keeps this -->", placeholder, f"<!-- /{name} -->"]


def write_text(path: Path, text: str) -> Path:
    old = path.read_text() if path.is_file() else ""
    text = keep_regions(text, old, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode())
    return path


# ---------------------------------------------------------------------------------------------
# What a post shows, read from the run dir


def read_config(run_dir: Path) -> dict:
    """The run's config.yaml, or {} when it is missing or damaged (the post is written without it)."""
    from diffusion.yamlfile import ConfigError, parse_yaml  # ruamel: not for `ops --help`, which imports this module

    try:
        config = parse_yaml((run_dir / CONFIG).read_bytes(), str(run_dir / CONFIG))
    except (OSError, ConfigError):
        return {}
    return config if isinstance(config, dict) else {}


TRAINING_COLOUR, VALIDATION_COLOUR = "#1f77b4", "#ff7f0e"  # matplotlib's first two


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, bool)) or value is None:
        return json.dumps(value)
    return " ".join(str(value).split())


def cell(value: Any) -> str:
    return "-" if value is None else format_value(value).replace("|", "\\|")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]


def figures(run_dir: Path) -> dict[str, Any]:
    """A run's end figures by name: summary.json's, its last logged metrics, the eval scores."""
    summary = read_summary(run_dir) or Summary()
    found = {
        key: value
        for key in ("step", "total_steps", "epoch", "train_seconds", "num_parameters")
        if (value := getattr(summary, key)) is not None
    }
    last = summary.final_metrics or {}
    if "step" in last and last["step"] != summary.step:
        found["last logged step"] = last["step"]  # the figures below are from then, not from the end
    found |= {key: value for key, value in last.items() if key not in ("step", "total_steps", "epoch", "train_seconds")}
    scores = summary.scores or {}  # a text run scores its final samples itself
    found |= {key: value for key, value in scores.items() if is_number(value)}
    for group, values in scores.items():  # scores of one kind together: latent_space, overfit
        if isinstance(values, dict):
            found |= {f"{group} {key}": value for key, value in values.items() if is_number(value)}
    if scores.get("collapsed"):
        found["collapsed"] = "; ".join(scores["collapsed"])
    for path in sorted((run_dir / EVAL).glob("*.json")):
        record = read_json(path) or {}
        for label, scores in (("", record.get("scores") or {}), (" (real vs real)", record.get("real_floor") or {})):
            found |= {f"{path.stem} {key}{label}": value for key, value in scores.items() if is_number(value)}
    return found


def last_samples(run_dir: Path) -> Path | None:
    """The newest sample grid (final.png when there is one), an eval grid, else text samples."""
    for pattern in (f"{SAMPLES}/*.png", f"{EVAL}/*.png", f"{SAMPLES}/*.txt"):
        found = sorted(run_dir.glob(pattern), key=lambda path: (path.stem == FINAL_SAMPLES, path.stat().st_mtime))
        if found:
            return found[-1]
    return None


def plot_loss(metrics_path: Path, out: Path) -> bool:
    """metrics.jsonl's loss against step as a PNG, with a text run's validation bits per character
    (train.val_every_steps) on a second axis; False when nothing was logged."""
    records = read_jsonl(metrics_path)  # complete lines only: a running trainer may be halfway through one
    points = [(record["step"], record["loss"]) for record in records if is_number(record.get("loss"))]
    validation = [
        (record["step"], record["val_bits_per_char"])
        for record in records
        if is_number(record.get("val_bits_per_char"))
    ]
    if not points:
        return False
    # Heavy, so only when there is a loss to draw. No pyplot: no global state; savefig renders PNG with Agg.
    from matplotlib.figure import Figure

    steps, losses = zip(*points)
    figure = Figure(figsize=(7, 3.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    axes.plot(
        steps,
        losses,
        marker="o" if len(points) < 30 else None,
        markersize=3,
        linewidth=1.2,
        color=TRAINING_COLOUR,
        label="training loss",
    )
    if min(losses) > 0:
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, which="both", alpha=0.3)
    if validation:
        # Its own axis: bits per character of the EMA weights, not the loss's nats per token.
        right = axes.twinx()
        right.plot(
            *zip(*validation),
            marker="o",
            markersize=3,
            linewidth=1.2,
            color=VALIDATION_COLOUR,
            label="validation bits/char",
        )
        right.set_ylabel("validation bits/char")
        figure.legend(loc="outside lower center", ncols=2, frameon=False)
    png = io.BytesIO()
    figure.savefig(png, format="png")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, png.getvalue())
    return True


def copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, source.read_bytes())


def text_block(text: str, limit: int = 4000) -> list[str]:
    fence = "~~~~" if "```" in text else "```"
    return [f"{fence}text", text[:limit].rstrip("\n"), fence]


def seconds_text(seconds: float | None) -> str:
    return f"{seconds:.1f}s" if seconds is not None and seconds < 60 else format_seconds(seconds)


# ---------------------------------------------------------------------------------------------
# The post of one run


def mark_removed(path: Path, ops_id: str, title: str, line: str) -> bool:
    """Put a warning box `title` with `line` under the post's heading, once (a box of that title
    already there gets the new line: a kept checkpoint removed later); False when there is no post."""
    if not path.is_file():
        return False
    text = path.read_text()
    box = f'!!! warning "{title}"\n\n    {line}\n'
    if box in text:
        return True
    earlier = re.search(rf'^!!! warning "{re.escape(title)}"\n\n    .*\n', text, flags=re.MULTILINE)
    if earlier:
        atomic_write(path, (text[: earlier.start()] + box + text[earlier.end() :]).encode())
        return True
    heading = text.find(f"\n# {ops_id}:")
    end_of_heading = text.find("\n", heading + 1) if heading >= 0 else -1
    at = end_of_heading + 1 if end_of_heading >= 0 else len(text)
    if at == len(text) and not text.endswith("\n"):
        text += "\n"
        at += 1
    atomic_write(path, (text[:at] + "\n" + box + text[at:]).encode())
    return True


def measured_text(check: dict) -> str:
    why = f" ({check['why']})" if check.get("why") else ""
    if check["measured"] is None:
        return f"**{check['verdict']}**{why}"
    return f"{format_value(check['measured'])}, **{check['verdict']}**{why}"


def write_post(project: Project, run: Run) -> Path:
    """Write (or rewrite) the run's post and its images; returns the post's path."""
    run_dir = Path(run.run_dir)
    job = read_job(run_dir)
    spec = job["spec"]
    provenance = read_json(run_dir / PROVENANCE) or {}
    git = git_of(provenance)
    summary = read_summary(run_dir) or Summary()
    config = flatten(read_config(run_dir))
    found = figures(run_dir)
    path = post_path(project, run)
    assets = path.parent / run.ops_id

    title = " ".join((spec.get("description") or run.name).split())
    hypothesis = " ".join((spec.get("hypothesis") or "").split())
    expected = " ".join((spec.get("expected") or "").split())
    created = time.localtime(run.created_at)
    duration = elapsed_seconds(run)
    checked = expectations(run, spec)
    verdict = checked["verdict"]
    lead = (
        f"**{run.state}**"
        + (f" (expected: **{verdict}**)" if verdict else "")
        + f" on `{run.engine}`"
        + (f" after {seconds_text(duration)}" if run.finished and duration else "")
    )
    if "loss" in found:
        lead += f", final loss {format_value(found['loss'])}"
    lines = [
        "---",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S', created)}",
        f"slug: {json.dumps(run.ops_id)}",  # quoted: a name like `on` or `1e3` is no string in YAML
        "categories:",
        f"  - {json.dumps(run.name)}",
        "tags:",
        f"  - {json.dumps(run.engine)}",
        f"  - {json.dumps(run.state.lower())}",
        "---",
        "",
        f"# {run.ops_id}: {title}",
        "",
        f"{lead}. {'Hypothesis: ' + hypothesis if hypothesis else 'No hypothesis given in the spec.'}",
        "",
        "<!-- more -->",
        "",
        "## Hypothesis",
        "",
        hypothesis or "_None given in the spec._",
        "",
    ]
    if expected:
        lines += [f"**Expected:** {expected}", ""]
    if verdict:
        kind = {"met": "success", "missed": "failure", "pending": "info"}.get(verdict, "question")
        lines += [f'!!! {kind} "Expected: {verdict}"', ""]
        lines += [f"    - `{check['expect']}`: {measured_text(check)}" for check in checked["checks"]]
        lines.append("")

    commit = "no git (submitted with --allow-no-git)"
    if git.get("commit"):
        commit = (
            f"`{git['commit'][:8]}`"
            + (f" on `{git['branch']}`" if git.get("branch") else "")
            + (", with uncommitted changes (`diff.patch`)" if git.get("dirty") else ", clean")
        )
    lines += [
        "## Run",
        "",
        f"- **State:** {run.state}"
        + (
            f": {' '.join(run.detail.split())}"
            if run.detail
            else f" (exit code {run.exit_code})"
            if run.exit_code is not None
            else ""
        ),
        f"- **Engine:** `{run.engine}`, job `{run.engine_job_id or 'not submitted'}`"
        + (f", restarted {run.requeues} time(s)" if run.requeues else ""),
        f"- **Commit:** {commit}",
        f"- **Created:** {time.strftime('%Y-%m-%d %H:%M', created)}",
        f"- **Duration:** {seconds_text(duration)}"
        + ("" if run.finished else " so far (still running)")
        + (f", of which training {seconds_text(summary.train_seconds)}" if summary.train_seconds is not None else ""),
        f"- **Run dir:** `{os.path.relpath(run_dir, project.root)}`",
    ]
    vertex = read_json(run_dir / VERTEX_FILE) or {}
    if vertex.get("gcs_run_dir"):
        lines.append(
            f"- **Artifacts:** `{vertex['gcs_run_dir']}` (`ops pull {run.ops_id}` copies them into "
            f"the run dir, then `ops journal {run.ops_id}` redraws this post)"
        )
    if run.github_issue:
        lines.append(f"- **GitHub issue:** [{run.github_issue}]({run.github_issue})")
    lines += ["", "## Results", ""]

    if summary.error:
        lines += [f"The run ended with an error: `{format_value(summary.error)}`", ""]
        if summary.traceback:
            lines += text_block("\n".join(summary.traceback)) + [""]
    if summary.reason:
        lines += [f"Stopped: {summary.reason}.", ""]
    if found:
        lines += table(["metric", "value"], [[key, value] for key, value in found.items()]) + [""]
    else:
        lines += [f"No final metrics: the run {'ended' if run.finished else 'is'} {run.state} without them.", ""]

    if plot_loss(run_dir / METRICS, assets / LOSS_IMAGE):
        lines += ["### Loss", "", f"![loss against step]({run.ops_id}/{LOSS_IMAGE})", ""]
    samples = last_samples(run_dir)
    lines += ["### Samples", ""]
    if samples is None:
        lines += ["No samples: the run wrote none" + ("." if run.finished else " yet."), ""]
    elif samples.suffix == ".png":
        copy_file(samples, assets / SAMPLES_IMAGE)
        lines += [
            f"![samples]({run.ops_id}/{SAMPLES_IMAGE}){{ {PIXELS} }}",
            "",
            f"_`{samples.relative_to(run_dir)}`_",
            "",
        ]
    else:
        lines += [f"_`{samples.relative_to(run_dir)}`_", ""] + text_block(samples.read_text()) + [""]
    # PNGs and animations (a flow from noise to data) alike: mkdocs shows both as images.
    pictures = sorted(path for pattern in ("*.png", "*.gif") for path in (run_dir / FIGURES).glob(pattern))
    if pictures:
        lines += ["### Figures", ""]
        for figure in pictures:  # what the run drew of its model: an autoencoder's latent space, a flow
            copy_file(figure, assets / f"figure-{figure.name}")
            lines += [
                f"![{figure.stem.replace('_', ' ')}]({run.ops_id}/figure-{figure.name})",
                "",
                f"_`{figure.relative_to(run_dir)}`_",
                "",
            ]

    lines += ["## Config", ""]
    changes = job.get("changes") or []
    if changes:
        lines += ["Changed from the spec:", ""]
        lines += table(["key", "spec", "this run"], [[f"`{key}`", old, new] for key, old, new in changes]) + [""]
    else:
        lines += [f"The spec `{run.name}` as written, nothing changed.", ""]
    # The settings a reader looks for first, by method and net; the full config follows them, folded.
    from diffusion.config import main_settings  # pydantic: only where a post is written, not for `ops --help`

    keys = main_settings(config.get("method.name"), config.get("model.name"))
    main = [[f"`{key}`", config[key]] for key in keys if config.get(key) is not None]
    if main:
        lines += ["Main settings:", ""] + table(["setting", "value"], main) + [""]
    if config:
        lines += ['??? note "Full config (config.yaml)"', ""]
        lines += ["    " + line for line in table(["key", "value"], [[f"`{k}`", v] for k, v in config.items()])] + [""]

    lines += [
        "## Reproduce",
        "",
        f"- Run it again on the recorded commit, config and diff: `ops rerun {run.ops_id}`",
        f"- Original command: `{job.get('command', '')}`",
        "",
        "## Observations",
        "",
        *region("observations", "_What did this run show? Write it here: `ops journal` keeps this text._"),
        "",
    ]
    return write_text(path, "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Comparing runs


def comparison(runs: list[Run]) -> dict:
    """The runs' differing settings (config.yaml and the spec's own fields) and their figures,
    each as {key: [value per run]}; a value a run lacks is None."""
    settings, found = [], []
    for run in runs:
        run_dir = Path(run.run_dir)
        spec = {key: value for key, value in read_job(run_dir)["spec"].items() if key != "run"}
        settings.append(
            flatten(read_config(run_dir)) | {key: redact_value(key, value) for key, value in flatten(spec).items()}
        )
        found.append(figures(run_dir))
    keys = sorted(set().union(*settings))
    config = {key: [values.get(key) for values in settings] for key in keys}
    metric_keys = list(dict.fromkeys(key for values in found for key in values))
    return {
        "runs": [run.ops_id for run in runs],
        "states": [run.state for run in runs],
        "config": {key: values for key, values in config.items() if any(value != values[0] for value in values)},
        "metrics": {key: [values.get(key) for values in found] for key in metric_keys},
    }


def write_comparison(project: Project, runs: list[Run], compared: dict) -> Path:
    """The comparison post; the same set of runs always maps to the same post (and its notes)."""
    digest = hashlib.sha1(" ".join(sorted(compared["runs"])).encode()).hexdigest()[:8]
    slug = f"compare-{digest}"
    folder = posts_dir(project)
    existing = sorted(folder.glob(f"*-{slug}.md"))
    path = existing[0] if existing else folder / f"{time.strftime('%Y-%m-%d')}-{slug}.md"
    ids = compared["runs"]
    names = sorted({run.name for run in runs})

    def run_link(run: Run) -> str:
        post = post_path(project, run)
        return f"[{run.ops_id}]({post.name})" if post.is_file() else run.ops_id  # a dead link fails --strict

    differing = ", ".join(f"`{key}`" for key in compared["config"]) or "nothing in their settings"
    lines = [
        "---",
        f"date: {path.name[:10]}",
        f"slug: {json.dumps(slug)}",
        "categories:",
        "  - comparisons",
        "---",
        "",
        f"# Comparison: {', '.join(ids)}",
        "",
        f"{len(ids)} runs of {', '.join(f'`{name}`' for name in names)}; they differ in {differing}.",
        "",
        "<!-- more -->",
        "",
        "## Runs",
        "",
        *(f"- {run_link(run)}: **{run.state}** on `{run.engine}`" for run in runs),
        "",
        "## Config differences",
        "",
    ]
    if compared["config"]:
        lines += table(["key", *ids], [[f"`{key}`", *values] for key, values in compared["config"].items()])
    else:
        lines.append("None: the runs share every setting.")
    lines += ["", "## Final metrics", ""]
    lines += table(
        ["metric", *ids],
        [["state", *compared["states"]], *([key, *values] for key, values in compared["metrics"].items())],
    )
    lines += ["", "## Samples", ""]
    grids, texts = [], []
    for run in runs:
        samples = last_samples(Path(run.run_dir))
        if samples is not None and samples.suffix == ".png":
            copy_file(samples, folder / slug / f"{run.ops_id}.png")
            grids.append(f"![{run.ops_id}]({slug}/{run.ops_id}.png){{ {PIXELS} }}")
        else:
            grids.append("no samples" if samples is None else "text, below")
            if samples is not None:
                texts += [f"### {run.ops_id}", "", *text_block(samples.read_text()), ""]
    lines += ["| " + " | ".join(ids) + " |", "|" + "---|" * len(ids), "| " + " | ".join(grids) + " |", "", *texts]
    lines += [
        "## Observations",
        "",
        *region(
            "observations", "_What does the comparison show? Write it here: `ops compare --post` keeps this text._"
        ),
        "",
    ]
    return write_text(path, "\n".join(lines))

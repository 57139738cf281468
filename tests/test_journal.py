"""The journal: real tiny runs on the local engine, their posts written by the follow-up, real
matplotlib plots, and a real `mkdocs build --strict` of the posts."""

import datetime
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from ruamel.yaml import YAML

from tests.ops_project import make_project, ops, ops_json, registry_rows, wait_for, write_misfit_checkpoint

PLACEHOLDER = "_What did this run show? Write it here: `ops journal` keeps this text._"
NOTE = "The loss fell | as hoped.\n\n- slower than expected\n- **check** the lr next"


def submit(root: Path, *args: str) -> dict:
    return ops_json(root, "submit", "tiny", *args)["runs"][0]


@pytest.fixture(scope="module")
def journal_project(tmp_path_factory):
    """Four runs of the tiny spec: `a` (8 steps), `b` (another lr, 4 steps), `failed` (a broken
    checkpoint) and `cancelled` (its post written while it runs, then killed). The first three end
    with nobody watching; then one `ops sync` reconciles them and does their follow-ups."""
    data = os.environ.get("DIFFUSION_DATA_ROOT")
    if not data or not (Path(data) / "MNIST/raw/train-images-idx3-ubyte").is_file():
        pytest.skip("set DIFFUSION_DATA_ROOT to a folder holding MNIST/raw/ (see README)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFUSION_DATA_ROOT", str(Path(data).resolve()))
        root = make_project(tmp_path_factory.mktemp("journal") / "project")
        write_misfit_checkpoint(root / "broken.pt")
        runs = {
            "a": submit(root),
            "b": submit(root, "--set", "train.lr=0.002", "--set", "train.epochs=1"),
            "failed": submit(root, "--set", "run.task=sample", "--set", f"run.sample.checkpoint={root / 'broken.pt'}"),
        }
        for run in runs.values():
            wait_for(lambda: (Path(run["run_dir"]) / "exit_status.json").is_file(), timeout=300)
        posts_before_sync = sorted((root / "docs").rglob("*.md"))
        synced = ops_json(root, "sync")
        runs["cancelled"] = submit(root, "--set", "train.epochs=1000")
        while_running = Path(ops_json(root, "journal", runs["cancelled"]["ops_id"])["post"]).read_text()
        assert ops_json(root, "cancel", runs["cancelled"]["ops_id"], "--grace", "0")["state"] == "CANCELLED"
        rows = {row["ops_id"]: row for row in registry_rows(root)}
        yield SimpleNamespace(
            root=root,
            posts=root / "docs/blog/posts",
            synced=synced,
            posts_before_sync=posts_before_sync,
            while_running=while_running,
            runs={key: rows[run["ops_id"]] for key, run in runs.items()},
        )


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return YAML(typ="safe").load(text.split("---\n")[1])


def table_rows(text: str, header: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    rows = {}
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def post_of(project, key: str) -> Path:
    run = project.runs[key]
    day = time.strftime("%Y-%m-%d", time.localtime(run["created_at"]))
    return project.posts / f"{day}-{run['ops_id']}.md"


def followups(root: Path, ops_id: str) -> dict[str, float]:
    db = sqlite3.connect(root / "runs/registry.sqlite")
    done = dict(db.execute("SELECT kind, done_at FROM followups WHERE ops_id = ?", (ops_id,)))
    db.close()
    return done


def test_the_post_is_written_once_when_the_run_ends(journal_project):
    project = journal_project
    assert project.posts_before_sync == []  # nobody reconciled the runs before the sync
    assert project.synced["problems"] == []
    a = project.runs["a"]
    path = post_of(project, "a")
    assert a["state"] == "SUCCEEDED" and a["journal_post"] == str(path) and path.is_file()
    assert "journal_post" in followups(project.root, a["ops_id"])

    before = (path.stat().st_mtime_ns, followups(project.root, a["ops_id"]))
    assert ops_json(project.root, "sync")["problems"] == []
    assert ops_json(project.root, "monitor", a["ops_id"])["journal_post"] == str(path)
    assert (path.stat().st_mtime_ns, followups(project.root, a["ops_id"])) == before


def test_the_post_shows_the_run_its_metrics_loss_curve_and_samples(journal_project):
    project = journal_project
    a = project.runs["a"]
    run_dir = Path(a["run_dir"])
    text = post_of(project, "a").read_text()

    meta = front_matter(text)
    assert meta["slug"] == a["ops_id"]
    assert meta["categories"] == ["tiny"] and meta["tags"] == ["local", "succeeded"]
    assert meta["date"] == datetime.datetime.fromtimestamp(int(a["created_at"]))
    assert text.split("---\n", 2)[2].lstrip().splitlines()[0] == f"# {a['ops_id']}: A tiny DDPM for the ops tests."
    assert "The loss goes down." in text and f"`ops rerun {a['ops_id']}`" in text
    assert "`ops submit tiny --json`" in text  # the original command

    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = table_rows(text, "| metric | value |")
    for key in ("step", "total_steps", "epoch", "train_seconds", "num_parameters"):
        assert float(metrics[key][0]) == pytest.approx(summary[key], rel=1e-5), key
    for key in ("loss", "lr", "grad_norm"):
        assert float(metrics[key][0]) == pytest.approx(summary["final_metrics"][key], rel=1e-5), key
    assert metrics["step"] == ["8"]

    assets = project.posts / a["ops_id"]
    assert f"![loss against step]({a['ops_id']}/loss.png)" in text
    with Image.open(assets / "loss.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5 and len(np.unique(pixels)) > 10  # a drawn curve, not a blank canvas
    assert f"![samples]({a['ops_id']}/samples.png)" in text
    assert (assets / "samples.png").read_bytes() == (run_dir / "samples/final.png").read_bytes()


def test_observations_survive_ops_journal_and_everything_else_is_rewritten(journal_project):
    project = journal_project
    ops_id = project.runs["a"]["ops_id"]
    path = post_of(project, "a")
    text = path.read_text()
    assert PLACEHOLDER in text
    path.write_text(text.replace(PLACEHOLDER, NOTE).replace("## Hypothesis", "## Hypothesis (edited)"))
    issue = "https://github.com/owner/repo/issues/7"  # what the GitHub follow-up stores
    db = sqlite3.connect(project.root / "runs/registry.sqlite")
    db.execute("UPDATE runs SET github_issue = ? WHERE ops_id = ?", (issue, ops_id))
    db.commit()
    db.close()

    result = ops_json(project.root, "journal", ops_id)
    assert result["post"] == str(path) and result["url"] == f"blog/{ops_id}/"
    assert {Path(image).name for image in result["images"]} == {"loss.png", "samples.png"}
    text = path.read_text()
    assert f"<!-- observations: write below; ops journal keeps this -->\n{NOTE}\n<!-- /observations -->" in text
    assert "(edited)" not in text and "## Hypothesis\n" in text
    assert f"- **GitHub issue:** [{issue}]({issue})" in text

    # Without its end marker the region cannot be told apart: refuse rather than drop the text.
    broken = text.replace("<!-- /observations -->", "")
    path.write_text(broken)
    refused = ops(project.root, "journal", ops_id)
    assert refused.returncode == 2 and "lost its end marker" in refused.stderr
    assert path.read_text() == broken
    path.write_text(text)


def test_a_failed_and_a_cancelled_run_get_posts_that_say_so(journal_project):
    project = journal_project
    for key, state in (("failed", "FAILED"), ("cancelled", "CANCELLED")):
        run = project.runs[key]
        assert run["state"] == state and run["journal_post"] == str(post_of(project, key))
        text = post_of(project, key).read_text()
        assert front_matter(text)["tags"] == ["local", state.lower()]
        assert f"**{state}** on `local`" in text
        assert "No samples: the run wrote none." in text and "![samples]" not in text
    # Written while it ran (`ops journal`), rewritten by the follow-up when it was cancelled.
    assert "**RUNNING** on `local`" in project.while_running and "so far (still running)" in project.while_running
    failed = post_of(project, "failed").read_text()
    assert "No final metrics: the run ended FAILED" in failed
    assert "Missing key(s) in state_dict" in failed  # the error from summary.json, with its traceback
    assert "| `run.task` | train | sample |" in failed  # what the overrides changed


def test_compare_shows_exactly_the_differing_settings_and_the_metrics(journal_project):
    project = journal_project
    a, b = project.runs["a"]["ops_id"], project.runs["b"]["ops_id"]
    compared = ops_json(project.root, "compare", a, b)
    assert compared["runs"] == [a, b] and compared["states"] == ["SUCCEEDED", "SUCCEEDED"]
    assert compared["config"] == {"train.epochs": [2, 1], "train.lr": [0.001, 0.002]}
    assert compared["metrics"]["step"] == [8, 4] and compared["post"] is None
    summaries = [json.loads((Path(project.runs[key]["run_dir"]) / "summary.json").read_text()) for key in "ab"]
    assert compared["metrics"]["loss"] == [summary["final_metrics"]["loss"] for summary in summaries]

    shown = ops(project.root, "compare", a, b)
    assert shown.returncode == 0, shown.stderr
    settings = shown.stdout.split("\n\n")[0].splitlines()
    assert settings[0].split() == ["differing", "settings", a, b]
    assert [line.split() for line in settings[1:]] == [["train.epochs", "2", "1"], ["train.lr", "0.001", "0.002"]]
    assert re.search(r"^step\s+8\s+4$", shown.stdout, re.MULTILINE)

    assert ops(project.root, "compare", a, a).returncode == 2  # one run is no comparison


def test_compare_post_has_both_grids_and_keeps_its_observations(journal_project):
    project = journal_project
    a, b = project.runs["a"], project.runs["b"]
    path = Path(ops_json(project.root, "compare", a["ops_id"], b["ops_id"], "--post")["post"])
    assert path.parent == project.posts and re.fullmatch(r"\d{4}-\d\d-\d\d-compare-[0-9a-f]{8}\.md", path.name)
    text = path.read_text()
    slug = path.stem[11:]
    assert front_matter(text) == {
        "date": datetime.date.fromisoformat(path.name[:10]),
        "slug": slug,
        "categories": ["comparisons"],
    }
    assert table_rows(text, f"| key | {a['ops_id']} | {b['ops_id']} |") == {
        "`train.epochs`": ["2", "1"],
        "`train.lr`": ["0.001", "0.002"],
    }
    for run in (a, b):
        assert f"![{run['ops_id']}]({slug}/{run['ops_id']}.png)" in text
        grid = project.posts / slug / f"{run['ops_id']}.png"
        assert grid.read_bytes() == (Path(run["run_dir"]) / "samples/final.png").read_bytes()

    path.write_text(text.replace("_What does the comparison show?", NOTE + "_What does the comparison show?"))
    again = ops_json(project.root, "compare", b["ops_id"], a["ops_id"], "--post")  # same runs, same post
    assert again["post"] == str(path)
    assert NOTE in path.read_text()
    assert sorted(project.posts.glob("*compare*.md")) == [path]


def test_the_posts_build_with_mkdocs_strict_and_their_images_resolve(journal_project, tmp_path):
    project = journal_project
    a, b = project.runs["a"]["ops_id"], project.runs["b"]["ops_id"]
    compare_post = Path(ops_json(project.root, "compare", a, b, "--post")["post"])
    config = tmp_path / "mkdocs.yml"
    config.write_text(
        "site_name: journal test\n"
        f"docs_dir: {project.root / 'docs'}\n"
        f"site_dir: {tmp_path / 'site'}\n"
        "theme: {name: material, font: false}\n"
        'plugins: [{blog: {post_url_format: "{slug}"}}]\n'
        "markdown_extensions: [admonition, attr_list, pymdownx.details, pymdownx.superfences, tables]\n"
    )
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stderr

    expected = {
        a: {"loss.png": project.posts / a / "loss.png", "samples.png": project.posts / a / "samples.png"},
        compare_post.stem[11:]: {
            f"{ops_id}.png": project.posts / compare_post.stem[11:] / f"{ops_id}.png" for ops_id in (a, b)
        },
    }
    for slug, images in expected.items():
        page = tmp_path / "site/blog" / slug / "index.html"
        html = page.read_text()
        sources = re.findall(r'<img alt="[^"]*" src="([^"]+)"', html)
        assert "{ width=" not in html  # the sample grids' size attributes were applied, not printed
        assert sorted(Path(source).name for source in sources) == sorted(images)
        for source in sources:
            served = (page.parent / source).resolve()
            assert served.read_bytes() == images[Path(source).name].read_bytes()
    failed = tmp_path / "site/blog" / project.runs["failed"]["ops_id"] / "index.html"
    assert "FAILED" in failed.read_text()


def test_loss_figure_shows_a_validation_curve_when_one_was_logged(tmp_path):
    from ops.journal import TRAINING_COLOUR, VALIDATION_COLOUR, plot_loss

    def colour_share(png: Path, colour: str) -> float:
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        with Image.open(png) as image:
            pixels = np.asarray(image.convert("RGB")).astype(int)
        return (np.abs(pixels - rgb).sum(axis=-1) < 40).mean()

    rows = [{"step": step, "loss": 3.0 / step**0.3} for step in range(10, 210, 10)]
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for row in rows[4::5]:
        row["val_bits_per_char"] = 6.0 - row["step"] / 100
    (tmp_path / "curve.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert plot_loss(tmp_path / "plain.jsonl", tmp_path / "plain.png")
    assert plot_loss(tmp_path / "curve.jsonl", tmp_path / "curve.png")
    assert colour_share(tmp_path / "plain.png", TRAINING_COLOUR) > 1e-3
    assert colour_share(tmp_path / "plain.png", VALIDATION_COLOUR) == 0
    assert colour_share(tmp_path / "curve.png", VALIDATION_COLOUR) > 1e-3

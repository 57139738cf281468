"""`ops du` and `ops rm` on real local runs: sizes as `du` counts them, removal that never touches
a live run, and a registry, experiment log and journal that say what was removed."""

import fcntl
import json
import os
import subprocess
from pathlib import Path

from tests.ops_project import ops, ops_json, registry_rows, wait_for


def du_bytes(path: Path) -> int:
    return int(
        subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    )


def test_du_matches_du_and_rm_keeps_what_it_is_told_and_says_so_everywhere(ops_project):
    root = ops_project
    steps = ["--set", "train.max_steps=4", "--set", "train.checkpoint_every_steps=2", "--set", "expect=[step >= 1]"]
    first, second = (ops_json(root, "submit", "tiny", *steps)["runs"][0] for _ in range(2))
    for run in (first, second):
        assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    live = ops_json(root, "submit", "tiny", "--set", "train.epochs=1000")["runs"][0]
    wait_for(lambda: (Path(live["run_dir"]) / "metrics.jsonl").is_file(), timeout=120)

    usage = ops_json(root, "du")
    by_id = {row["ops_id"]: row for row in usage["runs"]}
    for run in (first, second):
        assert by_id[run["ops_id"]]["bytes"] == du_bytes(Path(run["run_dir"]))
        assert by_id[run["ops_id"]]["checkpoint_bytes"] == du_bytes(Path(run["run_dir"]) / "checkpoints")
    assert usage["total_bytes"] == sum(row["bytes"] for row in usage["runs"])

    # A run that is not over is refused, in one line, and nothing of any named run is removed.
    refused = ops(root, "rm", first["ops_id"], live["ops_id"], "--yes")
    assert refused.returncode == 2 and "not over" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert Path(first["run_dir"]).is_dir() and Path(live["run_dir"]).is_dir()
    assert ops(root, "cancel", live["ops_id"]).returncode == 0

    # No terminal and no --yes: refused; --dry-run: what would go, nothing gone.
    asked = ops(root, "rm", first["ops_id"])
    assert asked.returncode == 2 and "--yes" in asked.stderr
    before = sorted(str(path) for path in Path(first["run_dir"]).rglob("*"))
    planned = ops_json(root, "rm", first["ops_id"], "--keep-checkpoints", "latest", "--dry-run")["would_remove"][0]
    assert sorted(str(path) for path in Path(first["run_dir"]).rglob("*")) == before
    assert "checkpoints/latest.pt" in planned["kept"] and planned["freed_bytes"] > 0

    # A process holding the run dir's lock (a sample task run in place) keeps it whole.
    fd = os.open(Path(second["run_dir"]) / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"pid 1 on a test\n")
    held = ops(root, "rm", second["ops_id"], "--yes")
    os.close(fd)
    assert held.returncode == 2 and "being written by pid 1 on a test" in held.stderr
    assert (Path(second["run_dir"]) / "checkpoints/latest.pt").is_file()

    removed = ops_json(root, "rm", first["ops_id"], "--keep-checkpoints", "latest", "--yes")["removed"][0]
    left = sorted(str(path.relative_to(first["run_dir"])) for path in Path(first["run_dir"]).rglob("*"))
    records = ["config.yaml", "job.json", "metrics.jsonl", "provenance.json", "summary.json", "diff.patch",
               "followups.json"]  # fmt: skip
    assert left == sorted([".lock", "checkpoints", "checkpoints/latest.pt", *records])
    assert json.loads((Path(first["run_dir"]) / "job.json").read_text())["removed_kept"][0] == "checkpoints/latest.pt"
    assert removed["freed_bytes"] == planned["freed_bytes"]
    best = ops_json(root, "rm", second["ops_id"], "--keep-checkpoints", "best", "--dry-run")["would_remove"][0]
    losses = {line["step"]: line["loss"] for line in map(json.loads, open(Path(second["run_dir"]) / "metrics.jsonl"))}
    lowest = min((2, 4), key=lambda step: losses[step])  # the step checkpoints, one logged loss at each
    assert [path for path in best["kept"] if path.startswith("checkpoints/")] == [
        f"checkpoints/step_{lowest:08d}.pt",
        "checkpoints/latest.pt",  # made the best step's
    ]
    third = ops_json(root, "submit", "tiny", *steps)["runs"][0]
    assert ops(root, "wait", third["ops_id"], "--interval", "0.3").returncode == 0
    losses = {line["step"]: line["loss"] for line in map(json.loads, open(Path(third["run_dir"]) / "metrics.jsonl"))}
    lowest = Path(third["run_dir"]) / f"checkpoints/step_{min((2, 4), key=lambda step: losses[step]):08d}.pt"
    weights = lowest.read_bytes()
    ops_json(root, "rm", third["ops_id"], "--keep-checkpoints", "best", "--yes")
    # latest.pt is now the best step's weights: what a run dir, run:ID or run:SPEC reads.
    assert (Path(third["run_dir"]) / "checkpoints/latest.pt").read_bytes() == weights == lowest.read_bytes()
    ops_json(root, "rm", second["ops_id"], "--yes")
    assert not Path(second["run_dir"]).exists()

    rows = {row["ops_id"]: row for row in registry_rows(root)}
    assert rows[first["ops_id"]]["removed_at"] and json.loads(rows[first["ops_id"]]["removed_kept"])[0] == (
        "checkpoints/latest.pt"
    )
    listed = {run["ops_id"]: run for run in ops_json(root, "list")}
    assert listed[second["ops_id"]]["removed_at"] and listed[second["ops_id"]]["removed_kept"] is None
    assert f"{second['ops_id']}  SUCCEEDED (dir removed)" in ops(root, "list").stdout
    assert ops_json(root, "du", second["ops_id"])["runs"][0]["bytes"] == 0
    log = (root / "EXPERIMENT_LOG.md").read_text()
    assert "_Run dir removed on" in log.split(f"## {second['ops_id']}")[1].split("## ")[0]
    assert "kept `checkpoints/latest.pt`" in log.split(f"## {first['ops_id']}")[1].split("## ")[0]
    post = Path(listed[second["ops_id"]]["journal_post"])
    assert '!!! warning "Run dir removed"' in post.read_text()
    again = ops(root, "rm", second["ops_id"], "--yes")
    assert again.returncode == 2 and "already removed" in again.stderr
    rewrite = ops(root, "journal", second["ops_id"])
    assert rewrite.returncode == 2 and "removed" in rewrite.stderr

    # The registry lost and rebuilt from the run dirs: a removed run that kept a checkpoint is what it was.
    (root / "runs/registry.sqlite").rename(root / "runs/registry.lost")
    for suffix in ("-wal", "-shm"):
        (root / f"runs/registry.sqlite{suffix}").unlink(missing_ok=True)
    assert ops(root, "sync").returncode == 0
    rebuilt = {run["ops_id"]: run for run in ops_json(root, "list")}
    assert rebuilt[first["ops_id"]]["state"] == "SUCCEEDED" and rebuilt[first["ops_id"]]["removed_at"]
    assert rebuilt[third["ops_id"]]["state"] == "SUCCEEDED" and second["ops_id"] not in rebuilt

    # The records a kept checkpoint keeps are all a rerun needs.
    again = ops_json(root, "rerun", first["ops_id"])
    assert ops(root, "wait", again["ops_id"], "--interval", "0.3").returncode == 0

    # What a removal kept goes later with --keep-checkpoints none; keeping again is refused, saying how.
    kept_again = ops(root, "rm", first["ops_id"], "--keep-checkpoints", "best", "--yes")
    assert kept_again.returncode == 2 and len(kept_again.stderr.splitlines()) == 1
    assert (
        "keeping checkpoints/latest.pt" in kept_again.stderr and "--keep-checkpoints none` removes" in kept_again.stderr
    )
    freed = ops_json(root, "rm", first["ops_id"], "--keep-checkpoints", "none", "--yes")["removed"][0]
    assert freed["kept"] == [] and freed["freed_bytes"] > 0 and not Path(first["run_dir"]).exists()
    row = {run["ops_id"]: run for run in ops_json(root, "list")}[first["ops_id"]]
    assert row["removed_kept"] is None and row["state"] == "SUCCEEDED"
    assert row["removed_verdict"] == listed[first["ops_id"]]["removed_verdict"] == "met"  # what it was, kept
    shown = ops(root, "monitor", first["ops_id"]).stdout
    assert "removed by ops rm on" in shown and "(kept: nothing)" in shown and "no metrics yet" not in shown
    post = Path(listed[first["ops_id"]]["journal_post"]).read_text()
    assert post.count('!!! warning "Run dir removed"') == 1 and "nothing kept." in post
    section = (root / "EXPERIMENT_LOG.md").read_text().split(f"## {first['ops_id']}")[1].split("## ")[0]
    assert section.count("_Run dir removed on") == 1 and "; nothing kept._" in section  # the note replaced too
    assert "already removed" in ops(root, "rm", first["ops_id"], "--keep-checkpoints", "none", "--yes").stderr

"""Fit to the machine: a GPU-sized spec submitted to a CPU says so, with its duration here from a
few timed steps and the CPU-sized variant; the estimate stays in job.json and `ops monitor`."""

import json
from pathlib import Path

import pytest

from ops.fit import gpu_sized, has_gpu
from ops.spec import load_spec
from tests.conftest import REPO
from tests.ops_project import ops

pytestmark = pytest.mark.skipif(has_gpu(), reason="this machine has a GPU: nothing to warn about")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("shakespeare-training", "resources.vertex.accelerator_type NVIDIA_L4"),
        ("mnist-training", "resources.vertex.accelerator_type NVIDIA_L4"),
        ("mnist-quick", None),
        ("shakespeare-quick", None),
    ],
)
def test_the_gpu_sized_specs_say_so(name, why):
    spec = load_spec(REPO / f"configs/jobs/{name}.yaml")
    assert gpu_sized(spec) == why
    assert (spec.cpu_variant is not None) == (why is not None)


def test_submit_on_a_cpu_estimates_the_duration_and_names_the_cpu_variant(ops_project, tmp_path, monkeypatch):
    root = ops_project
    monkeypatch.setenv("DIFFUSION_CACHE_DIR", str(tmp_path / "cache"))  # the machine's cache of timings
    spec = root / "configs/jobs/tiny.yaml"
    spec.write_text(
        spec.read_text()
        .replace("engine: local\n", "cpu_variant: tiny-cpu\nengine: local\n")
        .replace("  local:\n", "  slurm: {gpus_per_node: 1}\n  local:\n")
    )
    submitted = ops(root, "submit", "tiny", "--set", "train.max_steps=4", "--json")
    assert submitted.returncode == 0, submitted.stderr
    [warning] = [line for line in submitted.stderr.splitlines() if "sized for a GPU" in line]
    assert warning.startswith(
        "warning: tiny is sized for a GPU (resources.slurm.gpus_per_node 1) and this machine has none: on this "
        "CPU a step takes "
    )
    assert "s (2 timed), so its 4 steps would take about " in warning and warning.endswith(
        "; for a CPU: ops submit tiny-cpu"
    )
    run = json.loads(submitted.stdout)["runs"][0]
    estimate = json.loads((Path(run["run_dir"]) / "job.json").read_text())["estimate"]
    assert estimate["timing"]["total_steps"] == 4 and estimate["timing"]["seconds_per_step"] > 0
    assert estimate["seconds"] == pytest.approx(4 * estimate["timing"]["seconds_per_step"])
    view = json.loads(ops(root, "monitor", run["ops_id"], "--json").stdout)
    assert view["estimate"]["warning"] == warning.removeprefix("warning: ")
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0

    # The same run again: its timing comes from the cache (no steps timed), and says when it was taken.
    cache = tmp_path / "cache/fit-estimates.json"
    [entry] = json.loads(cache.read_text()).values()
    entry["timing"]["seconds_per_step"] = 123.0  # what the cache holds is what the warning reads
    cache.write_text(json.dumps({key: entry for key in json.loads(cache.read_text())}))
    again = ops(root, "submit", "tiny", "--set", "train.max_steps=4", "--dry-run")
    assert again.returncode == 0, again.stderr
    assert "a step takes 123.00 s (2 timed), so its 4 steps would take about 8 min (timed 20" in again.stderr
    samples = ops(root, "submit", "tiny", "--set", "train.max_steps=4", "--set", "sample.num_samples=7", "--dry-run")
    assert "a step takes 123.00 s" in samples.stderr  # what is sampled does not change a step's time
    other = ops(root, "submit", "tiny", "--set", "train.max_steps=5", "--dry-run")  # another run: timed anew
    assert "a step takes 123.00" not in other.stderr and "so its 5 steps would take" in other.stderr
    assert len(json.loads(cache.read_text())) == 2

    # A CPU-sized spec submits without a word of it.
    plain = ops(
        root, "submit", "tiny", "--set", "resources.slurm.gpus_per_node=0", "--set", "train.max_steps=1", "--json"
    )
    assert plain.returncode == 0 and "sized for a GPU" not in plain.stderr
    assert ops(root, "wait", json.loads(plain.stdout)["runs"][0]["ops_id"], "--interval", "0.3").returncode == 0


def test_a_timing_is_keyed_by_the_code_that_trains_and_a_damaged_cache_entry_is_not_read(tmp_path):
    from ops.fit import code_dir, timing_key, usable

    code = tmp_path / "diffusion"
    code.mkdir()
    (code / "__init__.py").write_text("")
    (code / "train.py").write_text("STEPS = 1\n")
    assert code_dir(tmp_path) == code and code_dir(tmp_path / "elsewhere") == REPO / "diffusion"
    run = {"train": {"max_steps": 4}}
    before = timing_key(run, code)
    assert timing_key(run, code) == before != timing_key({"train": {"max_steps": 5}}, code)
    (code / "train.py").write_text("STEPS = 2\n")  # another version of the trainer: timed anew
    assert timing_key(run, code) != before
    timing = {"seconds_per_step": 0.5, "total_steps": 4, "timed_steps": 2, "max_minutes": None}
    assert usable({"at": 100.0, "timing": timing}, now=200.0)
    assert not usable({"at": 100.0, "timing": timing}, now=100.0 + 8 * 24 * 3600)  # older than a week
    assert not usable({"at": "yesterday", "timing": timing}, now=200.0)
    assert not usable({"at": 100.0, "timing": timing | {"seconds_per_step": "fast"}}, now=200.0)
    assert not usable({"at": 100.0, "timing": {"seconds_per_step": 0.5}}, now=200.0)  # fields missing


def test_a_killed_submit_ends_its_timing_too(ops_project, tmp_path, monkeypatch):
    """SIGTERM to ops while it times steps: the `python -m diffusion estimate` child goes with it."""
    import signal
    import subprocess
    import sys
    import time

    from tests.ops_project import wait_for

    monkeypatch.setenv("DIFFUSION_CACHE_DIR", str(tmp_path / "cache"))
    spec = ops_project / "configs/jobs/tiny.yaml"
    spec.write_text(spec.read_text().replace("  local:\n", "  slurm: {gpus_per_node: 1}\n  local:\n"))
    submit = subprocess.Popen(
        [sys.executable, "-m", "ops", "submit", "tiny", "--dry-run"], cwd=ops_project, stderr=subprocess.PIPE
    )

    def timing() -> list[int]:
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    words = (entry / "cmdline").read_bytes().split(b"\0")
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                    continue  # a process that ended while we looked
                if b"estimate" in words and parent == submit.pid:
                    children.append(int(entry.name))
        return children

    wait_for(lambda: timing(), timeout=60, interval=0.05)
    [child] = timing()
    submit.send_signal(signal.SIGTERM)
    assert submit.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "the timing child outlived its ops"

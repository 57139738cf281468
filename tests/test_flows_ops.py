"""A 2-D toy flow run through `ops` on the local engine: its journal post shows the animation of the
flow from noise to data, its frames and its energy distance against the real-vs-real floor, and the
settings of its own method and net."""

from pathlib import Path

from tests.ops_project import git, ops, ops_json

TINY_MEANFLOW_TOY = """\
name: tiny-meanflow-toy
description: A tiny MeanFlow on two moons for the ops tests.
hypothesis: One step draws two moons.
engine: local
resources:
  local: {threads: 1}
run:
  device: cpu
  data: {dataset: moons, num_points: 512}
  model: {name: mlp, hidden_dim: 32, num_layers: 1}
  method: {name: meanflow, r_equals_t_share: 0.5}
  train: {batch_size: 64, epochs: 2, log_every: 4, sample_every_epochs: null, checkpoint_every_minutes: null, progress: lines}
  sample: {sampler: meanflow, num_inference_steps: 1, num_samples: 200}
"""


def test_a_toy_flow_post_shows_its_animation_frames_and_energy_distance(git_project):
    root = git_project
    (root / "configs/jobs/tiny-meanflow-toy.yaml").write_text(TINY_MEANFLOW_TOY)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "a toy flow spec")

    run = ops_json(root, "submit", "tiny-meanflow-toy")["runs"][0]
    assert ops(root, "wait", run["ops_id"], "--interval", "0.3").returncode == 0
    assert ops(root, "journal", run["ops_id"]).returncode == 0
    (post,) = (root / "docs/blog/posts").glob(f"*{run['ops_id']}.md")
    text = post.read_text()
    for name in ("flow.gif", "flow.png"):
        figure = f"{run['ops_id']}/figure-{name}"
        assert f"]({figure})" in text
        assert (post.parent / figure).read_bytes() == (Path(run["run_dir"]) / "figures" / name).read_bytes()
    assert "energy_distance" in text and "real_floor" in text
    assert "`method.r_equals_t_share`" in text and "`method.beta_schedule`" not in text.split("Full config")[0]

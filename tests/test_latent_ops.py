"""An autoencoder and a latent diffusion run through `ops` on the local engine: the latent spec
names its autoencoder as `run:SPEC`, which ops resolves at submit (or refuses in one line before
anything is submitted); the autoencoder's post shows its latent space; `ops ckpt inspect` of the
latent run names the autoencoder it builds on."""

import time
import zipfile
from pathlib import Path

import pytest

from diffusion.config import ConfigError, load_run_config
from ops.engines.vertex import VERTEX_FILE
from ops.registry import Registry, Run
from ops.rundir import write_json
from ops.runs import vertex_reference
from tests.ops_project import git, ops, ops_json, registry_rows

TINY_AE = """\
name: tiny-ae
description: A tiny MLP autoencoder for the ops tests.
hypothesis: The reconstructions improve.
engine: local
resources:
  local: {threads: 1}
run:
  device: cpu
  data: {subset: 64, download: false}
  model: {name: mlp_autoencoder, latent_dim: 4, hidden_dim: 32, num_layers: 1}
  method: {name: autoencoder}
  train: {batch_size: 16, epochs: 2, log_every: 1, sample_every_epochs: null, checkpoint_every_minutes: null, progress: lines}
  sample: {num_samples: 16}
  eval: {num_samples: 60}
"""

TINY_LATENT = """\
name: tiny-latent
description: A tiny latent DDPM for the ops tests.
hypothesis: It trains on the autoencoder's latents.
engine: local
resources:
  local: {threads: 1}
run:
  device: cpu
  data: {subset: 64, download: false}
  model: {name: mlp, hidden_dim: 32, num_layers: 1}
  method: {name: ddpm, autoencoder: "run:tiny-ae", clip_sample: false, num_train_timesteps: 20}
  train: {batch_size: 16, epochs: 1, log_every: 1, sample_every_epochs: null, checkpoint_every_minutes: null, progress: lines}
  sample: {num_samples: 4, num_inference_steps: 3}
"""


def test_a_latent_run_builds_on_the_newest_autoencoder_run_named_by_its_spec(ops_project):
    root = ops_project
    (root / "configs/jobs/tiny-ae.yaml").write_text(TINY_AE)
    (root / "configs/jobs/tiny-latent.yaml").write_text(TINY_LATENT)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "autoencoder specs")

    refused = ops(root, "submit", "tiny-latent")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    assert "run.method.autoencoder: 'run:tiny-ae' is not allowed: no checkpoint there" in refused.stderr
    assert registry_rows(root) == []  # nothing submitted

    autoencoder = ops_json(root, "submit", "tiny-ae")["runs"][0]
    assert ops(root, "wait", autoencoder["ops_id"], "--interval", "0.3").returncode == 0
    assert ops(root, "journal", autoencoder["ops_id"]).returncode == 0
    (post,) = (root / "docs/blog/posts").glob(f"*{autoencoder['ops_id']}.md")
    text = post.read_text()
    figure = f"{autoencoder['ops_id']}/figure-latent_space.png"
    assert f"![latent space]({figure})" in text and "latent_space silhouette" in text
    shown = post.parent / figure
    assert shown.read_bytes() == (Path(autoencoder["run_dir"]) / "figures/latent_space.png").read_bytes()

    time.sleep(1)  # a later submit: `run:SPEC` is the newest succeeded run
    latent = ops_json(root, "submit", "tiny-latent")["runs"][0]
    assert ops(root, "wait", latent["ops_id"], "--interval", "0.3").returncode == 0
    resolved = load_run_config(Path(latent["run_dir"]) / "config.yaml", stored=True)
    expected = autoencoder["run_dir"]
    assert resolved.method.autoencoder == expected  # recorded as the run dir it was at submit

    record = ops_json(root, "ckpt", "inspect", latent["ops_id"])
    assert record["parent"]["method"] == "autoencoder" and record["parent"]["net"] == "mlp_autoencoder"
    assert record["parent"]["checkpoint"] == str((Path(autoencoder["run_dir"]) / "checkpoints/latest.pt").resolve())
    shown = ops(root, "ckpt", "inspect", latent["ops_id"])
    assert f"built on  {expected}: autoencoder (mlp_autoencoder), step 8" in shown.stdout


def test_a_vertex_job_reaches_a_named_run_through_its_cloud_storage_path(tmp_path):
    registry = Registry(tmp_path / "runs.db")
    cloud, local = tmp_path / "cloud-ae", tmp_path / "local-ae"
    cloud.mkdir()
    write_json(cloud / VERTEX_FILE, {"gcs_run_dir": "gs://bucket/runs/ae-cloud"})
    registry.insert(Run("ae-cloud", "autoencoder-mlp", "vertex", str(cloud), state="SUCCEEDED", created_at=1.0))
    registry.insert(Run("ae-local", "autoencoder-mlp", "local", str(local), state="SUCCEEDED", created_at=2.0))

    registry.insert(Run("ae-like", "autoencoderXmlp", "vertex", str(cloud), state="SUCCEEDED", created_at=3.0))

    assert vertex_reference(registry, "ae-cloud", "key") == "/gcs/bucket/runs/ae-cloud"
    # The newest succeeded run of exactly that spec whose files are in the cloud (not the newer local one).
    assert vertex_reference(registry, "run:autoencoder-mlp", "key") == "/gcs/bucket/runs/ae-cloud"
    assert vertex_reference(registry, "gs://bucket/x/latest.pt", "key") == "/gcs/bucket/x/latest.pt"
    assert vertex_reference(registry, "/gcs/bucket/y", "key") == "/gcs/bucket/y"  # the job's own path, as given
    with pytest.raises(ConfigError) as error:
        vertex_reference(registry, "ae-local", "spec: run.method.autoencoder")
    assert str(error.value) == (
        "spec: run.method.autoencoder: 'ae-local' is not allowed on Vertex: run ae-local ran on local, "
        "so its checkpoints are not in Cloud Storage; name a Vertex run, or copy them to a gs:// path and give that"
    )
    with pytest.raises(ConfigError, match="'run:autoencoder_mlp' is not allowed: no succeeded run of spec"):
        vertex_reference(registry, "run:autoencoder_mlp", "key")  # `_` is no wildcard: autoencoderXmlp is another


def test_submit_refuses_an_autoencoder_that_does_not_fit_in_one_line(ops_project):
    """Checked at submit from the autoencoder run's config.yaml: nothing is submitted."""
    from diffusion.config import validate_run
    from ops.rundir import CONFIG
    from tests.conftest import write_config

    root = ops_project
    (root / "configs/jobs/tiny-latent.yaml").write_text(TINY_LATENT)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "latent spec")
    runs = {
        "cifar": {
            "data": {"dataset": "cifar10"},
            "model": {"name": "mlp_autoencoder"},
            "method": {"name": "autoencoder"},
        },
        "pixel": {},
        "conv": {"model": {"name": "conv_autoencoder"}, "method": {"name": "autoencoder"}},
    }
    for name, raw in runs.items():
        (root / name / "checkpoints").mkdir(parents=True)
        with zipfile.ZipFile(root / name / "checkpoints/latest.pt", "w") as checkpoint:  # torch.save's form
            checkpoint.writestr("latest/data.pkl", b"")
        write_config(validate_run(raw), root / name / CONFIG)
    expected = {
        "cifar": "run.method.autoencoder: 'cifar' is not allowed: it encodes cifar10 images of 3x32x32, and this "
        "run trains on 1x28x28",
        "pixel": "run.method.autoencoder: 'pixel' is not allowed: it is a 'ddpm' run, not an autoencoder",
        "conv": "run.model.name: 'mlp' is not allowed with method.autoencoder 'conv': a conv_autoencoder gives a "
        "latent grid; use 'unet' or 'dit'",
    }
    for name, message in expected.items():
        for reference in (name, f"{name}/checkpoints/latest.pt"):
            refused = ops(root, "submit", "tiny-latent", "--set", f"run.method.autoencoder={reference}", "--dry-run")
            assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
            assert message.replace(f"'{name}'", f"'{reference}'") in refused.stderr
    assert registry_rows(root) == []

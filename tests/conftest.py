import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from diffusion.config import RunConfig, dump_yaml, to_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mnist_root() -> Path:
    """The real MNIST files, from $DIFFUSION_DATA_ROOT (the README's test command sets it)."""
    root = os.environ.get("DIFFUSION_DATA_ROOT")
    if not root or not (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip("set DIFFUSION_DATA_ROOT to a folder holding MNIST/raw/ (see README)")
    return Path(root)


@pytest.fixture(scope="session")
def shakespeare_root() -> Path:
    """The real tiny-shakespeare corpus, from $DIFFUSION_DATA_ROOT (root/tinyshakespeare/input.txt)."""
    root = os.environ.get("DIFFUSION_DATA_ROOT")
    if not root or not (Path(root) / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip("set DIFFUSION_DATA_ROOT to a folder holding tinyshakespeare/input.txt (see README)")
    return Path(root)


@pytest.fixture
def tiny_config(mnist_root) -> RunConfig:
    """A run that trains in seconds on a CPU: 8-channel two-level UNet, 64 images, T=50."""
    return RunConfig.model_validate(
        {
            "device": "cpu",
            "data": {"root": str(mnist_root), "download": False, "subset": 64},
            "model": {
                "base_channels": 8,
                "channel_mults": [1, 2],
                "num_res_blocks": 1,
                "attention": True,
                "attention_heads": 2,
                "norm_groups": 4,
            },
            "method": {"num_train_timesteps": 50},
            "train": {
                "batch_size": 16,
                "epochs": 50,
                "lr": 1e-3,
                "log_every": 1,
                "sample_every_epochs": None,
                "checkpoint_every_steps": None,
                "checkpoint_every_minutes": None,
                "progress": "lines",
            },
            "sample": {"num_inference_steps": 4, "num_samples": 4},
        }
    )


def write_config(config: RunConfig, path: Path) -> Path:
    dump_yaml(to_dict(config), path)
    return path


def assert_resumes_bitwise(spec: Path, overrides: list[str], tmp_path: Path, parts=("model", "ema")) -> Path:
    """Train `spec` 4 steps in one go and 2 + 2 with a resume between: the checkpoints' `parts`
    are equal bit for bit. Returns the one-go run dir."""
    import torch

    from diffusion.config import load_run_config
    from diffusion.train import train

    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert train(load_run_config(spec, [*overrides, "train.max_steps=4"]), whole) == 0
    assert train(load_run_config(spec, [*overrides, "train.max_steps=2"]), halves) == 0
    assert train(load_run_config(spec, [*overrides, "train.max_steps=4"]), halves) == 0
    a = torch.load(whole / "checkpoints/latest.pt", weights_only=False)
    b = torch.load(halves / "checkpoints/latest.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for part in parts:
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name}"
    return whole


def run_diffusion(*args: str, **kwargs):
    """`python -m diffusion ...` in a fresh process, as engines start it."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "diffusion", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=kwargs.pop("cwd", REPO),
        **kwargs,
    )


@pytest.fixture
def git_project(tmp_path) -> Path:
    """A real git repo holding configs/jobs/tiny.yaml (see tests/ops_project.py)."""
    from tests.ops_project import make_project

    return make_project(tmp_path / "project")


@pytest.fixture
def ops_project(git_project, mnist_root, monkeypatch) -> Path:
    """git_project whose runs can train: the runs inherit DIFFUSION_DATA_ROOT."""
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(mnist_root.resolve()))
    return git_project


@contextmanager
def exported(env: dict[str, str]):
    """`env` in os.environ for a session fixture's lifetime (the tools the code under test runs
    read it), and the previous values back afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield


def _running_slurm_partition(env: dict[str, str]) -> str | None:
    """The default partition of the cluster $SLURM_CONF points at, or None when no cluster answers."""
    import shutil
    import subprocess

    if not shutil.which("sinfo"):
        return None
    result = subprocess.run(["sinfo", "-h", "-o", "%P"], env=env, capture_output=True, text=True)
    partitions = result.stdout.split()
    if result.returncode != 0 or not partitions:
        return None
    return next((p.rstrip("*") for p in partitions if p.endswith("*")), partitions[0])


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real SLURM cluster with accounting: the one $SLURM_CONF points at, else one started for the session.

    The started one exports SLURM_CONF in os.environ for the whole session so that subprocesses and submitit
    find it. Yields an object with `env` (variables for SLURM clients) and `partition`.
    """
    from types import SimpleNamespace

    from tests.slurm_cluster import SlurmCluster, slurm_available

    if os.environ.get("SLURM_CONF"):
        partition = _running_slurm_partition(dict(os.environ))
        if partition is not None:
            yield SimpleNamespace(env={"SLURM_CONF": os.environ["SLURM_CONF"]}, partition=partition)
            return
    if not slurm_available():
        pytest.skip("SLURM not installed: apt-get install slurmctld slurmd slurm-client munge slurmdbd mariadb-server")
    cluster = SlurmCluster()
    cluster.start(tmp_path_factory.mktemp("slurm"))
    with exported(cluster.env):
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def image_infra(tmp_path_factory):
    """Image builds without a Docker daemon: the test base image and a local registry for the session.

    The base (tests/image_infra.py) is Debian bookworm with the CPU torch and every dependency of pyproject.toml,
    so that building the repo's Dockerfile on it installs only the project; it is built once per machine (about
    3 minutes) and kept in buildah's vfs storage. STORAGE_DRIVER=vfs and CONTAINERS_STORAGE_CONF (a storage.conf
    naming vfs: buildah 1.28 ignores STORAGE_DRIVER) are exported for the session, so that buildah/skopeo run
    by the code under test with no storage flag use the same storage. Yields an object with `registry`
    ("127.0.0.1:PORT", plain HTTP: push with --tls-verify=false), `base_image` (a local image name) and `env`
    (the variables exported).
    """
    from types import SimpleNamespace

    from tests.image_infra import INSTALL_HINT, LocalRegistry, ensure_base_image, image_tools_available, vfs_storage_env

    if not image_tools_available():
        pytest.skip(f"image tools missing: {INSTALL_HINT}")
    env = vfs_storage_env(tmp_path_factory.mktemp("containers"))
    registry = LocalRegistry()
    with exported(env):
        try:
            base_image = ensure_base_image(work_dir=tmp_path_factory.mktemp("image-base"))
            registry.start(tmp_path_factory.mktemp("registry"))
            yield SimpleNamespace(registry=registry.address, base_image=base_image, env=env)
        finally:
            registry.stop()

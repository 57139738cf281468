"""The image infrastructure that `ops build` tests stand on (tests/image_infra.py, the `image_infra` fixture).

Both tests need buildah, skopeo, docker-registry and mmdebstrap (skipped otherwise); the first session on a
machine builds the base image (about 3 minutes), later ones reuse it.
"""

import re
import subprocess
import time
import uuid

import pytest

from tests.conftest import REPO
from tests.image_infra import buildah

pytestmark = pytest.mark.timeout(1800)  # the first session builds the base image in the fixture


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    """A command as `ops build` runs it: STORAGE_DRIVER=vfs comes from the image_infra fixture."""
    return subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kwargs)


def test_base_image_holds_torch_and_the_dependencies(image_infra):
    start = time.monotonic()
    container = buildah("from", "--pull-never", image_infra.base_image, capture=True).stdout.strip().splitlines()[-1]
    try:
        result = buildah(
            "run",
            "--isolation",
            "chroot",
            container,
            "--",
            "python3",
            "-c",
            "import torch, pydantic, torchvision, numpy, scipy, torchmetrics, matplotlib, typer, rich, "
            "psutil, filelock, submitit, ruamel.yaml, PIL; from torchvision.ops import nms; "
            "from importlib.metadata import version; version('gitpython'); "
            "print(torch.__version__, torchvision.__version__, pydantic.VERSION, "
            "nms(torch.tensor([[0., 0, 1, 1], [0, 0, 1, 1]]), torch.tensor([0.9, 0.8]), 0.5).tolist())",
            capture=True,
            check=False,
        )
    finally:
        buildah("rm", container, capture=True, check=False)
    print(f"\nbase image check (from + run + rm): {time.monotonic() - start:.1f} s: {result.stdout.strip()}")
    assert result.returncode == 0, result.stderr
    torch_version, torchvision_version, _, kept = result.stdout.strip().split(maxsplit=3)
    assert torch_version.startswith("2.13."), torch_version
    assert torchvision_version.startswith("0.28."), torchvision_version
    assert kept == "[0]"  # torchvision's CPU kernels work


def test_real_dockerfile_builds_on_the_base_and_pushes(image_infra, tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(context)], input=archive, check=True)
    ref = f"{image_infra.registry}/diffusion-ops:test-{uuid.uuid4().hex[:8]}"
    digest_file = tmp_path / "digest"
    try:
        start = time.monotonic()
        build = _run(
            "buildah",
            "bud",
            "--isolation",
            "chroot",
            "--build-arg",
            f"BASE_IMAGE={image_infra.base_image}",
            "-t",
            ref,
            str(context),
        )
        built = time.monotonic()
        output = build.stdout + build.stderr
        assert build.returncode == 0, output[-4000:]
        # The dependencies come from the base: pip finds them all there and fetches nothing.
        assert "Requirement already satisfied: torch" in output, output[-4000:]
        assert "Successfully installed diffusion-ops" in output, output[-4000:]
        for word in ("Collecting", "Downloading"):
            assert word not in output, [line for line in output.splitlines() if word in line]

        push = _run("buildah", "push", "--tls-verify=false", "--digestfile", str(digest_file), ref, f"docker://{ref}")
        pushed = time.monotonic()
        assert push.returncode == 0, push.stderr
        inspect = _run("skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}", f"docker://{ref}")
        assert inspect.returncode == 0, inspect.stderr
        digest = digest_file.read_text().strip()
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
        assert inspect.stdout.strip() == digest
        print(
            f"\nbuild {built - start:.1f} s, push {pushed - built:.1f} s, inspect {time.monotonic() - pushed:.1f} s; "
            f"{ref}@{digest}"
        )
    finally:
        _run("buildah", "rmi", "--force", ref)  # vfs keeps a full copy of each layer: don't let test images pile up

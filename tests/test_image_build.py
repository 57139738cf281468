"""`ops build` with buildah and a local registry (tests/image_infra.py): the real Dockerfile, tags by
commit and diff hash, skipped when the registry has the tag, and no secret in any layer."""

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.ops_project import git, ops_json
from tests.vertex_standin import VertexStandIn

SECRET = "sk-live-do-not-ship-0123456789"


@pytest.fixture
def image_project(tmp_path, image_infra, monkeypatch):
    """A copy of this repository's working tree (files git tracks or would track) as its own git repo,
    building into the local registry. `python -m ops` run in it imports that copy's ops."""
    root = tmp_path / "project"
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "Test")
    git(root, "add", "-A")
    # Fixed dates: every test's copy gets the same commit, so later tests find its image in the registry.
    fixed = {"GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z"}
    subprocess.run(["git", "commit", "-qm", "snapshot"], cwd=root, check=True, env={**os.environ, **fixed})
    for key, value in {
        "IMAGE_REPOSITORY": f"{image_infra.registry}/diffusion",
        "IMAGE_BUILDER": "buildah",
        "IMAGE_BASE": image_infra.base_image,
        "IMAGE_TLS_VERIFY": "false",
    }.items():
        monkeypatch.setenv(f"OPS_{key}", value)
    yield root
    # Each image is a full copy in vfs storage (~1.5 GB): drop the local ones (the registry keeps its copy).
    listed = subprocess.run(["buildah", "images", "--format", "{{.Name}}:{{.Tag}}"], capture_output=True, text=True)
    for name in listed.stdout.split():
        if name.startswith(f"{image_infra.registry}/diffusion:"):
            subprocess.run(["buildah", "rmi", "-f", name], capture_output=True)


def layer_bytes(reference: str, folder: Path) -> list[bytes]:
    """Every file's bytes in every layer of the pushed image."""
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{reference}", f"dir:{folder}"],
        check=True,
        capture_output=True,
    )
    contents = []
    manifest = json.loads((folder / "manifest.json").read_text())
    for layer in manifest["layers"]:
        blob = (folder / layer["digest"].split(":", 1)[1]).read_bytes()
        data = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    contents.append(tar.extractfile(member).read())
    return contents


def test_build_tags_by_commit_skips_a_known_tag_and_keeps_secrets_out(image_project, tmp_path):
    root = image_project
    head = git(root, "rev-parse", "HEAD")
    first = ops_json(root, "build", "--push")
    assert first["tag"] == head[:12] and first["built"] and first["pushed"]
    assert first["digest"].startswith("sha256:")
    inspected = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}", f"docker://{first['reference']}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert inspected.stdout.strip() == first["digest"]

    again = ops_json(root, "build", "--push")
    assert (again["built"], again["pushed"], again["digest"]) == (False, False, first["digest"])

    # A dirty tree (a changed file) with secrets lying around: a new tag, and no secret in the image.
    (root / ".env").write_text(f"TOKEN={SECRET}\n")  # ignored by git
    (root / ".env.production").write_text(f"TOKEN={SECRET}\n")  # not ignored by git: .dockerignore's job
    (root / "configs/credentials.json").write_text(json.dumps({"key": SECRET}))
    # Names in other cases, and a secret under an innocent name, where the Dockerfile copies files.
    (root / "configs/.envrc").write_text(f"export TOKEN={SECRET}\n")
    (root / "configs/kaggle.json").write_text(json.dumps({"username": "me", "key": SECRET}))
    (root / "configs/Credentials.JSON").write_text(json.dumps({"key": SECRET}))
    (root / "configs/local.yaml").write_text(f"token: ghp_{'A' * 36}\n# {SECRET}\n")
    readme = root / "README.md"
    readme.write_text(readme.read_text() + "\nA local edit.\n")
    dirty = ops_json(root, "build", "--push")
    assert dirty["tag"].startswith(head[:12] + "-dirty-") and dirty["digest"] != first["digest"]
    files = layer_bytes(dirty["reference"], tmp_path / "layers")
    assert any(b"A local edit." in content for content in files)  # the edit is in, so the scan sees the code
    assert not any(SECRET.encode() in content for content in files)


def test_submit_to_vertex_builds_the_image_of_the_run_and_names_it_by_digest(image_project, monkeypatch):
    root = image_project
    with VertexStandIn() as standin:
        from gcp_storage_emulator.server import create_server

        from tests.test_vertex_engine import free_port

        port = free_port()
        server = create_server("127.0.0.1", port, in_memory=True, default_bucket="test-bucket")
        server.start()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        for key, value in {
            "GCP_PROJECT": "p",
            "GCS_BUCKET": "gs://test-bucket/runs",
            "VERTEX_API_ENDPOINT": standin.url,
        }.items():
            monkeypatch.setenv(f"OPS_{key}", value)
        try:
            run = ops_json(root, "submit", "mnist-quick", "--engine", "vertex")["runs"][0]
        finally:
            server.stop()
    image = json.loads((Path(run["run_dir"]) / "image.json").read_text())
    [job] = [r["body"] for r in standin.requests if r["method"] == "POST"]
    assert job["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]["imageUri"] == image["image"]
    assert "@sha256:" in image["image"] and image["tag"] == git(root, "rev-parse", "HEAD")[:12]
    # Submitting appended to EXPERIMENT_LOG.md: a record, not code, so the tree still builds the same image.
    assert "## " + run["ops_id"] in (root / "EXPERIMENT_LOG.md").read_text()
    assert ops_json(root, "build", "--push")["built"] is False

"""`ops build`: the image for a piece of code, tagged so that it is never stale.

The tag is the commit (`REPO:1a2b3c4d5e6f`), plus a hash of diff.patch when the tree is dirty
(`REPO:1a2b3c4d5e6f-dirty-9f8e7d6c5b4a`): the same tag always means the same code, so a tag the
registry already has is neither rebuilt nor pushed again. The build context is that code
restored from the commit and diff.patch in a temporary folder (not the working tree), filtered by
.dockerignore, which keeps secrets, data and outputs out. The result names the image by digest.
"""

import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ops.errors import OpsError
from ops.provenance import capture, restore
from ops.rundir import DIFF, PROVENANCE, read_required

BUILDERS = ("docker", "podman", "buildah")


@dataclass
class Image:
    repository: str
    tag: str
    digest: str | None
    built: bool
    pushed: bool

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def by_digest(self) -> str:
        return f"{self.repository}@{self.digest}"

    def to_json(self) -> dict:
        return asdict(self) | {"reference": self.reference, "image": self.by_digest if self.digest else self.reference}


def image_tag(provenance: dict, patch: bytes) -> str:
    git = provenance["git"]
    tag = git["commit"][:12]
    if patch:
        tag += "-dirty-" + hashlib.sha256(patch).hexdigest()[:12]
    return tag


def pick_builder(configured: str | None) -> str:
    if configured:
        if configured not in BUILDERS:
            raise OpsError(f"ops.yaml: image_builder: {configured!r} is not allowed: one of {', '.join(BUILDERS)}")
        if not shutil.which(configured):
            raise OpsError(f"ops.yaml: image_builder: {configured!r} is not installed here")
        return configured
    for name in BUILDERS:
        if shutil.which(name):
            return name
    raise OpsError("no image builder found: install docker, podman or buildah (or set image_builder in ops.yaml)")


def run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise OpsError(f"{what} failed ({' '.join(command[:3])} ...): {' / '.join(tail)}")
    return result.stdout


def remote_digest(reference: str, tls_verify: bool) -> str | None:
    """The digest of a tag in the registry, None when the registry does not have it."""
    if shutil.which("skopeo"):
        result = subprocess.run(
            [
                "skopeo",
                "inspect",
                f"--tls-verify={str(tls_verify).lower()}",
                "--format",
                "{{.Digest}}",
                f"docker://{reference}",
            ],
            capture_output=True,
            text=True,
        )
        return result.stdout.strip() or None if result.returncode == 0 else None
    result = subprocess.run(["docker", "manifest", "inspect", "-v", reference], capture_output=True, text=True)
    return json.loads(result.stdout)["Descriptor"]["digest"] if result.returncode == 0 else None


def build_and_push(
    builder: str, context: Path, reference: str, push: bool, tls_verify: bool, build_args: dict[str, str]
) -> str | None:
    args = [arg for key, value in build_args.items() for arg in ("--build-arg", f"{key}={value}")]
    if builder == "buildah":
        run(["buildah", "bud", "--isolation", "chroot", *args, "-t", reference, str(context)], "image build")
    else:
        run([builder, "build", *args, "-t", reference, str(context)], "image build")
    if not push:
        return None
    if builder == "docker":
        run(["docker", "push", reference], "image push")
        out = run(["docker", "inspect", "--format", "{{index .RepoDigests 0}}", reference], "image inspect")
        return out.strip().rsplit("@", 1)[1]
    with tempfile.TemporaryDirectory() as folder:
        digest_file = Path(folder) / "digest"
        run(
            [
                builder,
                "push",
                f"--tls-verify={str(tls_verify).lower()}",
                "--digestfile",
                str(digest_file),
                reference,
                f"docker://{reference}",
            ],
            "image push",
        )
        return digest_file.read_text().strip()


def build_image(
    project,
    push: bool,
    builder: str | None = None,
    run_dir: Path | None = None,
    build_args: dict[str, str] | None = None,
) -> Image:
    """The image of the working tree's code (or of a run's recorded code: `run_dir`)."""
    settings = project.settings
    if not settings.image_repository:
        raise OpsError("ops.yaml: image_repository: missing; e.g. us-central1-docker.pkg.dev/PROJECT/REPO/diffusion")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if run_dir is None:
            provenance, patch_path = capture(project.root, folder, exclude=project.not_code()), folder / DIFF
        else:
            provenance = read_required(run_dir / PROVENANCE)
            patch_path = run_dir / DIFF
        if provenance["git"] is None:
            raise OpsError("an image is tagged by its commit: build inside a git repository")
        tag = image_tag(provenance, patch_path.read_bytes())
        reference = f"{settings.image_repository}:{tag}"
        if push:
            digest = remote_digest(reference, settings.image_tls_verify)
            if digest:
                return Image(settings.image_repository, tag, digest, built=False, pushed=False)
        builder = pick_builder(builder or settings.image_builder)
        context = restore(provenance, patch_path, project.root, folder / "context")  # the project's folder
        if not (context / "Dockerfile").is_file():
            raise OpsError(f"no Dockerfile at the root of commit {provenance['git']['short_commit']}")
        build_args = {**({"BASE_IMAGE": settings.image_base} if settings.image_base else {}), **(build_args or {})}
        digest = build_and_push(builder, context, reference, push, settings.image_tls_verify, build_args)
        return Image(settings.image_repository, tag, digest, built=True, pushed=push)

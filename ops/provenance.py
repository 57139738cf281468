"""Record which code a run used, and get that code back.

`capture` writes `run_dir/diff.patch` (every change in the working tree against HEAD: tracked edits and
deletions, and untracked files that .gitignore does not exclude, as a binary-safe patch) and returns the
provenance record. `restore` rebuilds the code from the record and the patch: the recorded commit's tree
with diff.patch applied.

The record is a JSON-serialisable dict; other code reads these fields, so they are a stable interface:

    git            None when the run was recorded outside git (--allow-no-git), else a dict:
        commit             full sha of HEAD
        short_commit       its abbreviation (`git rev-parse --short`)
        branch             branch name, None when HEAD is detached
        remote             URL of `origin` (else of the first remote, None if there is none),
                           with any user:password@ stripped so that tokens are never recorded
        dirty              True when the working tree differs from HEAD (tracked changes, or untracked
                           files that .gitignore does not exclude)
        diff_stat          summary line of the captured changes, e.g.
                           "3 files changed, 10 insertions(+), 2 deletions(-)"; "" when clean
        untracked          paths not in HEAD (untracked, or only staged) that diff.patch includes
        skipped_untracked  [{"path", "bytes", "reason", "secret"}] for such paths left out of
                           diff.patch: secrets by name (SECRET_NAMES) or content (SECRET_CONTENT),
                           files that are not code or config (CODE_SUFFIXES), files over
                           MAX_UNTRACKED_FILE_BYTES, nested git repositories (bytes None)
        patch_bytes        size of diff.patch
        project_dir        the project's folder within the repository, "" at its root
    versions       {"python", "torch", "torchvision", "numpy", "pydantic", "diffusion-ops"}: installed
                   versions, None for a package that is not installed
    host           socket.gethostname()
    user           getpass.getuser()
    platform       platform.platform()
    captured_at    UTC time of capture, ISO 8601 with Z, e.g. "2025-01-31T12:00:00Z"
    argv           sys.argv, secrets given as KEY=VALUE replaced by *** (ops.secrets)
"""

import getpass
import os
import platform
import socket
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ops.errors import OpsError
from ops.rundir import DIFF, atomic_write
from ops.secrets import redact_words, secret_content, secret_name

# What an untracked file must be to enter a snapshot (diff.patch, which travels to clusters, buckets
# and images as RUN_DIR/code and the build context): code or config the run may need, at most
# MAX_UNTRACKED_FILE_BYTES, with no secret in its name or its content. Everything else is left out
# and listed in skipped_untracked with its reason; `ops submit` says which.
MAX_UNTRACKED_FILE_BYTES = 1_000_000
CODE_SUFFIXES = (
    ".py",
    ".pyi",
    ".pyx",
    ".pxd",
    ".c",
    ".cc",
    ".cpp",
    ".h",
    ".hpp",
    ".cu",
    ".cuh",
    ".sh",
    ".proto",
    ".yaml",
    ".yml",
    ".toml",
    ".json",
    ".cfg",
    ".ini",
    ".txt",
    ".md",
    ".rst",
    ".ipynb",
    ".jinja",
    ".j2",
    ".sql",
    ".lock",
    ".cmake",
    ".mk",
    ".in",
    ".js",
    ".ts",
    ".css",
    ".html",
)
CODE_NAMES = ("makefile", ".dockerignore", ".gitignore")  # and dockerfile, Dockerfile.gpu ...
MAX_PATCH_BYTES = 20_000_000

PACKAGES = ("torch", "torchvision", "numpy", "pydantic", "diffusion-ops")


class ProvenanceError(OpsError):
    """One readable line: why provenance could not be captured or restored."""


def capture(repo_root: Path, run_dir: Path, allow_no_git: bool = False, exclude: tuple[str, ...] = ()) -> dict:
    """Write run_dir/diff.patch and return the provenance record (fields in the module docstring).

    `exclude`: paths (relative to the repo root) whose changes are not code and stay out of the
    patch, e.g. the experiment log that ops itself appends to at every submit."""
    run_dir.mkdir(parents=True, exist_ok=True)
    patch = run_dir / DIFF
    repo = _open_repo(repo_root)
    if repo is None:
        if not allow_no_git:
            raise ProvenanceError(
                f"{repo_root} is not inside a git repository; commit your work in one, "
                "or pass --allow-no-git to record the run without provenance"
            )
        patch.write_bytes(b"")
        git_record = None
    else:
        git_record = _capture_git(repo, patch, Path(repo_root), exclude)
    return {
        "git": git_record,
        "versions": {"python": platform.python_version()} | {name: _version(name) for name in PACKAGES},
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "platform": platform.platform(),
        "captured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "argv": redact_words(sys.argv),
    }


def restore(provenance: dict, patch: Path, repo_root: Path, dest: Path) -> Path:
    """Materialise the code as it was at capture into dest (which must be missing or empty):
    the recorded commit's tree from the repository at repo_root, with diff.patch applied.
    Returns the project's folder in it: dest itself, or dest/SUB for a project in a subfolder."""
    info = provenance.get("git")
    if info is None:
        raise ProvenanceError("this run was recorded without git (--allow-no-git), so its code cannot be restored")
    repo = _open_repo(repo_root)
    if repo is None:
        raise ProvenanceError(f"{repo_root} is not inside a git repository; restore needs the one the run came from")
    root = Path(repo.working_tree_dir)
    commit, short = info["commit"], info["short_commit"]
    status, _, _ = repo.git.cat_file("-e", f"{commit}^{{commit}}", with_extended_output=True, with_exceptions=False)
    if status != 0:
        raise ProvenanceError(
            f"commit {short} is not in {root} (was it rebased away or never pushed? fetch it, or submit anew)"
        )
    if dest.exists() and any(dest.iterdir()):
        raise ProvenanceError(f"{dest} is not empty; restore into a new directory")

    # Build the tree in a scratch index of the source repository rather than with `git archive` + `git apply`
    # in dest: archive drops export-ignore paths and rewrites export-subst files, and `git apply` run in a dest
    # that sits inside some other repository would patch relative to that repository's root.
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        repo.git.read_tree(commit, env=env)
        if patch.stat().st_size > 0:  # `git apply` rejects an empty patch
            status, _, err = repo.git.apply(
                "--cached",
                "--binary",
                str(patch.resolve()),
                env=env,
                with_extended_output=True,
                with_exceptions=False,
            )
            if status != 0:
                first = err.strip().splitlines()[0] if err.strip() else f"git apply exited {status}"
                raise ProvenanceError(f"{patch} does not apply to commit {short}: {first}")
        dest.mkdir(parents=True, exist_ok=True)
        repo.git.checkout_index("--all", f"--prefix={dest.resolve()}/", env=env)
    return dest / info.get("project_dir", "")


def is_record(path: str, record: str) -> bool:
    """`path` is the record, inside it (a folder of them), or its temporary file while another ops
    writes it (atomic_write's `.NAME.PID.tmp` beside it)."""
    name, folder = Path(record).name, Path(record).parent
    return (
        path == record
        or path.startswith(record + "/")
        or (Path(path).parent == folder and Path(path).name.startswith(f".{name}.") and path.endswith(".tmp"))
    )


def left_out(root: Path, path: str) -> str | None:
    """Why an untracked file stays out of the snapshot, or None when it goes in."""
    if path.endswith("/"):
        return "nested repository"  # adding it would record only a gitlink
    if secret_name(path):
        return "secret by its name"
    if (root / path).is_symlink():
        return "a symbolic link"  # it may point anywhere, a key file included
    name = Path(path).name.lower()
    if not (name.endswith(CODE_SUFFIXES) or name in CODE_NAMES or name.startswith("dockerfile")):
        return "not code or config"
    size = (root / path).lstat().st_size
    if size > MAX_UNTRACKED_FILE_BYTES:
        return f"larger than {MAX_UNTRACKED_FILE_BYTES:,} bytes"
    if secret_content((root / path).read_bytes()):
        return "secret in its content"
    return None


def _open_repo(path: Path):
    import git  # GitPython, heavy: imported only by the commands that record or restore code

    try:
        return git.Repo(path, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None


def _capture_git(repo, patch: Path, project: Path, exclude: tuple[str, ...] = ()) -> dict:
    root = Path(repo.working_tree_dir).resolve()
    # The project may sit in a folder of its repository: git wants paths from the repository's root.
    project_dir = project.resolve().relative_to(root).as_posix()
    exclude = tuple(Path(os.path.normpath(Path(project_dir) / path)).as_posix() for path in exclude)
    if not repo.head.is_valid():
        raise ProvenanceError(f"{root} has no commits yet; commit once before submitting")
    commit = repo.head.commit.hexsha

    # Stage the working tree into a scratch index so the user's real index (their staged work) is never touched.
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        repo.git.read_tree("HEAD", env=env)
        repo.git.add("--update", env=env)
        # Listed against the scratch index, so "untracked" means "not in HEAD": a file the user has only
        # staged would otherwise count as tracked and be missing from the patch.
        listed = repo.git.ls_files("--others", "--exclude-standard", "-z", env=env).split("\0")
        untracked, skipped = [], []
        for path in filter(None, listed):
            if any(is_record(path, record) for record in exclude):
                continue  # ops' own records: neither code nor a reason to call the tree dirty
            if not (root / path).is_symlink() and not (root / path).exists() and not path.endswith("/"):
                continue  # gone since it was listed: another ops's temporary file
            reason = left_out(root, path)
            if reason is None:
                untracked.append(path)
            else:
                size = None if path.endswith("/") else (root / path).lstat().st_size
                skipped.append({"path": path, "bytes": size, "reason": reason, "secret": reason.startswith("secret")})
        if untracked:
            pathspecs = Path(tmp) / "pathspecs"
            pathspecs.write_bytes(b"\0".join(os.fsencode(path) for path in untracked))  # any file name
            # Literal, so a file named like a glob adds only itself.
            repo.git.add(
                "--pathspec-from-file", str(pathspecs), "--pathspec-file-nul", env=env | {"GIT_LITERAL_PATHSPECS": "1"}
            )
        if exclude:
            repo.git.reset("-q", "HEAD", "--", *exclude, env=env)  # back to HEAD in the scratch index only
        # Plumbing diff-index, not `git diff`: it ignores user config (noprefix, color, external diff,
        # textconv) that would make the patch unappliable.
        scratch = Path(tmp) / DIFF
        with scratch.open("wb") as f:
            repo.git.diff_index("--cached", "--patch", "--binary", "HEAD", env=env, output_stream=f)
        diff_stat = repo.git.diff_index("--cached", "--shortstat", "HEAD", env=env).strip()
        patch_bytes = scratch.stat().st_size
        if patch_bytes <= MAX_PATCH_BYTES:
            atomic_write(patch, scratch.read_bytes())

    if patch_bytes > MAX_PATCH_BYTES:
        raise ProvenanceError(
            f"uncommitted changes make a {patch_bytes / 1e6:.1f} MB patch (limit {MAX_PATCH_BYTES / 1e6:.0f} MB); "
            "commit them, or .gitignore large files"
        )
    return {
        "commit": commit,
        "short_commit": repo.git.rev_parse("--short", commit),
        "branch": None if repo.head.is_detached else repo.active_branch.name,
        "remote": _remote_url(repo),
        "dirty": patch_bytes > 0 or bool(skipped),
        "diff_stat": diff_stat,
        "untracked": untracked,
        "skipped_untracked": skipped,
        "patch_bytes": patch_bytes,
        "project_dir": "" if project_dir == "." else project_dir,
    }


def _remote_url(repo) -> str | None:
    if not repo.remotes:
        return None
    names = [r.name for r in repo.remotes]
    remote = repo.remote("origin" if "origin" in names else names[0])
    return _strip_credentials(remote.url)


def _strip_credentials(url: str) -> str:
    """`https://user:token@host/x` -> `https://host/x`; scp-style `git@host:x` has no secret and is kept."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _version(package: str) -> str | None:
    import importlib.metadata  # tens of ms: only when a run's provenance is recorded, not for `ops --help`

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None

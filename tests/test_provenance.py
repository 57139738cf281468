import json
import subprocess
import sys
from pathlib import Path

import pytest

from ops import provenance
from ops.provenance import ProvenanceError, capture, restore


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def make_repo(path: Path, branch: str = "main") -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", branch)
    git(path, "config", "user.name", "Test")
    git(path, "config", "user.email", "test@example.com")
    (path / "README.md").write_text("hello\n")
    (path / "pkg").mkdir()
    (path / "pkg" / "model.py").write_text("def f():\n    return 1\n")
    (path / "pkg" / "old.py").write_text("gone soon\n")
    (path / ".gitignore").write_text("*.log\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "first")
    return path


def tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file() and ".git" not in p.relative_to(root).parts}


def test_clean_repo(tmp_path):
    repo = make_repo(tmp_path / "repo", branch="trunk")
    record = capture(repo, tmp_path / "run")
    assert record["git"]["commit"] == git(repo, "rev-parse", "HEAD").strip()
    assert record["git"]["commit"].startswith(record["git"]["short_commit"])
    assert record["git"]["branch"] == "trunk"
    assert record["git"]["dirty"] is False
    assert record["git"]["diff_stat"] == ""
    assert record["git"]["remote"] is None
    assert (tmp_path / "run" / "diff.patch").read_bytes() == b""
    assert record["git"]["patch_bytes"] == 0
    assert record["captured_at"].endswith("Z")
    assert set(record["versions"]) == {"python", "torch", "torchvision", "numpy", "pydantic", "diffusion-ops"}
    json.dumps(record)


def test_dirty_tree_restores_exactly_and_leaves_index_alone(tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo / "pkg" / "model.py").write_text("def f():\n    return 2\n")
    (repo / "pkg" / "old.py").unlink()
    (repo / "notes.txt").write_text("an idea\n")
    (repo / "data").mkdir()
    (repo / "data" / "blob.bin").write_bytes(bytes(range(256)))
    (repo / "train.log").write_text("ignored\n")
    (repo / "staged.py").write_text("x = 1\n")
    git(repo, "add", "staged.py")  # staged but not committed: must be captured, and stay staged
    status_before = git(repo, "status", "--porcelain")
    index_before = (repo / ".git" / "index").read_bytes()

    record = capture(repo, tmp_path / "run")

    assert git(repo, "status", "--porcelain") == status_before
    assert git(repo, "diff", "--cached", "--name-only") == "staged.py\n"
    assert (repo / ".git" / "index").read_bytes() == index_before
    info = record["git"]
    assert info["dirty"] is True
    assert sorted(info["untracked"]) == ["data/blob.bin", "notes.txt", "staged.py"]
    assert info["skipped_untracked"] == []
    assert info["diff_stat"].startswith("5 files changed")
    patch = tmp_path / "run" / "diff.patch"
    assert info["patch_bytes"] == patch.stat().st_size > 0
    assert b"train.log" not in patch.read_bytes()

    dest = tmp_path / "restored"
    restore(record, patch, repo, dest)
    expected = {k: v for k, v in tree_files(repo).items() if k != "train.log"}
    assert tree_files(dest) == expected
    assert (dest / "data" / "blob.bin").read_bytes() == bytes(range(256))
    assert not (dest / "train.log").exists()
    assert not (dest / "pkg" / "old.py").exists()


def test_restore_into_a_folder_inside_the_repo(tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo / "README.md").write_text("changed\n")
    record = capture(repo, tmp_path / "run")
    dest = repo / "runs" / "code"
    restore(record, tmp_path / "run" / "diff.patch", repo, dest)
    assert (dest / "README.md").read_text() == "changed\n"
    assert (repo / "README.md").read_text() == "changed\n"


def test_oversized_untracked_file_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "MAX_UNTRACKED_FILE_BYTES", 100)
    repo = make_repo(tmp_path / "repo")
    (repo / "weights.bin").write_bytes(b"\x01" * 500)
    record = capture(repo, tmp_path / "run")
    assert record["git"]["dirty"] is True  # the tree differs from HEAD even though the patch is empty
    assert (tmp_path / "run" / "diff.patch").read_bytes() == b""

    (repo / "small.txt").write_text("small\n")
    record = capture(repo, tmp_path / "run")
    assert record["git"]["untracked"] == ["small.txt"]
    assert record["git"]["skipped_untracked"] == [{"path": "weights.bin", "bytes": 500}]
    text = (tmp_path / "run" / "diff.patch").read_bytes()
    assert b"small.txt" in text
    assert b"weights.bin" not in text


def test_oversized_patch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "MAX_PATCH_BYTES", 1000)
    repo = make_repo(tmp_path / "repo")
    (repo / "README.md").write_text("line\n" * 1000)
    with pytest.raises(ProvenanceError, match=r"MB patch .*commit them, or \.gitignore large files"):
        capture(repo, tmp_path / "run")


def test_remote_credentials_are_stripped(tmp_path):
    repo = make_repo(tmp_path / "repo")
    git(repo, "remote", "add", "upstream", "https://someone@example.org/other.git")
    git(repo, "remote", "add", "origin", "https://alice:tok-SECRET123@github.com/lab/diffusion.git")
    record = capture(repo, tmp_path / "run")
    assert record["git"]["remote"] == "https://github.com/lab/diffusion.git"
    dumped = json.dumps(record)
    assert "tok-SECRET123" not in dumped
    assert "alice" not in dumped


def test_scp_style_remote_is_kept(tmp_path):
    repo = make_repo(tmp_path / "repo")
    git(repo, "remote", "add", "mirror", "git@github.com:lab/diffusion.git")
    assert capture(repo, tmp_path / "run")["git"]["remote"] == "git@github.com:lab/diffusion.git"


def test_not_a_git_repo(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ProvenanceError) as err:
        capture(plain, tmp_path / "run")
    assert str(err.value) == (
        f"{plain} is not inside a git repository; commit your work in one, "
        "or pass --allow-no-git to record the run without provenance"
    )
    assert not (tmp_path / "run" / "diff.patch").exists()

    record = capture(plain, tmp_path / "run", allow_no_git=True)
    assert "git" in record and record["git"] is None
    assert (tmp_path / "run" / "diff.patch").read_bytes() == b""
    with pytest.raises(ProvenanceError, match="recorded without git"):
        restore(record, tmp_path / "run" / "diff.patch", plain, tmp_path / "restored")


def test_repo_without_commits(tmp_path):
    repo = tmp_path / "empty"
    repo.mkdir()
    git(repo, "init", "-q")
    with pytest.raises(ProvenanceError, match="has no commits yet; commit once before submitting"):
        capture(repo, tmp_path / "run")


def test_restore_missing_commit(tmp_path):
    repo = make_repo(tmp_path / "repo")
    record = capture(repo, tmp_path / "run")
    record["git"] |= {"commit": "a" * 40, "short_commit": "aaaaaaa"}
    with pytest.raises(ProvenanceError, match=r"commit aaaaaaa is not in .*rebased away or never pushed"):
        restore(record, tmp_path / "run" / "diff.patch", repo, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


def test_restore_commit_rebased_away(tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo / "README.md").write_text("second\n")
    git(repo, "commit", "-q", "-am", "second")
    record = capture(repo, tmp_path / "run")
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    git(repo, "gc", "-q", "--prune=now")
    with pytest.raises(ProvenanceError, match=f"commit {record['git']['short_commit']} is not in"):
        restore(record, tmp_path / "run" / "diff.patch", repo, tmp_path / "restored")


def test_restore_patch_that_does_not_apply(tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo / "README.md").write_text("changed\n")
    record = capture(repo, tmp_path / "run")
    patch = tmp_path / "run" / "diff.patch"
    patch.write_text(patch.read_text().replace("-hello", "-something else"))
    with pytest.raises(ProvenanceError, match="does not apply to commit"):
        restore(record, patch, repo, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


def test_detached_head(tmp_path):
    repo = make_repo(tmp_path / "repo")
    git(repo, "checkout", "-q", "--detach", "HEAD")
    record = capture(repo, tmp_path / "run")
    assert record["git"]["branch"] is None
    assert record["git"]["commit"] == git(repo, "rev-parse", "HEAD").strip()


def test_import_does_not_load_git():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, ops.provenance; print('git' in sys.modules)"],
        check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert out.strip() == "False"


def test_untracked_secrets_stay_out_of_the_patch(tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo / ".env.production").write_text("API_TOKEN=sk-live-123\n")
    (repo / "gcp-service-account.json").write_text('{"private_key": "sk-live-456"}\n')
    (repo / "notes.txt").write_text("fine\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = capture(repo, run_dir)
    patch = (run_dir / "diff.patch").read_text()
    assert "notes.txt" in patch and "sk-live" not in patch
    assert {item["path"] for item in record["git"]["skipped_untracked"] if item.get("secret")} == {
        ".env.production", "gcp-service-account.json"}


def test_excluded_records_do_not_make_the_tree_dirty(tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo / "EXPERIMENT_LOG.md").write_text("# log\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "log")
    (repo / "EXPERIMENT_LOG.md").write_text("# log\n\n## a run\n")
    (repo / "docs/blog/posts").mkdir(parents=True)
    (repo / "docs/blog/posts/run.md").write_text("a post\n")
    run_dir = tmp_path / "run"
    record = capture(repo, run_dir, exclude=("EXPERIMENT_LOG.md", "docs/blog/posts"))
    assert record["git"]["dirty"] is False and (run_dir / "diff.patch").read_bytes() == b""
    (repo / "model.py").write_text("x = 1\n")
    record = capture(repo, run_dir, exclude=("EXPERIMENT_LOG.md", "docs/blog/posts"))
    patch = (run_dir / "diff.patch").read_text()
    assert record["git"]["dirty"] and "model.py" in patch and "a run" not in patch and "a post" not in patch

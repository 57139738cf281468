import json
import os
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
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


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
    (repo / "data" / "table.txt").write_bytes(bytes(range(256)))  # binary content: the patch is binary-safe
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
    assert sorted(info["untracked"]) == ["data/table.txt", "notes.txt", "staged.py"]
    assert info["skipped_untracked"] == []
    assert info["diff_stat"].startswith("5 files changed")
    patch = tmp_path / "run" / "diff.patch"
    assert info["patch_bytes"] == patch.stat().st_size > 0
    assert b"train.log" not in patch.read_bytes()

    dest = tmp_path / "restored"
    restore(record, patch, repo, dest)
    expected = {k: v for k, v in tree_files(repo).items() if k != "train.log"}
    assert tree_files(dest) == expected
    assert (dest / "data" / "table.txt").read_bytes() == bytes(range(256))
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
    (repo / "weights.json").write_bytes(b"\x01" * 500)
    record = capture(repo, tmp_path / "run")
    assert record["git"]["dirty"] is True  # the tree differs from HEAD even though the patch is empty
    assert (tmp_path / "run" / "diff.patch").read_bytes() == b""

    (repo / "small.txt").write_text("small\n")
    record = capture(repo, tmp_path / "run")
    assert record["git"]["untracked"] == ["small.txt"]
    assert record["git"]["skipped_untracked"] == [
        {"path": "weights.json", "bytes": 500, "reason": "larger than 100 bytes", "secret": False}
    ]
    text = (tmp_path / "run" / "diff.patch").read_bytes()
    assert b"small.txt" in text
    assert b"weights.json" not in text


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
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert out.strip() == "False"


SECRET = "sk-live-0123456789abcdefghijklmnop"
KEY_BLOCK = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def test_only_code_without_secrets_enters_the_snapshot(tmp_path):
    """Secret names in any case, secrets inside files with innocent names, and files that are not
    code stay out of diff.patch, each with its reason; code and config go in."""
    repo = make_repo(tmp_path / "repo")
    secrets_by_name = {
        ".env.production": f"API_TOKEN={SECRET}\n",
        ".envrc": f"export TOKEN={SECRET}\n",
        "kaggle.json": f'{{"username": "me", "key": "{SECRET}"}}\n',
        "Credentials.json": f'{{"token": "{SECRET}"}}\n',
        "gcp-service-account.json": "{}\n",
        "deploy/ID_RSA": KEY_BLOCK,
        ".ssh/config": f"IdentityFile {SECRET}\n",
        "Secrets/train.yaml": f"token: {SECRET}\n",
    }
    secrets_by_content = {
        "notes/key.txt": KEY_BLOCK,
        "config_local.yaml": f"hf: hf_{'a' * 34}\n",
        "sa.json": '{"type": "service_account", "project_id": "p"}\n',
    }
    code = {
        "model.py": "x = 1\n",
        "configs/jobs/new.yaml": "name: new\n",
        "notes.txt": "fine\n",
        "Dockerfile.gpu": None,
    }
    others = {"data.csv": "1,2\n", "weights.bin": "\0\0"}
    for path, text in {**secrets_by_name, **secrets_by_content, **code, **others}.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text if text is not None else "FROM base\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = capture(repo, run_dir)
    patch = (run_dir / "diff.patch").read_text()
    assert SECRET not in patch and "PRIVATE KEY" not in patch and "service_account" not in patch
    for path in ("model.py", "configs/jobs/new.yaml", "notes.txt"):
        assert f"b/{path}" in patch
    reasons = {item["path"]: item["reason"] for item in record["git"]["skipped_untracked"]}
    assert {path: reasons[path] for path in secrets_by_name} == dict.fromkeys(secrets_by_name, "secret by its name")
    assert {path: reasons[path] for path in secrets_by_content} == dict.fromkeys(
        secrets_by_content, "secret in its content"
    )
    assert {reasons[path] for path in others} == {"not code or config"}
    assert "Dockerfile.gpu" not in reasons and "b/Dockerfile.gpu" in patch  # a Dockerfile by any suffix is code
    assert all(item["secret"] == item["reason"].startswith("secret") for item in record["git"]["skipped_untracked"])


def test_dockerignore_carries_the_secret_names_in_any_case():
    """One list: the snapshot's SECRET_NAMES are .dockerignore's secret lines."""
    from ops.secrets import SECRET_NAMES, dockerignore_lines

    lines = (Path(__file__).resolve().parents[1] / ".dockerignore").read_text().splitlines()
    assert [line for line in lines if line.startswith("**/") and "[" in line] == dockerignore_lines()
    assert len(dockerignore_lines()) == len(SECRET_NAMES)
    import fnmatch

    # Docker matches case-sensitively; the any-case pattern takes every spelling.
    pattern = dockerignore_lines()[SECRET_NAMES.index("kaggle.json")].removeprefix("**/")
    assert all(fnmatch.fnmatchcase(name, pattern) for name in ("kaggle.json", "Kaggle.JSON", "KAGGLE.json"))


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


def test_odd_untracked_files_are_left_out_with_a_reason_not_a_crash(tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo / "deep").mkdir()
    (repo / "deep/dangling.py").symlink_to("/nonexistent/file.py")
    (repo / "deep/etc_link.py").symlink_to("/etc")
    (repo / os.fsdecode(b"bad\xffname.py")).write_text("x = 1\n")
    record = capture(repo, tmp_path / "run")
    reasons = {item["path"]: item["reason"] for item in record["git"]["skipped_untracked"]}
    assert reasons["deep/dangling.py"] == reasons["deep/etc_link.py"] == "a symbolic link"
    assert any(path.startswith("bad") for path in record["git"]["untracked"])  # a name that is not UTF-8 goes in


def test_secrets_in_more_formats_stay_out_and_code_that_only_looks_like_one_goes_in(tmp_path):
    repo = make_repo(tmp_path / "repo")
    secrets = {
        "adc.json": '{"type": "authorized_user", "client_secret": "x", "refresh_token": "y"}\n',
        "keys.py": f'API_KEY = "AIza{"A" * 35}"\n',
        "netrc.txt": "machine example.com login me password p\n",
        "docker/config.json": '{"auths": {"registry.example": {"auth": "eA=="}}}\n',
        "pay.py": f'STRIPE = "sk_live_{"a" * 24}"\n',
        "hooks.yaml": "url: https://hooks.slack.com/services/T000/B000/XXXX\n",
    }
    code = {
        "names.py": 'RUN = "mask-diffusion-ablation-lr-sweep"\n',
        "exp.yaml": "arch: task-conditioned_model_v2\n",
        "secret_sharing.py": "def share(): pass\n",
        "credentials.py": "def load(): pass\n",
        "schema.proto": "message A {}\n",
        "Dockerfile.cuda": "FROM base\n",
        "uv.lock": "version = 1\n",
        "query.sql": "select 1;\n",
        "template.j2": "{{ x }}\n",
    }
    for path, text in {**secrets, **code}.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    record = capture(repo, tmp_path / "run")
    patch = (tmp_path / "run/diff.patch").read_text()
    reasons = {item["path"]: item["reason"] for item in record["git"]["skipped_untracked"]}
    assert set(secrets) <= set(reasons) and all(reasons[path].startswith("secret") for path in secrets), reasons
    assert sorted(record["git"]["untracked"]) == sorted(code)
    assert all(f"b/{path}" in patch for path in code)


def test_another_ops_writing_a_record_makes_no_noise_in_the_snapshot(tmp_path):
    """Twenty submits at once: one's experiment-log temp file is untracked in another's capture."""
    repo = make_repo(tmp_path / "repo")
    (repo / ".EXPERIMENT_LOG.md.1092.tmp").write_text("# log, half written\n")
    (repo / "docs/blog/posts").mkdir(parents=True)
    (repo / "docs/blog/posts/.2026-11-30-x.md.77.tmp").write_text("a post, half written\n")
    record = capture(repo, tmp_path / "run", exclude=("EXPERIMENT_LOG.md", "docs/blog/posts"))
    assert record["git"]["untracked"] == [] and record["git"]["skipped_untracked"] == []
    assert record["git"]["dirty"] is False

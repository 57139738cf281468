"""Run dirs in Cloud Storage (google-cloud-storage, lazy import): upload at submit, read the log,
and `ops pull`, which downloads what is new, resumes a partial file and skips a file already
present with the same checksum. STORAGE_EMULATOR_HOST points the client at an emulator.
"""

import base64
import hashlib
import os
from pathlib import Path

from ops.errors import OpsError
from ops.rundir import CHECKPOINTS, EVAL, FIGURES, LATEST, SAMPLES

WHAT = {"checkpoints": (f"{CHECKPOINTS}/",), "samples": (f"{SAMPLES}/", f"{EVAL}/", f"{FIGURES}/"), "all": ("",)}


def split_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://"):
        raise OpsError(f"{uri!r}: not a Cloud Storage path; expected gs://BUCKET/PATH")
    bucket, _, path = uri.removeprefix("gs://").partition("/")
    return bucket, path.rstrip("/")


NO_CREDENTIALS = (
    "no Google credentials found; run `gcloud auth application-default login`, "
    "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file"
)


def client():
    # google.cloud, heavy: here and below, imported only by the commands that reach Cloud Storage
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    try:
        return storage.Client()
    except DefaultCredentialsError:
        raise OpsError(f"Cloud Storage: {NO_CREDENTIALS}") from None


def upload_run_dir(run_dir: Path, gcs_run_dir: str, names: tuple[str, ...]) -> None:
    bucket_name, prefix = split_uri(gcs_run_dir)
    bucket = client().bucket(bucket_name)
    for name in names:
        bucket.blob(f"{prefix}/{name}").upload_from_filename(str(run_dir / name))


def read_remote_from(uri: str, offset: int) -> tuple[str, int]:
    """Like engines.read_from, for a log file in Cloud Storage."""
    from google.api_core.exceptions import NotFound  # heavy, as in client()

    bucket_name, path = split_uri(uri)
    blob = client().bucket(bucket_name).blob(path)
    try:
        data = blob.download_as_bytes(start=offset) if offset else blob.download_as_bytes()
    except NotFound:
        return "", offset
    return data.decode(errors="replace"), offset + len(data)


def md5_matches(path: Path, md5_base64: str | None) -> bool:
    if not md5_base64 or not path.is_file():
        return False
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode() == md5_base64


def pull(
    gcs_run_dir: str, local_dir: Path, what: str = "all", progress=None, keep: frozenset[str] = frozenset()
) -> dict[str, list[str]]:
    """Download the run dir's files under `what`, except the local records in `keep` (ops' own, whose
    remote copies are older); returns {"downloaded": [...], "skipped": [...], "kept": [...]}."""
    from google.api_core.exceptions import GoogleAPICallError  # heavy, as in client()

    try:
        return pull_blobs(gcs_run_dir, local_dir, what, progress, keep)
    except GoogleAPICallError as exc:
        raise OpsError(
            f"{gcs_run_dir}: Cloud Storage refused the download ({' '.join(str(exc).split())}); "
            "`ops pull` again resumes it"
        ) from None


def pull_blobs(gcs_run_dir: str, local_dir: Path, what: str, progress, keep: frozenset[str]) -> dict[str, list[str]]:
    bucket_name, prefix = split_uri(gcs_run_dir)
    bucket = client().bucket(bucket_name)
    result = {"downloaded": [], "skipped": [], "kept": []}
    blobs = [
        blob
        for blob in bucket.list_blobs(prefix=prefix + "/")
        if blob.name.removeprefix(prefix + "/").startswith(WHAT[what])
    ]
    for blob in blobs:
        relative = blob.name.removeprefix(prefix + "/")
        target = local_dir / relative
        if relative.endswith("/") or not relative:
            continue  # a folder's placeholder object (the console and gcsfuse make them), not a file
        if ".." in Path(relative).parts or Path(relative).is_absolute():
            raise OpsError(f"gs://{bucket_name}/{blob.name}: its name leads out of the run dir; not downloaded")
        if relative in keep:
            result["kept"].append(relative)
            continue
        if md5_matches(target, blob.md5_hash):
            result["skipped"].append(relative)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        start = partial.stat().st_size if partial.is_file() else 0
        if start >= (blob.size or 0):
            partial.unlink(missing_ok=True)  # stale or complete-but-unverified: fetch it again
            start = 0
        with partial.open("ab") as f:
            blob.download_to_file(f, start=start or None)
        if not md5_matches(partial, blob.md5_hash) and blob.md5_hash:
            partial.unlink()
            raise OpsError(f"{blob.name}: downloaded file does not match its checksum; run `ops pull` again")
        os.replace(partial, target)
        result["downloaded"].append(relative)
        if progress:
            progress(relative)
    return result


def remote_files(gcs_run_dir: str) -> dict[str, int]:
    """{path relative to the run dir: bytes} of every object under `gcs_run_dir` (folder
    placeholders included, under their own name ending in /). OpsError, one line, when Cloud
    Storage refuses."""
    from google.api_core.exceptions import GoogleAPICallError  # heavy, as in client()

    bucket_name, prefix = split_uri(gcs_run_dir)
    try:
        return {
            blob.name.removeprefix(prefix + "/"): blob.size or 0
            for blob in client().bucket(bucket_name).list_blobs(prefix=prefix + "/")
        }
    except GoogleAPICallError as exc:
        raise OpsError(
            f"{gcs_run_dir}: Cloud Storage refused the listing ({' '.join(str(exc).split())}); "
            "--local-only leaves the bucket's copy as it is"
        ) from None


def remove_remote(gcs_run_dir: str, kept: set[str], latest_from: str | None = None) -> int:
    """Delete every object under `gcs_run_dir` but the `kept` relative paths, after copying
    `latest_from` (a kept step checkpoint) over checkpoints/latest.pt when given; bytes deleted.
    OpsError, one line, when Cloud Storage refuses (run `ops rm` again: it deletes what is left)."""
    from google.api_core.exceptions import GoogleAPICallError  # heavy, as in client()

    bucket_name, prefix = split_uri(gcs_run_dir)
    bucket = client().bucket(bucket_name)
    try:
        if latest_from is not None:
            bucket.copy_blob(bucket.blob(f"{prefix}/{latest_from}"), bucket, f"{prefix}/{CHECKPOINTS}/{LATEST}")
        freed = 0
        for blob in bucket.list_blobs(prefix=prefix + "/"):
            if blob.name.removeprefix(prefix + "/") not in kept:
                blob.delete()
                freed += blob.size or 0
    except GoogleAPICallError as exc:
        raise OpsError(
            f"{gcs_run_dir}: Cloud Storage refused a deletion ({' '.join(str(exc).split())}); `ops rm` again "
            "removes what is left"
        ) from None
    return freed

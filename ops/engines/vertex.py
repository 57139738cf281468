"""The Vertex AI engine: one CustomJob per run, through `google.cloud.aiplatform_v1` (lazy import).

The run dir lives in Cloud Storage, `gs://BUCKET/PREFIX/OPS_ID`, which the job sees at
`/gcs/BUCKET/PREFIX/OPS_ID`; the local run dir keeps ops' records and receives `ops pull`.
The container is the image `ops build` made for the run's code, named by digest, so a job never
runs a stale `:latest`. Project, region, bucket and endpoint come from ops.yaml, never from code.
"""

import difflib
import json
import time
from pathlib import Path

from ops.engines import EngineState, Launch
from ops.errors import OpsError
from ops.registry import Run
from ops.rundir import CONFIG, DIFF, IMAGE, JOB, LOG, PROVENANCE, git_of, read_json, read_required, write_json
from ops.storage import NO_CREDENTIALS, read_remote_from, upload_run_dir

JOB_STATES = {
    "JOB_STATE_QUEUED": "QUEUED",
    "JOB_STATE_PENDING": "QUEUED",
    "JOB_STATE_RUNNING": "RUNNING",
    "JOB_STATE_SUCCEEDED": "SUCCEEDED",
    "JOB_STATE_FAILED": "FAILED",
    "JOB_STATE_CANCELLING": "RUNNING",
    "JOB_STATE_CANCELLED": "CANCELLED",
    "JOB_STATE_PAUSED": "PREEMPTED",
    "JOB_STATE_EXPIRED": "FAILED",
    "JOB_STATE_UPDATING": "RUNNING",
    "JOB_STATE_PARTIALLY_SUCCEEDED": "FAILED",
}
VERTEX_FILE = "vertex_job.json"  # in the local run dir: the job's resource name and its gs:// run dir


def gcs_fuse_path(gcs_uri: str) -> str:
    """gs://bucket/a/b -> /gcs/bucket/a/b, where Vertex mounts Cloud Storage in the container."""
    return "/gcs/" + gcs_uri.removeprefix("gs://")


def remote_run_dir(bucket: str, ops_id: str) -> str:
    return f"{bucket.rstrip('/')}/{ops_id}"


def container_command(run_path: str, resources: dict) -> list[str]:
    """One process, or one per GPU (torchrun) on each replica; the launcher reads Vertex's CLUSTER_SPEC."""
    wrapper = ["python3", "-m", "ops.engines.local_wrapper", run_path, "--tee", "--"]
    gpus = resources["accelerator_count"] if resources["accelerator_type"] else 0
    if gpus > 1 or resources["replica_count"] > 1:
        return [*wrapper, "python3", "-m", "ops.engines.vertex_launch", str(max(gpus, 1)), run_path]
    return [*wrapper, "python3", "-m", "diffusion", run_path]


def custom_job(launch: Launch, ops_id: str, image: str, gcs_run_dir: str, labels: dict[str, str]) -> dict:
    """The CustomJob, as the dict the aiplatform_v1 types accept (and the stand-in records)."""
    resources = launch.resources
    machine = {"machine_type": resources["machine_type"]}
    if resources["accelerator_type"]:
        machine |= {
            "accelerator_type": resources["accelerator_type"],
            "accelerator_count": resources["accelerator_count"],
        }
    pool = {
        "machine_spec": machine,
        "replica_count": 1,
        "disk_spec": {"boot_disk_type": "pd-ssd", "boot_disk_size_gb": resources["boot_disk_gb"]},
        "container_spec": {"image_uri": image, "command": container_command(gcs_fuse_path(gcs_run_dir), resources)},
    }
    # Worker pool 0 is the chief; further replicas go in pool 1 with the same spec.
    pools = [pool] + (
        [{**pool, "replica_count": resources["replica_count"] - 1}] if resources["replica_count"] > 1 else []
    )
    scheduling = {
        "timeout": f"{int(resources['timeout_hours'] * 3600)}s",
        "restart_job_on_worker_restart": resources["restart_job_on_worker_restart"],
    }
    if resources["spot"]:
        scheduling["strategy"] = "SPOT"
    spec = {
        "worker_pool_specs": pools,
        "scheduling": scheduling,
        "base_output_directory": {"output_uri_prefix": gcs_run_dir},
    }
    if resources["service_account"]:
        spec["service_account"] = resources["service_account"]
    return {"display_name": ops_id, "job_spec": spec, "labels": {**labels, **resources["labels"]}}


def explain(exc: Exception, context: str) -> OpsError:
    """The errors people meet, each as one line with the fix."""
    from google.api_core import exceptions  # google.cloud, heavy: here and below, only when Vertex is used

    message = getattr(exc, "message", None) or str(exc)
    if message.split(" ", 1)[0] in ("GET", "POST"):  # the REST transport prefixes "METHOD URL: "
        message = message.split(": ", 1)[-1]
    # The REST transport raises the HTTP classes (Forbidden), gRPC the status ones (PermissionDenied).
    if isinstance(exc, (exceptions.PermissionDenied, exceptions.Forbidden)):
        return OpsError(
            f"{context}: permission denied ({message}); grant the account roles/aiplatform.user "
            "(and storage access to the bucket), or check gcp_project in ops.yaml"
        )
    if isinstance(exc, (exceptions.Unauthenticated, exceptions.Unauthorized)):
        return OpsError(f"{context}: not authenticated ({message}); run `gcloud auth application-default login`")
    if isinstance(exc, (exceptions.ResourceExhausted, exceptions.TooManyRequests)):
        return OpsError(
            f"{context}: quota exceeded ({message}); request more quota for this accelerator in "
            "the region, pick another region (gcp_region) or a smaller resources.vertex"
        )
    if isinstance(exc, exceptions.NotFound):
        return OpsError(
            f"{context}: not found ({message}); check gcp_project / gcp_region in ops.yaml, or that "
            "the image was pushed (`ops build --push`)"
        )
    if isinstance(exc, (exceptions.InvalidArgument, exceptions.BadRequest)):
        lowered = message.lower()
        if "label" in lowered:
            cause = "resources.vertex.labels (lowercase letters, digits, '_' and '-', at most 63 characters)"
        elif "display name" in lowered:
            cause = "the job's display name (the ops id, at most 128 characters)"
        elif any(word in lowered for word in ("accelerator", "machine", "gpu")):
            cause = (
                "resources.vertex: machine_type, accelerator_type and accelerator_count must be a combination "
                "the region offers"
            )
        else:
            cause = "resources.vertex and the rest of the CustomJob (`ops submit --dry-run` shows it)"
        return OpsError(f"{context}: rejected ({message}); check {cause}")
    return OpsError(f"{context}: {type(exc).__name__}: {message}")


def job_client(settings):
    """A JobServiceClient for the settings' region; `vertex_api_endpoint` points it elsewhere (a stand-in)."""
    import google.auth  # heavy, as in explain()
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import aiplatform_v1

    if settings.vertex_api_endpoint:
        from google.auth.credentials import AnonymousCredentials

        return aiplatform_v1.JobServiceClient(
            transport="rest",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": settings.vertex_api_endpoint},
        )
    try:
        credentials, _ = google.auth.default()
    except DefaultCredentialsError:
        raise OpsError(f"Vertex AI: {NO_CREDENTIALS}") from None
    return aiplatform_v1.JobServiceClient(
        credentials=credentials, client_options={"api_endpoint": f"{settings.gcp_region}-aiplatform.googleapis.com"}
    )


# What a real submit needs in ops.yaml (or OPS_*); a dry run shows <name> in their place.
REQUIRED_SETTINGS = ("gcp_project", "gcs_bucket", "image_repository")


class VertexEngine:
    name = "vertex"
    requeues_itself = True  # Vertex restarts workers itself (restart_job_on_worker_restart)
    needs_image = True  # the job runs the image of the run's code (ops build)
    snapshots_code = False  # the code is the image, built from the recorded commit + diff.patch

    def __init__(self, settings):
        self.settings = settings

    def setting(self, key: str) -> str:
        """A project setting, or `<key>` where it is unset (what a dry run shows in its place)."""
        return getattr(self.settings, key) or f"<{key}>"

    def parent(self) -> str:
        return f"projects/{self.setting('gcp_project')}/locations/{self.setting('gcp_region')}"

    def missing(self, resources: dict) -> list[str]:
        return [
            f"ops.yaml: {key} (or OPS_{key.upper()})" for key in REQUIRED_SETTINGS if not getattr(self.settings, key)
        ]

    def preflight(self, resources: dict) -> None:
        for key in REQUIRED_SETTINGS:
            if not getattr(self.settings, key):
                raise OpsError(f"ops.yaml: {key}: missing; the Vertex engine needs it (or set OPS_{key.upper()})")
        self.check(resources)

    def check(self, resources: dict) -> None:
        """The settings and resources that are given, checked: OpsError, one line."""
        from google.cloud import aiplatform_v1  # heavy, as in explain()

        if self.settings.gcs_bucket and not self.settings.gcs_bucket.startswith("gs://"):
            raise OpsError(
                f"ops.yaml: gcs_bucket: {self.settings.gcs_bucket!r} is not allowed: must be gs://BUCKET/PREFIX"
            )
        accelerator = resources["accelerator_type"]
        known = [name for name in aiplatform_v1.AcceleratorType.__members__ if name != "ACCELERATOR_TYPE_UNSPECIFIED"]
        if accelerator and accelerator not in known:
            close = difflib.get_close_matches(accelerator, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"one of {', '.join(known)}"
            raise OpsError(f"resources.vertex.accelerator_type: {accelerator!r} is not allowed: {hint}")

    def describe(self, launch: Launch) -> str:
        self.check(launch.resources)
        job = custom_job(
            launch,
            launch.run_dir.name,
            f"{self.setting('image_repository')}@sha256:<built at submit>",
            remote_run_dir(self.setting("gcs_bucket"), launch.run_dir.name),
            {"ops-id": launch.run_dir.name},
        )
        return f"as a Vertex AI CustomJob in {self.parent()}:\n" + json.dumps(job, indent=2)

    def submit(self, launch: Launch) -> str:
        from google.api_core.exceptions import GoogleAPICallError  # heavy, as in explain()

        client = job_client(self.settings)  # first: no credentials is one line, before any upload
        job_record = read_required(launch.run_dir / JOB)
        image = read_required(launch.run_dir / IMAGE)["image"]
        gcs_run_dir = remote_run_dir(self.settings.gcs_bucket, job_record["ops_id"])
        upload_run_dir(launch.run_dir, gcs_run_dir, (CONFIG, PROVENANCE, DIFF, JOB))
        commit = git_of(read_required(launch.run_dir / PROVENANCE))
        labels = {"ops-id": job_record["ops_id"], "commit": (commit.get("commit") or "no-git")[:12]}
        body = custom_job(launch, job_record["ops_id"], image, gcs_run_dir, labels)
        try:
            created = client.create_custom_job(parent=self.parent(), custom_job=body)
        except GoogleAPICallError as exc:
            raise explain(exc, f"Vertex AI create_custom_job in {self.parent()}") from None
        write_json(
            launch.run_dir / VERTEX_FILE,
            {"name": created.name, "gcs_run_dir": gcs_run_dir, "image": image, "submitted_at": time.time()},
        )
        return created.name.rsplit("/", 1)[1]

    def submit_many(self, launches: list[Launch]) -> list[str]:
        return [self.submit(launch) for launch in launches]

    def recorded_job(self, run_dir: Path) -> str | None:
        name = (read_json(run_dir / VERTEX_FILE) or {}).get("name")
        return name.rsplit("/", 1)[1] if isinstance(name, str) else None

    def job_name(self, run: Run) -> str:
        return read_required(Path(run.run_dir) / VERTEX_FILE)["name"]

    def state(self, run: Run) -> EngineState:
        from google.api_core.exceptions import GoogleAPICallError  # heavy, as in explain()

        try:
            job = job_client(self.settings).get_custom_job(name=self.job_name(run))
        except GoogleAPICallError as exc:
            raise explain(exc, f"Vertex AI job {run.engine_job_id}") from None
        name = job.state.name
        detail = f"Vertex {name}"
        if job.error.message:
            detail += f": {job.error.message}"
        ended = job.end_time.timestamp() if job.end_time else None
        return EngineState(JOB_STATES.get(name, "UNKNOWN"), None, detail, ended)

    def logs(self, run: Run, offset: int = 0) -> tuple[str, int]:
        """The job's output from log.txt in its run dir (offset: bytes), or from Cloud Logging
        (offset: entries), as `vertex_logs` in ops.yaml says."""
        if self.settings.vertex_logs == "cloud-logging":
            return self.cloud_logs(run, offset)
        record = read_required(Path(run.run_dir) / VERTEX_FILE)
        return read_remote_from(f"{record['gcs_run_dir']}/{LOG}", offset)

    def cloud_logs(self, run: Run, offset: int) -> tuple[str, int]:
        from google.api_core.exceptions import GoogleAPICallError  # heavy, as in explain()
        from google.cloud import logging as cloud_logging

        # The JSON API (not gRPC): the same client then talks to a plain-HTTP stand-in.
        options = {"client_options": {"api_endpoint": self.settings.logging_api_endpoint}}
        if self.settings.logging_api_endpoint:
            from google.auth.credentials import AnonymousCredentials

            options["credentials"] = AnonymousCredentials()
        client = cloud_logging.Client(project=self.settings.gcp_project, _use_grpc=False, **options)
        # An explicit start: without one the client looks back only 24 hours.
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.created_at))
        query = f'resource.type="ml_job" AND resource.labels.job_id="{run.engine_job_id}" AND timestamp>="{since}"'
        try:
            entries = list(
                client.list_entries(
                    resource_names=[f"projects/{self.settings.gcp_project}"],
                    filter_=query,
                    order_by=cloud_logging.ASCENDING,
                )
            )
        except GoogleAPICallError as exc:
            raise explain(exc, f"Cloud Logging for job {run.engine_job_id}") from None
        new = entries[offset:]
        text = "".join(
            f"{entry.payload if isinstance(entry.payload, str) else json.dumps(entry.payload)}\n" for entry in new
        )
        return text, offset + len(new)

    def cancel(self, run: Run, grace_seconds: float) -> None:
        from google.api_core.exceptions import GoogleAPICallError  # heavy, as in explain()

        client = job_client(self.settings)
        try:
            client.cancel_custom_job(name=self.job_name(run))
        except GoogleAPICallError as exc:
            raise explain(exc, f"Vertex AI cancel {run.engine_job_id}") from None
        # Vertex says CANCELLING until the container has stopped.
        deadline = time.monotonic() + max(grace_seconds, 5) + 60
        while time.monotonic() < deadline and self.state(run).state not in ("CANCELLED", "FAILED", "SUCCEEDED"):
            time.sleep(1)

"""`ops submit --engine vertex` and `ops pull` with the real aiplatform_v1 and google-cloud-storage
clients, against a local JobService stand-in (tests/vertex_standin.py) and gcp-storage-emulator."""

import hashlib
import json
import socket
from pathlib import Path

import pytest

from tests.ops_project import git, ops, ops_json, registry_rows
from tests.vertex_standin import VertexStandIn

IMAGE = "127.0.0.1:5000/diffusion@sha256:" + "ab" * 32
BUCKET = "test-bucket"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gcs(monkeypatch):
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    from ops.storage import client

    yield client().bucket(BUCKET)
    server.stop()


@pytest.fixture
def vertex(git_project, gcs):
    with VertexStandIn() as standin:
        (git_project / "ops.yaml").write_text(
            f"gcp_project: test-project\ngcp_region: europe-west4\ngcs_bucket: gs://{BUCKET}/runs\n"
            f"image_repository: 127.0.0.1:5000/diffusion\nvertex_api_endpoint: {standin.url}\n"
        )
        git(git_project, "add", "ops.yaml")
        git(git_project, "commit", "-qm", "settings")
        yield git_project, standin, gcs


def created_jobs(standin: VertexStandIn) -> list[dict]:
    return [r["body"] for r in standin.requests if r["method"] == "POST" and r["path"].endswith("/customJobs")]


def test_submit_sends_the_custom_job_and_follows_its_states(vertex):
    root, standin, bucket = vertex
    run = ops_json(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)["runs"][0]
    assert run["state"] == "QUEUED" and run["engine"] == "vertex"
    [job] = created_jobs(standin)
    assert standin.requests[0]["path"] == "/v1/projects/test-project/locations/europe-west4/customJobs"
    ops_id, head = run["ops_id"], git(root, "rev-parse", "HEAD")
    gcs_dir = f"gs://{BUCKET}/runs/{ops_id}"
    assert job["displayName"] == ops_id
    assert job["labels"] == {"ops-id": ops_id, "commit": head[:12]}
    pool = job["jobSpec"]["workerPoolSpecs"][0]
    assert pool["machineSpec"] == {"machineType": "n1-standard-8"}
    assert pool["containerSpec"]["imageUri"] == IMAGE
    assert pool["containerSpec"]["command"][-4:] == ["python3", "-m", "diffusion", f"/gcs/{BUCKET}/runs/{ops_id}"]
    assert job["jobSpec"]["baseOutputDirectory"]["outputUriPrefix"] == gcs_dir
    # The run dir the job reads was uploaded, byte for byte.
    uploaded = bucket.blob(f"runs/{ops_id}/config.yaml").download_as_bytes()
    assert uploaded == (Path(run["run_dir"]) / "config.yaml").read_bytes()
    assert json.loads((Path(run["run_dir"]) / "provenance.json").read_text())["image"] == IMAGE

    job_id = run["engine_job_id"]
    standin.set_state(job_id, "JOB_STATE_RUNNING")
    bucket.blob(f"runs/{ops_id}/log.txt").upload_from_string("step 1/8  loss 0.99\nstep 2/8  loss 0.98\n")
    view = ops_json(root, "monitor", ops_id, "--logs")
    assert view["state"] == "RUNNING" and "step 2/8  loss 0.98" in view["log_tail"]
    standin.set_state(job_id, "JOB_STATE_SUCCEEDED")
    assert ops(root, "wait", ops_id, "--interval", "0.2").returncode == 0
    [row] = registry_rows(root)
    assert row["state"] == "SUCCEEDED" and row["engine_job_id"] == job_id
    assert "**Result: SUCCEEDED**" in (root / "EXPERIMENT_LOG.md").read_text()


def test_logs_can_come_from_cloud_logging(vertex, monkeypatch):
    root, standin, _ = vertex
    monkeypatch.setenv("OPS_VERTEX_LOGS", "cloud-logging")
    monkeypatch.setenv("OPS_LOGGING_API_ENDPOINT", standin.url)
    run = ops_json(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)["runs"][0]
    standin.log_entries[run["engine_job_id"]] = ["training on cuda", "step 1/8  loss 0.99"]
    view = ops_json(root, "monitor", run["ops_id"], "--logs")
    assert view["log_tail"] == "training on cuda\nstep 1/8  loss 0.99"
    [query] = [r["body"] for r in standin.requests if r["path"] == "/v2/entries:list"]
    assert query["filter"].startswith(
        f'resource.type="ml_job" AND resource.labels.job_id="{run["engine_job_id"]}" AND timestamp>="20'
    )
    assert query["resourceNames"] == ["projects/test-project"]


def test_gpus_spot_and_replicas_shape_the_worker_pools(vertex):
    root, standin, _ = vertex
    ops_json(
        root,
        "submit",
        "tiny",
        "--engine",
        "vertex",
        "--image",
        IMAGE,
        "--set",
        "resources.vertex.accelerator_type=NVIDIA_TESLA_V100",
        "--set",
        "resources.vertex.accelerator_count=2",
        "--set",
        "resources.vertex.spot=true",
        "--set",
        "resources.vertex.replica_count=3",
        "--set",
        "resources.vertex.service_account=sa@p.iam",
        "--set",
        "run.train.batch_size=24",
    )  # split among 3 replicas x 2 GPUs
    [job] = created_jobs(standin)
    chief, workers = job["jobSpec"]["workerPoolSpecs"]
    from google.cloud import aiplatform_v1

    # The REST transport sends enums as integers.
    assert chief["machineSpec"] == {
        "machineType": "n1-standard-8",
        "acceleratorCount": 2,
        "acceleratorType": aiplatform_v1.AcceleratorType.NVIDIA_TESLA_V100.value,
    }
    assert chief["replicaCount"] == "1" and workers["replicaCount"] == "2"
    assert "ops.engines.vertex_launch" in chief["containerSpec"]["command"]
    assert job["jobSpec"]["scheduling"]["strategy"] == aiplatform_v1.Scheduling.Strategy.SPOT.value
    assert job["jobSpec"]["serviceAccount"] == "sa@p.iam"


def test_cancel_and_a_failed_job_shows_its_error(vertex):
    root, standin, _ = vertex
    run = ops_json(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)["runs"][0]
    assert ops_json(root, "cancel", run["ops_id"], "--grace", "0")["state"] == "CANCELLED"
    assert any(r["path"].endswith(":cancel") for r in standin.requests)

    failing = ops_json(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)["runs"][0]
    standin.set_state(failing["engine_job_id"], "JOB_STATE_FAILED", error="The replica workerpool0-0 exited with 1")
    assert ops(root, "wait", failing["ops_id"]).returncode == 1
    shown = ops(root, "monitor", failing["ops_id"]).stdout
    assert "Vertex JOB_STATE_FAILED: The replica workerpool0-0 exited with 1" in shown


@pytest.mark.parametrize(
    "status, words",
    [
        (403, "permission denied"),
        (429, "quota exceeded"),
        (400, "check resources.vertex"),
        (404, "not found"),
    ],
)
def test_refusals_are_one_clear_line(vertex, status, words):
    root, standin, _ = vertex
    standin.fail_next = (status, "the service says no")
    result = ops(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert words in result.stderr and "the service says no" in result.stderr


def test_an_unknown_accelerator_is_named_before_anything_is_written(vertex):
    root, standin, _ = vertex
    result = ops(
        root,
        "submit",
        "tiny",
        "--engine",
        "vertex",
        "--image",
        IMAGE,
        "--set",
        "resources.vertex.accelerator_type=NVIDIA_TESLA_V1000",
        "--set",
        "resources.vertex.accelerator_count=1",
    )
    assert result.returncode == 2
    assert (
        "resources.vertex.accelerator_type: 'NVIDIA_TESLA_V1000' is not allowed: did you mean 'NVIDIA_TESLA_V100'?"
        in result.stderr
    )
    assert standin.requests == [] and not (root / "runs").exists()


def test_no_credentials_is_one_line_with_the_fix(git_project, monkeypatch, tmp_path):
    (git_project / "ops.yaml").write_text("gcp_project: p\ngcs_bucket: gs://b/runs\nimage_repository: r/d\n")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    result = ops(git_project, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "no Google credentials found; run `gcloud auth application-default login`" in result.stderr


def test_missing_settings_submit_nothing(git_project):
    result = ops(git_project, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: ops.yaml: gcp_project: missing; the Vertex engine needs it (or set OPS_GCP_PROJECT)"
    )
    assert not (git_project / "runs").exists()


def test_pull_downloads_resumes_and_skips_unchanged_files(vertex):
    root, standin, bucket = vertex
    run = ops_json(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)["runs"][0]
    prefix, run_dir = f"runs/{run['ops_id']}", Path(run["run_dir"])
    checkpoint = bytes(range(256)) * 4000  # ~1 MB, binary
    bucket.blob(f"{prefix}/checkpoints/latest.pt").upload_from_string(checkpoint)
    bucket.blob(f"{prefix}/samples/epoch_0001.png").upload_from_string(b"\x89PNG fake")
    bucket.blob(f"{prefix}/metrics.jsonl").upload_from_string('{"step": 1}\n')

    first = ops_json(root, "pull", run["ops_id"], "--what", "checkpoints")
    assert first["downloaded"] == ["checkpoints/latest.pt"]
    assert (run_dir / "checkpoints/latest.pt").read_bytes() == checkpoint
    assert not (run_dir / "samples").exists()

    everything = ops_json(root, "pull", run["ops_id"])
    assert "checkpoints/latest.pt" in everything["skipped"]
    assert {"samples/epoch_0001.png", "metrics.jsonl"} <= set(everything["downloaded"])

    # A newer checkpoint, and a download cut short: the partial file is continued, not restarted.
    newer = bytes(reversed(range(256))) * 4000
    bucket.blob(f"{prefix}/checkpoints/latest.pt").upload_from_string(newer)
    (run_dir / "checkpoints/latest.pt.part").write_bytes(newer[:300_000])
    again = ops_json(root, "pull", run["ops_id"], "--what", "checkpoints")
    assert again["downloaded"] == ["checkpoints/latest.pt"]
    assert hashlib.sha256((run_dir / "checkpoints/latest.pt").read_bytes()).digest() == hashlib.sha256(newer).digest()
    assert not (run_dir / "checkpoints/latest.pt.part").exists()


def test_the_launcher_turns_vertex_cluster_spec_into_torchrun_ranks():
    from ops.engines.vertex_launch import torchrun_args

    spec = {
        "cluster": {"workerpool0": ["chief-0:2222"], "workerpool1": ["w-0:2222", "w-1:2222"]},
        "task": {"type": "workerpool1", "index": 1},
    }
    assert torchrun_args(spec, 4) == [
        "--nnodes=3",
        "--node_rank=2",
        "--nproc_per_node=4",
        "--master_addr=chief-0",
        "--master_port=29500",
    ]
    spec["task"] = {"type": "workerpool0", "index": 0}
    assert "--node_rank=0" in torchrun_args(spec, 4)
    assert torchrun_args({}, 2)[:3] == ["--nnodes=1", "--node_rank=0", "--nproc_per_node=2"]


def test_the_container_wrapper_tees_the_output_into_the_run_dir(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ops.engines.local_wrapper",
            str(tmp_path),
            "--tee",
            "--",
            sys.executable,
            "-c",
            "print('step 1'); import sys; sys.exit(3)",
        ],
        capture_output=True,
        text=True,
    )
    assert "step 1" in result.stdout
    assert (tmp_path / "log.txt").read_text() == "step 1\n"
    assert json.loads((tmp_path / "exit_status.json").read_text())["returncode"] == 3


@pytest.mark.parametrize(
    "setting, line",
    [
        (
            "resources.vertex.labels={Team: ML, cost-center: A/B}",
            "resources.vertex.labels: {'Team': 'ML', 'cost-center': 'A/B'} is not allowed: key 'Team' has 'T'",
        ),
        ("resources.vertex.labels={team: a/b}", "value 'a/b' has '/': only lowercase letters"),
        ("resources.vertex.labels={1team: x}", "key '1team' must start with a lowercase letter"),
        (f"resources.vertex.labels={{team: {'x' * 64}}}", "is longer than 63 characters"),
        ("resources.vertex.labels={ops-id: mine}", "key 'ops-id' is one that ops sets itself"),
        (
            "resources.vertex.accelerator_type=NVIDIA_TESLA_A100",
            "accelerator_count 0 is not allowed with accelerator_type NVIDIA_TESLA_A100: set 1 or more",
        ),
        ("resources.vertex.accelerator_type=NVIDIA_L4", "accelerator_count 0 is not allowed"),
        ("resources.vertex.machine_type=g2-standard-8", "machine_type 'g2-standard-8' comes with 1 x NVIDIA_L4"),
        ("resources.vertex.accelerator_count=3", "accelerator_count 3 is not offered for NVIDIA_TESLA_T4: 1, 2, 4"),
        ("resources.vertex.boot_disk_gb=50", "resources.vertex.boot_disk_gb: 50 is not allowed"),
    ],
)
def test_vertex_rules_are_checked_before_anything_is_uploaded_or_built(vertex, setting, line):
    root, standin, bucket = vertex
    extra = ["--set", "resources.vertex.accelerator_type=NVIDIA_TESLA_T4"] if "count=3" in setting else []
    for command in (["submit", "tiny", "--engine", "vertex", "--image", IMAGE], ["config", "set", "tiny"]):
        args = [*command, "--set", setting, *extra] if command[0] == "submit" else [*command, setting, *extra[1:]]
        result = ops(root, *args)
        assert result.returncode == 2 and line in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert standin.requests == [] and list(bucket.list_blobs()) == [] and not (root / "runs").exists()


def test_the_labels_ops_adds_satisfy_vertex_and_its_refusals_name_their_cause(vertex):
    root, standin, _ = vertex
    longest = "a" * 50  # the longest spec name: its ops id is a label value Vertex must take
    spec = (root / "configs/jobs/tiny.yaml").read_text().replace("name: tiny", f"name: {longest}")
    (root / f"configs/jobs/{longest}.yaml").write_text(spec)
    run = ops_json(
        root,
        "submit",
        longest,
        "--engine",
        "vertex",
        "--image",
        IMAGE,
        "--set",
        "resources.vertex.labels={team: vision, 'cost-center': a-b}",
    )["runs"][0]
    [job] = created_jobs(standin)
    assert job["labels"]["ops-id"] == run["ops_id"] and job["labels"]["team"] == "vision"
    too_long = ops(root, "config", "set", "tiny", f"name={'b' * 51}")
    assert too_long.returncode == 2 and "name: '" in too_long.stderr and "at most 50 characters" in too_long.stderr

    standin.fail_next = (400, "Invalid label: Team=ML. Label keys and values can be no longer than 63 characters")
    refused = ops(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)
    assert refused.returncode == 2
    assert "check resources.vertex.labels" in refused.stderr and "machine_type" not in refused.stderr


def test_pull_never_overwrites_the_records_ops_keeps_here(vertex):
    """The bucket's job.json was uploaded before the job existed (engine_job_id null): a pull that
    took it would make a rebuilt registry lose the job. ops' records keep their local copy."""
    root, standin, bucket = vertex
    run = ops_json(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)["runs"][0]
    prefix, run_dir = f"runs/{run['ops_id']}", Path(run["run_dir"])
    assert json.loads(bucket.blob(f"{prefix}/job.json").download_as_bytes())["engine_job_id"] is None
    bucket.blob(f"{prefix}/config.yaml").upload_from_string("task: train\n")  # the run's own rewrite
    bucket.blob(f"{prefix}/summary.json").upload_from_string('{"status": "completed", "step": 8}\n')
    kept = {
        name: (run_dir / name).read_bytes()
        for name in ("job.json", "provenance.json", "config.yaml", "diff.patch", "image.json", "vertex_job.json")
    }
    pulled = ops_json(root, "pull", run["ops_id"])
    assert "summary.json" in pulled["downloaded"] and {"job.json", "config.yaml"} <= set(pulled["kept"])
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept

    (root / "runs/registry.sqlite").unlink()
    synced = ops_json(root, "sync")
    assert synced["rebuilt"] == [run["ops_id"]]
    [row] = registry_rows(root)
    assert row["engine_job_id"] == run["engine_job_id"] and row["state"] != "UNKNOWN"


@pytest.mark.parametrize(
    "setting, allowed",
    [
        ("resources.vertex.labels.version=2", True),
        ("resources.vertex.labels.flag=true", True),
        ("resources.vertex.labels={half: ½}", True),
        ("resources.vertex.labels={ǅx: a}", False),
        ("resources.vertex.accelerator_type=NVIDIA_GB200", False),
        ("resources.vertex.accelerator_count=4", False),
        ("resources.vertex.machine_type=N1-STANDARD-8", False),
    ],
)
def test_vertex_rules_neither_refuse_valid_labels_nor_take_unplaceable_gpus(vertex, setting, allowed):
    root, standin, _ = vertex
    extra = ["--set", "resources.vertex.accelerator_count=1"] if "GB200" in setting else []
    result = ops(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE, "--dry-run", "--set", setting, *extra)
    assert (result.returncode == 0) == allowed, result.stderr
    assert allowed or len(result.stderr.splitlines()) == 1


def test_pull_skips_folder_placeholders_and_refreshes_the_records(vertex):
    root, standin, bucket = vertex
    run = ops_json(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)["runs"][0]
    standin.set_state(run["engine_job_id"], "JOB_STATE_SUCCEEDED")
    assert ops_json(root, "monitor", run["ops_id"])["state"] == "SUCCEEDED"
    assert "final loss" not in (root / "EXPERIMENT_LOG.md").read_text()  # nothing pulled yet
    prefix = f"runs/{run['ops_id']}"
    bucket.blob(f"{prefix}/summary.json").upload_from_string(
        '{"status": "completed", "step": 8, "epoch": 2.0, "final_metrics": {"step": 8, "loss": 0.25}}\n'
    )
    bucket.blob(f"{prefix}/checkpoints/").upload_from_string(b"")  # what the console and gcsfuse make
    pulled = ops_json(root, "pull", run["ops_id"])
    assert "summary.json" in pulled["downloaded"] and not (Path(run["run_dir"]) / "checkpoints").is_file()
    assert "final loss 0.2500" in (root / "EXPERIMENT_LOG.md").read_text()
    post = next(root.glob(f"docs/blog/posts/*-{run['ops_id']}.md")).read_text()
    assert "| loss | 0.25 |" in post


def test_rm_removes_the_buckets_copy_too_keeping_what_the_run_dir_keeps(vertex):
    root, standin, bucket = vertex
    run = ops_json(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)["runs"][0]
    standin.set_state(run["engine_job_id"], "JOB_STATE_SUCCEEDED")
    assert ops_json(root, "monitor", run["ops_id"])["state"] == "SUCCEEDED"
    prefix = f"runs/{run['ops_id']}"
    for name, data in [
        ("checkpoints/latest.pt", b"L" * 5000),
        ("checkpoints/step_00000004.pt", b"S" * 4000),
        ("samples/epoch_0001.png", b"\x89PNG fake"),
        ("summary.json", b'{"status": "completed", "step": 4}\n'),
        ("metrics.jsonl", b'{"step": 4, "loss": 0.5}\n'),
        ("checkpoints/", b""),  # a folder placeholder
    ]:
        bucket.blob(f"{prefix}/{name}").upload_from_string(data)
    refused = ops(root, "rm", run["ops_id"], "--keep-checkpoints", "latest", "--yes")  # nothing pulled yet
    assert refused.returncode == 2 and "`ops pull ID --what checkpoints` first" in refused.stderr
    assert ops(root, "pull", run["ops_id"]).returncode == 0

    planned = ops_json(root, "rm", run["ops_id"], "--keep-checkpoints", "latest", "--dry-run")["would_remove"][0]
    remote = planned["remote"]
    assert remote["gcs_run_dir"] == f"gs://{BUCKET}/{prefix}" and "checkpoints/latest.pt" in remote["kept"]
    assert remote["freed_bytes"] == 4000 + len(b"\x89PNG fake")  # the step checkpoint and the sample
    assert len(list(bucket.list_blobs(prefix=prefix + "/"))) >= 6  # a dry run deletes nothing
    ops_json(root, "rm", run["ops_id"], "--keep-checkpoints", "latest", "--yes")
    left = sorted(blob.name.removeprefix(prefix + "/") for blob in bucket.list_blobs(prefix=prefix + "/"))
    assert left == sorted(remote["kept"]) and "checkpoints/latest.pt" in left and "samples/epoch_0001.png" not in left
    assert bucket.blob(f"{prefix}/checkpoints/latest.pt").download_as_bytes() == b"L" * 5000

    ops_json(root, "rm", run["ops_id"], "--keep-checkpoints", "none", "--yes")  # what was kept goes later
    assert list(bucket.list_blobs(prefix=prefix + "/")) == [] and not Path(run["run_dir"]).exists()

    # --local-only: the bucket's copy stays (no credentials here, or kept on purpose).
    other = ops_json(root, "submit", "tiny", "--engine", "vertex", "--image", IMAGE)["runs"][0]
    standin.set_state(other["engine_job_id"], "JOB_STATE_SUCCEEDED")
    assert ops_json(root, "monitor", other["ops_id"])["state"] == "SUCCEEDED"
    before = sorted(blob.name for blob in bucket.list_blobs(prefix=f"runs/{other['ops_id']}/"))
    local = ops_json(root, "rm", other["ops_id"], "--local-only", "--yes")["removed"][0]
    assert local["remote"] is None and not Path(other["run_dir"]).exists()
    assert sorted(blob.name for blob in bucket.list_blobs(prefix=f"runs/{other['ops_id']}/")) == before != []

"""A local stand-in for Vertex AI's JobService REST API, for the real `aiplatform_v1` client, and
for Cloud Logging's entries:list (where Vertex jobs' output goes).

It stores the CustomJobs it is sent, records every request, and lets a test move a job through
its states (or make the next call fail with an HTTP error). It refuses a CustomJob as Vertex does
when its labels or display name break Vertex's rules (400 INVALID_ARGUMENT), written here from
Vertex's documentation, not from ops. It runs no containers: that part of Vertex cannot run here.
"""

import itertools
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JOB_PATH = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+)/customJobs$")
ONE_JOB = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+/customJobs/[^/:]+)(:cancel)?$")
ERROR_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
}


LABEL = re.compile(r"^[a-z\u00c0-\uffff][a-z0-9_\u00c0-\uffff-]{0,62}$")  # keys; values may also start otherwise


def job_problem(job: dict) -> str | None:
    """Vertex's answer to a CustomJob whose labels or display name it refuses."""
    if len(job.get("displayName", "")) > 128:
        return "Display name must be at most 128 characters."
    labels = job.get("labels", {})
    if len(labels) > 64:
        return "At most 64 labels are allowed."
    for key, value in labels.items():
        if (
            not LABEL.match(key)
            or (value and not LABEL.match("a" + value[1:] if value[:1].isdigit() else value))
            or any(c.isupper() for c in key + value)
            or len(value) > 63
        ):
            return (
                f"Invalid label: {key}={value}. Label keys and values can be no longer than 63 characters, "
                "can only contain lowercase letters, numeric characters, underscores and dashes."
            )
    return None


class VertexStandIn:
    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.log_entries: dict[str, list[str]] = {}  # job id -> lines, as Cloud Logging would hold them
        self.requests: list[dict] = []
        self.fail_next: tuple[int, str] | None = None
        self.ids = itertools.count(1000)
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                standin.handle(self, "POST")

            def do_GET(self):
                standin.handle(self, "GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "VertexStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def set_state(self, job_id: str, state: str, error: str | None = None) -> None:
        with self.lock:
            job = self.jobs[job_id]
            job["state"] = state
            if error:
                job["error"] = {"code": 3, "message": error}
            if state in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"):
                job["endTime"] = "2026-11-26T00:00:00Z"

    def reply(self, handler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def handle(self, handler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length) or b"{}") if length else {}
        path = handler.path.split("?")[0]
        with self.lock:
            self.requests.append({"method": method, "path": path, "body": body})
            failure, self.fail_next = self.fail_next, None
        if failure:
            status, message = failure
            return self.reply(
                handler,
                status,
                {"error": {"code": status, "message": message, "status": ERROR_STATUS.get(status, "UNKNOWN")}},
            )
        if method == "POST" and path == "/v2/entries:list":
            job_id = re.search(r'resource.labels.job_id="([^"]+)"', body.get("filter", "")).group(1)
            lines = self.log_entries.get(job_id, [])
            project = body["resourceNames"][0]
            entries = [
                {
                    "textPayload": line,
                    "timestamp": f"2026-11-26T00:00:{i:02d}Z",
                    "logName": f"{project}/logs/workerpool0-0",
                    "insertId": str(i),
                    "resource": {"type": "ml_job", "labels": {"job_id": job_id}},
                }
                for i, line in enumerate(lines)
            ]
            return self.reply(handler, 200, {"entries": entries})
        created = JOB_PATH.match(path)
        if method == "POST" and created and job_problem(body):
            return self.reply(
                handler, 400, {"error": {"code": 400, "message": job_problem(body), "status": "INVALID_ARGUMENT"}}
            )
        if method == "POST" and created:
            job_id = str(next(self.ids))
            job = {
                **body,
                "name": f"{created.group(1)}/customJobs/{job_id}",
                "state": "JOB_STATE_QUEUED",
                "createTime": "2026-11-26T00:00:00Z",
            }
            with self.lock:
                self.jobs[job_id] = job
            return self.reply(handler, 200, job)
        one = ONE_JOB.match(path)
        if one:
            job_id = one.group(1).rsplit("/", 1)[1]
            if job_id not in self.jobs:
                return self.reply(
                    handler,
                    404,
                    {"error": {"code": 404, "message": f"CustomJob {job_id} not found", "status": "NOT_FOUND"}},
                )
            if one.group(2):  # :cancel
                self.set_state(job_id, "JOB_STATE_CANCELLED")
                return self.reply(handler, 200, {})
            return self.reply(handler, 200, self.jobs[job_id])
        return self.reply(
            handler, 404, {"error": {"code": 404, "message": f"no route {method} {path}", "status": "NOT_FOUND"}}
        )

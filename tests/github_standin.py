"""A local stand-in for the part of GitHub's REST API that `ops` uses, for PyGithub to talk to.

Repositories, labels, issues (with the `state`, `labels` and `since` filters) and comments, kept in
memory. Label names compare ignoring case, as on GitHub: creating `experiment` where `Experiment`
exists is a 422, and filters and new issues use the existing label. Faults are queued per
request: `fail("500")`, `fail("timeout")` (answers after the client gave up), `fail("rate-limit")`
(403 with the rate-limit headers GitHub sends), `fail("401")`; `down` answers 500 to everything
while set; `latency` delays every answer (the real API takes about 0.1 s); and
`hang_after_create` (creates the issue, then holds the answer: the client can be killed between
GitHub creating an issue and ops recording it). Every request is kept for the tests to read.
"""

import json
import re
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class GitHubStandIn:
    def __init__(self, repo: str = "lab/diffusion"):
        self.repo_name = repo
        self.labels: dict[str, dict] = {}
        self.issues: dict[int, dict] = {}
        self.comments: dict[int, list[dict]] = {}
        self.requests: list[dict] = []
        self.faults: list[str] = []
        self.hang_after_create = False
        self.down = False
        self.latency = 0.0
        self.created = threading.Event()  # set once hang_after_create has created an issue
        self.release = threading.Event()
        self.timeout_seconds = 3.0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def fail(self, *faults: str) -> None:
        self.faults.extend(faults)

    # -- the API --------------------------------------------------------------------------------

    def repo_json(self) -> dict:
        owner, name = self.repo_name.split("/")
        return {
            "id": 1,
            "name": name,
            "full_name": self.repo_name,
            "owner": {"login": owner},
            "url": f"{self.url}/repos/{self.repo_name}",
            "html_url": f"https://github.example/{self.repo_name}",
        }

    def label_name(self, name: str) -> str:
        """The repository's own spelling of a label, which GitHub matches ignoring case."""
        return next((existing for existing in self.labels if existing.lower() == name.lower()), name)

    def label_json(self, name: str) -> dict:
        return {
            "name": name,
            "color": self.labels[name]["color"],
            "url": f"{self.url}/repos/{self.repo_name}/labels/{name}",
        }

    def issue_json(self, number: int) -> dict:
        issue = self.issues[number]
        return issue | {
            "labels": [self.label_json(name) for name in issue["labels"]],
            "comments": len(self.comments[number]),
        }

    def route(self, method: str, path: str, query: dict, body) -> tuple[int, object]:
        base = f"/repos/{self.repo_name}"
        if path in (base, f"/api/v3{base}") and method == "GET":
            return 200, self.repo_json()
        if not path.startswith(base):
            return 404, {"message": "Not Found"}
        rest = path[len(base) :]
        if rest == "/labels" and method == "GET":
            return 200, [self.label_json(name) for name in self.labels]
        if rest == "/labels" and method == "POST":
            if body["name"].lower() in {name.lower() for name in self.labels}:
                return 422, {"message": "Validation Failed", "errors": [{"code": "already_exists"}]}
            self.labels[body["name"]] = {"color": body.get("color", "ededed")}
            return 201, self.label_json(body["name"])
        if rest == "/issues" and method == "GET":
            wanted = {name.lower() for name in query.get("labels", [""])[0].split(",")} - {""}
            since = query.get("since", [""])[0]
            state = query.get("state", ["open"])[0]
            found = [
                self.issue_json(number)
                for number, issue in sorted(self.issues.items())
                if wanted <= {name.lower() for name in issue["labels"]}
                and (not since or issue["updated_at"] >= since)
                and state in ("all", issue["state"])
            ]
            return 200, found
        if rest == "/issues" and method == "POST":
            body["labels"] = [self.label_name(name) for name in body.get("labels", [])]
            for name in body["labels"]:
                self.labels.setdefault(name, {"color": "ededed"})
            number = len(self.issues) + 1
            self.issues[number] = {
                "id": 1000 + number,
                "number": number,
                "title": body["title"],
                "body": body.get("body", ""),
                "state": "open",
                "labels": list(body.get("labels", [])),
                "created_at": now_iso(),
                "updated_at": now_iso(),
                "url": f"{self.url}{base}/issues/{number}",
                "html_url": f"https://github.example/{self.repo_name}/issues/{number}",
                "user": {"login": "ops-bot"},
            }
            self.comments[number] = []
            return 201, self.issue_json(number)
        match = re.fullmatch(r"/issues/(\d+)(/comments|/labels)?", rest)
        if match is None or int(match[1]) not in self.issues:
            return 404, {"message": "Not Found"}
        number, sub = int(match[1]), match[2]
        if sub is None and method == "GET":
            return 200, self.issue_json(number)
        if sub == "/comments" and method == "GET":
            return 200, self.comments[number]
        if sub == "/comments" and method == "POST":
            comment_id = 5000 + sum(len(c) for c in self.comments.values())
            comment = {
                "id": comment_id,
                "body": body["body"],
                "created_at": now_iso(),
                "user": {"login": "ops-bot"},
                "url": f"{self.url}{base}/issues/comments/{comment_id}",
                "html_url": f"https://github.example/{self.repo_name}/issues/{number}#issuecomment-{comment_id}",
            }
            self.comments[number].append(comment)
            self.issues[number]["updated_at"] = now_iso()
            return 201, comment
        if sub == "/labels" and method == "PUT":
            names = [self.label_name(name) for name in (body if isinstance(body, list) else body["labels"])]
            for name in names:
                self.labels.setdefault(name, {"color": "ededed"})
            self.issues[number]["labels"] = list(names)
            self.issues[number]["updated_at"] = now_iso()
            return 200, [self.label_json(name) for name in names]
        return 404, {"message": "Not Found"}

    # -- HTTP -----------------------------------------------------------------------------------

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode() if length else ""
                url = urlsplit(self.path)
                with standin.lock:
                    standin.requests.append(
                        {
                            "method": self.command,
                            "path": url.path,
                            "query": url.query,
                            "headers": dict(self.headers),
                            "body": raw,
                        }
                    )
                    fault = standin.faults.pop(0) if standin.faults else ("500" if standin.down else None)
                time.sleep(standin.latency)
                if fault == "500":
                    return self.reply(500, {"message": "Server Error"})
                if fault == "timeout":
                    time.sleep(standin.timeout_seconds)
                    return self.reply(504, {"message": "too late"})
                if fault == "401":
                    return self.reply(401, {"message": "Bad credentials"})
                if fault == "rate-limit":
                    reset = str(int(time.time()) + 600)
                    return self.reply(
                        403,
                        {"message": "API rate limit exceeded for user."},
                        {"X-RateLimit-Limit": "5000", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset},
                    )
                with standin.lock:
                    status, data = standin.route(
                        self.command, url.path, parse_qs(url.query), json.loads(raw) if raw else None
                    )
                creating = self.command == "POST" and url.path.endswith("/issues") and status == 201
                if creating and standin.hang_after_create:
                    standin.created.set()
                    standin.release.wait(60)
                self.reply(status, data)

            def reply(self, status: int, data, headers: dict | None = None):
                payload = json.dumps(data).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timed out or was killed): what a real server sees too

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

        return Handler

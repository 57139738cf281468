"""The run registry: an SQLite index of every run (WAL, so readers never block the writer).

It is an index, not the truth: each run dir's `job.json` and the engine are, and `ops sync`
rebuilds rows from them. Schema changes are appended to MIGRATIONS and never edited; the file's
`PRAGMA user_version` says how many have been applied.
"""

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ops.errors import OpsError

STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "PREEMPTED", "UNKNOWN")
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")

MIGRATIONS = [
    """
    CREATE TABLE runs (
        ops_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        engine TEXT NOT NULL,
        engine_job_id TEXT,
        state TEXT NOT NULL,
        run_dir TEXT NOT NULL,
        git_commit TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        exit_code INTEGER,
        requeues INTEGER NOT NULL DEFAULT 0,
        sweep TEXT NOT NULL DEFAULT '{}',
        overrides TEXT NOT NULL DEFAULT '[]',
        github_issue TEXT,
        journal_post TEXT,
        updated_at REAL NOT NULL
    );
    CREATE INDEX runs_engine_job_id ON runs (engine_job_id);
    CREATE INDEX runs_state ON runs (state);
    CREATE INDEX runs_name_created ON runs (name, created_at);
    """,
    # Follow-ups done once per run when it ends (experiment log, issue, journal): the outbox.
    """
    CREATE TABLE followups (
        ops_id TEXT NOT NULL REFERENCES runs (ops_id),
        kind TEXT NOT NULL,
        done_at REAL NOT NULL,
        detail TEXT,
        PRIMARY KEY (ops_id, kind)
    );
    """,
    # Why a run is in its state, in the engine's words (SLURM's state and exit code, a signal ...).
    "ALTER TABLE runs ADD COLUMN detail TEXT",
    # The outbox's undelivered side: the last error of each follow-up not done yet.
    """
    CREATE TABLE followup_failures (
        ops_id TEXT NOT NULL REFERENCES runs (ops_id),
        kind TEXT NOT NULL,
        failed_at REAL NOT NULL,
        error TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (ops_id, kind)
    );
    """,
    # A failure that retrying cannot mend (a GitHub 4xx): kept out of the retries until `ops sync --retry`.
    "ALTER TABLE followup_failures ADD COLUMN permanent INTEGER NOT NULL DEFAULT 0",
    # The ops process that is handing the run to its engine (host, pid, start time): while it lives,
    # a run without an engine job is being started; once it is gone, the run is an orphan.
    "ALTER TABLE runs ADD COLUMN submitter TEXT NOT NULL DEFAULT 'null'",
    # `ops rm`: when the run dir was removed, and what it kept (paths inside it), JSON.
    "ALTER TABLE runs ADD COLUMN removed_at REAL",
    "ALTER TABLE runs ADD COLUMN removed_kept TEXT NOT NULL DEFAULT 'null'",
    # The verdict of its `expect:` checks when its run dir was removed (they read the run dir).
    "ALTER TABLE runs ADD COLUMN removed_verdict TEXT",
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class Run:
    ops_id: str
    name: str
    engine: str
    run_dir: str
    state: str = "QUEUED"
    engine_job_id: str | None = None
    git_commit: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    requeues: int = 0
    sweep: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    github_issue: str | None = None
    journal_post: str | None = None
    detail: str | None = None
    submitter: dict | None = None
    removed_at: float | None = None  # `ops rm` removed the run dir (all but removed_kept)
    removed_kept: list | None = None
    removed_verdict: str | None = None  # the verdict of its expect: checks when the dir went

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self) -> dict:
        return asdict(self)


COLUMNS = [f.name for f in fields(Run)]
JSON_COLUMNS = ("sweep", "overrides", "submitter", "removed_kept")


def _from_row(row: sqlite3.Row) -> Run:
    values = {name: row[name] for name in COLUMNS}
    for name in JSON_COLUMNS:
        values[name] = json.loads(values[name])
    return Run(**values)


class RegistryDamaged(OpsError):
    """The registry file cannot be read as one; the line says how to rebuild it."""


def move_aside(path: Path) -> Path:
    """A damaged registry (and its WAL files) renamed out of the way, kept for a post-mortem."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            Path(f"{path}{suffix}").rename(f"{aside}{suffix}")
    return aside


class Registry:
    def __init__(self, path: Path | str):
        self.path = path
        if path != ":memory:":
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: every write below opens its own BEGIN IMMEDIATE transaction, so
        # concurrent CLIs queue on the write lock (busy timeout) instead of failing mid-way.
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA busy_timeout=60000")
            self.db.execute("PRAGMA journal_mode=WAL")
            self._migrate()
            self.db.execute("SELECT ops_id FROM runs LIMIT 1")  # the index ops needs is really there
        except sqlite3.DatabaseError as exc:  # garbage, a truncated file, another program's database
            self.db.close()
            raise RegistryDamaged(
                f"{self.path}: damaged, not a run registry ({exc}); `ops sync` moves it aside "
                "and rebuilds it from the run dirs"
            ) from None

    @classmethod
    def empty(cls) -> "Registry":
        """A registry with no runs, in memory: what a project that has none yet looks like."""
        return cls(":memory:")

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise OpsError(
                f"{self.path}: written by a newer ops (schema {version}, this one knows {SCHEMA_VERSION}); "
                "update ops (pip install -e . in the project)"
            )
        self.db.execute("BEGIN IMMEDIATE")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]  # another CLI may have migrated
        for number in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[number].split(";"):
                if statement.strip():
                    self.db.execute(statement)
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def insert(self, run: Run) -> bool:
        """Add a run; False when its ops id is taken (the caller picks another)."""
        values = run.to_json()
        for name in JSON_COLUMNS:
            values[name] = json.dumps(values[name])
        values["updated_at"] = time.time()
        names = [*COLUMNS, "updated_at"]
        cursor = self.db.execute(
            f"INSERT OR IGNORE INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
            [values[name] for name in names],
        )
        return cursor.rowcount == 1

    def update(self, ops_id: str, **changes) -> None:
        self.update_if(ops_id, {}, **changes)

    def update_if(self, ops_id: str, expected: dict, **changes) -> bool:
        """Compare-and-set: apply `changes` only if the row still holds `expected`; True if it did.
        Two ops acting on one run at once: exactly one of them wins."""
        for name in JSON_COLUMNS:
            if name in changes:
                changes[name] = json.dumps(changes[name])
        changes["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in changes)
        conditions = "".join(f" AND {name} IS ?" for name in expected)
        cursor = self.db.execute(
            f"UPDATE runs SET {assignments} WHERE ops_id = ?{conditions}",
            [*changes.values(), ops_id, *expected.values()],
        )
        return cursor.rowcount == 1

    def get(self, job_id: str) -> Run | None:
        """By ops id, else by engine job id (the newest run with it: local pids get reused)."""
        row = self.db.execute("SELECT * FROM runs WHERE ops_id = ?", (job_id,)).fetchone()
        if row is None:
            row = self.db.execute(
                "SELECT * FROM runs WHERE engine_job_id = ? ORDER BY created_at DESC LIMIT 1", (job_id,)
            ).fetchone()
        return _from_row(row) if row else None

    def ids_like(self, text: str, limit: int = 3) -> list[str]:
        rows = self.db.execute(
            "SELECT ops_id FROM runs WHERE ops_id LIKE ? ORDER BY created_at DESC LIMIT ?", (f"%{text}%", limit)
        )
        return [row[0] for row in rows]

    def select(self, states: list[str] = (), names: list[str] = (), limit: int | None = None) -> list[Run]:
        query, params = "SELECT * FROM runs", []
        clauses = []
        if states:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            params += list(states)
        if names:
            clauses.append("(" + " OR ".join("name LIKE ?" for _ in names) + ")")
            params += [name.replace("*", "%") for name in names]
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY created_at DESC"
        if limit:
            query += f" LIMIT {int(limit)}"
        return [_from_row(row) for row in self.db.execute(query, params)]

    def unfinished(self) -> list[Run]:
        return self.select(states=[s for s in STATES if s not in FINAL_STATES])

    def followup_done(self, ops_id: str, kind: str) -> bool:
        row = self.db.execute("SELECT 1 FROM followups WHERE ops_id = ? AND kind = ?", (ops_id, kind)).fetchone()
        return row is not None

    def record_followup(self, ops_id: str, kind: str, detail: str | None = None) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute(
            "INSERT OR REPLACE INTO followups (ops_id, kind, done_at, detail) VALUES (?, ?, ?, ?)",
            (ops_id, kind, time.time(), detail),
        )
        self.db.execute("DELETE FROM followup_failures WHERE ops_id = ? AND kind = ?", (ops_id, kind))
        self.db.execute("COMMIT")

    def record_failure(self, ops_id: str, kind: str, error: str, permanent: bool = False) -> None:
        """A follow-up that failed this time; it stays due, and the next sync tries again, unless
        the failure is permanent: then it waits for `ops sync --retry`."""
        self.db.execute(
            "INSERT INTO followup_failures (ops_id, kind, failed_at, error, permanent) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (ops_id, kind) DO UPDATE SET failed_at = excluded.failed_at, "
            "error = excluded.error, attempts = attempts + 1, permanent = excluded.permanent",
            (ops_id, kind, time.time(), error, int(permanent)),
        )

    def followup_stopped(self, ops_id: str, kind: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM followup_failures WHERE ops_id = ? AND kind = ? AND permanent = 1", (ops_id, kind)
        ).fetchone()
        return row is not None

    def retry_stopped(self) -> int:
        """Put every permanently failed follow-up back in the retries (after its cause was fixed)."""
        return self.db.execute("UPDATE followup_failures SET permanent = 0 WHERE permanent = 1").rowcount

    def failures(self, ops_id: str) -> list[dict]:
        """What waits in the outbox for this run: kind, error, attempts, failed_at, permanent."""
        rows = self.db.execute(
            "SELECT kind, error, attempts, failed_at, permanent FROM followup_failures WHERE ops_id = ? ORDER BY kind",
            (ops_id,),
        )
        return [dict(row) | {"permanent": bool(row["permanent"])} for row in rows]

    def forget_followup(self, ops_id: str, kind: str) -> None:
        """A resumed run ends again: its end-of-run follow-up is due again."""
        self.db.execute("DELETE FROM followups WHERE ops_id = ? AND kind = ?", (ops_id, kind))

    def pending_followups(self, kinds: list[str]) -> list[str]:
        """Finished runs missing one of the follow-ups `kinds`."""
        rows = self.db.execute(
            f"SELECT ops_id FROM runs WHERE state IN ({', '.join('?' * len(FINAL_STATES))}) AND "
            f"(SELECT COUNT(*) FROM followups f WHERE f.ops_id = runs.ops_id AND f.kind IN "
            f"({', '.join('?' * len(kinds))})) < ?",
            [*FINAL_STATES, *kinds, len(kinds)],
        )
        return [row[0] for row in rows]

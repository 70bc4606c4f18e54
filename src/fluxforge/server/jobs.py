"""The durable job store and queue: SQLite in WAL mode, and every job's files in a folder of its own.

Every state change is one SQL statement guarded by the state it leaves (`... WHERE status = 'queued'`), so
a cancel racing a claim, or a restart racing a completion, has exactly one winner: no job is lost, and none
completes twice. File names are the server's own (`in-references-0`, `out-0.png`), never a path from a
request.

Lifecycle: queued -> running -> succeeded | failed | canceled; queued -> canceled. After a crash, `recover`
puts a job that was running back in the queue once; if it was already a second attempt, it fails with code
`interrupted`.

`Jobs` is the interface the HTTP layer and the worker share: the store, the events of each job
(`events.EventHub`) and the wake-up of the worker, together.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxforge.server.events import EventHub

FINAL = ("succeeded", "failed", "canceled")
STATUSES = ("queued", "running", *FINAL)
MAX_ATTEMPTS = 2  # a job that was running when the server died is run once more, then fails

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    inputs TEXT NOT NULL,
    options TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    step INTEGER,
    total INTEGER,
    last_event INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    idempotency_key TEXT UNIQUE,
    body_hash TEXT,
    webhook_url TEXT,
    webhook_pending INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


@dataclass
class Job:
    """One row of the store, decoded."""

    id: str
    seq: int
    kind: str  # "job" (POST /v1/jobs), "generation" or "edit" (the OpenAI endpoints)
    status: str
    params: dict[str, Any]  # GenerationRequest fields by their Python names, images aside
    inputs: dict[str, Any]  # image slots -> file names: {"references": [...], "init_image": ..., "mask": ...}
    options: dict[str, Any]  # how to answer: output_format, output_compression, ...
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    step: int | None = None
    total: int | None = None
    last_event: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    idempotency_key: str | None = None
    body_hash: str | None = None
    webhook_url: str | None = None
    webhook_pending: bool = False
    queue_position: int | None = field(default=None, compare=False)

    @property
    def final(self) -> bool:
        return self.status in FINAL


class JobStore:
    """The SQLite database and the job folders under one data directory. Thread-safe: one connection, a
    lock around it (SQLite serialises writers anyway, and a statement takes microseconds)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.files = self.root / "jobs"
        self.files.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def folder(self, job_id: str) -> Path:
        return self.files / job_id

    # ---------------------------------------------------------------------------------------------------

    def new_id(self) -> str:
        return "job_" + uuid.uuid4().hex

    def insert(self, job: Job) -> Job:
        """Store a new queued job (its input files already written to `folder(job.id)`)."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO jobs (id, kind, status, params, inputs, options, created_at, "
                "idempotency_key, body_hash, webhook_url) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.kind,
                    json.dumps(job.params),
                    json.dumps(job.inputs),
                    json.dumps(job.options),
                    job.created_at,
                    job.idempotency_key,
                    job.body_hash,
                    job.webhook_url,
                ),
            )
            job.seq, job.status = cursor.lastrowid, "queued"
        return job

    def by_key(self, key: str) -> Job | None:
        """The job created with this Idempotency-Key, if any."""
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
        return None if row is None else self.get(row[0])

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = _job(row)
            if job.status == "queued":
                job.queue_position = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?", (job.seq,)
                ).fetchone()[0]
        return job

    def list(self, status: str | None = None, limit: int = 20) -> list[Job]:
        with self._lock:
            if status is None:
                rows = self._db.execute("SELECT id FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT id FROM jobs WHERE status = ? ORDER BY seq DESC LIMIT ?", (status, limit)
                ).fetchall()
        return [job for (job_id,) in rows if (job := self.get(job_id)) is not None]

    def count(self, status: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: 0 for status in STATUSES} | {status: n for status, n in rows}

    def claim(self) -> Job | None:
        """The oldest queued job, now running (one more attempt), or None."""
        with self._transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1, step = 0 "
                "WHERE id = ? AND status = 'queued'",
                (time.time(), row[0]),
            )
        return self.get(row[0])

    def claim_matching(self, match: Callable[[Job], bool], limit: int, scan: int = 64) -> list[Job]:
        """Up to `limit` more queued jobs for which `match` holds (the oldest first, among the first `scan`
        waiting), now running: the companions of a batch."""
        if limit <= 0:
            return []
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT ?", (scan,))
            chosen = [row["id"] for row in rows.fetchall() if match(_job(row))][:limit]
            now = time.time()
            for job_id in chosen:
                db.execute(
                    "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1, step = 0 "
                    "WHERE id = ? AND status = 'queued'",
                    (now, job_id),
                )
        return [job for job_id in chosen if (job := self.get(job_id)) is not None]

    def progress(self, job_id: str, step: int, total: int, event: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET step = ?, total = ?, last_event = ? WHERE id = ? AND status = 'running'",
                (step, total, event, job_id),
            )

    def set_event(self, job_id: str, event: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET last_event = MAX(last_event, ?) WHERE id = ?", (event, job_id))

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        result: Mapping[str, Any] | None = None,
        error: Mapping[str, Any] | None = None,
        only_from: tuple[str, ...] = ("running",),
    ) -> bool:
        """Move a job to a final state if it is in one of `only_from`; False if it was not (a cancel or a
        recovery got there first)."""
        assert status in FINAL
        with self._transaction() as db:
            marks = ",".join("?" * len(only_from))
            cursor = db.execute(
                f"UPDATE jobs SET status = ?, finished_at = ?, result = ?, error = ?, "
                f"webhook_pending = (webhook_url IS NOT NULL) WHERE id = ? AND status IN ({marks})",
                (
                    status,
                    time.time(),
                    None if result is None else json.dumps(result),
                    None if error is None else json.dumps(error),
                    job_id,
                    *only_from,
                ),
            )
            return cursor.rowcount == 1

    def requeue(self, job_id: str, count_attempt: bool = True) -> bool:
        """A running job back to the queue, as a crash would leave it (its attempt counted), or, with
        `count_attempt=False`, as if it had not started (a batch companion stopped by another's cancel)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL, step = NULL, total = NULL, "
                "attempts = attempts - ? WHERE id = ? AND status = 'running'",
                (0 if count_attempt else 1, job_id),
            )
            return cursor.rowcount == 1

    def recover(self) -> tuple[list[str], list[str]]:
        """At start: jobs left running by a crash go back to the queue, or fail if that was their second
        attempt. Returns (requeued ids, failed ids)."""
        with self._lock:
            rows = self._db.execute("SELECT id, attempts FROM jobs WHERE status = 'running'").fetchall()
        requeued, failed = [], []
        for job_id, attempts in rows:
            if attempts >= MAX_ATTEMPTS:
                error = {
                    "code": "interrupted",
                    "message": f"the server stopped while this job was running, {attempts} times",
                    "param": None,
                }
                if self.finish(job_id, "failed", error=error):
                    failed.append(job_id)
            elif self.requeue(job_id):
                requeued.append(job_id)
        return requeued, failed

    def webhooks_pending(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE webhook_pending = 1 ORDER BY seq").fetchall()
        return [r[0] for r in rows]

    def webhook_done(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET webhook_pending = 0 WHERE id = ?", (job_id,))

    def delete(self, job_id: str) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                f"DELETE FROM jobs WHERE id = ? AND status IN ({','.join('?' * len(FINAL))})",
                (job_id, *FINAL),
            )
            deleted = cursor.rowcount == 1
        if deleted:
            shutil.rmtree(self.folder(job_id), ignore_errors=True)
        return deleted

    def expired(self, older_than: float) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM jobs WHERE status IN ({','.join('?' * len(FINAL))}) AND finished_at < ?",
                (*FINAL, older_than),
            ).fetchall()
        return [r[0] for r in rows]


_JSON_COLUMNS = ("params", "inputs", "options", "result", "error")


def _job(row: sqlite3.Row) -> Job:
    """A row as a Job: the columns are the Job's fields, five of them JSON."""
    fields = dict(row)
    for name in _JSON_COLUMNS:
        fields[name] = None if fields[name] is None else json.loads(fields[name])
    fields["webhook_pending"] = bool(fields["webhook_pending"])
    return Job(**fields)


class QueueFull(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the queue is full ({limit} jobs waiting); retry later")
        self.limit = limit


class Jobs:
    """The store, the events and the worker's wake-up: what the HTTP layer and the worker share."""

    def __init__(self, store: JobStore, max_queue: int) -> None:
        self.store, self.max_queue = store, max_queue
        self.events = EventHub()
        self._wake = threading.Condition()
        self._admit = threading.Lock()  # the queue-length check and the insert, together

    def submit(self, job: Job) -> tuple[Job, bool]:
        """Queue a job, or return the one with its idempotency key. Raises QueueFull."""
        with self._admit:
            if job.idempotency_key is not None and (existing := self.store.by_key(job.idempotency_key)):
                return existing, False
            if self.store.count("queued") >= self.max_queue:
                raise QueueFull(self.max_queue)
            self.store.insert(job)
        stored = self.store.get(job.id)
        self.publish(job.id, "queued", {"queue_position": stored.queue_position})
        self.wake()
        return stored, True

    def publish(self, job_id: str, name: str, data: dict[str, Any], persist: bool = True) -> int:
        """Send an event to the job's subscribers; returns its id. Ids continue from the store's record,
        so they keep increasing across restarts."""
        event_id = self.events.publish(job_id, name, data, start=lambda: self.last_event(job_id))
        if persist:
            self.store.set_event(job_id, event_id)
        return event_id

    def last_event(self, job_id: str) -> int:
        """The id of the job's latest event on record (0 for none)."""
        job = self.store.get(job_id)
        return job.last_event if job else 0

    def wait_for_work(self, timeout: float) -> None:
        with self._wake:
            self._wake.wait(timeout)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

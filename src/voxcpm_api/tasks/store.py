"""SQLite task store (WAL): the single source of truth for tasks, shared by every worker process.

Why SQLite: tasks must survive restarts and `kill -9`, several uvicorn workers must see the same
tasks, and nothing else should need to be running. WAL lets readers proceed while the engine owner
writes progress. Every state change is one short transaction; claims use BEGIN IMMEDIATE so two
processes can never claim the same task.

Invariants:
- status moves pending -> processing -> (completed | failed | cancelled), or pending -> cancelled,
  or processing -> pending again only through `requeue_interrupted` (crash recovery).
- progress never decreases while a task runs and is 1.0 only for completed tasks.
- audio_file is set only once the file has been renamed into place.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..domain import SynthesisParams, TaskStatus

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id          TEXT    NOT NULL UNIQUE,
    status           TEXT    NOT NULL,
    message          TEXT    NOT NULL,
    progress         REAL    NOT NULL DEFAULT 0.0,
    created_at       REAL    NOT NULL,
    updated_at       REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    estimated_time_s REAL,
    params_json      TEXT    NOT NULL,
    audio_file       TEXT,
    sample_rate_hz   INTEGER,
    duration_s       REAL,
    num_patches      INTEGER,
    error            TEXT,
    error_status     INTEGER,
    attempts         INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    task_id: str
    status: TaskStatus
    message: str
    progress: float
    created_at: float  # unix seconds
    updated_at: float
    started_at: float | None
    finished_at: float | None
    estimated_time_s: float | None
    params: SynthesisParams
    audio_file: str | None  # file name inside the output directory
    sample_rate_hz: int | None
    duration_s: float | None
    num_patches: int | None
    error: str | None
    error_status: int | None  # HTTP status the error maps to (sync mode re-raises it)
    attempts: int
    cancel_requested: bool


class TaskStore:
    """Thread-safe; one connection per store object guarded by a lock (calls are sub-millisecond)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # ---- creation and reads ------------------------------------------------------------------

    def insert(self, task_id: str, params: SynthesisParams, *, message: str, estimated_time_s: float | None,
               max_pending: int | None = None) -> TaskRecord | None:
        """Insert a pending task; returns None (and inserts nothing) if max_pending are already waiting."""
        now = time.time()
        with self._tx() as conn:
            if max_pending is not None:
                (pending,) = conn.execute("SELECT COUNT(*) FROM tasks WHERE status = 'pending'").fetchone()
                if pending >= max_pending:
                    return None
            conn.execute(
                "INSERT INTO tasks (task_id, status, message, created_at, updated_at, estimated_time_s, params_json)"
                " VALUES (?, 'pending', ?, ?, ?, ?, ?)",
                (task_id, message, now, now, estimated_time_s, json.dumps(params.to_json_dict(), ensure_ascii=False)),
            )
        record = self.get(task_id)
        assert record is not None
        return record

    def get(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return _to_record(row) if row else None

    def list_tasks(self, status: TaskStatus | None = None, limit: int = 50) -> list[TaskRecord]:
        query = "SELECT * FROM tasks"
        args: tuple[object, ...] = ()
        if status is not None:
            query += " WHERE status = ?"
            args = (status.value,)
        query += " ORDER BY seq DESC LIMIT ?"
        with self._lock:
            rows = self._conn.execute(query, (*args, limit)).fetchall()
        return [_to_record(r) for r in rows]

    def listing(self, status: TaskStatus | None, limit: int) -> tuple[list[TaskRecord], int, int]:
        """(newest tasks, how many match `status`, how many are processing), read from one snapshot: three
        separate reads could disagree while tasks change state between them."""
        where, args = ("WHERE status = ?", (status.value,)) if status is not None else ("", ())
        with self._lock:
            self._conn.execute("BEGIN")  # a read transaction: one consistent view, also across processes
            try:
                rows = self._conn.execute(f"SELECT * FROM tasks {where} ORDER BY seq DESC LIMIT ?",
                                          (*args, limit)).fetchall()
                (total,) = self._conn.execute(f"SELECT COUNT(*) FROM tasks {where}", args).fetchone()
                (processing,) = self._conn.execute("SELECT COUNT(*) FROM tasks WHERE status = 'processing'").fetchone()
            finally:
                self._conn.execute("COMMIT")
        return [_to_record(r) for r in rows], int(total), int(processing)

    def count(self, status: TaskStatus | None = None) -> int:
        with self._lock:
            if status is None:
                (n,) = self._conn.execute("SELECT COUNT(*) FROM tasks").fetchone()
            else:
                (n,) = self._conn.execute("SELECT COUNT(*) FROM tasks WHERE status = ?", (status.value,)).fetchone()
        return int(n)

    def pending_estimate_ahead_s(self, task_id: str | None = None) -> float:
        """Sum of the estimates of pending tasks queued before `task_id` (all pending if None)."""
        with self._lock:
            if task_id is None:
                row = self._conn.execute(
                    "SELECT COALESCE(SUM(estimated_time_s), 0) FROM tasks WHERE status = 'pending'").fetchone()
            else:
                row = self._conn.execute(
                    "SELECT COALESCE(SUM(estimated_time_s), 0) FROM tasks WHERE status = 'pending' AND seq <"
                    " (SELECT seq FROM tasks WHERE task_id = ?)", (task_id,)).fetchone()
        return float(row[0])

    # ---- the engine owner's transitions --------------------------------------------------------

    def claim_next(self) -> TaskRecord | None:
        """Atomically move the oldest pending task to processing (FIFO)."""
        now = time.time()
        with self._tx() as conn:
            row = conn.execute("SELECT task_id FROM tasks WHERE status = 'pending' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE tasks SET status = 'processing', message = 'Generating audio', attempts = attempts + 1,"
                " started_at = ?, updated_at = ? WHERE task_id = ?",
                (now, now, row["task_id"]),
            )
        return self.get(row["task_id"])

    def update_progress(self, task_id: str, progress: float, message: str, estimated_time_s: float | None) -> None:
        progress = min(max(progress, 0.0), 0.999)  # 1.0 is reserved for "file exists"
        with self._tx() as conn:
            conn.execute(
                "UPDATE tasks SET progress = MAX(progress, ?), message = ?, estimated_time_s = ?, updated_at = ?"
                " WHERE task_id = ? AND status = 'processing'",
                (progress, message, estimated_time_s, time.time(), task_id),
            )

    def complete(self, task_id: str, *, audio_file: str, sample_rate_hz: int, duration_s: float,
                 num_patches: int, message: str) -> None:
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "UPDATE tasks SET status = 'completed', progress = 1.0, message = ?, audio_file = ?,"
                " sample_rate_hz = ?, duration_s = ?, num_patches = ?, estimated_time_s = 0,"
                " finished_at = ?, updated_at = ? WHERE task_id = ? AND status = 'processing'",
                (message, audio_file, sample_rate_hz, duration_s, num_patches, now, now, task_id),
            )

    def fail(self, task_id: str, *, error: str, error_status: int, message: str = "Task failed") -> None:
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "UPDATE tasks SET status = 'failed', message = ?, error = ?, error_status = ?, estimated_time_s = 0,"
                " finished_at = ?, updated_at = ? WHERE task_id = ? AND status IN ('pending', 'processing')",
                (message, error, error_status, now, now, task_id),
            )

    def mark_cancelled(self, task_id: str, message: str = "Cancelled while processing") -> None:
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "UPDATE tasks SET status = 'cancelled', message = ?, estimated_time_s = 0, finished_at = ?,"
                " updated_at = ? WHERE task_id = ? AND status = 'processing'",
                (message, now, now, task_id),
            )

    def request_cancel(self, task_id: str) -> TaskStatus | None:
        """Cancel a pending task now, or flag a processing one. Returns the status before, or None."""
        now = time.time()
        with self._tx() as conn:
            row = conn.execute("SELECT status FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            status = TaskStatus(row["status"])
            if status is TaskStatus.PENDING:
                conn.execute(
                    "UPDATE tasks SET status = 'cancelled', message = 'Cancelled before it started',"
                    " estimated_time_s = 0, finished_at = ?, updated_at = ? WHERE task_id = ?",
                    (now, now, task_id),
                )
            elif status is TaskStatus.PROCESSING:
                conn.execute(
                    "UPDATE tasks SET cancel_requested = 1, message = 'Cancelling at the next patch',"
                    " updated_at = ? WHERE task_id = ?",
                    (now, task_id),
                )
        return status

    def cancel_requested_ids(self) -> set[str]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT task_id FROM tasks WHERE status = 'processing' AND cancel_requested = 1").fetchall()
        return {r["task_id"] for r in rows}

    def requeue_interrupted(self, max_attempts: int) -> tuple[int, int]:
        """Crash recovery, run by a new engine owner before it claims anything.

        Every task still marked processing was being run by a process that no longer holds the
        engine lock, so it was interrupted. Re-queue it at the front of its original position
        (seq is unchanged) unless it has used up its attempts. Returns (requeued, failed).
        """
        now = time.time()
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT task_id, attempts, cancel_requested FROM tasks WHERE status = 'processing'").fetchall()
            requeued = failed = 0
            for row in rows:
                if row["cancel_requested"]:
                    conn.execute(
                        "UPDATE tasks SET status = 'cancelled', message = 'Cancelled (interrupted while cancelling)',"
                        " finished_at = ?, updated_at = ? WHERE task_id = ?", (now, now, row["task_id"]))
                elif row["attempts"] >= max_attempts:
                    failed += 1
                    conn.execute(
                        "UPDATE tasks SET status = 'failed', message = 'Task failed', error = ?, error_status = 500,"
                        " finished_at = ?, updated_at = ? WHERE task_id = ?",
                        (f"the server stopped while processing this task {row['attempts']} times; giving up",
                         now, now, row["task_id"]),
                    )
                else:
                    requeued += 1
                    conn.execute(
                        "UPDATE tasks SET status = 'pending', progress = 0.0, message = ?, updated_at = ?"
                        " WHERE task_id = ?",
                        (f"Re-queued after an interrupted attempt ({row['attempts']} of {max_attempts})",
                         now, row["task_id"]),
                    )
        return requeued, failed

    def requeue_interrupted_one(self, task_id: str) -> None:
        """A graceful shutdown stopped this task mid-run: back to pending, attempt not counted."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE tasks SET status = 'pending', progress = 0.0, attempts = MAX(attempts - 1, 0),"
                " message = 'Re-queued: the server restarted while processing', updated_at = ?"
                " WHERE task_id = ? AND status = 'processing'", (time.time(), task_id))

    # ---- files ---------------------------------------------------------------------------------

    def referenced_audio_files(self) -> set[str]:
        with self._lock:
            rows = self._conn.execute("SELECT audio_file FROM tasks WHERE audio_file IS NOT NULL").fetchall()
        return {r["audio_file"] for r in rows}

    def is_known_audio_file(self, file_name: str) -> bool:
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM tasks WHERE audio_file = ? AND status = 'completed'", (file_name,)).fetchone()
        return row is not None

    def forget_audio_files(self, file_names: list[str], message: str) -> None:
        now = time.time()
        with self._tx() as conn:
            conn.executemany(
                "UPDATE tasks SET audio_file = NULL, message = ?, updated_at = ? WHERE audio_file = ?",
                [(message, now, name) for name in file_names],
            )

    # ---- meta (engine info, speed statistics, owner heartbeat) ---------------------------------

    def set_meta(self, key: str, value: object) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: object = None) -> object:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default


def _to_record(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        task_id=row["task_id"],
        status=TaskStatus(row["status"]),
        message=row["message"],
        progress=float(row["progress"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        estimated_time_s=row["estimated_time_s"],
        params=SynthesisParams.from_json_dict(json.loads(row["params_json"])),
        audio_file=row["audio_file"],
        sample_rate_hz=row["sample_rate_hz"],
        duration_s=row["duration_s"],
        num_patches=row["num_patches"],
        error=row["error"],
        error_status=row["error_status"],
        attempts=int(row["attempts"]),
        cancel_requested=bool(row["cancel_requested"]),
    )

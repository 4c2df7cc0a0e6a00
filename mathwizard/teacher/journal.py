"""The batch journal: every teacher batch and the state of every item asked through one, durable under `kill -9`.

SQLite in WAL mode next to the reply cache (`<cache_dir>/teacher-batches.sqlite`), autocommit, one transaction per
step. A batch's row is written, with its request file on disk and the item-to-request map, *before* the upload;
its file id and batch id are recorded as soon as the API returns them; the items' new state and the batch's
`collected` mark are written in one transaction after its valid replies are in the reply cache. So a re-run finds
every batch a killed run had started, at whatever step, and the name of each (a hash of its request file, also in
the uploaded file's name and the batch's metadata) finds an upload or a batch whose id the kill did not let us
record. Never holds the API key.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mathwizard.teacher.client import Message
from mathwizard.teacher.store import SQLiteStore

JOURNAL_FILE = "teacher-batches.sqlite"
_BATCH = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    name TEXT PRIMARY KEY,
    requests INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    file_id TEXT,
    batch_id TEXT,
    status TEXT NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    collected INTEGER NOT NULL DEFAULT 0,
    note TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batch_requests (
    name TEXT NOT NULL,
    custom_id TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (name, custom_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS items (key TEXT PRIMARY KEY, state TEXT NOT NULL) WITHOUT ROWID;
"""


@dataclass
class ItemState:
    """An item between asks: what to send next and what it has cost so far (`asks`: replies received)."""

    key: str
    source_answer: str
    reask: str
    base_messages: list[Message]
    next_messages: list[Message]
    sent: int = 0  # requests put into batch files (numbers the custom ids: a re-sent item is a new request)
    asks: int = 0  # replies received and validated (the online runner's attempts)
    faults: int = 0  # failed requests in a row (5xx, expired, malformed line): retried up to request_retries
    last_text: str | None = None
    last_reason: str | None = None
    last_error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchRow:
    name: str
    requests: int
    bytes: int
    file_id: str | None
    batch_id: str | None
    status: str
    completed: int
    failed: int
    collected: bool
    note: str
    created_at: float


class BatchJournal(SQLiteStore):
    """Batches and item states by key; one connection per thread, safe across processes (SQLite locking)."""

    what = "the teacher batch journal"
    when_damaged = (
        "cancel its batches in the provider's console if any are running, delete the file and re-run (the reply"
        " cache keeps every collected reply)"
    )
    schema = _SCHEMA
    synchronous = "FULL"  # few writes, each a step a re-run must see

    @classmethod
    def in_dir(cls, cache_dir: Path) -> BatchJournal:
        return cls(Path(cache_dir) / JOURNAL_FILE)

    def _guarded(self, work: Any) -> Any:
        with self._guard():
            return work(self._connection())

    def _transaction(self, work: Any) -> Any:
        def run(conn: sqlite3.Connection) -> Any:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return self._guarded(run)

    # ------------------------------------------------------------------------------------------- items
    def items(self, keys: Iterable[str]) -> dict[str, ItemState]:
        keys = list(dict.fromkeys(keys))

        def read(conn: sqlite3.Connection) -> dict[str, ItemState]:
            found: dict[str, ItemState] = {}
            for start in range(0, len(keys), _BATCH):
                part = keys[start : start + _BATCH]
                sql = f"SELECT key, state FROM items WHERE key IN ({','.join('?' * len(part))})"
                for key, state in conn.execute(sql, part):
                    found[key] = ItemState(**json.loads(state))
            return found

        return self._guarded(read)

    def save(self, states: Iterable[ItemState], done: Iterable[str] = ()) -> None:
        """Store item states and forget the `done` items (their reply or failure is in the reply cache)."""
        self._transaction(lambda conn: _save(conn, states, done))

    # ----------------------------------------------------------------------------------------- batches
    def prepare(self, name: str, requests: dict[str, str], nbytes: int, states: Iterable[ItemState]) -> None:
        """Record a batch about to be uploaded: its name, its requests (custom id -> key), the items' new states."""
        now = time.time()

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO batches (name, requests, bytes, status, created_at, updated_at)"
                " VALUES (?, ?, ?, 'prepared', ?, ?)",
                (name, len(requests), nbytes, now, now),
            )
            conn.executemany(
                "INSERT INTO batch_requests (name, custom_id, key) VALUES (?, ?, ?)",
                [(name, custom_id, key) for custom_id, key in requests.items()],
            )
            _save(conn, states, ())

        self._transaction(work)

    def update(self, name: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        assignments = ", ".join(f"{column} = ?" for column in fields)
        self._guarded(
            lambda conn: conn.execute(f"UPDATE batches SET {assignments} WHERE name = ?", [*fields.values(), name])
        )

    def collect(self, name: str, states: Iterable[ItemState], done: Iterable[str], **fields: Any) -> None:
        """A batch's replies are in the cache: the items' new states and the batch marked collected, at once."""
        fields.update(collected=1, updated_at=time.time())
        assignments = ", ".join(f"{column} = ?" for column in fields)

        def work(conn: sqlite3.Connection) -> None:
            _save(conn, states, done)
            conn.execute(f"UPDATE batches SET {assignments} WHERE name = ?", [*fields.values(), name])

        self._transaction(work)

    def open_batches(self) -> list[BatchRow]:
        """Batches not collected yet, oldest first."""
        return self._rows("WHERE collected = 0 ORDER BY created_at, name")

    def batches(self, names: Iterable[str]) -> list[BatchRow]:
        names = list(names)
        if not names:
            return []
        return self._rows(f"WHERE name IN ({','.join('?' * len(names))}) ORDER BY created_at, name", names)

    def _rows(self, where: str, args: list[Any] | None = None) -> list[BatchRow]:
        sql = (
            "SELECT name, requests, bytes, file_id, batch_id, status, completed, failed, collected, note, created_at"
            f" FROM batches {where}"
        )
        rows = self._guarded(lambda conn: conn.execute(sql, args or []).fetchall())
        return [BatchRow(*row[:8], bool(row[8]), *row[9:]) for row in rows]

    def requests(self, name: str) -> dict[str, str]:
        """custom id -> item key of a batch's requests."""
        sql = "SELECT custom_id, key FROM batch_requests WHERE name = ?"
        return dict(self._guarded(lambda conn: conn.execute(sql, (name,)).fetchall()))


def _save(conn: sqlite3.Connection, states: Iterable[ItemState], done: Iterable[str]) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO items (key, state) VALUES (?, ?)",
        [(state.key, json.dumps(asdict(state))) for state in states],
    )
    conn.executemany("DELETE FROM items WHERE key = ?", [(key,) for key in done])

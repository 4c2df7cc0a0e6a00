"""A durable, content-addressed cache of teacher replies and failures, one row per item (SQLite in WAL mode).

The key hashes everything that determines a reply: the model, the endpoint's host, the prompt texts, the item's
question and source solution, and the sampling parameters, so a grown dataset only pays for its new rows and a
changed prompt re-asks exactly what it must. Never the API key. Each reply is committed on its own as soon as it
is validated: a `kill -9` at any instant loses at most the requests in flight (WAL + synchronous=NORMAL survives
a process crash; only a power loss may drop the last commits, which are then simply asked again).

Failures are kept too, under the same key, with their reason: an item whose replies failed validation, that was
refused or that the server found too long is not asked again by a re-run unless told (`teacher.retry_failed`).
Failures that a later attempt can fix (timeouts, 5xx, an outage) are never stored. A reply for a key replaces its
failure. A damaged cache file is one `DataError` that names the file and says to delete it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mathwizard.manifest import stable_hash
from mathwizard.teacher.store import SQLiteStore

CACHE_FILE = "teacher.sqlite"
KEY_VERSION = 1  # bump if the key's recipe changes
DEFAULT_HOST = "api.openai.com"
_BATCH = 500  # keys per SELECT ... IN (...), under SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    model TEXT NOT NULL,
    host TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 1,
    text TEXT,
    created_at REAL NOT NULL
) WITHOUT ROWID;
"""


def endpoint_host(base_url: str | None) -> str:
    """`host[:port]` of the endpoint, lower-cased and without credentials: the part of the URL that names a server."""
    if not base_url:
        return DEFAULT_HOST
    parts = urlsplit(base_url if "://" in base_url else f"https://{base_url}")
    host = (parts.hostname or "").lower()
    return f"{host}:{parts.port}" if parts.port else host


def reply_key(
    *,
    model: str,
    base_url: str | None,
    prompts: Iterable[str],
    question: str,
    solution: str,
    sampling: Mapping[str, Any],
) -> str:
    """The cache key of one item's reply (sha256 hex)."""
    return stable_hash(
        "teacher-reply", KEY_VERSION, model, endpoint_host(base_url), list(prompts), question, solution, dict(sampling)
    )


@dataclass(frozen=True)
class CachedReply:
    text: str
    model: str
    host: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1


@dataclass(frozen=True)
class CachedFailure:
    """Why an item got no usable reply: `reason` as in failures.jsonl, after `attempts` asks; `text` is the last
    reply when there was one (re-validated on read, so a laxer validator turns it into a reply)."""

    reason: str
    detail: str = ""
    attempts: int = 1
    text: str | None = None


class ReplyCache(SQLiteStore):
    """Replies and failures by key; safe to share between threads (one SQLite connection per thread) and processes.

    Raises (every method):
        DataError: the file is damaged (not a database, malformed) or cannot be used; the message names it.
        TransientError: another process held the database locked for a minute.
    """

    what = "the teacher cache"
    when_damaged = (
        "delete it (with its -wal and -shm files, if any) and re-run: only the replies it held are asked again"
    )
    schema = _SCHEMA

    @classmethod
    def in_dir(cls, cache_dir: Path) -> ReplyCache:
        return cls(Path(cache_dir) / CACHE_FILE)

    def _select(self, sql: str, keys: Iterable[str]) -> list[tuple[Any, ...]]:
        keys = list(dict.fromkeys(keys))
        rows: list[tuple[Any, ...]] = []
        with self._guard():
            conn = self._connection()
            for start in range(0, len(keys), _BATCH):
                batch = keys[start : start + _BATCH]
                rows += conn.execute(sql.format(marks=",".join("?" * len(batch))), batch).fetchall()
        return rows

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedReply]:
        """The cached replies among `keys` (missing keys are simply absent)."""
        sql = (
            "SELECT key, text, model, host, finish_reason, prompt_tokens, completion_tokens, attempts"
            " FROM replies WHERE key IN ({marks})"
        )
        return {key: CachedReply(*fields) for key, *fields in self._select(sql, keys)}

    def get(self, key: str) -> CachedReply | None:
        return self.get_many([key]).get(key)

    def failures(self, keys: Iterable[str]) -> dict[str, CachedFailure]:
        """The cached failures among `keys`."""
        sql = "SELECT key, reason, detail, attempts, text FROM failures WHERE key IN ({marks})"
        return {key: CachedFailure(*fields) for key, *fields in self._select(sql, keys)}

    def put(self, key: str, reply: CachedReply) -> None:
        """Store a valid reply (it replaces a failure stored for the same key)."""
        with self._guard():
            conn = self._connection()
            conn.execute(
                "INSERT OR REPLACE INTO replies"
                " (key, text, model, host, finish_reason, prompt_tokens, completion_tokens, attempts, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    reply.text,
                    reply.model,
                    reply.host,
                    reply.finish_reason,
                    reply.prompt_tokens,
                    reply.completion_tokens,
                    reply.attempts,
                    time.time(),
                ),
            )
            conn.execute("DELETE FROM failures WHERE key = ?", (key,))

    def put_failure(self, key: str, failure: CachedFailure) -> None:
        """Store why an item failed for a reason a re-run would meet again (never a timeout or a 5xx)."""
        with self._guard():
            self._connection().execute(
                "INSERT OR REPLACE INTO failures (key, reason, detail, attempts, text, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key, failure.reason, failure.detail, failure.attempts, failure.text, time.time()),
            )

    def delete(self, keys: Iterable[str]) -> None:
        """Forget replies and failures of `keys`."""
        rows = [(k,) for k in keys]
        with self._guard():
            conn = self._connection()
            conn.executemany("DELETE FROM replies WHERE key = ?", rows)
            conn.executemany("DELETE FROM failures WHERE key = ?", rows)

    def __len__(self) -> int:
        """Cached replies (failures are counted by `failure_count`)."""
        with self._guard():
            return self._connection().execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def failure_count(self) -> int:
        with self._guard():
            return self._connection().execute("SELECT COUNT(*) FROM failures").fetchone()[0]

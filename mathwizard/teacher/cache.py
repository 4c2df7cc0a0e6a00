"""A durable, content-addressed cache of valid teacher replies, one row per item (SQLite in WAL mode).

The key hashes everything that determines a reply: the model, the endpoint's host, the prompt texts, the item's
question and source solution, and the sampling parameters, so a grown dataset only pays for its new rows and a
changed prompt re-asks exactly what it must. Never the API key. Each reply is committed on its own as soon as it
is validated: a `kill -9` at any instant loses at most the requests in flight (WAL + synchronous=NORMAL survives
a process crash; only a power loss may drop the last commits, which are then simply asked again).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mathwizard.manifest import stable_hash

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
) WITHOUT ROWID
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


class ReplyCache:
    """Valid replies by key; safe to share between threads (one SQLite connection per thread) and processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._connection().execute(_SCHEMA)

    @classmethod
    def in_dir(cls, cache_dir: Path) -> ReplyCache:
        return cls(Path(cache_dir) / CACHE_FILE)

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # autocommit: every put is its own transaction, durable as soon as it returns
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=60000")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedReply]:
        """The cached replies among `keys` (missing keys are simply absent)."""
        keys = list(dict.fromkeys(keys))
        conn = self._connection()
        found: dict[str, CachedReply] = {}
        for start in range(0, len(keys), _BATCH):
            batch = keys[start : start + _BATCH]
            marks = ",".join("?" * len(batch))
            rows = conn.execute(
                "SELECT key, text, model, host, finish_reason, prompt_tokens, completion_tokens, attempts"
                f" FROM replies WHERE key IN ({marks})",
                batch,
            )
            for key, *fields in rows:
                found[key] = CachedReply(*fields)
        return found

    def get(self, key: str) -> CachedReply | None:
        return self.get_many([key]).get(key)

    def put(self, key: str, reply: CachedReply) -> None:
        self._connection().execute(
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

    def delete(self, keys: Iterable[str]) -> None:
        self._connection().executemany("DELETE FROM replies WHERE key = ?", [(k,) for k in keys])

    def __len__(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> ReplyCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

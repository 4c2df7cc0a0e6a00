"""The teacher's SQLite files (the reply cache, the batch journal): shared by threads and processes, durable per
write, and their errors as one line that names the file and says what to do."""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Self

from mathwizard.errors import DataError, MathWizardError, TransientError

_DAMAGED = re.compile(r"malformed|not a database|encrypted|corrupt", re.IGNORECASE)


class SQLiteStore:
    """One SQLite file: a connection per thread (autocommit, WAL), SQLite's own locking between processes.

    Subclasses name the file for messages (`what`), say how to recover from a damaged one (`when_damaged`) and give
    their `schema`.

    Raises (every guarded call):
        DataError: the file is damaged (not a database, malformed) or cannot be used; the message names it.
        TransientError: another process held the database locked for a minute.
    """

    what: ClassVar[str]
    when_damaged: ClassVar[str]
    schema: ClassVar[str]
    synchronous: ClassVar[str] = "NORMAL"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        with self._guard():
            self._connection().executescript(self.schema)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite's errors about the file as one line that names it and says what to do."""
        problem: MathWizardError | None = None
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError):
                raise  # our bug, not the file's
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if "locked" in reason:
                problem = TransientError(f"{self.what} {self.path} stayed locked by another process ({reason})")
            elif isinstance(exc, sqlite3.OperationalError) and not _DAMAGED.search(reason):
                problem = DataError(f"cannot use {self.what} {self.path} ({reason})")
            else:
                problem = DataError(f"{self.what} {self.path} is damaged ({reason}); {self.when_damaged}")
        if problem is not None:
            raise problem from None  # one line: the SQLite error is in the message

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # autocommit: every statement outside an explicit transaction is durable as soon as it returns
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA busy_timeout=60000")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

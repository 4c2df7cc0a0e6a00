"""The per-item reply cache: what its key covers, and that it is durable and shareable."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mathwizard.errors import DataError
from mathwizard.teacher.cache import CachedFailure, CachedReply, ReplyCache, endpoint_host, reply_key

BASE = {
    "model": "gpt-4o-mini",
    "base_url": "https://api.example.com/v1",
    "prompts": ("system text", "user {question} {solution}", "reask {problems}"),
    "question": "Find AB.",
    "solution": r"$AB=\boxed{5}$",
    "sampling": {"temperature": 0.0, "max_tokens": 2048},
}


def test_same_input_same_key(monkeypatch: pytest.MonkeyPatch) -> None:
    first = reply_key(**BASE)
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", "sk-another-key")  # the key is never part of it
    assert reply_key(**{**BASE, "sampling": dict(reversed(list(BASE["sampling"].items())))}) == first
    assert reply_key(**{**BASE, "base_url": "https://API.example.com/other/path"}) == first  # host only


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gpt-4o"},
        {"base_url": "https://api.other.com/v1"},
        {"base_url": "http://api.example.com:8000/v1"},
        {"prompts": ("system text, edited", "user {question} {solution}", "reask {problems}")},
        {"prompts": ("system text", "user {question} {solution}", "reask again {problems}")},
        {"question": "Find BC."},
        {"solution": r"$AB=\boxed{6}$"},
        {"sampling": {"temperature": 0.7, "max_tokens": 2048}},
        {"sampling": {"temperature": 0.0, "max_tokens": 512}},
    ],
    ids=lambda c: next(iter(c)),
)
def test_anything_that_changes_the_reply_changes_the_key(change: dict) -> None:
    assert reply_key(**{**BASE, **change}) != reply_key(**BASE)


def test_endpoint_host() -> None:
    assert endpoint_host(None) == "api.openai.com"
    assert endpoint_host("http://user:pw@LocalHost:8000/v1") == "localhost:8000"
    assert endpoint_host("api.deepseek.com") == "api.deepseek.com"


def test_replies_survive_reopening(tmp_path: Path) -> None:
    with ReplyCache.in_dir(tmp_path) as cache:
        cache.put("k1", CachedReply(text="one", model="m", host="h", prompt_tokens=3))
    with ReplyCache.in_dir(tmp_path) as cache:
        assert cache.get("k1") == CachedReply(text="one", model="m", host="h", prompt_tokens=3)
        assert cache.get_many(["k1", "missing"]).keys() == {"k1"}
        assert len(cache) == 1
    mode = sqlite3.connect(tmp_path / "teacher.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_threads_share_one_cache(tmp_path: Path) -> None:
    cache = ReplyCache.in_dir(tmp_path)

    def write(thread: int) -> None:
        for i in range(50):
            cache.put(f"{thread}-{i}", CachedReply(text=str(i), model="m", host="h"))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 200  # 4 threads x 50 replies
    assert len(cache.get_many(f"{t}-{i}" for t in range(4) for i in range(50))) == 200
    cache.close()


def test_the_cache_outlives_a_killed_writer(tmp_path: Path) -> None:
    """A process killed right after its commits leaves them readable (WAL recovery on the next open)."""
    code = (
        "import os, signal, sys\n"
        "from mathwizard.teacher.cache import ReplyCache, CachedReply\n"
        "c = ReplyCache.in_dir(sys.argv[1])\n"
        "for i in range(100): c.put(f'k{i}', CachedReply(text='t', model='m', host='h'))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == -signal.SIGKILL
    with ReplyCache.in_dir(tmp_path) as cache:
        assert len(cache) == 100


# ------------------------------------------------------------------------------------------------ failures
def test_failures_are_kept_until_a_reply_replaces_them(tmp_path: Path) -> None:
    with ReplyCache.in_dir(tmp_path) as cache:
        cache.put_failure("k", CachedFailure("answer_mismatch", "answer_mismatch: '...'", attempts=3, text="reply"))
        cache.put_failure("long", CachedFailure("too_long", "400: maximum context length"))
        assert cache.failures(["k", "long", "other"]) == {
            "k": CachedFailure("answer_mismatch", "answer_mismatch: '...'", 3, "reply"),
            "long": CachedFailure("too_long", "400: maximum context length", 1, None),
        }
        cache.put("k", CachedReply("### Solution ...", "m", "h"))
        assert set(cache.failures(["k", "long"])) == {"long"} and cache.failure_count() == 1 and len(cache) == 1
        cache.delete(["long"])
        assert cache.failure_count() == 0


def test_a_cache_from_before_failures_were_kept_gains_the_table(tmp_path: Path) -> None:
    path = tmp_path / "teacher.sqlite"
    with sqlite3.connect(path) as old:  # the schema of the first release: replies only
        old.execute(
            "CREATE TABLE replies (key TEXT PRIMARY KEY, text TEXT NOT NULL, model TEXT NOT NULL, host TEXT NOT NULL,"
            " finish_reason TEXT, prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL"
            " DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 1, created_at REAL NOT NULL) WITHOUT ROWID"
        )
        old.execute("INSERT INTO replies VALUES ('k', 't', 'm', 'h', 'stop', 1, 1, 1, 0)")
    old.close()
    with ReplyCache(path) as cache:
        assert cache.get("k").text == "t" and cache.failures(["k"]) == {}


# ---------------------------------------------------------------------------------------- a damaged file
def _one_line(info: pytest.ExceptionInfo[DataError], path: Path) -> str:
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "delete it" in message
    assert info.value.__suppress_context__  # the SQLite traceback does not ride along
    return message


def test_a_file_that_is_not_a_database_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "teacher.sqlite"
    path.write_bytes(b"this was never SQLite " * 200)
    with pytest.raises(DataError) as info:
        ReplyCache(path)
    assert "file is not a database" in _one_line(info, path)


def test_a_malformed_database_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "teacher.sqlite"
    with ReplyCache(path) as cache:
        for i in range(300):
            cache.put(f"k{i}", CachedReply("x" * 2000, "m", "h"))
    damaged = bytearray(path.read_bytes())
    damaged[3 * 4096 : 40 * 4096] = b"\x5a" * (37 * 4096)  # the pages holding the table, overwritten
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError) as info, ReplyCache(path) as cache:
        cache.get_many([f"k{i}" for i in range(300)])
    assert "database disk image is malformed" in _one_line(info, path)

"""The per-item reply cache: what its key covers, and that it is durable and shareable."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mathwizard.teacher.cache import CachedReply, ReplyCache, endpoint_host, reply_key

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

"""kill -9 in the middle of a run, then a re-run: only the requests in flight at the kill are paid twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mathwizard.stages import teach
from mathwizard.teacher.cache import ReplyCache
from mathwizard.testing import OpenAITestServer
from tests.teacher.helpers import api_config, unique_items

CONCURRENCY = 4
SCRIPT = """
import sys
from pathlib import Path
from mathwizard.config import TeacherConfig
from mathwizard.stages import teach
cfg = TeacherConfig(kind="openai", base_url=sys.argv[1], model="test-teacher", concurrency=int(sys.argv[5]), rpm=None)
teach.run(cfg, Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
"""


def test_kill_9_then_resume_pays_at_most_the_requests_in_flight(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    unique = unique_items(prepared)
    server.configure(latency=0.1)  # 60 requests / 4 at a time x 0.1 s: about 1.5 s of work
    out, cache_dir = tmp_path / "out", tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, server.base_url, str(prepared), str(out), str(cache_dir), str(CONCURRENCY)],
        env=os.environ.copy(),  # the API key comes from the environment (the `api_key` fixture)
    )
    try:
        deadline = time.monotonic() + 60
        while server.requests < 20 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    time.sleep(0.3)  # let the server finish the replies nobody will read
    sent_before = server.requests
    assert 20 <= sent_before < unique, "the kill must land mid-run"
    with ReplyCache.in_dir(cache_dir) as cache:
        cached = len(cache)
    assert sent_before - CONCURRENCY <= cached <= sent_before  # lost: only what was in flight

    manifest = teach.run(api_config(server, concurrency=CONCURRENCY), prepared, out, cache_dir)
    assert manifest.counts["written"] == manifest.counts["items"] == 60 and manifest.counts["failed"] == 0
    assert manifest.counts["api_calls"] == unique - cached
    assert unique <= server.requests <= unique + CONCURRENCY  # never twice the work
    sent = server.requests
    assert teach.run(api_config(server), prepared, out, cache_dir).fingerprint == manifest.fingerprint  # skipped
    assert server.requests == sent


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

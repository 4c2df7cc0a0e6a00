"""The API key never shows up in outputs, the cache, logs, reports, failure records or exceptions."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest

from mathwizard.errors import TeacherError
from mathwizard.stages import teach
from mathwizard.testing import OpenAITestServer
from tests.teacher.helpers import api_config, unique_items


def _files_mentioning(root: Path, needle: str) -> list[str]:
    """Files under `root` whose bytes contain `needle` (SQLite db and WAL included)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_key_stays_out_of_everything_under_faults(
    prepared: Path, server: OpenAITestServer, api_key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.configure(faults={"503": 0.1, "429": 0.05, "drop": 0.05, "wrong_answer": 0.1, "refusal": 0.05}, seed=3)
    caplog.set_level(logging.DEBUG)  # every logger, the openai and httpx ones included
    out, cache_dir = tmp_path / "out", tmp_path / "cache"
    manifest = teach.run(api_config(server, max_failed_fraction=1.0), prepared, out, cache_dir)
    assert manifest.counts["api_calls"] > unique_items(prepared) and manifest.counts["retries"] > 0  # faults hit
    assert _files_mentioning(tmp_path, api_key) == []
    assert (cache_dir / "teacher.sqlite").is_file() and (out / "report.json").is_file()
    assert api_key not in caplog.text and caplog.records  # logs were captured, none has the key


def test_key_stays_out_of_a_401(
    prepared: Path, server: OpenAITestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    wrong = "sk-wrong-Yy3Kd9Qp2Rt7Wm5Hc1"
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", wrong)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TeacherError) as info:
        teach.run(api_config(server), prepared, tmp_path / "out", tmp_path / "cache")
    assert server.requests == 1 and server.outcomes == {"401": 1}  # and the server did echo the key back
    rendered = "".join(traceback.format_exception(info.value))
    assert wrong not in rendered and wrong not in repr(info.value) and "Yy3Kd9" not in rendered
    assert wrong not in caplog.text
    assert _files_mentioning(tmp_path, wrong) == []

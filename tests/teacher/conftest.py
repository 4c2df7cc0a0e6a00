"""Fixtures for the teacher tests: a prepared sample, the OpenAI-compatible test server, a known API key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from teacher_fixtures import API_KEY

from mathwizard.config import PrepareConfig
from mathwizard.testing import OpenAITestServer


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled 60-problem sample through the real prepare stage (train 51 / val 4 / test 5)."""
    from mathwizard.stages import prepare

    out = tmp_path_factory.mktemp("teach-input") / "01-prepare"
    prepare.run(PrepareConfig(source="sample", workers=1), out)
    return out


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", API_KEY)
    return API_KEY


@pytest.fixture
def server(api_key: str) -> Iterator[OpenAITestServer]:
    """A fresh server per test that only accepts `API_KEY`, with quick Retry-After and slow replies."""
    with OpenAITestServer(api_key=api_key, retry_after=0.01, slow_s=1.0) as srv:
        yield srv

"""Fixtures for the publish tests: a synthetic run folder, a recording fake Hub, and no ambient Hub login."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.publish.fakehub import FakeHub
from tests.publish.synthetic import make_run

TOKEN = "hf_TestTokenThatMustNeverBeWritten0123"


def forget_hub_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token from this machine's environment, .env or `hf auth login` may leak into a test."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MATHWIZARD_HF_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-hf-login" / "token"))
    monkeypatch.chdir(tmp_path)  # Secrets reads .env from the working directory


@pytest.fixture(autouse=True)
def _no_hub_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    forget_hub_login(monkeypatch, tmp_path)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A Hub on 127.0.0.1 that accepts TOKEN; HF_HUB_OFFLINE is lifted for the test's duration only."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub(token=TOKEN) as hub:
        yield hub

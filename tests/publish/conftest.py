"""Every publish test runs without this machine's Hub login (see `no_hub_login` in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_hub_login(no_hub_login: None) -> None:
    """Applies the shared fixture to every test here."""

"""Training tests share one tiny-model cache per session (built once, ~3 s)."""

from __future__ import annotations

import pytest

from tests.training.builders import use_session_model_cache


@pytest.fixture(scope="session", autouse=True)
def _models_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    use_session_model_cache(tmp_path_factory)

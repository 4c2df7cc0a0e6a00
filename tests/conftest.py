"""Shared fixtures: no network, one torch thread, a private Prefect home, tiny assets built or shipped."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub or prefect.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
for secret in ("OPENAI_API_KEY", "MATHWIZARD_TEACHER_API_KEY", "HF_TOKEN"):
    os.environ.pop(secret, None)

# Prefect, transformers and datasets attach log handlers to the sys.stderr of their first import. Import them
# here, against the real stderr, so a first import inside a CliRunner (whose stream closes) cannot break later tests.
import datasets  # noqa: E402, F401
import prefect.main  # noqa: E402, F401
import pytest  # noqa: E402
import transformers  # noqa: E402, F401


@pytest.fixture(scope="session", autouse=True)
def _prefect_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))


@pytest.fixture(scope="session")
def prefect_harness(_prefect_home: None):
    """One ephemeral Prefect API for the whole session (start-up costs ~6 s); use it only in flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield

"""Helpers for the tests that talk to the OpenAI-compatible test server: its key, settings for it, request counts."""

from __future__ import annotations

from pathlib import Path

from mathwizard.config import TeacherConfig
from mathwizard.testing import OpenAITestServer

API_KEY = "sk-test-Zq8Hx5mW2pLk9Tr4vB7n"  # distinctive, so a leak is easy to grep for


def unique_items(prepared: Path) -> int:
    """Distinct (question, solution) pairs: the requests a full run needs (identical items are asked once)."""
    import pyarrow.parquet as pq

    pairs: set[tuple[str, str]] = set()
    for split in ("train", "val", "test"):
        table = pq.read_table(prepared / f"{split}-00000-of-00001.parquet", columns=["question", "solution"])
        pairs.update(zip(table.column("question").to_pylist(), table.column("solution").to_pylist(), strict=True))
    return len(pairs)


def api_config(server: OpenAITestServer, **overrides: object) -> TeacherConfig:
    """Settings for the test server: small, fast backoff; no RPM limit unless a test asks for one."""
    values: dict[str, object] = {
        "kind": "openai",
        "base_url": server.base_url,
        "model": "test-teacher",
        "concurrency": 4,
        "rpm": None,
        "timeout_s": 5.0,
        "request_retries": 3,
        "backoff_s": 0.005,
        "backoff_max_s": 0.02,
    }
    values.update(overrides)
    return TeacherConfig(**values)

"""Test doubles shipped with the library, so tests, benchmarks and users' own checks can share them.

`from mathwizard.testing import OpenAITestServer, spawn_test_server` (imported lazily, so that
`python -m mathwizard.testing.openai_server` runs its module only once).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FAULTS", "OpenAITestServer", "RemoteTestServer", "spawn_test_server"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mathwizard.testing import openai_server

        return getattr(openai_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

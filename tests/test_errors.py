"""Which errors are worth a retry: transient ones (network, 5xx), never our permanent ones or programming errors."""

from __future__ import annotations

from mathwizard.errors import ConfigError, DataError, PublishError, TeacherError, TransientError, is_transient


def test_transient_errors() -> None:
    assert is_transient(TransientError("503"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert not is_transient(DataError("bad"))
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(ValueError("bug"))
    assert not any(is_transient(e("x")) for e in (ConfigError, TeacherError, PublishError))

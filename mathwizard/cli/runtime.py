"""What a CLI process sets up around the flows: a Prefect API of its own, and a terminal that shows results, not logs.

The API server. With no `PREFECT_API_URL`, Prefect would start a temporary server as a child in our process group:
Ctrl-C then reached that server too, and the interrupted run hung reporting to a dead API; a `kill -9` of the CLI left
it running. Here the CLI starts the same server (`prefect.server.api.server:create_app` under uvicorn, as Prefect
does) in a session of its own, so a terminal's Ctrl-C reaches only the CLI, and asks Linux to end it when the CLI
dies, even by `kill -9` (PR_SET_PDEATHSIG). Ctrl-C then stops the flow in the CLI while the API records it.

The terminal. By default the console shows warnings and errors of the library and third parties, but not the flow and
task run logs (they are the UI's; the CLI prints its own summary, and a failure as one red line). `-v` adds every log
line at INFO, without tracebacks; `-vv` everything at DEBUG, tracebacks included. Third-party progress bars and
notices (transformers, datasets) are silenced; the live display (`display.py`) shows progress instead.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, TypeVar

from mathwizard.errors import MathWizardError
from mathwizard.processes import dying_with_this_process

log = logging.getLogger(__name__)
T = TypeVar("T")

_verbosity = 0


def quiet_console(verbosity: int) -> None:
    """Set, before Prefect is imported, what its console handler shows: warnings (0), info (1) or debug (2+)."""
    global _verbosity
    _verbosity = verbosity
    level = {0: "WARNING", 1: "INFO"}.get(verbosity, "DEBUG")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", level)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mathwizard")  # the library's INFO lines reach the UI
    logging.getLogger("mathwizard").setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    if verbosity == 0:
        # Prefect's events worker notes "Still processing items" while the CLI sends the last events at exit.
        logging.getLogger("EventsWorker").setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _NoTraceback(logging.Formatter):
    """The console formatter without tracebacks: the CLI prints the error's one line; the UI keeps the trace."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text:
            record = copy.copy(record)  # the API handler formats the same record, with its traceback
            record.exc_info, record.exc_text = None, None
        return self.inner.format(record)


def _not_a_run_log(record: logging.LogRecord) -> bool:
    return not record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))


def quiet_prefect_console() -> None:
    """Apply the verbosity to Prefect's console handlers (call after `import prefect`); the API handlers keep all."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not isinstance(handler, PrefectConsoleHandler) or getattr(handler, "_mathwizard_quiet", False):
                continue
            handler._mathwizard_quiet = True  # type: ignore[attr-defined]
            if _verbosity == 0:
                handler.addFilter(_not_a_run_log)
            if _verbosity < 2:
                handler.setFormatter(_NoTraceback(handler.formatter))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def prefect_api(meanwhile: Callable[[], T], timeout_s: float = 120.0) -> Iterator[T]:
    """A Prefect API server for this CLI process, unless Prefect is configured with one (`PREFECT_API_URL` in the
    environment, the profile, or a test harness); yields what `meanwhile()` returned.

    `meanwhile` (importing the flows: torch, transformers, ...) runs while the server starts, so the two overlap.

    Raises:
        MathWizardError: the server did not answer within `timeout_s` (its last output is in the message).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield meanwhile()
        return

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    command = dying_with_this_process(
        "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    )  # fmt: skip
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty server must never block on a full pipe
        server = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,  # the terminal's Ctrl-C goes to the CLI alone
        )
        with _stopped_at_exit(server):
            result = meanwhile()
            _wait_healthy(server, url, errors, timeout_s)
            # Heartbeats let a server notice a crashed run; this private server ends with the run, and each flow run
            # waited up to a second at its end for the heartbeat thread: ten stages, ten seconds.
            with temporary_settings(updates={PREFECT_API_URL: url, "flows.heartbeat_frequency": None}):
                try:
                    yield result
                finally:
                    _flush_to_server()


def _flush_to_server() -> None:
    """Send the flow runs' last log lines and events while the server still listens (else, at exit, the handler
    retries for a minute and the events worker prints "Still processing items" on the console)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    try:
        APILogHandler().flush()
        EventsWorker.drain_all(timeout=5, at_exit=False)
    except Exception as exc:  # a log line or event lost at exit must not replace the run's own outcome
        log.debug("could not flush the flow runs' logs and events: %s", exc)


def _wait_healthy(server: subprocess.Popen, url: str, errors: IO[bytes], timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            errors.seek(0)
            error = errors.read().decode(errors="replace").strip()
            last = error.splitlines()[-1] if error else f"exit code {server.returncode}"
            raise MathWizardError(f"the local Prefect API server stopped while starting: {last}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise MathWizardError(
                f"the local Prefect API server did not answer within {timeout_s:.0f} s; set PREFECT_API_URL to a"
                " running server (prefect server start) or retry"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def _stopped_at_exit(server: subprocess.Popen) -> Iterator[None]:
    try:
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

"""Running the CLI in-process several times in one test session."""

from __future__ import annotations

import logging
import signal
import sys

from click.testing import Result


def invoke(args: list[str]) -> Result:
    """Run the CLI, then point Prefect's console handlers back at the real stderr.

    Prefect sets up its logging during the first flow run, binding its console handler to the stderr that
    CliRunner swapped in and closes afterwards; a second run in the same process would log into a closed file.
    """
    from prefect.logging.handlers import PrefectConsoleHandler
    from typer.testing import CliRunner

    from mathwizard.cli import app

    result = CliRunner().invoke(app, args)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.stream = handler.console.file = sys.stderr
    return result


def default_sigint() -> None:
    """A child's `preexec_fn`: Ctrl-C as a terminal's foreground job gets it, even when the suite itself runs with
    SIGINT ignored (started as a background job by a non-interactive shell, which children would inherit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

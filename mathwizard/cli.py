"""The `mathwizard` command line: turns flags into settings and runs the flows.

Usage: `mathwizard run` (whole pipeline on embedded defaults), `mathwizard prepare --source sample`, ...
Flows are imported inside the commands, so `mathwizard --help` starts fast.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from mathwizard import __version__
from mathwizard.config import Settings, load_settings
from mathwizard.errors import MathWizardError

app = typer.Typer(
    name="mathwizard",
    help="Turn MM_Math into a multimodal math tutor: prepare → teach → sft → pairs → dpo → eval → publish.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file, e.g. deployments/recipes/smoke.yaml.")
]
HomeOpt = Annotated[str | None, typer.Option("--home", help="Artifact root folder or URL (MATHWIZARD_HOME).")]
RunNameOpt = Annotated[str | None, typer.Option("--run-name", help="Run folder under <home>/runs (default: default).")]


def handles_errors(fn: F) -> F:
    """User errors become one red line and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MathWizardError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]; re-run the same command to resume where it stopped")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def load(config: Path | None, home: str | None = None, run_name: str | None = None, **overrides: Any) -> Settings:
    """Settings from the file, env and flags, with Prefect set up for this machine."""
    settings = load_settings(config, home=home, run_name=run_name, **overrides)
    prepare_prefect_env(settings)
    return settings


def prepare_prefect_env(settings: Settings) -> None:
    """Offline-friendly Prefect defaults, set before prefect is imported; explicit env vars win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mathwizard")
    if "://" not in settings.home:
        results = Path(settings.home).resolve() / "prefect-results"
        os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(results))
    logging.getLogger("mathwizard").setLevel(logging.INFO)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"mathwizard {__version__}")
        raise typer.Exit()


@app.command("config")
@handles_errors
def show_config(config: ConfigOpt = None, home: HomeOpt = None, run_name: RunNameOpt = None) -> None:
    """Print the effective settings (defaults < --config < .env/env < flags) as JSON."""
    print_json(load_settings(config, home=home, run_name=run_name).model_dump(mode="json"))

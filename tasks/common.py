"""Decorator policy shared by the stage tasks: cache keys from the library's fingerprints, transient-only retries."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import Task
from prefect.context import TaskRunContext

from mathwizard.errors import is_transient
from mathwizard.manifest import reusable
from tasks.artifacts import ProgressArtifact

T = TypeVar("T", bound=Task)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: retry network/Hub/API hiccups, never our permanent errors (bad config, bad data)."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def fingerprint_key(fingerprint_of: Callable[..., str]) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A cache_key_fn returning the library's own fingerprint of the task's output.

    `fingerprint_of(**parameters)` must be cheap (hash settings and upstream manifests, never outputs), so
    Prefect and the library agree on "done": the TASK_SOURCE policy cannot see library code behind a one-line task.
    """

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return f"{context.task.name}-{fingerprint_of(**parameters)}"

    return key


def unless_missing(task: T, out: str | Path, fingerprint: str) -> T:
    """The task, told to ignore its cached result when the output folder no longer holds that fingerprint.

    A cached Prefect result only points at files; if someone deleted or damaged them, the stage must run again.
    """
    return task.with_options(refresh_cache=reusable(Path(out), fingerprint) is None)


def run_with_progress(
    task: Task, out: str | Path, fingerprint: str, total: int, *args: Any, key: str, description: str
) -> Any:
    """`unless_missing(task, out, fingerprint)(*args, progress=...)` with a live progress artifact of `total` items.

    A stage already done (Prefect's cache or the library's manifest check skips it, so it never reports) shows
    complete; the artifact is finished after a failure too, so the UI shows how far the run got.
    """
    reused = reusable(Path(out), fingerprint) is not None
    progress = ProgressArtifact(total, key=key, description=description)
    if reused:
        progress(total)
    try:
        return task.with_options(refresh_cache=not reused)(*args, progress=progress)
    finally:
        progress.finish()

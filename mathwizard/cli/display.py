"""The terminal's live view of a run: one bar per long loop (teach items, SFT steps, pairs items, DPO steps, eval
problems) with done/total, rate, ETA and the latest metrics, then a summary table of the stages.

Fed by `mathwizard.progress.watching`: the flows announce every progress report in this process, so the display
needs no hook into Prefect. On a terminal the bars redraw in place; piped to a file, rich prints them when they end.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from mathwizard.progress import Watcher, watching


class _Rate(ProgressColumn):
    """Items or steps per second (per minute when slower than one a second)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("", style="progress.data.speed")
        text = f"{speed:.1f}/s" if speed >= 1 else f"{60 * speed:.1f}/min"
        return Text(text, style="progress.data.speed")


def _label(key: str) -> str:
    return key.removesuffix("-progress")


def _metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{name} {value:.4g}" for name, value in metrics.items())


@contextmanager
def live_progress(console: Console) -> Iterator[None]:
    """Show a bar for every loop announced while the block runs (on a terminal; else one line as each one ends)."""
    if not console.is_terminal:
        with watching(_line_per_loop(console)):
            yield
        return
    progress = Progress(
        SpinnerColumn(finished_text="[green]✓[/]"),
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[metrics]}"),
        console=console,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def watcher(key: str, description: str, done: int, total: int, metrics: Mapping[str, float]) -> None:
        if key not in tasks:
            tasks[key] = progress.add_task(_label(key), total=total or None, metrics="")
        progress.update(tasks[key], completed=done, total=total or None, metrics=_metrics(metrics))

    with progress, watching(watcher):
        yield


def _line_per_loop(console: Console) -> Watcher:
    finished: set[str] = set()

    def watcher(key: str, description: str, done: int, total: int, metrics: Mapping[str, float]) -> None:
        if done >= total and key not in finished:
            finished.add(key)
            console.print(f"✓ {description}: {done:,} of {total:,} {_metrics(metrics)}".rstrip(), highlight=False)

    return watcher


def stage_table(result: Mapping[str, Mapping[str, Any]]) -> Table:
    """The pipeline's stages: seconds and what each did."""
    table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("result", overflow="fold")
    for stage, info in result.items():
        table.add_row(f"[green]✓[/] {stage}", f"{info['seconds']:.1f}", info["summary"])
    return table

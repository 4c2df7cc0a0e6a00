"""Helpers that show stage results in the Prefect UI: tables, progress, and PNG plots inline."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect.artifacts import create_markdown_artifact


def create_image_artifact(png: Path, *, key: str, title: str, description: str | None = None) -> None:
    """A markdown artifact embedding the PNG as a data URI, so the UI shows the plot without file access."""
    data = base64.b64encode(Path(png).read_bytes()).decode()
    create_markdown_artifact(
        markdown=f"### {title}\n\n![{title}](data:image/png;base64,{data})\n",
        key=key,
        description=description or title,
    )

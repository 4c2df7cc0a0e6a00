"""Builders of small MM_Math copies on disk: valid rows, figures in any PIL mode, jsonl files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

FIXTURES = Path(__file__).parent.parent / "data"


def good_row(n: int, file_name: str | None = None) -> dict[str, Any]:
    """A valid MM_Math row; `n` makes question and answer unique."""
    return {
        "question": rf"As shown in the figure, in $\triangle ABC$, $\angle A={n}^\circ$, $\angle B=40^\circ$. "
        rf"Find $\angle C$. (problem {n})",
        "file_name": file_name or f"{n}.png",
        "solution": rf"\textbf{{Solution:}} $\angle C=180^\circ-{n}^\circ-40^\circ$ \\ $=\boxed{{{140 - n}^\circ}}$.",
        "year": "seven",
        "difficult": "easy",
        "knowledge": "Triangle angle sum theorem",
    }


def draw_figure(path: Path, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).line((0, size[1] - 1, size[0] - 1, 0), fill="black", width=max(1, min(size) // 16))
    img.convert(mode).save(path)
    return path


def write_jsonl(path: Path, rows: Iterable[dict[str, Any] | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

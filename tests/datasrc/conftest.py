"""Fixtures for the data tests: a small valid MM_Math copy on disk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.datasrc.mm_math_builders import draw_figure, good_row, write_jsonl


@pytest.fixture
def mm_math_copy(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """make(n, start=0, folder=...) -> (jsonl, images folder) holding n valid rows with one figure each."""

    def make(n: int, start: int = 0, folder: Path | None = None) -> tuple[Path, Path]:
        folder = folder or tmp_path / "mm_math"
        rows = [good_row(i) for i in range(start, start + n)]
        for row in rows:
            draw_figure(folder / "images" / row["file_name"])
        jsonl = folder / "MM_Math.jsonl"
        existing = jsonl.read_text(encoding="utf-8").splitlines() if jsonl.exists() else []
        write_jsonl(jsonl, [*existing, *(json.dumps(r) for r in rows)])
        return jsonl, folder / "images"

    return make

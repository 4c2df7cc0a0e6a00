"""Small helpers shared by the card builders: copying into a repo folder and markdown tables."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import RepoCard


def copy_file(src: Path, dst: Path) -> None:
    """A copy, not a hard link: a later re-training rewrites files in place and must not alter what was published."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def copy_tree(src: Path, dst: Path, *, skip: Iterable[str] = ()) -> list[str]:
    """Copy the files under `src` into `dst` (hidden files and names in `skip` left out); relative paths copied."""
    skipped = set(skip)
    copied = []
    for path in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        if rel.as_posix() in skipped or any(part.startswith(".") for part in rel.parts):
            continue
        copy_file(path, dst / rel)
        copied.append(rel.as_posix())
    return copied


def write_card(card: RepoCard, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(str(card), encoding="utf-8")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return "–" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def percent(value: float | None) -> str | None:
    """Fractions as percentages with one decimal (reports store accuracy as a fraction of 1)."""
    return None if value is None else f"{100 * value:.1f}%"


def size_category(rows: int) -> str:
    """The Hub's `size_categories` bucket for a row count."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
    return next((label for bound, label in bounds if rows < bound), "n>1M")


def fmt(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or None
    return str(value)

"""The bundled sample: MM_Math's fields and style, small, and exactly what `make_sample.py` regenerates."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from mathwizard.answers import boxed_answers
from mathwizard.data.fetch import SAMPLE_DIR, SAMPLE_IMAGES, SAMPLE_JSONL
from scripts import make_sample


def _rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in SAMPLE_JSONL.read_text(encoding="utf-8").splitlines()]


def test_sample_looks_like_mm_math() -> None:
    rows = _rows()
    assert len(rows) == 60  # 15 problem templates x 4
    assert all(list(row) == ["question", "file_name", "solution", "year", "difficult", "knowledge"] for row in rows)
    assert Counter(r["difficult"] for r in rows) == {"medium": 42, "hard": 12, "easy": 6}  # mostly medium, as MM_Math
    assert set(r["year"] for r in rows) == {"seven", "eight", "nine"}
    for row in rows:
        assert row["question"].startswith("As shown in the figure") and "$" in row["question"]
        assert row["solution"].startswith(r"\textbf{Solution:} ") and r" \\ " in row["solution"]
        assert len(boxed_answers(row["solution"])) == 1 and row["solution"].rstrip(".$").endswith("}")
        assert (SAMPLE_IMAGES / row["file_name"]).is_file()
    assert len({r["question"] for r in rows}) == 60  # no duplicates to quarantine
    size = sum(p.stat().st_size for p in SAMPLE_DIR.rglob("*") if p.is_file())
    assert size < 1_000_000  # well under the 2 MB budget


def test_answers_follow_from_the_numbers() -> None:
    """Spot checks of the arithmetic: the boxed answer is the one the stated numbers give."""
    for row in _rows():
        answer = boxed_answers(row["solution"])[0]
        if row["knowledge"] == "Triangle angle sum theorem":
            a, b = (int(x) for x in re.findall(r"=(\d+)\^\\circ", row["question"])[:2])
            assert answer == f"{180 - a - b}^\\circ"
        if row["knowledge"] == "Pythagorean theorem":
            legs = [int(x) for x in re.findall(r"[AB]C=(\d+)", row["question"])]
            assert int(answer) ** 2 == legs[0] ** 2 + legs[1] ** 2


def test_make_sample_regenerates_the_bundled_files(tmp_path: Path) -> None:
    assert make_sample.write_sample(tmp_path) == 60
    assert (tmp_path / "mm_math_sample.jsonl").read_text() == SAMPLE_JSONL.read_text()
    for bundled in sorted(SAMPLE_IMAGES.glob("*.png")):
        fresh = Image.open(tmp_path / "images" / bundled.name)
        original = Image.open(bundled)
        assert fresh.mode == original.mode and fresh.size == original.size
        assert np.array_equal(np.asarray(fresh.convert("RGBA")), np.asarray(original.convert("RGBA"))), bundled.name
    modes = Counter(Image.open(p).mode for p in SAMPLE_IMAGES.glob("*.png"))
    assert set(modes) == {"L", "RGB", "P", "RGBA"}  # several modes, so cleaning converts them in every run

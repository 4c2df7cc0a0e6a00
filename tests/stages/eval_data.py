"""A small teach-like folder with a test split, and a generator that answers it from a script: the evaluation's
inputs for the stage, flow and CLI tests."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from mathwizard.generation import Completion, Request, SamplingParams
from mathwizard.manifest import stage_output


def _solution(answer: str) -> str:
    return f"### Solution\n1. Work it out from the figure.\n### Final Answer\n\\boxed{{{answer}}}"


# id -> (difficulty, reference solution, model output). References and outputs differ only in spelling where
# they should match.
ITEMS = {
    "e1": ("easy", _solution("80^\\circ"), _solution("80°")),  # degree spellings normalise alike
    "e2": ("easy", _solution("\\frac{\\sqrt{3}}{2}"), _solution("\\dfrac{\\sqrt{3}}{2}")),  # nested braces
    "m1": ("medium", _solution("3"), _solution("4")),  # wrong
    "m2": ("medium", _solution("2\\sqrt{5}"), "The answer is \\boxed{2 \\sqrt{5}}."),  # right, but not the format
    "h1": ("hard", _solution("12"), "I think it is 12."),  # no boxed answer: wrong and unformatted
    "h2": ("hard", "The source has no boxed answer.", _solution("7")),  # no reference: not scored
}


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (seed * 40 % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_data(folder: Path, items: dict = ITEMS, split_file: str = "test.parquet") -> Path:
    """A finished teach-like (or, with the prepare file name, prepare-like) folder with a test split."""
    import datasets
    import pyarrow.parquet as pq

    features = datasets.Features(
        {k: datasets.Image() if k == "image" else datasets.Value("string") for k in _row("x", 0, "easy", "")}
    )
    rows = [_row(item_id, n, d, ref) for n, (item_id, (d, ref, _)) in enumerate(items.items())]
    with stage_output(folder, stage="teach", version=1, fingerprint=f"teach-{folder.name}") as record:
        table = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features).data.table
        pq.write_table(table, folder / split_file)
        record.add_file(split_file, rows=len(rows))
    return folder


def _row(item_id: str, n: int, difficult: str, solution: str) -> dict:
    return {
        "id": item_id,
        "question": f"[{item_id}] Find the marked quantity.",
        "solution": solution,
        "image": {"bytes": _png(n), "path": None},
        "difficult": difficult,
    }


class FakeGenerator:
    """Answers each question with the scripted output for its id; records calls, requests and parameters."""

    def __init__(self, items: dict = ITEMS) -> None:
        self.items = items
        self.calls: list[tuple[list[Request], SamplingParams]] = []

    def __call__(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        self.calls.append((list(requests), params))
        outputs = [self.items[r.text.split("]", 1)[0].lstrip("[")][2] for r in requests]
        return [Completion(text=o, tokens=len(o.split())) for o in outputs]

"""Small upstream stage folders for the training tests: a teach output (SFT data) and a pairs output (DPO data)."""

from __future__ import annotations

import io
from pathlib import Path

from mathwizard.manifest import stage_output

SOLUTION = (
    "### Solution\n1. Since AB = AC, angle B = angle C = {b} degrees.\n2. So angle A = 180 - 2 x {b}.\n"
    "### Final Answer\n\\boxed{{{a}}}"
)
WRONG = (
    "### Solution\n1. Since AB = AC, angle B = {b} degrees.\n2. So angle A = 180 - {b}.\n"
    "### Final Answer\n\\boxed{{{w}}}"
)


def png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small RGB PNG whose pixels depend on `seed` (different figures for different rows)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.line((seed % size[0], 0, size[0] - 1, size[1] - 1), fill=(seed * 37 % 256, 0, 0), width=3)
    draw.rectangle((2, 2, 2 + seed % 10, 2 + seed % 7), fill=(0, seed * 91 % 256, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write(folder: Path, stage: str, tables: dict[str, list[dict]], columns: list[str]) -> Path:
    import datasets

    folder = Path(folder)
    with stage_output(folder, stage=stage, version=1, fingerprint=f"{stage}-fixture-{folder.name}") as record:
        for split, rows in tables.items():
            ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({c: [] for c in columns})
            if rows:
                ds = ds.cast_column("image", datasets.Image())
            ds.to_parquet(str(folder / f"{split}.parquet"))
            record.add_file(f"{split}.parquet", rows=len(rows))
    return folder


def teach_folder(folder: Path, n_train: int = 8, n_val: int = 2) -> Path:
    """A `02-teach`-like folder: id, question, solution, image, difficult, source_solution, ..."""

    def rows(n: int, offset: int) -> list[dict]:
        out = []
        for i in range(offset, offset + n):
            b = 40 + i
            out.append(
                {
                    "id": f"q{i}",
                    "question": f"In triangle ABC, AB = AC and angle B = {b} degrees. Find angle A.",
                    "solution": SOLUTION.format(b=b, a=180 - 2 * b),
                    "image": {"bytes": png(i), "path": None},
                    "difficult": "easy" if i % 2 else "medium",
                    "source_solution": f"\\boxed{{{180 - 2 * b}}}",
                    "teacher_model": "rule",
                    "prompt_version": "v1",
                }
            )
        return out

    columns = ["id", "question", "solution", "image", "difficult", "source_solution", "teacher_model", "prompt_version"]
    return _write(folder, "teach", {"train": rows(n_train, 0), "val": rows(n_val, 100)}, columns)


def pairs_folder(folder: Path, n_train: int = 8, n_val: int = 2) -> Path:
    """A `04-pairs`-like folder: id, image, question, chosen, rejected, strategy, difficult."""

    def rows(n: int, offset: int) -> list[dict]:
        out = []
        for i in range(offset, offset + n):
            b = 40 + i
            out.append(
                {
                    "id": f"p{i}",
                    "image": {"bytes": png(i), "path": None},
                    "question": f"In triangle ABC, AB = AC and angle B = {b} degrees. Find angle A.",
                    "chosen": SOLUTION.format(b=b, a=180 - 2 * b),
                    "rejected": WRONG.format(b=b, w=180 - b),
                    "strategy": "calculation_error",
                    "difficult": "easy",
                }
            )
        return out

    columns = ["id", "image", "question", "chosen", "rejected", "strategy", "difficult"]
    return _write(folder, "pairs", {"train": rows(n_train, 0), "val": rows(n_val, 100)}, columns)


def use_session_model_cache(tmp_path_factory) -> str:
    """Point the tiny-model cache at one folder of this test session (so tests never write to ~/.cache)."""
    import os

    folder = tmp_path_factory.getbasetemp() / "mathwizard-models"
    os.environ["MATHWIZARD_MODELS_DIR"] = str(folder)
    return str(folder)


class Interrupted(RuntimeError):
    """Raised by `interrupt_at` to stand in for a kill."""


def interrupt_at(step: int):
    """A TrainerCallback that stops training right after step `step` was logged (before it is checkpointed)."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == step and logs and "loss" in logs:
                raise Interrupted(f"interrupted after step {step}")

    return Interrupt()


def trainable_snapshot(model) -> dict:
    """Copies of the trainable parameters (to assert that training changed them, TRL-style)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

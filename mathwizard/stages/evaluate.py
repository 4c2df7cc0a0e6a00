"""Accuracy of a model's boxed answers on the test split, overall and by difficulty, plus format compliance.

Usage: `mathwizard eval --model <run>/05-dpo --label dpo`.

The pipeline evaluates the base, SFT and DPO models with the same greedy decoding, so a run shows whether each
stage helped (`evaluation_table` puts them side by side; the model card uses it). The reference is the final
boxed answer of the split's `solution` (the teacher's rewrite in 02-teach, the source solution in 01-prepare);
answers agree when `answers.answers_match` says so (the same normalised spelling, or symbolically equivalent).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mathwizard.answers import answers_match, final_answer, format_problems
from mathwizard.config import EvalConfig, ModelConfig
from mathwizard.data.splits import read_table, split_rows
from mathwizard.errors import DataError
from mathwizard.generation import Completion, Generator, Request, SamplingParams, answer_budget
from mathwizard.manifest import (
    Manifest,
    StageReport,
    atomic_write_text,
    fingerprint,
    require_manifest,
    reusable,
    stage_output,
)
from mathwizard.progress import Progress, Tally
from mathwizard.prompts import load_prompt, prompt_digest

log = logging.getLogger(__name__)

STAGE = "eval"
VERSION = 1
PROMPT_VERSION = "v1"
SYSTEM_PROMPT = "tutor_system"
_INPUT_COLUMNS = ("id", "question", "solution", "image", "difficult")
_DIFFICULTY_ORDER = ("easy", "medium", "hard")
REPORT_FILE = "report.json"


class Score(BaseModel):
    """Accuracy over `n` scorable problems."""

    n: int
    accuracy: float


class Report(StageReport):
    """One model's evaluation: `report.json` of its folder, and the manifest's report."""

    label: str = Field(description="The model's name in tables: base, sft or dpo.")
    n: int = Field(description="Problems with a reference answer (the ones scored).")
    accuracy: float
    format_rate: float
    by_difficulty: dict[str, Score]
    generated_tokens: int
    max_new_tokens: int = Field(description="The budget per answer.")
    split: str
    items: int = Field(description="Problems answered, scorable or not.")
    no_reference: int
    seconds: float
    model_location: str = Field(description="What was loaded (a local path or a Hub id): machine-specific.")

    def summary(self) -> str:
        by = " · ".join(f"{d} {_percent(s.accuracy)}" for d, s in self.by_difficulty.items())
        line = f"accuracy {_percent(self.accuracy)} on {self.n:,} problems, format {_percent(self.format_rate)}"
        return line + (f" ({by})" if by else "")

    def public(self) -> dict[str, Any]:
        """The report without machine-specific fields, for published cards."""
        return self.model_dump(mode="json", exclude={"model_location", "seconds"})


# ------------------------------------------------------------------------------------------ scoring
def score(id_: str, difficult: str, reference_solution: str, completion: Completion) -> dict[str, Any]:
    """One prediction row: the extracted and reference answers, whether they agree, and the format check."""
    reference = final_answer(reference_solution)
    predicted = final_answer(completion.text)
    problems = format_problems(completion.text)
    return {
        "id": id_,
        "difficult": difficult,
        "reference": reference,
        "predicted": predicted,
        "correct": answers_match(predicted, reference),
        "format_ok": not problems,
        "format_problems": problems,
        "tokens": completion.tokens,
        "output": completion.text,
    }


def summarize(predictions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy and format rate over the scorable predictions (those with a reference answer), by difficulty too."""
    scored = [p for p in predictions if p["reference"] is not None]
    by: dict[str, list[Mapping[str, Any]]] = {}
    for p in scored:
        by.setdefault(p["difficult"] or "unknown", []).append(p)
    return {
        "n": len(scored),
        "accuracy": _rate(p["correct"] for p in scored),
        "format_rate": _rate(p["format_ok"] for p in scored),
        "by_difficulty": {d: Score(n=len(by[d]), accuracy=_rate(p["correct"] for p in by[d])) for d in _ordered(by)},
        "generated_tokens": sum(p["tokens"] for p in scored),
    }


def _rate(flags: Iterable[bool]) -> float:
    values = list(flags)
    return round(sum(values) / len(values), 4) if values else 0.0


def _ordered(difficulties: Iterable[str]) -> list[str]:
    known = [d for d in _DIFFICULTY_ORDER if d in difficulties]
    return known + sorted(d for d in difficulties if d not in _DIFFICULTY_ORDER)


# ------------------------------------------------------------------------------------------- tables
def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def markdown_table(reports: Mapping[str, Report]) -> str:
    """A markdown table with one row per labelled report (in the given order) and the change in accuracy."""
    if not reports:
        return ""
    difficulties = _ordered({d for r in reports.values() for d in r.by_difficulty})
    header = ["model", "n", "accuracy", "Δ accuracy", "format", *difficulties]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous: float | None = None
    for label, report in reports.items():
        delta = "" if previous is None else f"{100 * (report.accuracy - previous):+.1f} pts"
        cells = [label, str(report.n), _percent(report.accuracy), delta, _percent(report.format_rate)]
        for d in difficulties:
            part = report.by_difficulty.get(d)
            cells.append(f"{_percent(part.accuracy)} (n={part.n})" if part else "–")
        lines.append("| " + " | ".join(cells) + " |")
        previous = report.accuracy
    return "\n".join(lines) + "\n"


def load_report(folder: str | Path) -> Report:
    """The report.json of an eval folder.

    Raises:
        DataError: the folder has no readable report.json.
    """
    path = Path(folder) / REPORT_FILE
    try:
        return Report.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is missing or unreadable ({exc.__class__.__name__}); run `mathwizard eval`") from None


def evaluation_table(folders: Mapping[str, str | Path], *, skip_missing: bool = True) -> str:
    """The combined table (e.g. base / SFT / DPO) from eval folders, in the mapping's order.

    With `skip_missing`, folders without a report are left out (a run that skipped a model); otherwise they raise.
    """
    reports = {}
    for label, folder in folders.items():
        if skip_missing and not (Path(folder) / REPORT_FILE).is_file():
            log.debug("no evaluation of %s in %s; leaving it out of the table", label, folder)
            continue
        reports[label] = load_report(folder)
    return markdown_table(reports)


# ------------------------------------------------------------------------------------------- stage
def expected_fingerprint(cfg: EvalConfig, model_cfg: ModelConfig, model: str | Path, data: Path, label: str) -> str:
    """Settings that change answers (not the pipeline's `models` list), the model, the data and the prompt.

    Raises:
        DataError: the data folder is unfinished or damaged.
        ModelError: the model path does not exist.
    """
    from mathwizard.models.ref import resolve

    source = require_manifest(Path(data), "teach")
    ref = resolve(model)
    settings = cfg.model_dump(exclude={"models"})
    prompt = prompt_digest(load_prompt(SYSTEM_PROMPT, PROMPT_VERSION))
    upstream = {source.stage: source.fingerprint}
    return fingerprint(STAGE, VERSION, settings, upstream, model=ref.identity(model_cfg), label=label, prompt=prompt)


def run(
    cfg: EvalConfig,
    model_cfg: ModelConfig,
    model: str | Path,
    data: Path,
    out: Path,
    label: str,
    *,
    generator: Generator | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Evaluate one model on `cfg.split` of `data` into `out` (e.g. `<run>/06-eval/sft`).

    Args:
        cfg: split, batch size, token budget, limit.
        model_cfg: how models load (backend, dtype, 4-bit, decode).
        model: what to evaluate: a stage folder (03-sft, 05-dpo), a model or adapter dir, 'tiny' or a Hub id.
        data: a teach or prepare stage folder.
        out: this evaluation's folder.
        label: the model's name in reports and tables ("base", "sft", "dpo").
        generator: replaces the model (tests); it must answer requests in order.
        progress: called as `progress(problems done, problems in total)` as generate batches are scored.

    Returns:
        The manifest; its report (a `Report`) is also `out/report.json`, one row per problem `out/predictions.jsonl`.

    Raises:
        DataError: the data folder is unfinished, or the split has no rows.
        ModelError: the model cannot be loaded.
    """
    from mathwizard.launch import world_size
    from mathwizard.models.ref import resolve

    started = time.perf_counter()
    out = Path(out)
    fp = expected_fingerprint(cfg, model_cfg, model, data, label)
    if (done := reusable(out, fp)) is not None:
        return done
    source = require_manifest(Path(data), "teach")
    ref = resolve(model)
    upstream = {source.stage: source.fingerprint}
    if ref.fingerprint:
        upstream[ref.stage or "model"] = ref.fingerprint
    table = read_table(data, cfg.split, _INPUT_COLUMNS, limit=cfg.limit)
    if table.num_rows == 0:
        raise DataError(f"{data}: the {cfg.split} split has no rows; nothing to evaluate")
    tally = Tally(split_rows(data, cfg.split, cfg.limit), progress)
    config = {"eval": cfg, "model": model_cfg}
    world = world_size(model_cfg) if generator is None else 1
    with stage_output(
        out, stage=STAGE, version=VERSION, fingerprint=fp, config=config, upstream=upstream, started=started
    ) as record:
        generating = time.perf_counter()
        if world > 1:
            predictions, budget = _answer_on_ranks(cfg, model_cfg, model, data, out, table.num_rows, world, progress)
        else:
            generate = generator if generator is not None else ref.generator(model_cfg, cfg.batch_size)
            budget = _budget(cfg, table, generate)
            offsets = range(0, table.num_rows, cfg.batch_size)
            predictions = [p for _, batch in _answer(cfg, table, generate, budget, offsets, tally) for p in batch]
        scores = summarize(predictions)
        report = Report(
            label=label,
            **scores,
            max_new_tokens=budget,
            split=cfg.split,
            items=len(predictions),
            no_reference=len(predictions) - scores["n"],
            seconds=round(time.perf_counter() - generating, 3),
            model_location=ref.location,
        )
        atomic_write_text(
            out / "predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        )
        record.add_file("predictions.jsonl", rows=len(predictions))
        atomic_write_text(out / REPORT_FILE, report.model_dump_json(indent=2) + "\n")
        record.add_file(REPORT_FILE)
        atomic_write_text(out / "table.md", markdown_table({label: report}))
        record.add_file("table.md")
        record.report(report)
        log.info("%s: accuracy %s on %d problems", label, _percent(report.accuracy), report.n)
    return record.manifest


def _budget(cfg: EvalConfig, table: Any, generate: Generator) -> int:
    references = [text or "" for text in table.column("solution").to_pylist()]
    return cfg.max_new_tokens or answer_budget(references, generate)


def _answer(
    cfg: EvalConfig, table: Any, generate: Generator, budget: int, offsets: Iterable[int], tally: Tally
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(offset, scored predictions) of each batch of `batch_size` rows starting at `offsets`."""
    system = load_prompt(SYSTEM_PROMPT, PROMPT_VERSION)
    params = SamplingParams(max_new_tokens=budget)  # greedy: the same answer on every run
    # One slice at a time, so only a batch's images are decoded at once.
    for offset in offsets:
        rows = table.slice(offset, cfg.batch_size).to_pylist()
        requests = [Request(text=r["question"] or "", image=r["image"], system=system) for r in rows]
        completions = generate(requests, params)
        yield (
            offset,
            [
                score(str(r["id"]), str(r["difficult"] or ""), r["solution"] or "", c)
                for r, c in zip(rows, completions, strict=True)
            ],
        )
        tally(len(rows))


# ---------------------------------------------------------------------------------------------- several GPUs
SHARDS_DIR = ".shards"


def _answer_on_ranks(
    cfg: EvalConfig,
    model_cfg: ModelConfig,
    model: str | Path,
    data: Path,
    out: Path,
    rows: int,
    world: int,
    progress: Progress | None,
) -> tuple[list[dict[str, Any]], int]:
    """The predictions of `world` processes (`mathwizard.launch`), each answering every world-th batch of
    `batch_size` rows (the very batches one process would send), merged back in the split's order; and the budget."""
    import shutil

    from mathwizard.launch import launch

    shards = out / SHARDS_DIR
    shutil.rmtree(shards, ignore_errors=True)
    batches = -(-rows // cfg.batch_size)
    kwargs = {
        "cfg": cfg.model_dump(mode="json"),
        "model_cfg": model_cfg.model_dump(mode="json"),
        "model": str(model),
        "data": str(data),
        "shards": str(shards),
    }
    result = launch(
        f"{__name__}:_answer_shard",
        kwargs,
        nprocs=min(world, batches),
        workdir=out,
        description=STAGE,
        progress=progress,
        progress_from="sum",
        total=rows,
    )
    answered: list[tuple[int, list[dict[str, Any]]]] = []
    for path in sorted(shards.glob("rank-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            batch = json.loads(line)
            answered.append((batch["offset"], batch["predictions"]))
    shutil.rmtree(shards, ignore_errors=True)
    answered.sort(key=lambda item: item[0])
    predictions = [p for _, batch in answered for p in batch]
    if len(predictions) != rows:
        raise DataError(f"eval on several processes returned {len(predictions)} answers for {rows} rows; run it again")
    return predictions, int(result["max_new_tokens"])


def _answer_shard(
    cfg: dict[str, Any], model_cfg: dict[str, Any], model: str, data: str, shards: str, progress: Progress
) -> dict[str, Any]:
    """One rank of a launch: answer every world-th batch, from its rank on, into `<shards>/rank-<r>.jsonl`."""
    from mathwizard.launch import current_world_size, rank
    from mathwizard.models.ref import resolve

    settings, loading = EvalConfig.model_validate(cfg), ModelConfig.model_validate(model_cfg)
    table = read_table(data, settings.split, _INPUT_COLUMNS, limit=settings.limit)
    generate = resolve(model).generator(loading, settings.batch_size)
    budget = _budget(settings, table, generate)
    offsets = list(range(0, table.num_rows, settings.batch_size))[rank() :: current_world_size()]
    lines = []
    for offset, batch in _answer(settings, table, generate, budget, offsets, Tally(0, progress)):
        lines.append(json.dumps({"offset": offset, "predictions": batch}, ensure_ascii=False) + "\n")
    atomic_write_text(Path(shards) / f"rank-{rank()}.jsonl", "".join(lines))
    return {"max_new_tokens": budget}

"""Accuracy of a model's boxed answers on the test split, overall and by difficulty, plus format compliance.

Usage: `mathwizard eval --model <run>/05-dpo --label dpo`.

The pipeline evaluates the base, SFT and DPO models with the same greedy decoding, so a run shows whether each
stage helped (`evaluation_table` puts them side by side; the model card uses it). The reference is the final
boxed answer of the split's `solution` (the teacher's rewrite in 02-teach, the source solution in 01-prepare);
answers are compared after `answers.normalize_answer`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mathwizard.answers import answers_match, final_answer, format_problems
from mathwizard.config import EvalConfig, ModelConfig
from mathwizard.errors import DataError
from mathwizard.generation import Completion, Generator, Request, SamplingParams, model_ref, read_split, split_path
from mathwizard.manifest import (
    Manifest,
    atomic_write_text,
    fingerprint,
    require_manifest,
    reusable,
    stage_output,
)
from mathwizard.prompts import load_prompt, prompt_digest

log = logging.getLogger(__name__)

STAGE = "eval"
VERSION = 1
PROMPT_VERSION = "v1"
SYSTEM_PROMPT = "tutor_system"
_INPUT_COLUMNS = ("id", "question", "solution", "image", "difficult")
_DIFFICULTY_ORDER = ("easy", "medium", "hard")


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


def summarize(predictions: Iterable[Mapping[str, Any]], model: str) -> dict[str, Any]:
    """Accuracy and format rate over the scorable predictions (those with a reference answer), by difficulty too."""
    scored = [p for p in predictions if p["reference"] is not None]
    by: dict[str, list[Mapping[str, Any]]] = {}
    for p in scored:
        by.setdefault(p["difficult"] or "unknown", []).append(p)
    return {
        "model": model,
        "n": len(scored),
        "accuracy": _rate(p["correct"] for p in scored),
        "format_rate": _rate(p["format_ok"] for p in scored),
        "by_difficulty": {d: {"n": len(by[d]), "accuracy": _rate(p["correct"] for p in by[d])} for d in _ordered(by)},
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


def markdown_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table with one row per labelled report (in the given order) and the change in accuracy."""
    if not reports:
        return ""
    difficulties = _ordered({d for r in reports.values() for d in r.get("by_difficulty", {})})
    header = ["model", "n", "accuracy", "Δ accuracy", "format", *difficulties]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous: float | None = None
    for label, report in reports.items():
        accuracy = float(report["accuracy"])
        delta = "" if previous is None else f"{100 * (accuracy - previous):+.1f} pts"
        cells = [
            label,
            str(report["n"]),
            _percent(accuracy),
            delta,
            _percent(float(report["format_rate"])),
        ]
        for d in difficulties:
            part = report.get("by_difficulty", {}).get(d)
            cells.append(f"{_percent(float(part['accuracy']))} (n={part['n']})" if part else "–")
        lines.append("| " + " | ".join(cells) + " |")
        previous = accuracy
    return "\n".join(lines) + "\n"


def load_report(folder: str | Path) -> dict[str, Any]:
    """The report.json of an eval folder.

    Raises:
        DataError: the folder has no readable report.json.
    """
    path = Path(folder) / "report.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is missing or unreadable ({exc.__class__.__name__}); run `mathwizard eval`") from None


def evaluation_table(folders: Mapping[str, str | Path], *, skip_missing: bool = True) -> str:
    """The combined table (e.g. base / SFT / DPO) from eval folders, in the mapping's order.

    With `skip_missing`, folders without a report are left out (a run that skipped a model); otherwise they raise.
    """
    reports = {}
    for label, folder in folders.items():
        if skip_missing and not (Path(folder) / "report.json").is_file():
            log.debug("no evaluation of %s in %s; leaving it out of the table", label, folder)
            continue
        reports[label] = load_report(folder)
    return markdown_table(reports)


# ------------------------------------------------------------------------------------------- stage
def expected_fingerprint(cfg: EvalConfig, model: ModelConfig | str | Path, data: Path, label: str) -> str:
    """Settings that change answers (not the pipeline's `models` list), the model, the data and the prompt."""
    source = require_manifest(Path(data), "teach")
    ref = model_ref(model)
    upstream = {source.stage: source.fingerprint}
    if ref.fingerprint:
        upstream[ref.stage or "model"] = ref.fingerprint
    settings = cfg.model_dump(exclude={"models"})
    prompt = prompt_digest(load_prompt(SYSTEM_PROMPT, PROMPT_VERSION))
    return fingerprint(STAGE, VERSION, settings, upstream, model=ref.identity(), label=label, prompt=prompt)


def total_items(cfg: EvalConfig, data: Path) -> int:
    """How many problems `run` answers (`cfg.split` cut to `cfg.limit`): the total its `progress` calls add up to.
    Reads only the parquet footer, so a flow can size a progress bar before the run.

    Raises:
        DataError: the split's file is missing.
    """
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(split_path(data, cfg.split)).metadata.num_rows
    return rows if cfg.limit is None else min(rows, cfg.limit)


def run(
    cfg: EvalConfig,
    model: ModelConfig | str | Path,
    data: Path,
    out: Path,
    label: str,
    *,
    generator: Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Evaluate one model on `cfg.split` of `data` into `out` (e.g. `<run>/06-eval/sft`).

    Args:
        cfg: split, batch size, token budget, limit.
        model: the settings' ModelConfig (the base model) or a location: a stage folder (03-sft, 05-dpo), a model
            dir, 'tiny' or a Hub id.
        data: a teach or prepare stage folder.
        out: this evaluation's folder.
        label: the model's name in reports and tables ("base", "sft", "dpo").
        generator: replaces the model (tests); it must answer requests in order.
        progress: called with the number of problems of each generate batch as it is scored (the calls add up to
            `total_items(cfg, data)`); not called when the evaluation is already done.

    Returns:
        The manifest; the numbers are in `out/report.json`, one row per problem in `out/predictions.jsonl`.

    Raises:
        DataError: the data folder is unfinished, or the split has no rows.
        ModelError: the model cannot be loaded.
    """
    out = Path(out)
    fp = expected_fingerprint(cfg, model, data, label)
    if (done := reusable(out, fp)) is not None:
        return done
    source = require_manifest(Path(data), "teach")
    ref = model_ref(model)
    upstream = {
        source.stage: source.fingerprint,
        **({ref.stage or "model": ref.fingerprint} if ref.fingerprint else {}),
    }
    table = read_split(data, cfg.split, _INPUT_COLUMNS, cfg.limit)
    if table.num_rows == 0:
        raise DataError(f"{data}: the {cfg.split} split has no rows; nothing to evaluate")
    with stage_output(out, stage=STAGE, version=VERSION, fingerprint=fp, config=cfg, upstream=upstream) as record:
        generate = generator if generator is not None else ref.load(cfg.batch_size)
        system = load_prompt(SYSTEM_PROMPT, PROMPT_VERSION)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens)  # greedy: the same answer on every run
        predictions: list[dict[str, Any]] = []
        started = time.perf_counter()
        # One slice at a time, so only a batch's images are decoded at once.
        for offset in range(0, table.num_rows, cfg.batch_size):
            rows = table.slice(offset, cfg.batch_size).to_pylist()
            requests = [Request(text=r["question"] or "", image=r["image"], system=system) for r in rows]
            completions = generate(requests, params)
            predictions += [
                score(str(r["id"]), str(r["difficult"] or ""), r["solution"] or "", c)
                for r, c in zip(rows, completions, strict=True)
            ]
            if progress is not None:
                progress(len(rows))
        seconds = time.perf_counter() - started
        report = summarize(predictions, label)
        report.update(
            model_location=ref.location,
            split=cfg.split,
            items=len(predictions),
            no_reference=len(predictions) - report["n"],
            seconds=round(seconds, 3),
        )
        atomic_write_text(
            out / "predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        )
        record.add_file("predictions.jsonl", rows=len(predictions))
        atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
        record.add_file("report.json")
        atomic_write_text(out / "table.md", markdown_table({label: report}))
        record.add_file("table.md")
        record.count(n=report["n"], correct=sum(p["correct"] for p in predictions), items=len(predictions))
        record.manifest.extra.update(label=label, model=ref.location, accuracy=report["accuracy"])
        log.info("%s: accuracy %s on %d problems", label, _percent(report["accuracy"]), report["n"])
    return record.manifest

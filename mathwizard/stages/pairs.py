"""DPO preference pairs: the teacher's solution as `chosen`, a flawed answer sampled from the SFT model as `rejected`.

Usage: `mathwizard pairs --model <run>/03-sft --data <run>/02-teach`.

Each problem gets one of three flaws (a calculation error, a misapplied concept, a broken process), chosen from its
id and the seed. The flawed answers are sampled in batches (left padding, many prompts per `generate`) and every
one is checked: it follows the answer format, differs from the chosen answer, and, for the two flaws that must
change the result, has a different final answer. Failures are re-sampled up to `max_attempts` times; then either
a deterministic rule writes the flaw (`fallback="rule"`, the offline demo: a random tiny model never writes valid
text) or the item is excluded. No text that failed the checks is ever written, and the report counts how many
rejected answers came from the model and how many from the rule.

Work is done in chunks of `chunk_size` items; each finished chunk is written atomically to `chunks/`, so a killed
run restarts at the first unfinished chunk. An optional `progress(done, total)` callback hears of every finished chunk,
resumed ones included, so a progress bar starts where a resumed run already is.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mathwizard.answers import (
    FINAL_HEADER,
    SOLUTION_HEADER,
    answers_match,
    final_answer,
    format_problems,
)
from mathwizard.config import ModelConfig, PairsConfig
from mathwizard.data.splits import read_table, split_rows, write_table
from mathwizard.errors import DataError
from mathwizard.generation import Generator, Request, SamplingParams
from mathwizard.manifest import (
    Manifest,
    StageReport,
    atomic_write_text,
    fingerprint,
    require_manifest,
    reusable,
    stable_hash,
    stage_output,
)
from mathwizard.progress import Progress, Tally
from mathwizard.prompts import FLAWED_STRATEGIES, load_prompt, prompt_digest

log = logging.getLogger(__name__)

STAGE = "pairs"
VERSION = 1
PROMPT_VERSION = "v1"
# The two flaws that must change the final answer; a broken process may keep it.
ANSWER_CHANGING = frozenset({"calculation_error", "misapplied_concept"})
COLUMNS = ("id", "image", "question", "chosen", "rejected", "strategy", "difficult", "source")
_INPUT_COLUMNS = ("id", "question", "solution", "image", "difficult")
_CHUNK_META = b"mathwizard_chunk"
REPORT_FILE = "report.json"

USER_TEMPLATE = """Problem:
{question}

Correct solution (for reference only; your answer must contain the flaw described above):
{chosen}

Write the flawed solution now, in the same format: "### Solution" with numbered steps, then "### Final Answer" \
with exactly one \\boxed{{}} answer."""


# ------------------------------------------------------------------------------------------ checks
def _normalized_text(text: str) -> str:
    return " ".join(text.split()).casefold()


def rejected_problems(rejected: str, chosen: str, strategy: str) -> list[str]:
    """Why `rejected` cannot be the flawed answer for `chosen` under `strategy`; empty when it can."""
    problems = [f"format:{reason}" for reason in format_problems(rejected)]
    if _normalized_text(rejected) == _normalized_text(chosen):
        problems.append("same_as_chosen")
    if strategy in ANSWER_CHANGING and answers_match(final_answer(rejected), final_answer(chosen)):
        problems.append("same_final_answer")
    return problems


def choose_strategy(item_id: str, seed: int) -> str:
    """The item's flaw: fixed by its id and the seed, so a re-run (or a resumed run) asks for the same flaw."""
    return FLAWED_STRATEGIES[int(stable_hash("strategy", seed, item_id)[:8], 16) % len(FLAWED_STRATEGIES)]


# ------------------------------------------------------------------------------------ rule fallback
_STEP_START = re.compile(r"^(\s*)(\d+)([.)])(\s+)")
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?!\d|\.\d)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Concept confusions a student makes; the first that occurs in the steps is swapped in (either direction).
_CONCEPT_SWAPS: tuple[tuple[str, str], ...] = (
    ("complementary", "supplementary"),
    ("perpendicular", "parallel"),
    ("\\perp", "\\parallel"),
    ("\\sin", "\\cos"),
    ("radius", "diameter"),
    ("congruent", "similar"),
    ("\\cong", "\\sim"),
    ("isosceles", "equilateral"),
    ("area", "perimeter"),
    ("midpoint", "endpoint"),
    ("bisector", "median"),
    ("inscribed", "central"),
)


@dataclass
class _Solution:
    """An answer split into the text up to its first step, the numbered steps, and the final-answer part."""

    head: str
    steps: list[str]
    tail: str

    @classmethod
    def parse(cls, text: str) -> _Solution | None:
        start, end = text.find(SOLUTION_HEADER), text.find(FINAL_HEADER)
        if start < 0 or end < start:
            return None
        head, steps = text[: start + len(SOLUTION_HEADER)], []
        for line in text[start + len(SOLUTION_HEADER) : end].splitlines(keepends=True):
            if _STEP_START.match(line):
                steps.append(line)
            elif steps:
                steps[-1] += line  # a step's continuation line
            else:
                head += line
        return cls(head, steps, text[end:]) if steps else None

    def render(self) -> str:
        steps = [_STEP_START.sub(rf"\g<1>{n}\g<3>\g<4>", step, count=1) for n, step in enumerate(self.steps, 1)]
        return self.head + "".join(s if s.endswith("\n") else s + "\n" for s in steps) + self.tail


def _last_boxed_span(text: str) -> tuple[int, int] | None:
    """Start and end of the last boxed answer's content (nested braces kept whole)."""
    spans = []
    for match in _BOXED.finditer(text):
        depth = 1
        for i in range(match.end(), len(text)):
            if text[i] == "{" and text[i - 1] != "\\":
                depth += 1
            elif text[i] == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    spans.append((match.end(), i))
                    break
    return spans[-1] if spans else None


def _format_number(value: float, like: str) -> str:
    decimals = len(like.split(".")[1]) if "." in like else 0
    return f"{value:.{decimals}f}" if decimals else str(round(value))


def _replace_last_number(text: str, old: str, new: str, start: int = 0) -> str | None:
    found = [m for m in _NUMBER.finditer(text) if m[0] == old and m.start() >= start]
    return None if not found else text[: found[-1].start()] + new + text[found[-1].end() :]


def _change_result(
    text: str, change: Callable[[str], str], *, number: int = -1, in_steps: bool = True
) -> tuple[str, str, str] | None:
    """Change one number (`number`: its index, -1 the last) of the boxed answer and, with `in_steps`, that number
    where the last step that states it does.

    Returns the new text and the boxed answer before and after, or None when the boxed answer holds no number.
    """
    span = _last_boxed_span(text)
    numbers = list(_NUMBER.finditer(text[span[0] : span[1]])) if span else []
    if not span or not numbers:
        return None
    target = numbers[number]
    old, new = target[0], change(target[0])
    before = text[span[0] : span[1]]
    after = before[: target.start()] + new + before[target.end() :]
    text = text[: span[0]] + after + text[span[1] :]
    solution = _Solution.parse(text)
    if not in_steps or solution is None:
        return text, before, after
    for i in range(len(solution.steps) - 1, -1, -1):
        number_end = _STEP_START.match(solution.steps[i]).end()  # type: ignore[union-attr]  # skip "3. " itself
        changed = _replace_last_number(solution.steps[i], old, new, number_end)
        if changed is not None:
            solution.steps[i] = changed
            break
    return solution.render(), before, after


def _calculation_error(chosen: str) -> str | None:
    """An off-by-one slip in the last computation: the final step and the boxed answer both carry it."""
    changed = _change_result(chosen, lambda old: _format_number(float(old) + 1, old))
    return changed[0] if changed else None


def _swap_concept(text: str) -> str | None:
    """`text` with its first known concept term replaced by the one students confuse it with."""
    hits = []
    for a, b in _CONCEPT_SWAPS:
        for old, new in ((a, b), (b, a)):
            pattern = rf"{re.escape(old)}(?![A-Za-z])" if old.startswith("\\") else rf"\b{re.escape(old)}\b"
            if match := re.search(pattern, text):
                hits.append((match.start(), match.end(), new))
    if not hits:
        return None
    start, end, new = min(hits)
    return text[:start] + new + text[end:]


def _misapplied_concept(chosen: str) -> str | None:
    """A confused concept (e.g. supplementary for complementary) that doubles the result."""
    solution = _Solution.parse(chosen)
    if solution is None:
        return None
    swapped = next((i for i, step in enumerate(solution.steps) if _swap_concept(step) is not None), None)
    if swapped is not None:
        solution.steps[swapped] = _swap_concept(solution.steps[swapped])  # type: ignore[assignment]
        changed = _change_result(solution.render(), _doubled, number=0)
        if changed is not None:
            return changed[0]
    else:
        changed = _change_result(chosen, _doubled, number=0, in_steps=False)
        if changed is not None:
            # No known concept to confuse: wrongly invoke a symmetry, stated as a step, that doubles the result.
            text, old, new = changed
            solution = _Solution.parse(text)
            solution.steps.append(  # type: ignore[union-attr]
                f"1. Since the figure is symmetric about this line, the result doubles: 2 \\times {old} = {new}.\n"
            )
            return solution.render()  # type: ignore[union-attr]
    # A non-numeric answer (a relation, a name): confuse the concept inside the boxed answer itself.
    text = solution.render()
    span = _last_boxed_span(text)
    inner = _swap_concept(text[span[0] : span[1]]) if span else None
    return None if inner is None or span is None else text[: span[0]] + inner + text[span[1] :]


def _doubled(old: str) -> str:
    return _format_number(float(old) * 2 if float(old) else 1.0, old)


def _broken_process(chosen: str) -> str | None:
    """A skipped step: the middle step is dropped (the first of two), so the reasoning jumps to the result."""
    solution = _Solution.parse(chosen)
    if solution is None:
        return None
    if len(solution.steps) >= 3:
        del solution.steps[len(solution.steps) // 2]
    elif len(solution.steps) == 2:
        del solution.steps[0]
    else:
        solution.steps = ["1. From the figure, the result follows directly.\n"]
    return solution.render()


_RULES: dict[str, Callable[[str], str | None]] = {
    "calculation_error": _calculation_error,
    "misapplied_concept": _misapplied_concept,
    "broken_process": _broken_process,
}


def rule_flaw(chosen: str, strategy: str) -> str | None:
    """A deterministic flawed version of `chosen` that passes `rejected_problems`, or None when the rule cannot."""
    flawed = _RULES[strategy](chosen)
    if flawed is None or rejected_problems(flawed, chosen, strategy):
        return None
    return flawed


# ------------------------------------------------------------------------------------------- stage
def _prompt_texts() -> dict[str, str]:
    return {s: load_prompt(f"flawed_{s}", PROMPT_VERSION) for s in FLAWED_STRATEGIES}


def expected_fingerprint(cfg: PairsConfig, model_cfg: ModelConfig, model: str | Path, data: Path) -> str:
    """Settings, the sampling model's identity, the teach output's fingerprint and the prompt texts; never outputs.

    Raises:
        DataError: the teach folder is unfinished or damaged.
        ModelError: the model path does not exist.
    """
    from mathwizard.models.ref import resolve

    teach = require_manifest(Path(data), "teach")
    ref = resolve(model)
    prompts = _prompt_texts()
    return fingerprint(
        STAGE,
        VERSION,
        cfg,
        {teach.stage: teach.fingerprint},
        model=ref.identity(model_cfg),
        prompts=prompt_digest(*(prompts[s] for s in FLAWED_STRATEGIES), USER_TEMPLATE),
    )


@dataclass
class _Item:
    index: int
    id: str
    question: str
    chosen: str
    image: Any
    difficult: str
    strategy: str
    attempts: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


class Counts(BaseModel):
    """Items of one strategy (or all): how many were paired, from where, and how many were excluded."""

    items: int = 0
    written: int = 0
    from_model: int = 0
    from_rule: int = 0
    failed: int = 0

    def add(self, other: Counts) -> None:
        for name in Counts.model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def count(self, source: str) -> None:
        """One more item paired, its rejected answer from `source` (model or rule)."""
        self.written += 1
        if source == "model":
            self.from_model += 1
        else:
            self.from_rule += 1


class Stats(Counts):
    """A chunk's, a split's or the whole stage's counts, with the sampling effort and a per-strategy breakdown."""

    attempts: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    by_strategy: dict[str, Counts] = Field(default_factory=lambda: {s: Counts() for s in FLAWED_STRATEGIES})

    def add(self, other: Counts) -> None:
        super().add(other)
        if isinstance(other, Stats):
            self.attempts += other.attempts
            self.generated_tokens += other.generated_tokens
            self.seconds = round(self.seconds + other.seconds, 3)
            for strategy, counts in other.by_strategy.items():
                self.by_strategy.setdefault(strategy, Counts()).add(counts)


class Report(StageReport, Stats):
    """The stage's totals (`report.json`), per split too."""

    model: str
    fallback: str
    prompt_version: str
    splits: dict[str, Stats]
    resumed_chunks: int
    wall_seconds: float

    def summary(self) -> str:
        return (
            f"{self.written:,} pairs: {self.from_model:,} rejected answers from the model, {self.from_rule:,} from the"
            f" rule fallback; {self.failed:,} excluded"
        )


def _features() -> Any:
    from datasets import Features, Image, Value

    return Features({name: Image() if name == "image" else Value("string") for name in COLUMNS})


def _image_struct(image: Any) -> dict[str, Any]:
    if isinstance(image, dict):
        return {"bytes": image.get("bytes"), "path": image.get("path")}
    return {"bytes": image, "path": None}


def _write_chunk(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Rows plus the chunk's counts and failures in the parquet metadata: one file, replaced atomically."""
    import pyarrow as pa

    schema = _features().arrow_schema
    table = pa.Table.from_pylist(rows, schema=schema)
    metadata = {**(schema.metadata or {}), _CHUNK_META: json.dumps(meta).encode()}
    write_table(path, table.replace_schema_metadata(metadata))


def _read_chunk(path: Path, fp: str) -> tuple[Any, dict[str, Any]] | None:
    """A finished chunk of this fingerprint (its table and meta), else None (missing, stale or damaged)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(_CHUNK_META, b"{}"))
    except (OSError, ValueError) as exc:
        log.warning("redoing damaged chunk %s: %s", path, exc)
        return None
    if meta.get("fingerprint") != fp:
        return None
    return table, meta


class _Sampler:
    """Samples flawed answers for chunks of items, with checks, re-sampling and the rule fallback."""

    def __init__(self, cfg: PairsConfig, generator_factory: Callable[[], Generator]) -> None:
        self.cfg = cfg
        self.prompts = _prompt_texts()
        self._factory = generator_factory
        self._generator: Generator | None = None

    @property
    def generator(self) -> Generator:
        if self._generator is None:  # loaded only when a chunk needs work, so a finished run never loads the model
            self._generator = self._factory()
        return self._generator

    def request(self, item: _Item) -> Request:
        text = USER_TEMPLATE.format(question=item.question, chosen=item.chosen)
        return Request(text=text, image=item.image, system=self.prompts[item.strategy])

    def chunk(self, items: list[_Item], seed_key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Stats]:
        """Rows for the items that got a checked flawed answer, failure records for the rest, and the counts."""
        cfg, stats = self.cfg, Stats()
        accepted: dict[int, tuple[str, str]] = {}
        started = time.perf_counter()

        # A chosen answer out of format has nothing sensible to contrast with: report it, spend no samples.
        pending = []
        for item in items:
            if problems := format_problems(item.chosen):
                item.reasons.update(f"chosen:{p}" for p in problems)
            else:
                pending.append(item)

        # Sample all pending items together; re-sample only those whose answer failed the checks.
        for attempt in range(1, cfg.max_attempts + 1):
            if not pending:
                break
            seed = int(stable_hash("sample", cfg.seed, seed_key, attempt)[:8], 16)
            params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed)
            completions = self.generator([self.request(item) for item in pending], params)
            still_pending = []
            for item, completion in zip(pending, completions, strict=True):
                item.attempts += 1
                stats.attempts += 1
                stats.generated_tokens += completion.tokens
                if problems := rejected_problems(completion.text, item.chosen, item.strategy):
                    item.reasons.update(problems)
                    still_pending.append(item)
                else:
                    accepted[item.index] = (completion.text, "model")
            pending = still_pending

        # Out of attempts: the rule writes the flaw (itself checked), or the item is excluded.
        for item in pending:
            flawed = rule_flaw(item.chosen, item.strategy) if cfg.fallback == "rule" else None
            if flawed is not None:
                accepted[item.index] = (flawed, "rule")
            elif cfg.fallback == "rule":
                item.reasons["rule_not_applicable"] += 1

        rows, failures = [], []
        for item in items:
            per_strategy = stats.by_strategy[item.strategy]
            stats.items += 1
            per_strategy.items += 1
            if item.index not in accepted:
                failures.append(self._failure(item))
                stats.failed += 1
                per_strategy.failed += 1
                continue
            rejected, source = accepted[item.index]
            rows.append(
                {
                    "id": item.id,
                    "image": _image_struct(item.image),
                    "question": item.question,
                    "chosen": item.chosen,
                    "rejected": rejected,
                    "strategy": item.strategy,
                    "difficult": item.difficult,
                    "source": source,
                }
            )
            stats.count(source)
            per_strategy.count(source)
        stats.seconds = round(time.perf_counter() - started, 3)
        return rows, failures, stats

    @staticmethod
    def _failure(item: _Item) -> dict[str, Any]:
        # Reasons and counts only: the failed text itself is never written anywhere.
        return {"id": item.id, "strategy": item.strategy, "attempts": item.attempts, "reasons": dict(item.reasons)}


def _items(table: Any, offset: int, seed: int) -> list[_Item]:
    rows = table.to_pylist()
    return [
        _Item(
            index=offset + i,
            id=str(row["id"]),
            question=row["question"] or "",
            chosen=row["solution"] or "",
            image=row["image"],
            difficult=str(row["difficult"] or ""),
            strategy=choose_strategy(str(row["id"]), seed),
        )
        for i, row in enumerate(rows)
    ]


def run(
    cfg: PairsConfig,
    model_cfg: ModelConfig,
    model: str | Path,
    data: Path,
    out: Path,
    *,
    generator: Generator | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Build the DPO pairs of every split in `cfg.splits` into `out`.

    Args:
        cfg: sampling, checking and chunking settings.
        model_cfg: how the model loads (backend, dtype, 4-bit, decode).
        model: the model that samples the flawed answers: the SFT stage folder (its `adapter/`), a model or adapter
            dir, 'tiny' or a Hub id.
        data: the teach stage folder (`<split>.parquet`; `solution` is the chosen answer).
        out: this stage's folder.
        generator: replaces the model (tests, benchmarks); it must answer requests in order.
        progress: called as `progress(items done, items in total)` as chunks finish or are found finished on disk.

    Returns:
        The manifest (also `out/manifest.json`); counts per split and source are in `out/report.json`.

    Raises:
        DataError: the teach folder is unfinished, a split is missing or has no rows.
        ModelError: the SFT model cannot be loaded.
    """
    from mathwizard.models.ref import resolve

    started = time.perf_counter()
    out = Path(out)
    fp = expected_fingerprint(cfg, model_cfg, model, data)
    if (done := reusable(out, fp)) is not None:
        return done
    teach = require_manifest(Path(data), "teach")
    ref = resolve(model)
    upstream = {teach.stage: teach.fingerprint, **({ref.stage or "model": ref.fingerprint} if ref.fingerprint else {})}
    load = (lambda: generator) if generator is not None else (lambda: ref.generator(model_cfg, cfg.batch_size))
    sampler = _Sampler(cfg, load)
    chunk_dir = out / "chunks"
    tally = Tally(sum(split_rows(data, split, cfg.limit) for split in cfg.splits), progress)
    config = {"pairs": cfg, "model": model_cfg}
    with stage_output(
        out, stage=STAGE, version=VERSION, fingerprint=fp, config=config, upstream=upstream, started=started
    ) as record:
        chunk_dir.mkdir(parents=True, exist_ok=True)
        totals, per_split = Stats(), {}
        all_failures: list[dict[str, Any]] = []
        resumed = 0
        for split in cfg.splits:
            table = read_table(data, split, _INPUT_COLUMNS, limit=cfg.limit)
            if table.num_rows == 0:
                raise DataError(f"{data}: the {split} split has no rows; nothing to pair")
            split_stats, tables = Stats(), []
            for k, offset in enumerate(range(0, table.num_rows, cfg.chunk_size)):
                path = chunk_dir / f"{split}-{k:05d}.parquet"
                finished = _read_chunk(path, fp)
                if finished is None:
                    items = _items(table.slice(offset, cfg.chunk_size), offset, cfg.seed)
                    rows, failures, stats = sampler.chunk(items, f"{split}-{k}")
                    meta = {
                        "fingerprint": fp,
                        "split": split,
                        "chunk": k,
                        "stats": stats.model_dump(),
                        "failures": failures,
                    }
                    _write_chunk(path, rows, meta)
                    finished = _read_chunk(path, fp)
                    log.info(
                        "%s chunk %d: %d/%d written (%d by rule)", split, k, stats.written, stats.items, stats.from_rule
                    )
                else:
                    resumed += 1
                chunk_table, meta = finished  # type: ignore[misc]
                chunk_stats = Stats.model_validate(meta["stats"])
                tally(chunk_stats.items)
                tables.append(chunk_table)
                split_stats.add(chunk_stats)
                all_failures.extend({"split": split, **f} for f in meta["failures"])
            _write_split(out / f"{split}.parquet", tables)
            record.add_file(f"{split}.parquet", rows=split_stats.written)
            per_split[split] = split_stats
            totals.add(split_stats)
        atomic_write_text(out / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in all_failures))
        record.add_file("failures.jsonl", rows=len(all_failures))
        report = Report(
            **totals.model_dump(),
            model=ref.location,
            fallback=cfg.fallback,
            prompt_version=PROMPT_VERSION,
            splits=per_split,
            resumed_chunks=resumed,
            wall_seconds=round(time.perf_counter() - started, 3),
        )
        atomic_write_text(out / REPORT_FILE, report.model_dump_json(indent=2) + "\n")
        record.add_file(REPORT_FILE)
        record.report(report)
    return record.manifest


def _write_split(path: Path, tables: list[Any]) -> None:
    import pyarrow as pa

    schema = _features().arrow_schema  # drops the chunks' private metadata, keeps `datasets`' Image feature
    tables = [t.replace_schema_metadata(schema.metadata) for t in tables]
    write_table(path, pa.concat_tables(tables) if tables else schema.empty_table())

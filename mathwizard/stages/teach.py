"""Teach: rewrite every prepared solution into numbered steps and a `### Final Answer` block, and keep only valid ones.

Usage: `mathwizard teach --teacher openai --teacher-model gpt-4o-mini` (library: `teach.run(cfg, data, out, cache)`).
The teacher is an OpenAI-compatible API (concurrent, rate-limited, retried, cached per item) or the offline rule
teacher. Every API reply is validated; an item that never gets a valid one is excluded and reported, never written,
so `written + failed == items`. The per-item cache makes a re-run after any failure pay only for what is missing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from mathwizard.answers import final_answer
from mathwizard.config import SPLITS, TeacherConfig
from mathwizard.data.splits import read_table, write_table
from mathwizard.errors import ConfigError, TeacherError
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
from mathwizard.prompts import fill_prompt, load_prompt, prompt_digest
from mathwizard.teacher import rule
from mathwizard.teacher.cache import ReplyCache, endpoint_host, reply_key
from mathwizard.teacher.client import api_key_configured
from mathwizard.teacher.runner import ApiRunner, Item, Stats
from mathwizard.teacher.validate import reply_problems

log = logging.getLogger(__name__)

STAGE = "teach"
VERSION = 1  # bump when output semantics change; part of the fingerprint
REPORT_FILE, FAILURES_FILE = "report.json", "failures.jsonl"
PROMPT_NAMES = ("rewrite_system", "rewrite_user", "rewrite_reask")
Kind = Literal["rule", "openai"]


class Failure(BaseModel):
    """An item excluded from the dataset, with why (one line of `failures.jsonl`)."""

    id: str
    split: str
    reason: str
    attempts: int = 0
    last_error: str = ""


class SplitCounts(BaseModel):
    items: int
    written: int
    failed: int


class Report(StageReport):
    """What teaching cost and produced (`report.json`, and the manifest's report)."""

    teacher: Kind
    model: str
    host: str | None
    prompt_version: str
    items: int
    written: int
    failed: int
    cache_hits: int
    api_calls: int
    retries: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    failures_by_reason: dict[str, int]
    splits: dict[str, SplitCounts]

    def summary(self) -> str:
        return (
            f"{self.written:,} of {self.items:,} items written by {self.model}, {self.failed:,} failed; "
            f"{self.api_calls:,} API calls, {self.cache_hits:,} cache hits"
        )


@dataclass(frozen=True)
class _Row:
    split: str
    index: int
    id: str
    question: str
    solution: str


@dataclass
class _Taught:
    """The outcome for a set of rows: the text of each written row (by split and index) and the failures."""

    texts: dict[tuple[str, int], str]
    failures: list[Failure]
    cache_hits: int = 0
    stats: Stats | None = None


# --------------------------------------------------------------------------------------- settings
def resolve_kind(cfg: TeacherConfig) -> Kind:
    """The teacher that will run: `auto` means openai when an API key is configured, else the rule teacher.

    Raises:
        ConfigError: kind=openai without an API key.
    """
    has_key = api_key_configured()
    if cfg.kind == "auto":
        return "openai" if has_key else "rule"
    if cfg.kind == "openai" and not has_key:
        raise ConfigError(
            "teacher.kind=openai needs an API key: set MATHWIZARD_TEACHER_API_KEY or OPENAI_API_KEY "
            "(environment or .env), or use --teacher rule"
        )
    return cfg.kind


def _prompts(cfg: TeacherConfig) -> tuple[str, str, str]:
    return tuple(load_prompt(name, cfg.prompt_version) for name in PROMPT_NAMES)  # type: ignore[return-value]


def _sampling(cfg: TeacherConfig) -> dict[str, Any]:
    """The request settings that change a reply (part of the cache key); attempts and limits do not."""
    return {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}


def _output_config(cfg: TeacherConfig, kind: Kind) -> dict[str, Any]:
    """The settings that change what the stage writes; speed settings (concurrency, rpm, ...) are left out."""
    common = {"kind": kind, "split": cfg.split, "limit": cfg.limit}
    if kind == "rule":
        return {**common, "rule_version": rule.RULE_VERSION}
    return {
        **common,
        "model": cfg.model,
        "host": endpoint_host(cfg.base_url),
        "prompt_version": cfg.prompt_version,
        "prompts": prompt_digest(*_prompts(cfg)),
        "max_attempts": cfg.max_attempts,  # decides which items end up excluded
        **_sampling(cfg),
    }


def expected_fingerprint(cfg: TeacherConfig, data: Path) -> str:
    """The output's identity from the settings that matter and the prepare manifest (no output is read).

    Raises:
        DataError: `data` is not a finished prepare folder.
        ConfigError: kind=openai without an API key.
    """
    upstream = require_manifest(Path(data), "prepare")
    return fingerprint(STAGE, VERSION, _output_config(cfg, resolve_kind(cfg)), {"prepare": upstream.fingerprint})


def _splits(cfg: TeacherConfig) -> tuple[str, ...]:
    return SPLITS if cfg.split == "all" else (cfg.split,)


def _model_name(cfg: TeacherConfig, kind: Kind) -> str:
    return rule.MODEL_NAME if kind == "rule" else cfg.model


def _prompt_version(cfg: TeacherConfig, kind: Kind) -> str:
    return f"rule-v{rule.RULE_VERSION}" if kind == "rule" else cfg.prompt_version


# ------------------------------------------------------------------------------------------- input
def _read_rows(data: Path, split: str, limit: int | None) -> list[_Row]:
    """The text columns of a split (no images), cheaply, straight from its parquet file."""
    columns = read_table(data, split, ["id", "question", "solution"], limit=limit).to_pydict()  # type: ignore[union-attr]
    return [
        _Row(split, i, id_, question or "", solution or "")
        for i, (id_, question, solution) in enumerate(
            zip(columns["id"], columns["question"], columns["solution"], strict=True)
        )
    ]


def _key(cfg: TeacherConfig, prompts: tuple[str, str, str], row: _Row) -> str:
    return reply_key(
        model=cfg.model,
        base_url=cfg.base_url,
        prompts=prompts,
        question=row.question,
        solution=row.solution,
        sampling=_sampling(cfg),
    )


def _item(cfg: TeacherConfig, prompts: tuple[str, str, str], row: _Row, answer: str) -> Item:
    system, user, reask = prompts
    boxed = f"\\boxed{{{answer}}}"
    return Item(
        key=_key(cfg, prompts, row),
        messages=(
            {"role": "system", "content": system},
            {"role": "user", "content": fill_prompt(user, question=row.question, solution=row.solution, answer=boxed)},
        ),
        source_answer=answer,
        reask=fill_prompt(reask, answer=boxed),
    )


def _cached_valid(cache: ReplyCache, answers: dict[str, str]) -> dict[str, str]:
    """Cached replies (by key) that still pass validation against their source answer; a stricter validator
    thus re-asks what it no longer accepts."""
    found = cache.get_many(answers)
    return {key: hit.text for key, hit in found.items() if not reply_problems(hit.text, answers[key])}


# ------------------------------------------------------------------------------------------ teaching
def _teach(cfg: TeacherConfig, kind: Kind, rows: list[_Row], cache_dir: Path, tally: Tally) -> _Taught:
    """A valid rewrite for every row that can get one (from the cache, the API or the rule), failures for the rest."""
    taught = _Taught(texts={}, failures=[])
    answered: list[tuple[_Row, str]] = []
    for row in rows:
        answer = final_answer(row.solution)
        if answer is None:  # nothing to check a rewrite against: never pay for it
            taught.failures.append(Failure(id=row.id, split=row.split, reason="no_source_answer"))
        else:
            answered.append((row, answer))
    tally(len(rows) - len(answered))
    if kind == "rule":
        for row, answer in answered:
            text = rule.rewrite(row.solution)
            if problems := reply_problems(text, answer):
                taught.failures.append(Failure(id=row.id, split=row.split, reason=problems[0], attempts=1))
            else:
                taught.texts[(row.split, row.index)] = text
        tally(len(answered))
        return taught

    prompts = _prompts(cfg)
    keyed = [(row, _item(cfg, prompts, row, answer)) for row, answer in answered]
    unique = {item.key: item for _, item in keyed}  # identical question + solution: asked once
    with ReplyCache.in_dir(cache_dir) as cache:
        replies = _cached_valid(cache, {key: item.source_answer for key, item in unique.items()})
        taught.cache_hits = sum(1 for _, item in keyed if item.key in replies)
        tally(taught.cache_hits)
        todo = [item for key, item in unique.items() if key not in replies]
        failed = {}
        if todo:
            with ApiRunner(cfg, cache) as runner:
                outcomes, taught.stats = runner.run(todo, tally)
            replies.update({o.key: o.text for o in outcomes if o.ok})  # type: ignore[misc]
            failed = {o.key: o for o in outcomes if not o.ok}
    for row, item in keyed:
        if item.key in replies:
            taught.texts[(row.split, row.index)] = replies[item.key]
        else:
            outcome = failed[item.key]
            taught.failures.append(
                Failure(
                    id=row.id,
                    split=row.split,
                    reason=outcome.reason or "unknown",
                    attempts=outcome.attempts,
                    last_error=outcome.last_error,
                )
            )
    tally(len(rows) - tally.done)  # rows that shared a key with one just asked
    return taught


def _write_split(
    data: Path, out: Path, split: str, texts: dict[int, str], model_name: str, prompt_version: str
) -> None:
    """`<out>/<split>.parquet`: the written rows with the rewritten solution, the source one and provenance.

    Plain pyarrow (no `datasets` conversion cache): the schema carries the `datasets` features, so
    `load_dataset("parquet", ...)` still decodes `image` as an Image.
    """
    import datasets
    import pyarrow as pa

    source: pa.Table = read_table(data, split)  # type: ignore[assignment]
    keep = sorted(texts)
    taken = source.take(pa.array(keep, type=pa.int64()))
    source_features = datasets.Features.from_arrow_schema(source.schema)
    string = datasets.Value("string")
    columns: dict[str, pa.Array | pa.ChunkedArray] = {}
    features: dict[str, Any] = {}
    for name in ("id", "question", "solution", "image", "difficult", "year", "knowledge", "source_solution"):
        if name == "solution":
            columns[name], features[name] = pa.array([texts[i] for i in keep], pa.string()), string
        elif name == "source_solution":
            columns[name], features[name] = taken.column("solution"), source_features["solution"]
        elif name in source.column_names:
            columns[name], features[name] = taken.column(name), source_features[name]
    columns["teacher_model"] = pa.array([model_name] * len(keep), pa.string())
    columns["prompt_version"] = pa.array([prompt_version] * len(keep), pa.string())
    features.update(teacher_model=string, prompt_version=string)
    schema = datasets.Features(features).arrow_schema
    write_table(out / f"{split}.parquet", pa.table(columns).cast(schema))


# -------------------------------------------------------------------------------------------- run
def run(cfg: TeacherConfig, data: Path, out: Path, cache_dir: Path, *, progress: Progress | None = None) -> Manifest:
    """Rewrite the selected splits of the prepare folder `data` into `out`.

    Args:
        cfg: teacher settings (no secrets: the API key is read from the environment or `.env` when needed).
        data: the prepare stage folder.
        out: this stage's folder.
        cache_dir: where the per-item reply cache lives (shared across runs).
        progress: called as `progress(items done, items in total)` while items finish.

    Returns:
        The manifest, also written to `out / "manifest.json"` as the last step; its report is a `Report`.

    Raises:
        DataError: `data` is not a finished prepare folder.
        ConfigError: kind=openai without an API key.
        TeacherError: the API refused the work, or more than `max_failed_fraction` of the items failed (raised
            after the report and failures are written; the manifest is not, so a re-run pays only for those).
        TransientError: the API stayed down; re-run to resume from the cache.
    """
    started = time.perf_counter()
    data, out, cache_dir = Path(data), Path(out), Path(cache_dir)
    fp = expected_fingerprint(cfg, data)
    if (done := reusable(out, fp)) is not None:
        return done
    kind = resolve_kind(cfg)
    upstream = require_manifest(data, "prepare")
    model_name, prompt_version = _model_name(cfg, kind), _prompt_version(cfg, kind)
    with stage_output(
        out,
        stage=STAGE,
        version=VERSION,
        fingerprint=fp,
        config=cfg,
        upstream={"prepare": upstream.fingerprint},
        started=started,
    ) as record:
        # Every split in one pass: no boundaries where the request pipeline would drain.
        rows = [row for split in _splits(cfg) for row in _read_rows(data, split, cfg.limit)]
        taught = _teach(cfg, kind, rows, cache_dir, Tally(len(rows), progress))

        splits: dict[str, SplitCounts] = {}
        for split in _splits(cfg):
            texts = {i: text for (s, i), text in taught.texts.items() if s == split}
            _write_split(data, out, split, texts, model_name, prompt_version)
            record.add_file(f"{split}.parquet", rows=len(texts))
            items = sum(1 for row in rows if row.split == split)
            splits[split] = SplitCounts(items=items, written=len(texts), failed=items - len(texts))

        stats = taught.stats or Stats()
        by_reason = Counter(f.reason for f in taught.failures)
        report = Report(
            teacher=kind,
            model=model_name,
            host=endpoint_host(cfg.base_url) if kind == "openai" else None,
            prompt_version=prompt_version,
            items=len(rows),
            written=len(taught.texts),
            failed=len(taught.failures),
            cache_hits=taught.cache_hits,
            api_calls=stats.api_calls,
            retries=stats.retries,
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            seconds=round(time.perf_counter() - started, 3),
            failures_by_reason=dict(by_reason.most_common()),
            splits=splits,
        )
        atomic_write_text(out / FAILURES_FILE, "".join(f.model_dump_json() + "\n" for f in taught.failures))
        atomic_write_text(out / REPORT_FILE, report.model_dump_json(indent=2) + "\n")
        record.add_file(FAILURES_FILE, rows=len(taught.failures))
        record.add_file(REPORT_FILE)
        record.report(report)
        log.info(
            "teach: %d of %d items written, %d failed %s; %d API calls, %d cache hits, %d retries",
            report.written, report.items, report.failed, dict(by_reason),
            report.api_calls, report.cache_hits, report.retries,
        )  # fmt: skip
        if rows and report.failed > cfg.max_failed_fraction * report.items:
            top = ", ".join(f"{reason} ({n})" for reason, n in by_reason.most_common(3))
            raise TeacherError(
                f"{report.failed:,} / {report.items:,} items failed (teacher.max_failed_fraction="
                f"{cfg.max_failed_fraction}); top errors: {top}; see {out / FAILURES_FILE}"
                " and re-run to retry only those"
            )
    return record.manifest

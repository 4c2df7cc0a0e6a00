"""Teach: rewrite every prepared solution into numbered steps and a `### Final Answer` block, and keep only valid ones.

Usage: `mathwizard teach --teacher openai --teacher-model gpt-4o-mini` (library: `teach.run(cfg, data, out, cache)`).
The teacher is an OpenAI-compatible API (concurrent, rate-limited, retried, cached per item) or the offline rule
teacher. Every API reply is validated; an item that never gets a valid one is excluded and reported, never written,
so `written + failed == items`. The per-item cache makes a re-run after any failure pay only for what is missing;
items that failed for a reason a re-run would meet again (invalid replies, refusals, too long) are served from the
cache as failures at temperature 0, unless `retry_failed`. A stage that stops early (a wrong key, an outage, Ctrl-C)
still writes `report.json` and `failures.jsonl` for what it did, and no manifest, so a re-run resumes.
`teacher.mode=batch` asks the same items through the OpenAI-compatible Batch API instead (`teacher/batch.py`: same
cache keys, same validation, a durable journal of its batches); an attempt that stops while batches still run
(`BatchPending`) is resumed by the next one, which collects them without sending anything again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

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
from mathwizard.teacher.batch import BatchRunner, BatchStats
from mathwizard.teacher.cache import ReplyCache, endpoint_host, reply_key
from mathwizard.teacher.client import api_key_configured
from mathwizard.teacher.runner import ApiRunner, Item, Outcome, Stats
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
    cached: bool = Field(False, description="Served from the teacher cache: failed the same way in an earlier run.")


class TokenCount(BaseModel):
    prompt: int = 0
    completion: int = 0


class BatchLine(BaseModel):
    """One teacher batch this run sent, waited for or collected."""

    id: str | None
    name: str = Field(description="The request file's name (a hash of its content), also in the batch's metadata.")
    status: str
    requests: int
    completed: int
    failed: int
    note: str = Field("", description="What went wrong: expired, cancelled, failed, malformed output lines.")


class SplitCounts(BaseModel):
    items: int
    written: int
    failed: int
    not_attempted: int = 0


class Report(StageReport):
    """What teaching cost and produced (`report.json`, and the manifest's report)."""

    teacher: Kind
    model: str
    host: str | None
    prompt_version: str
    items: int
    written: int = Field(description="Items with a valid rewrite (in the parquet files once the stage finishes).")
    failed: int
    not_attempted: int = Field(
        0, description="Items without an outcome because the stage stopped early (never sent, or in flight then)."
    )
    stopped: str | None = Field(None, description="Why the stage stopped before every item was asked; None: it ran.")
    cache_hits: int
    cached_failures: int = Field(0, description="Failures served from the cache (not asked again; see retry_failed).")
    api_calls: int = Field(description="Online chat-completion requests (batch mode: the items re-asked online).")
    retries: int
    prompt_tokens: int = Field(description="Prompt tokens of every reply received, online and batch.")
    completion_tokens: int = Field(description="Completion tokens of every reply received, online and batch.")
    mode: Literal["online", "batch"] | None = Field(None, description="teacher.mode (None: the rule teacher).")
    batch_requests: int = Field(0, description="Requests this run put into batch files (re-sent ones counted again).")
    batch_ids: list[str] = Field(
        default_factory=list, description="The batches this run sent, waited for or collected."
    )
    batches: list[BatchLine] = Field(default_factory=list)
    batch_events: list[str] = Field(
        default_factory=list, description="Expired, cancelled or failed batches and malformed output, one line each."
    )
    tokens_by_mode: dict[str, TokenCount] = Field(
        default_factory=dict, description="Prompt and completion tokens of the replies received, online and batch."
    )
    estimated_cost_usd: float | None = Field(
        None,
        description="Tokens by mode at teacher.price_input_per_mtok / price_output_per_mtok, batch tokens less"
        " teacher.batch_discount; None when both prices are 0 (unknown).",
    )
    concurrency: int | None = Field(None, description="teacher.concurrency: the in-flight limit it starts at.")
    concurrency_min: int | None = Field(None, description="The lowest in-flight limit timeouts and 429s forced.")
    concurrency_final: int | None = Field(None, description="The in-flight limit when the stage ended.")
    seconds: float
    failures_by_reason: dict[str, int]
    splits: dict[str, SplitCounts]

    def summary(self) -> str:
        line = (
            f"{self.written:,} of {self.items:,} items written by {self.model}, {self.failed:,} failed; "
            f"{self.api_calls:,} API calls, {self.cache_hits:,} cache hits"
        )
        if self.mode == "batch":
            line += f", {self.batch_requests:,} batch requests in {len(self.batch_ids)} batches"
        if self.estimated_cost_usd is not None:
            line += f"; about ${self.estimated_cost_usd:,.2f}"
        if self.cached_failures:
            line += f", {self.cached_failures:,} failures from the cache"
        if self.concurrency and self.concurrency_min and self.concurrency_min < self.concurrency:
            line += (
                f"; concurrency lowered to {self.concurrency_min} by timeouts or 429s, ended at"
                f" {self.concurrency_final} of {self.concurrency}"
            )
        return line


@dataclass(frozen=True)
class _Row:
    split: str
    index: int
    id: str
    question: str
    solution: str


@dataclass
class _Taught:
    """The outcome for a set of rows: the text of each written row (by split and index) and the failures; when the
    run stopped early, why (`stopped`), and the rows without an outcome are in neither."""

    texts: dict[tuple[str, int], str]
    failures: list[Failure]
    cache_hits: int = 0
    cached_failures: int = 0
    stats: Stats | None = None
    batch: BatchStats | None = None
    stopped: BaseException | None = None


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


def _cached_failures(cfg: TeacherConfig, cache: ReplyCache, answers: dict[str, str]) -> dict[str, Outcome]:
    """Cached failures (by key) a re-run would meet again, so they are served instead of asked.

    A failure counts only if asking again cannot change it: the request was too long (at any temperature), or the
    replies were invalid at temperature 0 (deterministic) after at least `max_attempts` asks. A failure whose last
    reply passes today's validator is not served: that item is asked again.
    """
    served: dict[str, Outcome] = {}
    for key, failure in cache.failures(answers).items():
        if failure.text is not None and not reply_problems(failure.text, answers[key]):
            continue
        if failure.reason == "too_long" or (cfg.temperature == 0 and failure.attempts >= cfg.max_attempts):
            served[key] = Outcome(key, reason=failure.reason, attempts=failure.attempts, last_error=failure.detail)
    return served


def _stop_line(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ teaching
def _teach(cfg: TeacherConfig, kind: Kind, rows: list[_Row], cache_dir: Path, tally: Tally) -> _Taught:
    """A valid rewrite for every row that can get one (from the cache, the API or the rule), failures for the rest.

    However the API run stops (a TeacherError, a TransientError, Ctrl-C), what it finished is returned, with the
    exception in `stopped` for the caller to raise once the report is written.
    """
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
    answers = {key: item.source_answer for key, item in unique.items()}
    with ReplyCache.in_dir(cache_dir) as cache:
        replies = _cached_valid(cache, answers)
        unanswered = {key: answer for key, answer in answers.items() if key not in replies}
        failed = {} if cfg.retry_failed else _cached_failures(cfg, cache, unanswered)
        taught.cache_hits = sum(1 for _, item in keyed if item.key in replies)
        taught.cached_failures = sum(1 for _, item in keyed if item.key in failed)
        tally(taught.cache_hits + taught.cached_failures)
        cached = set(failed)
        todo = [item for key, item in unique.items() if key not in replies and key not in failed]
        if todo and cfg.mode == "batch":
            with BatchRunner(cfg, cache, cache_dir) as batches:
                try:
                    outcomes, taught.batch = batches.run(todo, tally)
                except BaseException as exc:  # Ctrl-C and BatchPending included: the report says what was done
                    outcomes, taught.batch = batches.partial()
                    taught.stopped = exc
            taught.stats = taught.batch.online
        elif todo:
            with ApiRunner(cfg, cache) as runner:
                try:
                    outcomes, taught.stats = runner.run(todo, tally)
                except BaseException as exc:  # Ctrl-C included: the report still says what was done
                    outcomes, taught.stats = runner.partial()
                    taught.stopped = exc
        else:
            outcomes = []
        replies.update({o.key: o.text for o in outcomes if o.ok})  # type: ignore[misc]
        failed.update({o.key: o for o in outcomes if not o.ok})
    for row, item in keyed:
        if item.key in replies:
            taught.texts[(row.split, row.index)] = replies[item.key]
        elif (outcome := failed.get(item.key)) is not None:
            taught.failures.append(
                Failure(
                    id=row.id,
                    split=row.split,
                    reason=outcome.reason or "unknown",
                    attempts=outcome.attempts,
                    last_error=outcome.last_error,
                    cached=item.key in cached,
                )
            )
    if taught.stopped is None:
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
        DataError: `data` is not a finished prepare folder, or the teacher cache file is damaged.
        ConfigError: kind=openai without an API key.
        TeacherError: the API refused the work, or more than `max_failed_fraction` of the items failed.
        TransientError: the API stayed down; re-run to resume from the cache.
        BatchPending (a TransientError): batch mode waited `batch_wait_s` and batches still run; re-run to collect.
        After a TeacherError, a TransientError or a KeyboardInterrupt, `report.json` and `failures.jsonl` say what
        was done (the items not attempted counted) and the manifest is not written, so a re-run resumes.
    """
    started = time.perf_counter()
    data, out, cache_dir = Path(data), Path(out), Path(cache_dir)
    fp = expected_fingerprint(cfg, data)
    if (done := reusable(out, fp)) is not None:
        if not (cfg.retry_failed and Report.of(done).failed):
            return done
        log.info("%s has %d failed items and retry_failed is set: asking them again", out, Report.of(done).failed)
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
        for name in (REPORT_FILE, FAILURES_FILE):  # an earlier attempt's: never mistaken for this one's
            (out / name).unlink(missing_ok=True)
        # Every split in one pass: no boundaries where the request pipeline would drain.
        rows = [row for split in _splits(cfg) for row in _read_rows(data, split, cfg.limit)]
        taught = _teach(cfg, kind, rows, cache_dir, Tally(len(rows), progress))
        report = _report(cfg, kind, rows, taught, model_name, prompt_version, started)
        atomic_write_text(out / FAILURES_FILE, "".join(f.model_dump_json() + "\n" for f in taught.failures))
        atomic_write_text(out / REPORT_FILE, report.model_dump_json(indent=2) + "\n")
        by_reason = report.failures_by_reason
        if taught.stopped is not None:
            log.info(
                "teach stopped (%s): %d of %d items written, %d failed, %d not attempted; re-run to resume",
                report.stopped, report.written, report.items, report.failed, report.not_attempted,
            )  # fmt: skip
            raise taught.stopped

        for split in _splits(cfg):
            texts = {i: text for (s, i), text in taught.texts.items() if s == split}
            _write_split(data, out, split, texts, model_name, prompt_version)
            record.add_file(f"{split}.parquet", rows=len(texts))
        record.add_file(FAILURES_FILE, rows=len(taught.failures))
        record.add_file(REPORT_FILE)
        record.report(report)
        log.info(
            "teach: %d of %d items written, %d failed %s; %d API calls, %d cache hits, %d cached failures, %d retries",
            report.written, report.items, report.failed, by_reason,
            report.api_calls, report.cache_hits, report.cached_failures, report.retries,
        )  # fmt: skip
        if rows and report.failed > cfg.max_failed_fraction * report.items:
            top = ", ".join(f"{reason} ({n})" for reason, n in list(by_reason.items())[:3])
            raise TeacherError(
                f"{report.failed:,} / {report.items:,} items failed (teacher.max_failed_fraction="
                f"{cfg.max_failed_fraction}); top errors: {top}; see {out / FAILURES_FILE}; a re-run asks again"
                " the timeouts and 5xx, and the others with --retry-failed (teacher.retry_failed)"
            )
    return record.manifest


def estimated_cost(cfg: TeacherConfig, tokens: dict[str, TokenCount]) -> float | None:
    """USD for the tokens by mode at the configured prices (batch tokens less the discount); None: prices unknown."""
    if not (cfg.price_input_per_mtok or cfg.price_output_per_mtok):
        return None
    total = 0.0
    for mode, count in tokens.items():
        factor = 1.0 - cfg.batch_discount if mode == "batch" else 1.0
        total += factor * (count.prompt * cfg.price_input_per_mtok + count.completion * cfg.price_output_per_mtok) / 1e6
    return round(total, 8)


def _report(
    cfg: TeacherConfig,
    kind: Kind,
    rows: list[_Row],
    taught: _Taught,
    model_name: str,
    prompt_version: str,
    started: float,
) -> Report:
    stats = taught.stats or Stats()
    splits: dict[str, SplitCounts] = {}
    for split in _splits(cfg):
        items = sum(1 for row in rows if row.split == split)
        written = sum(1 for s, _ in taught.texts if s == split)
        failed = sum(1 for f in taught.failures if f.split == split)
        splits[split] = SplitCounts(items=items, written=written, failed=failed, not_attempted=items - written - failed)
    api = kind == "openai"
    batch = taught.batch or BatchStats()
    tokens = {"online": TokenCount(prompt=stats.prompt_tokens, completion=stats.completion_tokens)}
    if cfg.mode == "batch":
        tokens["batch"] = TokenCount(prompt=batch.prompt_tokens, completion=batch.completion_tokens)
    lines = [BatchLine(**vars(summary)) for summary in batch.batches.values()]
    return Report(
        teacher=kind,
        model=model_name,
        host=endpoint_host(cfg.base_url) if api else None,
        prompt_version=prompt_version,
        items=len(rows),
        written=len(taught.texts),
        failed=len(taught.failures),
        not_attempted=len(rows) - len(taught.texts) - len(taught.failures),
        stopped=None if taught.stopped is None else _stop_line(taught.stopped),
        cache_hits=taught.cache_hits,
        cached_failures=taught.cached_failures,
        api_calls=stats.api_calls,
        retries=stats.retries,
        prompt_tokens=stats.prompt_tokens + batch.prompt_tokens,
        completion_tokens=stats.completion_tokens + batch.completion_tokens,
        mode=cfg.mode if api else None,
        batch_requests=batch.batch_requests,
        batch_ids=[line.id for line in lines if line.id],
        batches=lines,
        batch_events=list(batch.events),
        tokens_by_mode=tokens if api else {},
        estimated_cost_usd=estimated_cost(cfg, tokens) if api else None,
        concurrency=cfg.concurrency if api else None,
        concurrency_min=(stats.concurrency_min or cfg.concurrency) if api else None,
        concurrency_final=(stats.concurrency_final or cfg.concurrency) if api else None,
        seconds=round(time.perf_counter() - started, 3),
        failures_by_reason=dict(Counter(f.reason for f in taught.failures).most_common()),
        splits=splits,
    )

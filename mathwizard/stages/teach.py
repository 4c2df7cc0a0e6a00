"""Teach: rewrite every prepared solution into numbered steps and a `### Final Answer` block, and keep only valid ones.

Usage: `mathwizard teach --teacher openai --model gpt-4o-mini` (library: `teach.run(cfg, prepare_dir, out, cache_dir)`).
The teacher is an OpenAI-compatible API (concurrent, rate-limited, retried, cached per item) or the offline rule
teacher. The stage comes in pieces so Prefect can run it as chunk tasks: `plan` lists the chunks, `run_chunk` fills
the reply cache for one chunk, `assemble` writes the splits, `failures.jsonl` and `report.json` from the cache.
`run` does all of it in one call. Every API reply is validated; an item that never gets a valid one is excluded
and reported, never written, so `written + failed == items`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from mathwizard.answers import final_answer
from mathwizard.config import SPLITS, TeacherConfig
from mathwizard.errors import ConfigError, MathWizardError, TeacherError
from mathwizard.manifest import Manifest, atomic_write_text, fingerprint, require_manifest, reusable, stage_output
from mathwizard.prompts import load_prompt, prompt_digest
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
ProgressFn = Callable[[int, int], None]  # (items done, items in total)
_PLACEHOLDER = re.compile(r"\{(question|solution|answer|problems)\}")


class Chunk(BaseModel):
    """A slice of one split: the unit of a Prefect task."""

    split: str
    start: int
    stop: int


class Failure(BaseModel):
    """An item excluded from the dataset, with why (one line of `failures.jsonl`)."""

    id: str
    split: str
    reason: str
    attempts: int = 0
    last_error: str = ""


class ChunkResult(BaseModel):
    """What filling one chunk cost and which items failed; small enough to pass between Prefect tasks."""

    chunk: Chunk
    items: int = 0
    cache_hits: int = 0
    api_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    failures: list[Failure] = Field(default_factory=list)


@dataclass(frozen=True)
class _Row:
    split: str
    index: int
    id: str
    question: str
    solution: str


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
def _read_rows(data: Path, split: str, limit: int | None, start: int = 0, stop: int | None = None) -> list[_Row]:
    """The text columns of a split (no images), cheaply, straight from its parquet file."""
    import pyarrow.parquet as pq

    from mathwizard.data.splits import split_file

    table = pq.read_table(split_file(data, split), columns=["id", "question", "solution"])
    end = table.num_rows if limit is None else min(limit, table.num_rows)
    stop = end if stop is None else min(stop, end)
    table = table.slice(start, max(0, stop - start))
    columns = table.to_pydict()
    return [
        _Row(split, start + i, id_, question or "", solution or "")
        for i, (id_, question, solution) in enumerate(
            zip(columns["id"], columns["question"], columns["solution"], strict=True)
        )
    ]


def _split_size(data: Path, split: str, limit: int | None) -> int:
    import pyarrow.parquet as pq

    from mathwizard.data.splits import split_file

    rows = pq.ParquetFile(split_file(data, split)).metadata.num_rows
    return rows if limit is None else min(limit, rows)


def plan(cfg: TeacherConfig, data: Path) -> list[Chunk]:
    """The chunks of `chunk_size` items covering the selected splits (none for an empty split)."""
    require_manifest(Path(data), "prepare")
    chunks: list[Chunk] = []
    for split in _splits(cfg):
        size = _split_size(Path(data), split, cfg.limit)
        chunks += [
            Chunk(split=split, start=i, stop=min(i + cfg.chunk_size, size)) for i in range(0, size, cfg.chunk_size)
        ]
    return chunks


def _fill(template: str, **values: str) -> str:
    # One pass, so a question that happens to contain "{solution}" is left as it is.
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


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
            {"role": "user", "content": _fill(user, question=row.question, solution=row.solution, answer=boxed)},
        ),
        source_answer=answer,
        reask=_fill(reask, answer=boxed),
    )


def _cached_valid(cache: ReplyCache, answers: dict[str, str]) -> dict[str, str]:
    """Cached replies (by key) that still pass validation against their source answer; a stricter validator
    thus re-asks what it no longer accepts."""
    found = cache.get_many(answers)
    return {key: hit.text for key, hit in found.items() if not reply_problems(hit.text, answers[key])}


# ---------------------------------------------------------------------------------------- runners
_SESSIONS: dict[tuple[str, str], ApiRunner] = {}
_STOPPED: set[str] = set()
_SESSIONS_LOCK = threading.Lock()


def _runner(cfg: TeacherConfig, cache_dir: Path, session: str | None) -> tuple[ApiRunner, bool]:
    """A runner for this call, or the one shared by all chunks of `session` (one set of limits per stage run)."""
    if session is None:
        return ApiRunner(cfg, ReplyCache.in_dir(cache_dir)), True
    key = (session, cfg.model_dump_json() + str(Path(cache_dir).resolve()))
    with _SESSIONS_LOCK:
        runner = _SESSIONS.get(key)
        if runner is None:
            runner = _SESSIONS[key] = ApiRunner(cfg, ReplyCache.in_dir(cache_dir))
    return runner, False


def stop(session: str) -> None:
    """Make chunks of `session` that have not started yet fail at once instead of probing a failing API."""
    with _SESSIONS_LOCK:
        _STOPPED.add(session)


def release(session: str) -> None:
    """Stop `session` and close its shared runners (call when the flow that created them ends)."""
    with _SESSIONS_LOCK:
        _STOPPED.add(session)
        keys = [key for key in _SESSIONS if key[0] == session]
        runners = [_SESSIONS.pop(key) for key in keys]
    for runner in runners:
        runner.cache.close()
        runner.close()


def _run_rows(
    cfg: TeacherConfig,
    rows: list[_Row],
    cache_dir: Path,
    *,
    session: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, Stats, list[Failure]]:
    """Get a valid reply for every row into the cache; returns (rows served by the cache, API stats, failures)."""
    kind = resolve_kind(cfg)
    failures: list[Failure] = []
    answered: list[tuple[_Row, str]] = []
    for row in rows:
        answer = final_answer(row.solution)
        if answer is None:  # nothing to check a rewrite against: never pay for it
            failures.append(Failure(id=row.id, split=row.split, reason="no_source_answer", attempts=0))
        else:
            answered.append((row, answer))
    if kind == "rule":
        for row, answer in answered:
            problems = reply_problems(rule.rewrite(row.solution), answer)
            if problems:
                failures.append(Failure(id=row.id, split=row.split, reason=problems[0], attempts=1))
        if progress is not None:
            progress(len(rows))
        return 0, Stats(), failures

    prompts = _prompts(cfg)
    pairs = [(row, _item(cfg, prompts, row, answer)) for row, answer in answered]
    unique = {item.key: item for _, item in pairs}  # identical question + solution: asked once
    with ReplyCache.in_dir(cache_dir) as cache:
        hits = _cached_valid(cache, {key: item.source_answer for key, item in unique.items()})
    cache_hits = sum(1 for _, item in pairs if item.key in hits)
    if progress is not None:
        progress(len(rows) - len(pairs) + cache_hits)
    todo = [item for key, item in unique.items() if key not in hits]
    stats = Stats()
    if todo:
        runner, private = _runner(cfg, cache_dir, session)
        try:
            outcomes, stats = runner.run(todo, progress)
        finally:
            if private:
                runner.cache.close()
                runner.close()
        failed = {outcome.key: outcome for outcome in outcomes if not outcome.ok}
        for row, item in pairs:
            if (outcome := failed.get(item.key)) is not None:
                failures.append(
                    Failure(
                        id=row.id,
                        split=row.split,
                        reason=outcome.reason or "unknown",
                        attempts=outcome.attempts,
                        last_error=outcome.last_error,
                    )
                )
        if progress is not None and len(pairs) - cache_hits > len(todo):
            progress(len(pairs) - cache_hits - len(todo))  # duplicates answered along with their twin
    return cache_hits, stats, failures


def run_chunk(
    cfg: TeacherConfig,
    data: Path,
    cache_dir: Path,
    chunk: Chunk,
    *,
    session: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ChunkResult:
    """Get a valid reply into the cache for every item of `chunk` that lacks one.

    Args:
        cfg: teacher settings.
        data: the prepare stage folder.
        cache_dir: the shared cache folder (`<home>/cache`).
        chunk: which rows.
        session: chunks run with the same session share one runner, hence one set of concurrency and rate limits.
        progress: called with the number of items just finished (from the runner's thread).

    Raises:
        TeacherError: the API refused the work (wrong key, unknown model).
        TransientError: the API stayed down; what finished is cached.
    """
    if session is not None and session in _STOPPED:
        raise MathWizardError(f"teach run {session[:8]} stopped after an earlier chunk failed; this chunk was skipped")
    started = time.perf_counter()
    rows = _read_rows(Path(data), chunk.split, cfg.limit, chunk.start, chunk.stop)
    hits, stats, failures = _run_rows(cfg, rows, Path(cache_dir), session=session, progress=progress)
    result = ChunkResult(
        chunk=chunk,
        items=len(rows),
        cache_hits=hits,
        api_calls=stats.api_calls,
        retries=stats.retries,
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        seconds=round(time.perf_counter() - started, 3),
        failures=failures,
    )
    log.info(
        "teach %s[%d:%d]: %d items, %d cached, %d API calls, %d failed",
        chunk.split, chunk.start, chunk.stop, result.items, hits, stats.api_calls, len(failures),
    )  # fmt: skip
    return result


# --------------------------------------------------------------------------------------- assemble
def assemble(
    cfg: TeacherConfig,
    data: Path,
    out: Path,
    cache_dir: Path,
    results: Iterable[ChunkResult] = (),
    *,
    started_at: float | None = None,
) -> Manifest:
    """Write the splits, `failures.jsonl`, `report.json` and the manifest from the cache (or the rule teacher).

    An item with a valid cached reply is written; any other is a failure (the reason from `results` when a
    chunk recorded one, else `not_attempted`), so `written + failed == items` holds whatever happened before.
    `started_at` (a `time.time()`) is when the stage began, for the report's `seconds`.

    Raises:
        TeacherError: more than `max_failed_fraction` of the items failed (after the report is written; the
            manifest is not, so a re-run pays only for the failed items).
    """
    data, out, cache_dir = Path(data), Path(out), Path(cache_dir)
    started = time.perf_counter()
    kind = resolve_kind(cfg)
    upstream = require_manifest(data, "prepare")
    fp = fingerprint(STAGE, VERSION, _output_config(cfg, kind), {"prepare": upstream.fingerprint})
    results = list(results)
    recorded = {(f.split, f.id): f for r in results for f in r.failures}
    prompts = _prompts(cfg) if kind == "openai" else None
    model_name, prompt_version = _model_name(cfg, kind), _prompt_version(cfg, kind)

    with stage_output(
        out, stage=STAGE, version=VERSION, fingerprint=fp, config=cfg, upstream={"prepare": upstream.fingerprint}
    ) as record:
        failures: list[Failure] = []
        per_split: dict[str, dict[str, int]] = {}
        cache = ReplyCache.in_dir(cache_dir) if kind == "openai" else None
        try:
            for split in _splits(cfg):
                rows = _read_rows(data, split, cfg.limit)
                texts: dict[int, str] = {}
                keyed: dict[str, list[_Row]] = {}  # rows with identical question and solution share a key
                answers: dict[str, str] = {}
                for row in rows:
                    answer = final_answer(row.solution)
                    if answer is None:
                        failures.append(
                            recorded.get((split, row.id))
                            or Failure(id=row.id, split=split, reason="no_source_answer", attempts=0)
                        )
                    elif kind == "rule":
                        text = rule.rewrite(row.solution)
                        problems = reply_problems(text, answer)
                        if problems:
                            failures.append(Failure(id=row.id, split=split, reason=problems[0], attempts=1))
                        else:
                            texts[row.index] = text
                    else:
                        key = _key(cfg, prompts, row)  # type: ignore[arg-type]
                        keyed.setdefault(key, []).append(row)
                        answers[key] = answer
                if cache is not None:
                    valid = _cached_valid(cache, answers)
                    for key, same in keyed.items():
                        for row in same:
                            if key in valid:
                                texts[row.index] = valid[key]
                            else:
                                failures.append(
                                    recorded.get((split, row.id))
                                    or Failure(id=row.id, split=split, reason="not_attempted", attempts=0)
                                )
                _write_split(data, out, split, rows, texts, model_name, prompt_version)
                record.add_file(f"{split}.parquet", rows=len(texts))
                per_split[split] = {"items": len(rows), "written": len(texts), "failed": len(rows) - len(texts)}
        finally:
            if cache is not None:
                cache.close()

        # ------------------------------------------------------------------------------ report
        items = sum(s["items"] for s in per_split.values())
        written = sum(s["written"] for s in per_split.values())
        by_reason = Counter(f.reason for f in failures)
        totals = {
            name: sum(getattr(r, name) for r in results)
            for name in ("cache_hits", "api_calls", "retries", "prompt_tokens", "completion_tokens")
        }
        if started_at is not None:
            elapsed = time.time() - started_at
        else:
            elapsed = sum(r.seconds for r in results) + time.perf_counter() - started
        report = {
            "teacher": kind,
            "model": model_name,
            "host": endpoint_host(cfg.base_url) if kind == "openai" else None,
            "prompt_version": prompt_version,
            "items": items,
            "written": written,
            "failed": len(failures),
            **totals,
            "seconds": round(elapsed, 3),
            "failures_by_reason": dict(by_reason.most_common()),
            "splits": per_split,
        }
        lines = "".join(f.model_dump_json() + "\n" for f in failures)
        atomic_write_text(out / FAILURES_FILE, lines)
        atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2) + "\n")
        record.add_file(FAILURES_FILE, rows=len(failures))
        record.add_file(REPORT_FILE)
        record.count(items=items, written=written, failed=len(failures), **totals)
        record.manifest.extra.update(
            teacher=kind,
            teacher_model=model_name,
            prompt_version=prompt_version,
            failures_by_reason=report["failures_by_reason"],
            seconds=report["seconds"],
        )
        log.info(
            "teach: %d of %d items written, %d failed %s; %d API calls, %d cache hits, %d retries",
            written, items, len(failures), dict(by_reason),
            totals["api_calls"], totals["cache_hits"], totals["retries"],
        )  # fmt: skip
        if items and len(failures) > cfg.max_failed_fraction * items:
            top = ", ".join(f"{reason} ({n})" for reason, n in by_reason.most_common(3))
            raise TeacherError(
                f"{len(failures):,} / {items:,} items failed (teacher.max_failed_fraction={cfg.max_failed_fraction}); "
                f"top errors: {top}; see {out / FAILURES_FILE} and re-run to retry only those"
            )
    return record.manifest


def _write_split(
    data: Path, out: Path, split: str, rows: list[_Row], texts: dict[int, str], model_name: str, prompt_version: str
) -> None:
    """`<out>/<split>.parquet`: the written rows with the rewritten solution, the source one and provenance.

    Plain pyarrow (no `datasets` conversion cache): the schema carries the `datasets` features, so
    `load_dataset("parquet", ...)` still decodes `image` as an Image.
    """
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mathwizard.data.splits import split_file

    source = pq.read_table(split_file(data, split))
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
    table = pa.table(columns).cast(schema)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{split}.", suffix=".parquet.tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out / f"{split}.parquet")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -------------------------------------------------------------------------------------------- run
def run(cfg: TeacherConfig, data: Path, out: Path, cache_dir: Path, progress: ProgressFn | None = None) -> Manifest:
    """Rewrite the selected splits of the prepare folder `data` into `out`, all in one call.

    Args:
        cfg: teacher settings (no secrets: the API key is read from the environment or `.env` when needed).
        data: the prepare stage folder.
        out: this stage's folder.
        cache_dir: where the per-item reply cache lives (shared across runs).
        progress: called as `progress(done, total)` while items finish.

    Returns:
        The manifest, also written to `out / "manifest.json"` as the last step.

    Raises:
        DataError: `data` is not a finished prepare folder.
        ConfigError: kind=openai without an API key.
        TeacherError: the API refused the work, or more than `max_failed_fraction` of the items failed.
        TransientError: the API stayed down; re-run to resume from the cache.
    """
    data, out, cache_dir = Path(data), Path(out), Path(cache_dir)
    fp = expected_fingerprint(cfg, data)
    if (done := reusable(out, fp)) is not None:
        return done
    started_at = time.time()
    total = sum(c.stop - c.start for c in plan(cfg, data))
    finished = 0
    lock = threading.Lock()

    def advance(n: int) -> None:
        nonlocal finished
        with lock:
            finished += n
            if progress is not None:
                progress(finished, total)

    # Every split in one pass: no chunk boundaries where the request pipeline would drain.
    rows = [row for split in _splits(cfg) for row in _read_rows(data, split, cfg.limit)]
    hits, stats, failures = _run_rows(cfg, rows, cache_dir, progress=advance)
    whole = ChunkResult(
        chunk=Chunk(split=cfg.split, start=0, stop=len(rows)),
        items=len(rows),
        cache_hits=hits,
        api_calls=stats.api_calls,
        retries=stats.retries,
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        failures=failures,
    )
    return assemble(cfg, data, out, cache_dir, [whole], started_at=started_at)

"""DPO preference pairs: the teacher's solution as `chosen`, a flawed answer sampled from the SFT model as `rejected`.

Usage: `mathwizard pairs --sft <run>/03-sft --data <run>/02-teach`.

Each problem gets one of three flaws, chosen from its id and the seed; what a flawed answer must pass and the
rule-made flaws are in `mathwizard.flaws`. The flawed answers are sampled in batches (left padding, many prompts per
`generate`) with the flaw's system prompt and the `flawed_user` prompt, and every one is checked. Failures are
re-sampled up to `max_attempts` times; then either a deterministic rule writes the flaw (`fallback="rule"`, the
offline demo: a random tiny model never writes valid text) or the item is excluded. No text that failed the checks is
ever written, and the report counts how many rejected answers came from the model and how many from the rule.

Work is done in chunks of `chunk_size` items; each finished chunk is written atomically to `chunks/`, so a killed
run restarts at the first unfinished chunk. An optional `progress(done, total)` callback hears of every finished chunk,
resumed ones included, so a progress bar starts where a resumed run already is.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mathwizard.answers import format_problems
from mathwizard.config import ModelConfig, PairsConfig
from mathwizard.data.splits import read_table, split_rows, write_table
from mathwizard.errors import DataError
from mathwizard.flaws import FLAWED_STRATEGIES, choose_strategy, rejected_problems, rule_flaw
from mathwizard.generation import Generator, Request, SamplingParams, answer_budget
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
from mathwizard.prompts import fill_prompt, load_prompt, prompt_digest

log = logging.getLogger(__name__)

STAGE = "pairs"
VERSION = 1
PROMPT_VERSION = "v1"
COLUMNS = ("id", "image", "question", "chosen", "rejected", "strategy", "difficult", "source")
_INPUT_COLUMNS = ("id", "question", "solution", "image", "difficult")
_CHUNK_META = b"mathwizard_chunk"
REPORT_FILE = "report.json"
USER_PROMPT = "flawed_user"  # the user message: the problem and the chosen answer, `{question}` and `{chosen}`
# The system prompt of each flaw, then the user message; their texts are part of the fingerprint.
PROMPT_NAMES = (*(f"flawed_{s}" for s in FLAWED_STRATEGIES), USER_PROMPT)


def _prompts() -> dict[str, str]:
    return {name: load_prompt(name, PROMPT_VERSION) for name in PROMPT_NAMES}


def user_prompt(question: str, chosen: str) -> str:
    """The user message that asks for a flawed answer to `question`, showing the correct `chosen` one."""
    return fill_prompt(load_prompt(USER_PROMPT, PROMPT_VERSION), question=question, chosen=chosen)


def expected_fingerprint(cfg: PairsConfig, model_cfg: ModelConfig, model: str | Path, data: Path) -> str:
    """Settings, the sampling model's identity, the teach output's fingerprint and the prompt texts; never outputs.

    Raises:
        DataError: the teach folder is unfinished or damaged.
        ModelError: the model path does not exist.
    """
    from mathwizard.models.ref import resolve

    teach = require_manifest(Path(data), "teach")
    ref = resolve(model)
    return fingerprint(
        STAGE,
        VERSION,
        cfg,
        {teach.stage: teach.fingerprint},
        model=ref.identity(model_cfg),
        prompts=prompt_digest(*_prompts().values()),
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
    max_new_tokens: int | None = Field(description="The budget per flawed answer (None: every chunk was resumed).")
    fallback: str
    prompt_version: str
    splits: dict[str, Stats]
    resumed_chunks: int
    wall_seconds: float

    def summary(self) -> str:
        per_split = " · ".join(f"{split} {stats.written:,}" for split, stats in self.splits.items())
        return (
            f"{self.written:,} pairs ({per_split}): {self.from_model:,} rejected answers from the model,"
            f" {self.from_rule:,} from the rule fallback; {self.failed:,} excluded"
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

    def __init__(self, cfg: PairsConfig, generator_factory: Callable[[], Generator], chosen: list[str]) -> None:
        self.cfg = cfg
        self.prompts = _prompts()
        self._factory = generator_factory
        self._generator: Generator | None = None
        self._chosen = chosen  # every chosen answer of the run: sizes the token budget once, the same for each chunk
        self.max_new_tokens = cfg.max_new_tokens

    @property
    def generator(self) -> Generator:
        if self._generator is None:  # loaded only when a chunk needs work, so a finished run never loads the model
            self._generator = self._factory()
            if self.max_new_tokens is None:
                self.max_new_tokens = answer_budget(self._chosen, self._generator)
                log.info("pairs: up to %d new tokens per flawed answer", self.max_new_tokens)
        return self._generator

    def request(self, item: _Item) -> Request:
        system = self.prompts[f"flawed_{item.strategy}"]
        return Request(text=user_prompt(item.question, item.chosen), image=item.image, system=system)

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
            generator = self.generator
            params = SamplingParams(self.max_new_tokens, cfg.temperature, cfg.top_p, seed)  # type: ignore[arg-type]
            completions = generator([self.request(item) for item in pending], params)
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
    from mathwizard.launch import world_size
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
    chosen = [
        text or ""
        for split in cfg.splits
        for text in read_table(data, split, ["solution"], limit=cfg.limit).column("solution").to_pylist()  # type: ignore[union-attr]
    ]
    sampler = _Sampler(cfg, load, chosen)
    chunk_dir = out / "chunks"
    total = sum(split_rows(data, split, cfg.limit) for split in cfg.splits)
    world = world_size(model_cfg) if generator is None else 1
    # Several GPUs: the ranks sample the unfinished chunks; the loop below then finds every chunk on disk and merges.
    tally = Tally(total, progress if world == 1 else None)
    config = {"pairs": cfg, "model": model_cfg}
    with stage_output(
        out, stage=STAGE, version=VERSION, fingerprint=fp, config=config, upstream=upstream, started=started
    ) as record:
        chunk_dir.mkdir(parents=True, exist_ok=True)
        resumed_before = None
        if world > 1:
            resumed_before = _sample_on_ranks(cfg, model_cfg, model, data, out, fp, sampler, world, total, progress)
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
        if resumed_before is not None:
            resumed = resumed_before  # the chunks finished before this run; the ranks did the others
        atomic_write_text(out / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in all_failures))
        record.add_file("failures.jsonl", rows=len(all_failures))
        report = Report(
            **totals.model_dump(),
            model=ref.location,
            max_new_tokens=sampler.max_new_tokens,
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


# ---------------------------------------------------------------------------------------------- several GPUs
def _chunks(cfg: PairsConfig, data: Path) -> list[tuple[str, int, int, int]]:
    """Every chunk of the run as (split, k, offset, rows), in the order the stage merges them."""
    chunks = []
    for split in cfg.splits:
        rows = split_rows(data, split, cfg.limit)
        for k, offset in enumerate(range(0, rows, cfg.chunk_size)):
            chunks.append((split, k, offset, min(cfg.chunk_size, rows - offset)))
    return chunks


def _sample_on_ranks(
    cfg: PairsConfig,
    model_cfg: ModelConfig,
    model: str | Path,
    data: Path,
    out: Path,
    fp: str,
    sampler: _Sampler,
    world: int,
    total: int,
    progress: Progress | None,
) -> int:
    """Sample the unfinished chunks on `world` processes (`mathwizard.launch`), each rank every world-th of them, so
    each chunk is sampled exactly as one process would (its seed is the chunk's own); returns how many chunks were
    already finished."""
    from mathwizard.launch import launch

    chunk_dir = out / "chunks"
    pending, finished_rows = [], 0
    chunks = _chunks(cfg, data)
    for split, k, _, rows in chunks:
        if _read_chunk(chunk_dir / f"{split}-{k:05d}.parquet", fp) is None:
            pending.append([split, k])
        else:
            finished_rows += rows
    if progress is not None:
        progress(finished_rows, total)
    if pending:
        kwargs = {
            "cfg": cfg.model_dump(mode="json"),
            "model_cfg": model_cfg.model_dump(mode="json"),
            "model": str(model),
            "data": str(data),
            "out": str(out),
            "fp": fp,
            "chunks": pending,
        }

        def shifted(done: int, _total: int, /, **metrics: float) -> None:
            if progress is not None:
                progress(finished_rows + done, total, **metrics)

        result = launch(
            f"{__name__}:_sample_shard",
            kwargs,
            nprocs=min(world, len(pending)),
            workdir=out,
            description=STAGE,
            progress=shifted,
            progress_from="sum",
            total=total - finished_rows,
        )
        sampler.max_new_tokens = (result or {}).get("max_new_tokens") or sampler.max_new_tokens
    return len(chunks) - len(pending)


def _sample_shard(
    cfg: dict[str, Any],
    model_cfg: dict[str, Any],
    model: str,
    data: str,
    out: str,
    fp: str,
    chunks: list[list[Any]],
    progress: Progress,
) -> dict[str, Any]:
    """One rank of a launch: sample and write its share of `chunks` (every world-th, from its rank on)."""
    from mathwizard.launch import current_world_size, rank
    from mathwizard.models.ref import resolve

    settings, loading = PairsConfig.model_validate(cfg), ModelConfig.model_validate(model_cfg)
    ref = resolve(model)
    chosen = [
        text or ""
        for split in settings.splits
        for text in read_table(data, split, ["solution"], limit=settings.limit).column("solution").to_pylist()  # type: ignore[union-attr]
    ]
    sampler = _Sampler(settings, lambda: ref.generator(loading, settings.batch_size), chosen)
    mine = chunks[rank() :: current_world_size()]
    tally = Tally(0, progress)
    tables: dict[str, Any] = {}
    for split, k in mine:
        if split not in tables:
            tables[split] = read_table(data, split, _INPUT_COLUMNS, limit=settings.limit)
        offset = k * settings.chunk_size
        items = _items(tables[split].slice(offset, settings.chunk_size), offset, settings.seed)
        rows, failures, stats = sampler.chunk(items, f"{split}-{k}")
        meta = {"fingerprint": fp, "split": split, "chunk": k, "stats": stats.model_dump(), "failures": failures}
        _write_chunk(Path(out) / "chunks" / f"{split}-{k:05d}.parquet", rows, meta)
        log.info("%s chunk %d: %d/%d written (%d by rule)", split, k, stats.written, stats.items, stats.from_rule)
        tally(stats.items)
    return {"max_new_tokens": sampler.max_new_tokens}

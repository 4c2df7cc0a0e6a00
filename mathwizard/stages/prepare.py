"""Prepare MM_Math: fetch (Hub, local files or the bundled sample), clean with a quarantine, split stably.

Usage: `mathwizard prepare --source sample` (library: `prepare.run(settings.prepare, Path("out/01-prepare"))`).
`run` is the stage. Inside it, fetch and clean write `raw/` and `clean/` with manifests of their own, so a stage
that failed after cleaning 6,000 figures resumes at the split instead of cleaning them again.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from mathwizard.config import SPLITS, PrepareConfig
from mathwizard.data import clean as cleaning
from mathwizard.data import fetch as fetching
from mathwizard.data.splits import SPLIT_FILES, arrow_schema, split_of
from mathwizard.errors import ConfigError, DataError
from mathwizard.manifest import Manifest, StageReport, fingerprint, require_manifest, reusable, stage_output

log = logging.getLogger(__name__)

STAGE = "prepare"
VERSION = 2  # bump when output semantics change; part of every fingerprint below
RAW_DIR, CLEAN_DIR = "raw", "clean"
CLEAN_FILE, QUARANTINE_FILE = "clean.parquet", "quarantine.jsonl"


class FetchReport(StageReport):
    """Where the fetch step put the records and the figures (`raw/manifest.json`)."""

    source: str
    records_file: str = Field(description="The records file, relative to raw/.")
    images_root: str = Field(description="The image folder: relative to raw/, or absolute when used in place.")
    layout: dict[str, str]
    resolved_revision: str | None = None
    skipped_archive_members: int = 0


class CleanReport(StageReport):
    """What the clean step kept and why it quarantined the rest (`clean/manifest.json`)."""

    rows_in: int
    kept: int
    quarantined: int
    resized: int
    quarantine_reasons: dict[str, int]
    workers: int
    rows_per_second: float


class Report(StageReport):
    """The prepared dataset: where it came from, what was kept, how it was split."""

    source: str
    resolved_revision: str | None
    rows_in: int
    kept: int
    quarantined: int
    resized: int
    quarantine_reasons: dict[str, int]
    splits: dict[str, int]
    workers: int

    def summary(self) -> str:
        splits = " · ".join(f"{name} {n:,}" for name, n in self.splits.items())
        return f"{self.kept:,} of {self.rows_in:,} rows kept ({splits}), {self.quarantined:,} quarantined"


# ------------------------------------------------------------------------------------------ fingerprints
def _fetch_config(cfg: PrepareConfig) -> dict[str, Any]:
    if cfg.source == "local":
        return {"source": "local", "jsonl": cfg.jsonl, "images": cfg.images}
    if cfg.source == "hub":
        return {"source": "hub", "hub_repo": cfg.hub_repo, "hub_revision": cfg.hub_revision}
    return {"source": "sample"}


def _clean_config(cfg: PrepareConfig) -> dict[str, Any]:
    # `workers` changes speed, not output, so it is left out of the key.
    return {
        "max_image_size": cfg.max_image_size,
        "max_image_pixels": cfg.max_image_pixels,
        "max_question_chars": cfg.max_question_chars,
        "max_solution_chars": cfg.max_solution_chars,
        "limit": cfg.limit,
        "split_salt": cfg.split_salt,
    }


def fetch_fingerprint(cfg: PrepareConfig) -> str:
    """Identity of the fetched input: sample = package data content; local = files' size/mtime; hub = commit."""
    if cfg.source == "sample":
        inputs = fetching.sample_fingerprint()
    elif cfg.source == "local":
        records, images = fetching.check_local_paths(cfg.jsonl, cfg.images)
        inputs = fetching.files_fingerprint(records, *([images] if images else []))
    else:
        inputs = fetching.hub_revision(cfg.hub_repo, cfg.hub_revision)
    return fingerprint(f"{STAGE}.fetch", VERSION, _fetch_config(cfg), inputs=inputs)


def clean_fingerprint(cfg: PrepareConfig, fetch_fp: str) -> str:
    return fingerprint(f"{STAGE}.clean", VERSION, _clean_config(cfg), fetch=fetch_fp)


def split_fingerprint(cfg: PrepareConfig, clean_fp: str) -> str:
    return fingerprint(STAGE, VERSION, {"splits": list(cfg.splits)}, clean=clean_fp)


def expected_fingerprint(cfg: PrepareConfig) -> str:
    """The stage's fingerprint from settings and input identities alone (no output is read).

    Raises:
        DataError: local files missing.
    """
    return split_fingerprint(cfg, clean_fingerprint(cfg, fetch_fingerprint(cfg)))


def _check_source(cfg: PrepareConfig) -> None:
    """Fail fast, in one line, on a source that cannot be fetched here.

    Raises:
        DataError: local files missing, the bundled sample missing, or the Hub unreachable by configuration.
    """
    if cfg.source == "local":
        fetching.check_local_paths(cfg.jsonl, cfg.images)
    elif cfg.source == "sample":
        if not fetching.SAMPLE_JSONL.is_file():
            raise DataError(
                f"the bundled sample {fetching.SAMPLE_JSONL} is missing; reinstall mathwizard (scripts/setup.sh)"
            )
    else:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise DataError(
                f"cannot download {cfg.hub_repo}: HF_HUB_OFFLINE is set; unset it, or {fetching.OFFLINE_HINT}"
            )


# ---------------------------------------------------------------------------------------------- steps
def _first_file_names(records: Path, n: int = 200) -> list[str]:
    names: list[str] = []
    for _, item in cleaning.read_records(records, limit=n):
        if isinstance(item, dict):
            for key in ("file_name", "image_file_name", "image"):
                if isinstance(item.get(key), str):
                    names.append(item[key])
                    break
    return names


def fetch(cfg: PrepareConfig, out: Path) -> Manifest:
    """Put the records file and the figures where `clean` finds them (`out/manifest.json` says where).

    Archives are extracted into `out/images/`; image folders (local, sample) are used in place.

    Raises:
        DataError: missing inputs, no MM_Math layout found, unreadable archive, Hub offline or unknown repo.
        TransientError: network trouble while downloading (the Prefect task retries it).
    """
    out = Path(out)
    fp = fetch_fingerprint(cfg)
    if (done := reusable(out, fp)) is not None:
        return done
    _check_source(cfg)
    resolved_revision = None
    with stage_output(out, stage=f"{STAGE}.fetch", version=VERSION, fingerprint=fp, config=_fetch_config(cfg)) as rec:
        # -- locate the records and images of the chosen source
        if cfg.source == "sample":
            layout = fetching.Layout(fetching.SAMPLE_JSONL, fetching.SAMPLE_IMAGES)
        elif cfg.source == "local":
            records, images = fetching.check_local_paths(cfg.jsonl, cfg.images)
            layout = fetching.detect_layout(records) if images is None else fetching.Layout(records, images)
        else:
            # Download the very commit the key was made from, so key and data cannot disagree.
            resolved = fetching.hub_revision(cfg.hub_repo, cfg.hub_revision)
            revision = resolved if len(resolved) == 40 else cfg.hub_revision
            resolved_revision = revision if revision and len(revision) == 40 else None
            layout = fetching.detect_layout(fetching.hub_download(cfg.hub_repo, revision, out / "hub"))
        # -- records: copied, so later edits of the source cannot change a finished run underneath
        if layout.records.resolve().is_relative_to(out.resolve()):
            records_rel = layout.records.resolve().relative_to(out.resolve()).as_posix()
        else:
            records_rel = layout.records.name
            shutil.copyfile(layout.records, out / records_rel)
        # -- images: archives extracted safely, folders used in place
        skipped = 0
        if layout.images_kind == "archive":
            target = out / "images"
            shutil.rmtree(target, ignore_errors=True)
            skipped = fetching.extract_archive(layout.images, target)
            image_root = fetching.find_image_root(target, _first_file_names(out / records_rel))
        else:
            image_root = fetching.find_image_root(layout.images, _first_file_names(out / records_rel))
        if image_root.resolve().is_relative_to(out.resolve()):
            images_ref = image_root.resolve().relative_to(out.resolve()).as_posix()
        else:
            images_ref = str(image_root.resolve())
        rec.add_file(records_rel)
        rec.report(
            FetchReport(
                source=cfg.source,
                records_file=records_rel,
                images_root=images_ref,
                layout={"records": layout.records.name, "images": layout.images.name, "kind": layout.images_kind},
                resolved_revision=resolved_revision,
                skipped_archive_members=skipped,
            )
        )
        log.info("fetched %s: records %s, images %s", cfg.source, records_rel, images_ref)
    return rec.manifest


def clean(cfg: PrepareConfig, raw: Path, out: Path) -> Manifest:
    """Validate rows and figures of the fetched copy in `raw`; write `clean.parquet` and `quarantine.jsonl`.

    Raises:
        DataError: `raw` is not a finished fetch, or no row survived (see the quarantine file for why).
    """
    raw, out = Path(raw), Path(out)
    fetched = require_manifest(raw, STAGE)
    fp = clean_fingerprint(cfg, fetched.fingerprint)
    if (done := reusable(out, fp)) is not None:
        return done
    where = FetchReport.of(fetched)
    records = raw / where.records_file
    images = Path(where.images_root)
    images = images if images.is_absolute() else raw / images
    workers = cfg.workers or cleaning.default_workers()
    with stage_output(
        out,
        stage=f"{STAGE}.clean",
        version=VERSION,
        fingerprint=fp,
        config=_clean_config(cfg),
        upstream={f"{STAGE}.fetch": fetched.fingerprint},
    ) as rec:
        started = time.perf_counter()
        report = cleaning.clean_dataset(
            records, images, out / CLEAN_FILE, out / QUARANTINE_FILE,
            salt=cfg.split_salt, max_size=cfg.max_image_size, max_pixels=cfg.max_image_pixels,
            limit=cfg.limit, workers=workers, max_question_chars=cfg.max_question_chars,
            max_solution_chars=cfg.max_solution_chars,
        )  # fmt: skip
        if report.kept == 0:
            raise DataError(
                f"no usable rows in {records}: all {report.rows_in} were quarantined {report.by_reason}; "
                f"see {out / QUARANTINE_FILE}"
            )
        rec.add_file(CLEAN_FILE, rows=report.kept)
        rec.add_file(QUARANTINE_FILE, rows=report.quarantined)
        seconds = time.perf_counter() - started
        rec.report(
            CleanReport(
                rows_in=report.rows_in,
                kept=report.kept,
                quarantined=report.quarantined,
                resized=report.resized,
                quarantine_reasons=dict(sorted((report.by_reason or {}).items())),
                workers=workers,
                rows_per_second=round(report.rows_in / max(seconds, 1e-9), 1),
            )
        )
    return rec.manifest


def _split(cfg: PrepareConfig, clean_dir: Path, out: Path) -> dict[str, int]:
    """Route each clean row to train/val/test by its id into the stage's split files; returns the row counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema()
    counts = dict.fromkeys(SPLITS, 0)
    writers = {s: pq.ParquetWriter(out / SPLIT_FILES[s], schema) for s in SPLITS}
    try:
        for batch in pq.ParquetFile(clean_dir / CLEAN_FILE).iter_batches(batch_size=128):
            routed: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
            for row in batch.to_pylist():
                routed[split_of(row["id"], cfg.splits)].append(row)
            for name, rows in routed.items():
                if rows:
                    writers[name].write_table(pa.Table.from_pylist(rows, schema=schema))
                    counts[name] += len(rows)
    finally:
        for writer in writers.values():
            writer.close()
    shutil.copyfile(clean_dir / QUARANTINE_FILE, out / QUARANTINE_FILE)
    return counts


def run(cfg: PrepareConfig, out: Path) -> Manifest:
    """Fetch, clean and split MM_Math into `out` (the `01-prepare` folder); skip what is already done.

    Args:
        cfg: the prepare settings (source, image limits, split fractions and salt).
        out: the stage folder; `raw/` and `clean/` inside it hold the intermediate steps.

    Returns:
        The stage manifest, also written to `out/manifest.json` as the last step; its report is a `Report`.

    Raises:
        DataError: missing or unusable inputs (the message names the path or flag).
        ConfigError: settings that cannot work together.
        TransientError: network trouble while downloading from the Hub.
    """
    started = time.perf_counter()
    out = Path(out)
    if not isinstance(cfg, PrepareConfig):
        raise ConfigError(f"prepare.run needs a PrepareConfig, got {type(cfg).__name__}")
    fp = expected_fingerprint(cfg)
    if (done := reusable(out, fp)) is not None:
        return done
    _check_source(cfg)
    with stage_output(out, stage=STAGE, version=VERSION, fingerprint=fp, config=cfg, started=started) as rec:
        fetched = fetch(cfg, out / RAW_DIR)
        cleaned = CleanReport.of(clean(cfg, out / RAW_DIR, out / CLEAN_DIR))
        counts = _split(cfg, out / CLEAN_DIR, out)
        for name in SPLITS:
            rec.add_file(SPLIT_FILES[name], rows=counts[name])
        rec.add_file(QUARANTINE_FILE, rows=cleaned.quarantined)
        rec.report(
            Report(
                source=cfg.source,
                resolved_revision=FetchReport.of(fetched).resolved_revision,
                rows_in=cleaned.rows_in,
                kept=cleaned.kept,
                quarantined=cleaned.quarantined,
                resized=cleaned.resized,
                quarantine_reasons=cleaned.quarantine_reasons,
                splits=counts,
                workers=cleaned.workers,
            )
        )
    log.info("prepared %s: %s", out, counts)
    return rec.manifest

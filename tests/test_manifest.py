"""Manifests are the commit marker: written last, only on success; `reusable` alone decides whether a stage runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import Field, ValidationError

from mathwizard.errors import DataError
from mathwizard.manifest import (
    MANIFEST_FORMAT,
    MIRROR_MARK,
    Manifest,
    StageReport,
    damage,
    fingerprint,
    read_manifest,
    require_manifest,
    reusable,
    stable_hash,
    stage_output,
)


class Counted(StageReport):
    rows: int
    by_reason: dict[str, int] = Field(default_factory=dict)

    def summary(self) -> str:
        return f"{self.rows} rows"


def finished(folder: Path, fp: str = "fp1", payload: bytes = b'{"loss": 1}\n') -> Manifest:
    """A finished stage folder with one output file (its size recorded) and a typed report."""
    with stage_output(folder, stage="sft", version=1, fingerprint=fp, config={"a": 1}) as record:
        (folder / "metrics.jsonl").write_bytes(payload)
        record.add_file("metrics.jsonl", rows=1)
        record.report(Counted(rows=1, by_reason={"x": 2}))
    return record.manifest


# ------------------------------------------------------------------------------------------ fingerprints
def test_fingerprint_changes_with_config_upstream_and_version() -> None:
    base = fingerprint("sft", 1, {"lr": 1e-4, "steps": 3}, {"teach": "abc"})
    assert base == fingerprint("sft", 1, {"steps": 3, "lr": 1e-4}, {"teach": "abc"})  # key order irrelevant
    assert base != fingerprint("sft", 2, {"lr": 1e-4, "steps": 3}, {"teach": "abc"})
    assert base != fingerprint("sft", 1, {"lr": 2e-4, "steps": 3}, {"teach": "abc"})
    assert base != fingerprint("sft", 1, {"lr": 1e-4, "steps": 3}, {"teach": "abd"})
    assert base != fingerprint("sft", 1, {"lr": 1e-4, "steps": 3}, {"teach": "abc"}, model="tiny")  # inputs count
    assert stable_hash((1, 2)) == stable_hash([1, 2])


def test_the_manifest_format_is_part_of_every_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    import mathwizard.manifest as manifest

    before = fingerprint("sft", 1, {"lr": 1e-4}, {"teach": "abc"})
    assert before == stable_hash(MANIFEST_FORMAT, "sft", 1, {"lr": 1e-4}, {"teach": "abc"}, {})
    monkeypatch.setattr(manifest, "MANIFEST_FORMAT", MANIFEST_FORMAT + 1)
    assert fingerprint("sft", 1, {"lr": 1e-4}, {"teach": "abc"}) != before  # a new layout redoes every folder


# ------------------------------------------------------------------------------------------ stage_output
def test_manifest_written_last_and_reused(tmp_path: Path) -> None:
    out = tmp_path / "03-sft"
    with stage_output(out, stage="sft", version=1, fingerprint="fp1", config={"a": 1}) as record:
        assert read_manifest(out) is None  # nothing looks finished while the body runs
        (out / "metrics.jsonl").write_text('{"loss": 1}\n')
        record.add_file("metrics.jsonl", rows=1)
        record.report(Counted(rows=1))
    manifest = reusable(out, "fp1")
    assert manifest is not None and manifest.files["metrics.jsonl"].rows == 1
    assert manifest.files["metrics.jsonl"].bytes == len('{"loss": 1}\n')
    assert manifest.report == {"rows": 1, "by_reason": {}}
    assert manifest.config == {"a": 1} and manifest.stage == "sft" and manifest.version == 1
    assert manifest.env["python"] and manifest.seconds >= 0
    assert reusable(out, "other") is None


def test_seconds_count_from_the_stage_start_when_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mathwizard.manifest as manifest

    clock = iter([100.0, 107.5])  # stage_output reads the clock when it starts, then when the body ends
    monkeypatch.setattr(manifest.time, "perf_counter", lambda: next(clock))
    with stage_output(tmp_path / "a", stage="s", version=1, fingerprint="f"):
        pass
    assert read_manifest(tmp_path / "a").seconds == 7.5
    clock = iter([112.0])  # only the end: the start is the caller's (loading inputs before the block)
    with stage_output(tmp_path / "b", stage="s", version=1, fingerprint="f", started=100.0):
        pass
    assert read_manifest(tmp_path / "b").seconds == 12.0


def test_failed_body_leaves_no_manifest_but_keeps_partial_files(tmp_path: Path) -> None:
    out = tmp_path / "stage"
    with stage_output(out, stage="s", version=1, fingerprint="fp1"):
        pass
    with pytest.raises(RuntimeError), stage_output(out, stage="s", version=1, fingerprint="fp2"):
        (out / "checkpoint").write_text("step 3")
        raise RuntimeError("killed")
    assert read_manifest(out) is None  # the old manifest was removed before the retry started
    assert (out / "checkpoint").read_text() == "step 3"  # resume state survives


def test_corrupt_manifest_counts_as_missing(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    assert read_manifest(tmp_path) is None
    assert reusable(tmp_path, "fp1") is None
    with pytest.raises(DataError, match="mathwizard teach"):
        require_manifest(tmp_path, "teach")


# ------------------------------------------------------------------------------------- reusable / damage
def test_a_deleted_output_file_makes_the_stage_run_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "03-sft"
    manifest = finished(out)
    assert damage(out, manifest) is None and reusable(out, "fp1") == manifest
    (out / "metrics.jsonl").unlink()
    assert damage(out, manifest) == "metrics.jsonl is missing"
    with caplog.at_level(logging.WARNING, logger="mathwizard.manifest"):
        assert reusable(out, "fp1") is None
    assert f"{out} is damaged (metrics.jsonl is missing); running the stage again" in caplog.text


def test_a_truncated_output_file_makes_the_stage_run_again(tmp_path: Path) -> None:
    out = tmp_path / "02-teach"
    manifest = finished(out, payload=b"x" * 1500)
    (out / "metrics.jsonl").write_bytes(b"x" * 1000)  # a copy cut short
    assert damage(out, manifest) == "metrics.jsonl is 1,000 bytes, not the 1,500 recorded"
    assert reusable(out, "fp1") is None
    (out / "metrics.jsonl").write_bytes(b"y" * 1500)  # same size: the cheap check trusts it (no checksum)
    assert reusable(out, "fp1") == manifest


def test_reusable_says_why_a_stage_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "03-sft"
    with caplog.at_level(logging.DEBUG, logger="mathwizard.manifest"):
        assert reusable(out, "fp1") is None
        finished(out)
        assert reusable(out, "fp2") is None
        assert reusable(out, "fp1") is not None
    messages = [r.getMessage() for r in caplog.records if r.name == "mathwizard.manifest"]
    assert messages == [
        f"{out} has no finished output; running the stage",
        f"{out} was made from other settings or inputs; running the stage again",
        f"{out} is up to date (fingerprint fp1); skipping",
    ]


def test_a_mirror_only_folder_is_trusted_without_its_files(tmp_path: Path) -> None:
    out = tmp_path / "01-prepare"
    manifest = finished(out)
    (out / "metrics.jsonl").unlink()
    (out / MIRROR_MARK).touch()  # remote.py: the files live on the remote side
    assert damage(out, manifest) is None and reusable(out, "fp1") == manifest


def test_a_damaged_upstream_is_one_data_error_naming_the_command(tmp_path: Path) -> None:
    upstream = tmp_path / "02-teach"
    manifest = finished(upstream)
    assert require_manifest(upstream, "teach") == manifest
    (upstream / "metrics.jsonl").unlink()
    with pytest.raises(DataError) as info:
        require_manifest(upstream, "teach")
    message = str(info.value)
    assert message == f"{upstream} is damaged (metrics.jsonl is missing); run `mathwizard teach` again to redo it"
    assert "\n" not in message
    with pytest.raises(DataError, match=r"no manifest\.json: it is not a finished stage folder; run `mathwizard sft`"):
        require_manifest(tmp_path / "nowhere", "sft")


# ------------------------------------------------------------------------------------------------ reports
def test_report_of_round_trips_a_manifest_and_its_json(tmp_path: Path) -> None:
    manifest = finished(tmp_path / "s")
    report = Counted.of(manifest)
    assert report == Counted(rows=1, by_reason={"x": 2}) and report.summary() == "1 rows"
    assert Counted.of(manifest.model_dump(mode="json")) == report  # what a flow returns
    assert Counted.of(json.loads((tmp_path / "s" / "manifest.json").read_text())) == report  # what is on disk
    assert Counted.of(read_manifest(tmp_path / "s")) == report


def test_a_report_refuses_unknown_or_missing_fields() -> None:
    with pytest.raises(ValidationError, match="extra_field"):
        Counted.of({"report": {"rows": 1, "extra_field": 2}})
    with pytest.raises(ValidationError, match="rows"):
        Counted.of({"report": {}})  # e.g. a manifest written before reports existed


def test_report_of_picks_the_stage_modules_report() -> None:
    from mathwizard.stages import dpo, evaluate, pairs, prepare, publish, report_of, sft, stage_module, teach

    modules = {"prepare": prepare, "teach": teach, "sft": sft, "pairs": pairs, "dpo": dpo, "eval": evaluate}
    modules["publish"] = publish
    assert {stage: stage_module(stage) for stage in modules} == modules
    report = {"destination": "local", "endpoint": None, "root": "/r", "repos": []}
    assert report_of("publish", {"report": report}) == publish.Report(**report)
    summary = report_of("publish", {"report": report}).summary()
    assert summary == "0 repos written under /r (not uploaded: publish.push is false)"

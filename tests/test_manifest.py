"""Manifests are the commit marker: written last, only on success, and the fingerprint decides skipping."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathwizard.errors import DataError, TransientError, is_transient
from mathwizard.manifest import (
    fingerprint,
    read_manifest,
    require_manifest,
    reusable,
    stable_hash,
    stage_output,
)


def test_fingerprint_changes_with_config_upstream_and_version() -> None:
    base = fingerprint("sft", 1, {"lr": 1e-4, "steps": 3}, {"teach": "abc"})
    assert base == fingerprint("sft", 1, {"steps": 3, "lr": 1e-4}, {"teach": "abc"})  # key order irrelevant
    assert base != fingerprint("sft", 2, {"lr": 1e-4, "steps": 3}, {"teach": "abc"})
    assert base != fingerprint("sft", 1, {"lr": 2e-4, "steps": 3}, {"teach": "abc"})
    assert base != fingerprint("sft", 1, {"lr": 1e-4, "steps": 3}, {"teach": "abd"})
    assert stable_hash((1, 2)) == stable_hash([1, 2])


def test_manifest_written_last_and_reused(tmp_path: Path) -> None:
    out = tmp_path / "03-sft"
    with stage_output(out, stage="sft", version=1, fingerprint="fp1", config={"a": 1}) as record:
        assert read_manifest(out) is None  # nothing looks finished while the body runs
        (out / "metrics.jsonl").write_text('{"loss": 1}\n')
        record.add_file("metrics.jsonl", rows=1)
        record.count(rows=1)
    manifest = reusable(out, "fp1")
    assert manifest is not None and manifest.files["metrics.jsonl"].rows == 1 and manifest.counts == {"rows": 1}
    assert manifest.env["python"] and manifest.seconds >= 0
    assert reusable(out, "other") is None


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
    with pytest.raises(DataError, match="mathwizard teach"):
        require_manifest(tmp_path, "teach")


def test_transient_errors() -> None:
    assert is_transient(TransientError("503"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(DataError("bad"))
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(ValueError("bug"))

"""What a run recorded, as the cards read it: failure records grouped by reason, its manifests and reports."""

from __future__ import annotations

import json
from pathlib import Path

from mathwizard.publish.lineage import RunInfo, failure_summary
from tests.publish.synthetic import BASE_MODEL, MM_MATH_COMMIT


def test_failure_summary_groups_reasons(tmp_path: Path) -> None:
    path = tmp_path / "failures.jsonl"
    lines = [
        {"error": {"message": "HTTP 429", "count": 2}},
        {"error": "format:   no \\boxed{}"},
        {"reason": "format: no \\boxed{}"},
        {"id": "x"},
        "not json",
    ]
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n")
    total, reasons = failure_summary(path)
    assert total == 5  # the blank line is not a record
    assert reasons == [("format: no \\boxed{}", 2), ("HTTP 429", 1), ("unspecified", 1)]


def test_run_info_reads_every_stage_and_eval(run_dir: Path) -> None:
    info = RunInfo.read(run_dir)
    assert {stage: m.stage for stage, m in info.manifests.items()} == {
        "prepare": "prepare",
        "teach": "teach",
        "sft": "sft",
        "pairs": "pairs",
        "dpo": "dpo",
    }
    assert sorted(info.evals) == ["base", "dpo", "sft"] and info.evals["dpo"].accuracy == 0.5
    assert info.report("teach")["written"] == 10 and info.report("sft")["base_model"] == BASE_MODEL
    assert info.source() == {"kind": "hub", "repo": "THU-KEG/MM_Math", "revision": MM_MATH_COMMIT}
    assert (info.base_model(), info.backend(), info.dpo_start()) == (BASE_MODEL, "hf", "03-sft/adapter")
    upstream = info.upstream()
    assert set(upstream) == {"prepare", "teach", "sft", "pairs", "dpo", "eval-base", "eval-sft", "eval-dpo"}
    assert upstream["pairs"] == json.loads((run_dir / "04-pairs" / "manifest.json").read_text())["fingerprint"]


def test_a_stage_that_did_not_run_reads_as_empty(run_dir: Path) -> None:
    (run_dir / "04-pairs" / "manifest.json").unlink()
    info = RunInfo.read(run_dir)
    assert info.manifests["pairs"] is None and info.report("pairs") == {} and info.config("pairs") == {}
    assert "pairs" not in info.upstream()

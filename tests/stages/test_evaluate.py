"""Evaluation: boxed-answer scoring, accuracy by difficulty, format rate, the combined table, skipping and redoing
by manifest, progress, and a run of the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mathwizard.config import EvalConfig, ModelConfig
from mathwizard.errors import DataError, ModelError
from mathwizard.generation import Completion
from mathwizard.manifest import read_manifest
from mathwizard.prompts import load_prompt
from mathwizard.stages import evaluate
from mathwizard.stages.evaluate import Report, Score, evaluation_table, markdown_table, score, summarize
from tests.stages.eval_data import ITEMS, FakeGenerator, make_data

MODEL = ModelConfig()


# ------------------------------------------------------------------------------------------ scoring
def test_scoring_extracts_nested_answers_and_normalises() -> None:
    rows = {i: score(i, d, ref, Completion(out, 1)) for i, (d, ref, out) in ITEMS.items()}
    assert rows["e1"]["correct"] and rows["e1"]["format_ok"]
    assert rows["e2"]["predicted"] == "\\dfrac{\\sqrt{3}}{2}" and rows["e2"]["correct"]
    assert not rows["m1"]["correct"] and rows["m1"]["format_ok"]
    assert rows["m2"]["correct"] and not rows["m2"]["format_ok"]
    assert rows["m2"]["format_problems"] == ["missing_solution_header", "missing_final_answer_header"]
    assert rows["h1"]["predicted"] is None and not rows["h1"]["correct"]
    assert rows["h2"]["reference"] is None


def test_summary_arithmetic_by_difficulty() -> None:
    rows = [score(i, d, ref, Completion(out, 3)) for i, (d, ref, out) in ITEMS.items()]
    report = summarize(rows)
    # h2 has no reference: 5 scored. Correct: e1, e2, m2 -> 3/5. Formatted: e1, e2, m1 -> 3/5.
    assert (report["n"], report["accuracy"], report["format_rate"]) == (5, 0.6, 0.6)
    assert report["by_difficulty"] == {
        "easy": Score(n=2, accuracy=1.0),  # e1, e2
        "medium": Score(n=2, accuracy=0.5),  # m2 of m1, m2
        "hard": Score(n=1, accuracy=0.0),  # h1
    }
    assert list(report["by_difficulty"]) == ["easy", "medium", "hard"]  # natural order, not alphabetical
    assert report["generated_tokens"] == 5 * 3
    assert summarize([])["accuracy"] == 0.0 and summarize([])["by_difficulty"] == {}


# ---------------------------------------------------------------------------------------------- run
def test_run_writes_report_predictions_and_table(tmp_path: Path) -> None:
    data = make_data(tmp_path / "02-teach")
    fake = FakeGenerator()
    out = tmp_path / "06-eval" / "sft"
    manifest = evaluate.run(EvalConfig(batch_size=4), MODEL, "tiny", data, out, "sft", generator=fake)
    report = json.loads((out / "report.json").read_text())
    assert (report["label"], report["n"], report["accuracy"], report["format_rate"]) == ("sft", 5, 0.6, 0.6)
    assert report["model_location"] == "tiny" and report["generated_tokens"] > 0
    assert (report["items"], report["no_reference"], report["split"]) == (6, 1, "test")
    # 6 problems in slices of batch_size 4 -> 2 generate calls, greedy, with the tutor's instruction and the image.
    assert [len(requests) for requests, _ in fake.calls] == [4, 2]
    params = fake.calls[0][1]
    assert (params.greedy, params.max_new_tokens) == (True, 1024)
    first = fake.calls[0][0][0]
    assert first.system == load_prompt("tutor_system") and first.image["bytes"][:4] == b"\x89PNG"
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == list(ITEMS)
    assert predictions[1]["predicted"] == "\\dfrac{\\sqrt{3}}{2}" and predictions[1]["correct"] is True
    table = (out / "table.md").read_text()
    assert "| sft | 5 | 60.0% |  | 60.0% | 100.0% (n=2) | 50.0% (n=2) | 0.0% (n=1) |" in table
    typed = Report.of(manifest)
    assert typed == evaluate.load_report(out) and (typed.label, typed.n, typed.items) == ("sft", 5, 6)
    assert typed.summary() == "accuracy 60.0% on 5 problems, format 60.0% (easy 100.0% · medium 50.0% · hard 0.0%)"
    assert set(manifest.files) == {"predictions.jsonl", "report.json", "table.md"}
    assert manifest.files["predictions.jsonl"].rows == 6 and manifest.upstream == {"teach": "teach-02-teach"}
    # Same inputs: skipped without generating. Another label: a new evaluation.
    same = evaluate.run(EvalConfig(batch_size=4), MODEL, "tiny", data, out, "sft", generator=FakeGenerator({}))
    assert same == manifest
    assert evaluate.expected_fingerprint(EvalConfig(), MODEL, "tiny", data, "dpo") != manifest.fingerprint


def test_run_on_a_prepare_folder_with_limit(tmp_path: Path) -> None:
    data = make_data(tmp_path / "01-prepare", split_file="test-00000-of-00001.parquet")
    out = tmp_path / "eval"
    evaluate.run(EvalConfig(limit=2), MODEL, "tiny", data, out, "base", generator=FakeGenerator())
    report = json.loads((out / "report.json").read_text())
    assert (report["n"], report["accuracy"]) == (2, 1.0)  # e1, e2 only
    assert Report.of(read_manifest(out)).items == 2


def test_progress_counts_every_problem_per_batch(tmp_path: Path) -> None:
    data = make_data(tmp_path / "02-teach")
    cfg = EvalConfig(batch_size=4)
    fake = FakeGenerator()
    seen: list[tuple[int, int, int]] = []  # (problems done, total, generate calls made so far)
    out = tmp_path / "sft"
    evaluate.run(
        cfg, MODEL, "tiny", data, out, "sft", generator=fake, progress=lambda d, t: seen.append((d, t, len(fake.calls)))
    )
    # 6 problems in batches of 4: 4 done after the 1st generate call, 6 after the 2nd; the total is known at once.
    assert seen == [(4, 6, 1), (6, 6, 2)]
    calls: list[tuple[int, int]] = []
    evaluate.run(cfg, MODEL, "tiny", data, out, "sft", generator=FakeGenerator({}), progress=lambda *a: calls.append(a))
    assert calls == []  # already done: nothing to report (and the flow's progress artifact is never created)
    limited = EvalConfig(batch_size=4, limit=2)
    out = tmp_path / "limited"
    evaluate.run(
        limited, MODEL, "tiny", data, out, "sft", generator=FakeGenerator(), progress=lambda *a: calls.append(a)
    )
    assert calls == [(2, 2)]  # e1, e2 in one batch: the limit is the total


def test_bad_data_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `mathwizard teach` first"):
        evaluate.run(EvalConfig(), MODEL, "tiny", tmp_path / "none", tmp_path / "out", "sft", generator=FakeGenerator())
    empty = make_data(tmp_path / "empty", items={})
    with pytest.raises(DataError, match="test split has no rows"):
        evaluate.run(EvalConfig(), MODEL, "tiny", empty, tmp_path / "out", "sft", generator=FakeGenerator())
    with pytest.raises(DataError, match=r"no val\.parquet"):
        evaluate.run(EvalConfig(split="val"), MODEL, "tiny", empty, tmp_path / "out", "sft", generator=FakeGenerator())
    with pytest.raises(ModelError, match=r"model path .*03-sft does not exist"):
        evaluate.run(
            EvalConfig(), MODEL, tmp_path / "03-sft", empty, tmp_path / "out", "sft", generator=FakeGenerator()
        )
    assert not (tmp_path / "out").exists()  # every refusal came before anything was written


def test_a_damaged_input_or_output_is_caught(tmp_path: Path) -> None:
    data = make_data(tmp_path / "02-teach")
    out = tmp_path / "06-eval" / "sft"
    first = evaluate.run(EvalConfig(), MODEL, "tiny", data, out, "sft", generator=FakeGenerator())
    (out / "predictions.jsonl").write_text("")  # emptied: the stage runs again
    fake = FakeGenerator()
    again = evaluate.run(EvalConfig(), MODEL, "tiny", data, out, "sft", generator=fake)
    assert len(fake.calls) == 1 and again.files["predictions.jsonl"] == first.files["predictions.jsonl"]

    damaged = tmp_path / "damaged"
    shutil.copytree(data, damaged)
    (damaged / "test.parquet").unlink()
    with pytest.raises(DataError) as info:
        evaluate.run(EvalConfig(), MODEL, "tiny", damaged, tmp_path / "x", "sft", generator=FakeGenerator())
    assert str(info.value) == f"{damaged} is damaged (test.parquet is missing); run `mathwizard teach` again to redo it"


def test_a_stage_folder_is_evaluated_by_its_adapter_and_fingerprint(tmp_path: Path) -> None:
    from mathwizard.manifest import stage_output
    from mathwizard.models import write_adapter_pointer

    data = make_data(tmp_path / "02-teach")
    sft = tmp_path / "03-sft"
    with stage_output(sft, stage="sft", version=1, fingerprint="s" * 64) as record:
        (sft / "adapter").mkdir()
        (sft / "adapter" / "adapter_config.json").write_text("{}")
        write_adapter_pointer(sft / "adapter", "tiny", "hf")
        record.add_file("adapter/adapter_config.json")
    manifest = evaluate.run(EvalConfig(), MODEL, sft, data, tmp_path / "out", "sft", generator=FakeGenerator())
    assert manifest.upstream == {"teach": "teach-02-teach", "sft": "s" * 64}
    assert Report.of(manifest).model_location == str((sft / "adapter").resolve())


# ------------------------------------------------------------------------------------------- tables
def _report(folder: Path, accuracy: float, easy: float) -> Path:
    folder.mkdir(parents=True)
    report = Report(
        label=folder.name,
        n=10,
        accuracy=accuracy,
        format_rate=0.9,
        by_difficulty={"easy": Score(n=4, accuracy=easy), "hard": Score(n=6, accuracy=0.5)},
        generated_tokens=100,
        max_new_tokens=64,
        split="test",
        items=10,
        no_reference=0,
        seconds=1.0,
        model_location="tiny",
    )
    (folder / "report.json").write_text(report.model_dump_json())
    return folder


def test_combined_table_shows_whether_each_stage_helped(tmp_path: Path) -> None:
    folders = {
        "base": _report(tmp_path / "base", 0.2, 0.25),
        "sft": _report(tmp_path / "sft", 0.5, 0.5),
        "dpo": tmp_path / "dpo",  # not evaluated (yet): left out
    }
    table = evaluation_table(folders)
    lines = table.splitlines()
    assert lines[0] == "| model | n | accuracy | Δ accuracy | format | easy | hard |"
    assert lines[2] == "| base | 10 | 20.0% |  | 90.0% | 25.0% (n=4) | 50.0% (n=6) |"
    assert lines[3] == "| sft | 10 | 50.0% | +30.0 pts | 90.0% | 50.0% (n=4) | 50.0% (n=6) |"  # 50 - 20
    assert len(lines) == 4
    with pytest.raises(DataError, match=r"dpo/report\.json is missing"):
        evaluation_table(folders, skip_missing=False)
    assert markdown_table({}) == ""


# ---------------------------------------------------------------------------------------- a real model
def test_the_tiny_model_end_to_end(tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    data = make_data(tmp_path / "02-teach")
    out = tmp_path / "06-eval" / "base"
    cfg = EvalConfig(limit=3, max_new_tokens=8, batch_size=2)
    seen: list[tuple[int, int]] = []
    report = Report.of(evaluate.run(cfg, MODEL, "tiny", data, out, "base", progress=lambda d, t: seen.append((d, t))))
    # A random tiny model writes no boxed answer in 8 tokens: 0 of 3 right, none formatted.
    assert (report.n, report.accuracy, report.format_rate) == (3, 0.0, 0.0)
    assert report.by_difficulty == {"easy": Score(n=2, accuracy=0.0), "medium": Score(n=1, accuracy=0.0)}
    assert 0 < report.generated_tokens <= 3 * 8
    assert report.summary() == "accuracy 0.0% on 3 problems, format 0.0% (easy 0.0% · medium 0.0%)"
    assert (out / "table.md").read_text().startswith("| model | n | accuracy |")
    assert seen == [(2, 3), (3, 3)]  # batches of 2 up to the limit of 3

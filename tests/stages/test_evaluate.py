"""Evaluation: boxed-answer scoring, accuracy by difficulty, format rate, the combined table, and a tiny-model run."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from mathwizard.config import EvalConfig
from mathwizard.errors import DataError, ModelError
from mathwizard.generation import Completion, Request, SamplingParams
from mathwizard.manifest import read_manifest, stage_output
from mathwizard.prompts import load_prompt
from mathwizard.stages import evaluate
from mathwizard.stages.evaluate import evaluation_table, markdown_table, score, summarize
from tests.cli_runner import invoke


def _solution(answer: str) -> str:
    return f"### Solution\n1. Work it out from the figure.\n### Final Answer\n\\boxed{{{answer}}}"


# id -> (difficulty, reference solution, model output). References and outputs differ only in spelling where
# they should match.
ITEMS = {
    "e1": ("easy", _solution("80^\\circ"), _solution("80°")),  # degree spellings normalise alike
    "e2": ("easy", _solution("\\frac{\\sqrt{3}}{2}"), _solution("\\dfrac{\\sqrt{3}}{2}")),  # nested braces
    "m1": ("medium", _solution("3"), _solution("4")),  # wrong
    "m2": ("medium", _solution("2\\sqrt{5}"), "The answer is \\boxed{2 \\sqrt{5}}."),  # right, but not the format
    "h1": ("hard", _solution("12"), "I think it is 12."),  # no boxed answer: wrong and unformatted
    "h2": ("hard", "The source has no boxed answer.", _solution("7")),  # no reference: not scored
}


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (seed * 40 % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_data(folder: Path, items: dict = ITEMS, split_file: str = "test.parquet") -> Path:
    """A finished teach-like (or, with the prepare file name, prepare-like) folder with a test split."""
    import datasets
    import pyarrow.parquet as pq

    features = datasets.Features(
        {k: datasets.Image() if k == "image" else datasets.Value("string") for k in _row("x", 0, "easy", "")}
    )
    rows = [_row(item_id, n, d, ref) for n, (item_id, (d, ref, _)) in enumerate(items.items())]
    with stage_output(folder, stage="teach", version=1, fingerprint=f"teach-{folder.name}") as record:
        table = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features).data.table
        pq.write_table(table, folder / split_file)
        record.add_file(split_file, rows=len(rows))
    return folder


def _row(item_id: str, n: int, difficult: str, solution: str) -> dict:
    return {
        "id": item_id,
        "question": f"[{item_id}] Find the marked quantity.",
        "solution": solution,
        "image": {"bytes": _png(n), "path": None},
        "difficult": difficult,
    }


class FakeGenerator:
    """Answers each question with the scripted output for its id; records calls, requests and parameters."""

    def __init__(self, items: dict = ITEMS) -> None:
        self.items = items
        self.calls: list[tuple[list[Request], SamplingParams]] = []

    def __call__(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        self.calls.append((list(requests), params))
        outputs = [self.items[r.text.split("]", 1)[0].lstrip("[")][2] for r in requests]
        return [Completion(text=o, tokens=len(o.split())) for o in outputs]


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
    report = summarize(rows, "sft")
    # h2 has no reference: 5 scored. Correct: e1, e2, m2 -> 3/5. Formatted: e1, e2, m1 -> 3/5.
    assert (report["model"], report["n"], report["accuracy"], report["format_rate"]) == ("sft", 5, 0.6, 0.6)
    assert report["by_difficulty"] == {
        "easy": {"n": 2, "accuracy": 1.0},  # e1, e2
        "medium": {"n": 2, "accuracy": 0.5},  # m2 of m1, m2
        "hard": {"n": 1, "accuracy": 0.0},  # h1
    }
    assert list(report["by_difficulty"]) == ["easy", "medium", "hard"]  # natural order, not alphabetical
    assert report["generated_tokens"] == 5 * 3
    assert summarize([], "base")["accuracy"] == 0.0


# ---------------------------------------------------------------------------------------------- run
def test_run_writes_report_predictions_and_table(tmp_path: Path) -> None:
    data = make_data(tmp_path / "02-teach")
    fake = FakeGenerator()
    out = tmp_path / "06-eval" / "sft"
    manifest = evaluate.run(EvalConfig(batch_size=4), "tiny", data, out, "sft", generator=fake)
    report = json.loads((out / "report.json").read_text())
    assert (report["model"], report["n"], report["accuracy"], report["format_rate"]) == ("sft", 5, 0.6, 0.6)
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
    assert manifest.counts == {"n": 5, "correct": 3, "items": 6} and manifest.extra["label"] == "sft"
    # Same inputs: skipped without generating. Another label: a new evaluation.
    assert evaluate.run(EvalConfig(batch_size=4), "tiny", data, out, "sft", generator=FakeGenerator({})) == manifest
    assert evaluate.expected_fingerprint(EvalConfig(), "tiny", data, "dpo") != manifest.fingerprint


def test_run_on_a_prepare_folder_with_limit(tmp_path: Path) -> None:
    data = make_data(tmp_path / "01-prepare", split_file="test-00000-of-00001.parquet")
    out = tmp_path / "eval"
    evaluate.run(EvalConfig(limit=2), "tiny", data, out, "base", generator=FakeGenerator())
    report = json.loads((out / "report.json").read_text())
    assert (report["n"], report["accuracy"]) == (2, 1.0)  # e1, e2 only
    assert read_manifest(out).counts["items"] == 2


def test_progress_counts_every_problem_per_batch(tmp_path: Path) -> None:
    data = make_data(tmp_path / "02-teach")
    cfg = EvalConfig(batch_size=4)
    fake = FakeGenerator()
    seen: list[tuple[int, int]] = []  # (problems reported, generate calls made so far)
    out = tmp_path / "sft"
    evaluate.run(cfg, "tiny", data, out, "sft", generator=fake, progress=lambda n: seen.append((n, len(fake.calls))))
    # 6 problems in batches of 4: 4 after the 1st generate call, 2 after the 2nd; 4 + 2 = 6 = total_items.
    assert seen == [(4, 1), (2, 2)] and evaluate.total_items(cfg, data) == 6
    counts: list[int] = []
    evaluate.run(cfg, "tiny", data, out, "sft", generator=FakeGenerator({}), progress=counts.append)
    assert counts == []  # already done: nothing to report (the flow shows it complete itself)
    limited = EvalConfig(batch_size=4, limit=2)
    evaluate.run(limited, "tiny", data, tmp_path / "limited", "sft", generator=FakeGenerator(), progress=counts.append)
    assert counts == [2] and evaluate.total_items(limited, data) == 2  # e1, e2 in one batch


def test_bad_data_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `mathwizard teach` first"):
        evaluate.run(EvalConfig(), "tiny", tmp_path / "none", tmp_path / "out", "sft", generator=FakeGenerator())
    empty = make_data(tmp_path / "empty", items={})
    with pytest.raises(DataError, match="test split has no rows"):
        evaluate.run(EvalConfig(), "tiny", empty, tmp_path / "out", "sft", generator=FakeGenerator())
    with pytest.raises(DataError, match=r"no val\.parquet"):
        evaluate.run(EvalConfig(split="val"), "tiny", empty, tmp_path / "out", "sft", generator=FakeGenerator())
    with pytest.raises(DataError, match=r"no val\.parquet"):
        evaluate.total_items(EvalConfig(split="val"), empty)


# ------------------------------------------------------------------------------------------- tables
def _report(folder: Path, accuracy: float, easy: float) -> Path:
    folder.mkdir(parents=True)
    report = {
        "model": folder.name,
        "n": 10,
        "accuracy": accuracy,
        "format_rate": 0.9,
        "by_difficulty": {"easy": {"n": 4, "accuracy": easy}, "hard": {"n": 6, "accuracy": 0.5}},
    }
    (folder / "report.json").write_text(json.dumps(report))
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


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_eval_on_the_tiny_model(tmp_path: Path, prefect_harness: None) -> None:
    import torch

    torch.set_num_threads(1)
    data = make_data(tmp_path / "02-teach")
    home = tmp_path / "home"
    args = ["eval", "--home", str(home), "--model", "tiny", "--label", "base", "--data", str(data)]
    result = invoke([*args, "--limit", "3", "--max-new-tokens", "8", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    out = home / "runs" / "default" / "06-eval" / "base"
    report = json.loads((out / "report.json").read_text())
    # A random tiny model writes no boxed answer in 8 tokens: 0 of 3 right, none formatted.
    assert (report["n"], report["accuracy"], report["format_rate"]) == (3, 0.0, 0.0)
    assert report["by_difficulty"] == {"easy": {"n": 2, "accuracy": 0.0}, "medium": {"n": 1, "accuracy": 0.0}}
    assert 0 < report["generated_tokens"] <= 3 * 8
    assert "base: accuracy 0.0% on 3 problems" in " ".join(result.output.split())
    assert (out / "table.md").read_text().startswith("| model | n | accuracy |")

    missing = invoke(["eval", "--home", str(home), "--label", "sft", "--data", str(data)])
    assert missing.exit_code == 1 and "03-sft does not exist" in " ".join(missing.output.split())
    assert "Traceback" not in missing.output


def test_cli_flags_reach_the_flow_and_task_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tasks.evaluate import evaluate as task
    from typer.testing import CliRunner

    import flows.evaluate
    from mathwizard.cli import app

    assert (task.name, task.retries, task.persist_result) == ("eval", 0, True) and task.cache_key_fn is not None
    for name in ("PREFECT_LOCAL_STORAGE_PATH", "PREFECT_LOGGING_EXTRA_LOGGERS"):
        monkeypatch.delenv(name, raising=False)
    received = []
    out = _report(tmp_path / "dpo", 0.25, 0.5)

    def eval_flow(settings, model=None, data=None, out=None, label="sft"):
        received.append((settings, model, data, out, label))
        return {"fingerprint": "f" * 64}

    monkeypatch.setattr(flows.evaluate, "eval_flow", eval_flow)
    args = ["eval", "--home", str(tmp_path), "--model", "m", "--label", "dpo", "--data", "d", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--limit", "7", "--batch-size", "2", "--max-new-tokens", "50"])
    assert result.exit_code == 0, result.output
    ((settings, model, data, out_arg, label),) = received
    assert (model, data, out_arg, label) == ("m", "d", str(out), "dpo")
    assert (settings.eval.limit, settings.eval.batch_size, settings.eval.max_new_tokens) == (7, 2, 50)
    printed = " ".join(result.output.split())
    assert "dpo: accuracy 25.0% on 10 problems, format 90.0% — easy 50.0% (n=4) · hard 50.0% (n=6)" in printed


# --------------------------------------------------------------------------------------------- flow
class BrokenGenerator(FakeGenerator):
    """Like FakeGenerator until its `fail_on_call`-th call, which raises an ordinary error (the flow run fails)."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__()
        self.fail_on_call = fail_on_call

    def __call__(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        if self.fail_on_call == len(self.calls) + 1:
            raise ModelError("CUDA out of memory")
        return super().__call__(requests, params)


def _flow_run(state, key: str) -> tuple[float, str | None, list[str]]:
    """The flow run's one progress artifact `key` (progress, description) and its task runs' state names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    run_id = state.state_details.flow_run_id
    artifacts = ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=artifacts)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    assert artifact.type == "progress"
    return float(artifact.data), artifact.description, [t.state.name for t in tasks]


def test_flow_progress_failed_done_and_skipped(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    from flows.evaluate import eval_flow
    from mathwizard.config import load_settings

    data = str(make_data(tmp_path / "02-teach"))
    settings = load_settings(home=str(tmp_path / "home"), eval={"batch_size": 4})
    real_run = evaluate.run

    def flow_with(generator: FakeGenerator):
        monkeypatch.setattr(evaluate, "run", functools.partial(real_run, generator=generator))
        return eval_flow(settings, model="tiny", data=data, label="sft", return_state=True)

    # The 2nd batch fails: 4 of 6 problems were scored -> 4 / 6 = 66.7 %.
    failed = flow_with(BrokenGenerator(fail_on_call=2))
    assert failed.is_failed()
    progress, description, _ = _flow_run(failed, "eval-progress")
    assert round(progress, 1) == 66.7 and description == "eval (sft on test): problems done: 4 of 6"

    # A full run (an evaluation does not resume: all 6 again, in batches 4 + 2).
    fake = BrokenGenerator()
    done = flow_with(fake)
    assert done.is_completed() and [len(requests) for requests, _ in fake.calls] == [4, 2]
    assert _flow_run(done, "eval-progress") == (100.0, "eval (sft on test): problems done: 6 of 6", ["Completed"])

    # Done already: Prefect's cache answers (the callback is no part of its key) and the bar is complete at once.
    skipped = flow_with(BrokenGenerator(fail_on_call=1))
    assert skipped.is_completed() and skipped.result()["fingerprint"] == done.result()["fingerprint"]
    assert _flow_run(skipped, "eval-progress") == (100.0, "eval (sft on test): problems done: 6 of 6", ["Cached"])

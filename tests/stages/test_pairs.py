"""The pairs stage: sampling and checking per chunk, the rule fallback, counts, resume, the user prompt, CLI and flow.

The flaws themselves (which flaw, the checks, the rule-made flaws) are tested in `tests/test_flaws.py`, whose solution
templates are the chosen answers here.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from mathwizard.config import ModelConfig, PairsConfig
from mathwizard.errors import DataError, ModelError
from mathwizard.flaws import FLAWED_STRATEGIES
from mathwizard.generation import Completion, Request, SamplingParams
from mathwizard.manifest import Manifest, read_manifest, stage_output
from mathwizard.prompts import load_prompt
from mathwizard.stages import pairs
from mathwizard.stages.pairs import Counts, Report, Stats
from tests.cli_runner import invoke
from tests.test_flaws import ISOSCELES, solution

# ------------------------------------------------------------------------------------------ fixture
# id -> (template, strategy with seed 42). The strategies are pinned here so a change in the choice shows up.
TRAIN = {
    "q0": ("isosceles", "broken_process"),
    "q1": ("chord", "broken_process"),
    "q2": ("relation", "calculation_error"),  # no number to perturb: the rule cannot help -> failed
    "q3": ("isosceles", "broken_process"),
    "q4": ("chord", "broken_process"),
    "q5": ("invalid", "broken_process"),  # the chosen answer breaks the format -> failed, never sampled
    "q6": ("isosceles", "calculation_error"),
    "q7": ("chord", "misapplied_concept"),
}
VAL = {"q100": ("isosceles", "broken_process"), "q101": ("chord", "broken_process")}


def _png(seed: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (48, 36), (255, 255, 255))
    ImageDraw.Draw(image).line((seed % 48, 0, 47, 35), fill=(seed * 37 % 256, 0, 0), width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _row(item_id: str, template: str, n: int, question: str | None = None) -> dict:
    return {
        "id": item_id,
        "question": question or f"[{item_id}] Find the marked quantity in the figure.",
        "solution": solution(template, n),
        "image": {"bytes": _png(n), "path": None},
        "difficult": ("easy", "medium", "hard")[n % 3],
        "source_solution": "\\boxed{0}",
        "teacher_model": "rule",
        "prompt_version": "v1",
    }


def make_teach(
    folder: Path, splits: dict[str, dict[str, tuple[str, str]]] | None = None, questions: dict[str, str] | None = None
) -> Path:
    """A finished 02-teach-like folder (parquet with `datasets` Image metadata + manifest); `questions` by id replace
    the default question (which starts with the id in brackets, as FakeGenerator needs)."""
    import datasets
    import pyarrow.parquet as pq

    splits = splits if splits is not None else {"train": TRAIN, "val": VAL}
    with stage_output(folder, stage="teach", version=1, fingerprint=f"teach-{folder.name}") as record:
        for split, items in splits.items():
            rows = [
                _row(item_id, template, n, (questions or {}).get(item_id))
                for n, (item_id, (template, _)) in enumerate(items.items())
            ]
            features = datasets.Features(
                {k: datasets.Image() if k == "image" else datasets.Value("string") for k in _row("x", "chord", 0)}
            )
            columns = {name: [row[name] for row in rows] for name in features}
            table = datasets.Dataset.from_dict(columns, features=features).data.table  # keeps the Image metadata
            pq.write_table(table, folder / f"{split}.parquet")
            record.add_file(f"{split}.parquet", rows=len(rows))
    return folder


class FakeGenerator:
    """Answers by item id (read from the question) and by how often that item was asked; counts calls."""

    def __init__(self, policy: dict[str, Sequence[str]], fail_on_call: int | None = None) -> None:
        self.policy = policy
        self.fail_on_call = fail_on_call
        self.calls = 0
        self.asked: Counter[str] = Counter()
        self.requests: list[Request] = []
        self.params: list[SamplingParams] = []

    def __call__(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise KeyboardInterrupt("killed mid-run")
        self.params.append(params)
        completions = []
        for request in requests:
            self.requests.append(request)
            item_id = request.text.split("[", 1)[1].split("]", 1)[0]
            answers = self.policy.get(item_id, ["GARBAGE"])
            answer = answers[min(self.asked[item_id], len(answers) - 1)]
            self.asked[item_id] += 1
            chosen = request.text.split("Correct solution", 1)[1].split(":\n", 1)[1].split("\n\nWrite the flawed")[0]
            text = {"GARBAGE": "GARBAGE-TEXT without any format", "CHOSEN": chosen, "SAME_ANSWER": _reworded(chosen)}
            completions.append(Completion(text=text.get(answer, answer), tokens=5))
        return completions


def _reworded(chosen: str) -> str:
    return chosen.replace("### Solution\n1.", "### Solution\n1. Clearly,", 1)


MODEL_FLAW = "### Solution\n1. The model skipped ahead.\n### Final Answer\n\\boxed{{{a}}}"
POLICY = {
    "q0": [MODEL_FLAW.format(a=1)],  # valid on the first try
    "q1": ["GARBAGE", MODEL_FLAW.format(a=3)],  # valid on the second try
    "q3": ["CHOSEN"],  # always a copy of the chosen answer -> rule
    "q4": ["CHOSEN"],
    "q6": ["SAME_ANSWER"],  # a calculation error that keeps the answer -> rule
    "q7": ["GARBAGE"],  # -> rule
    # q2: garbage -> the rule cannot perturb a relation -> failed; q5: never asked (chosen invalid)
}


def _cfg(**overrides) -> PairsConfig:
    values = {"splits": ["train"], "chunk_size": 3, "max_attempts": 3, "batch_size": 4, "max_new_tokens": 64}
    return PairsConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------- run
def test_counts_sources_and_failures(tmp_path: Path) -> None:
    import datasets

    from mathwizard.data.splits import read_table

    teach = make_teach(tmp_path / "02-teach")
    fake = FakeGenerator(POLICY)
    out = tmp_path / "04-pairs"
    manifest = pairs.run(_cfg(), ModelConfig(), "tiny", teach, out, generator=fake)
    report = Report.of(manifest)
    assert json.loads((out / "report.json").read_text()) == report.model_dump(mode="json")  # one report, two places
    # 8 items: model q0 (1st try) and q1 (2nd try); rule q3, q4, q6, q7 after 3 tries; failed q2 (rule cannot
    # perturb a relation) and q5 (chosen answer unformatted, never sampled).
    assert Counts.model_validate(report.model_dump(include=set(Counts.model_fields))) == Counts(
        items=8, written=6, from_model=2, from_rule=4, failed=2
    )
    assert report.attempts == 1 + 2 + 3 * 5  # q0, q1, then q2 q3 q4 q6 q7 three times each = 18
    assert report.generated_tokens == 18 * 5
    # Chunks [q0 q1 q2] [q3 q4 q5] [q6 q7]: every chunk needs 3 rounds (q2; q3/q4; q6/q7 never pass).
    assert fake.calls == 9
    assert report.by_strategy["broken_process"] == Counts(items=5, written=4, from_model=2, from_rule=2, failed=1)
    assert report.by_strategy["calculation_error"].failed == 1
    assert report.splits["train"].written == 6 and manifest.files["train.parquet"].rows == 6
    assert (report.model, report.fallback, report.prompt_version, report.resumed_chunks) == ("tiny", "rule", "v1", 0)

    # Sampling settings, prompts and images reach the generator.
    assert {(p.temperature, p.top_p, p.max_new_tokens) for p in fake.params} == {(1.0, 0.95, 64)}
    first = fake.requests[0]
    assert first.system == load_prompt("flawed_broken_process") and "[q0]" in first.text
    assert first.image["bytes"][:4] == b"\x89PNG"
    assert first.text == pairs.user_prompt("[q0] Find the marked quantity in the figure.", solution("isosceles", 0))
    assert "Correct solution" in first.text and "angle B = angle C" in first.text

    rows = datasets.Dataset(read_table(out, "train"))  # features from the file's own `datasets` metadata
    assert rows.column_names == list(pairs.COLUMNS) and isinstance(rows.features["image"], datasets.Image)
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ["q0", "q1", "q3", "q4", "q6", "q7"]
    assert {i: r["strategy"] for i, r in by_id.items()} == {i: TRAIN[i][1] for i in by_id}  # the pinned flaws
    assert by_id["q1"]["rejected"] == MODEL_FLAW.format(a=3) and by_id["q1"]["source"] == "model"
    assert by_id["q6"]["source"] == "rule" and by_id["q6"]["rejected"].endswith(
        "\\boxed{89^\\circ}"
    )  # 180 - 2 x 46 = 88, +1
    assert by_id["q0"]["image"].size == (48, 36)  # decoded as an image by `datasets`

    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["strategy"], f["attempts"]) for f in failures] == [
        ("q2", "calculation_error", 3),
        ("q5", "broken_process", 0),
    ]
    assert failures[0]["reasons"]["rule_not_applicable"] == 1
    assert failures[0]["reasons"]["format:missing_solution_header"] == 3
    assert "chosen:missing_solution_header" in failures[1]["reasons"]
    # Nothing that failed the checks is written anywhere as text.
    for path in out.rglob("*"):
        if path.is_file():
            assert b"GARBAGE-TEXT" not in path.read_bytes(), path


def test_fallback_none_excludes_what_the_model_could_not_do(tmp_path: Path) -> None:
    teach = make_teach(tmp_path / "02-teach")
    manifest = pairs.run(
        _cfg(fallback="none"), ModelConfig(), "tiny", teach, tmp_path / "out", generator=FakeGenerator(POLICY)
    )
    report = Report.of(manifest)
    # Only q0 and q1 came from the model; the 4 the rule would have written are excluded with q2 and q5.
    assert (report.written, report.from_model, report.from_rule, report.failed) == (2, 2, 0, 6)
    failures = (tmp_path / "out" / "failures.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in failures] == ["q2", "q3", "q4", "q5", "q6", "q7"]


def test_resumes_at_the_first_unfinished_chunk(tmp_path: Path) -> None:
    teach = make_teach(tmp_path / "02-teach")
    out = tmp_path / "04-pairs"
    # Killed at the 4th generate call: chunk 0 (3 calls) is finished, chunk 1 is not.
    with pytest.raises(KeyboardInterrupt):
        pairs.run(_cfg(), ModelConfig(), "tiny", teach, out, generator=FakeGenerator(POLICY, fail_on_call=4))
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["train-00000.parquet"]
    assert read_manifest(out) is None  # not finished, so nothing downstream trusts it

    resumed = FakeGenerator(POLICY)
    report = Report.of(pairs.run(_cfg(), ModelConfig(), "tiny", teach, out, generator=resumed))
    assert resumed.calls == 6  # chunks 1 and 2 only, 3 rounds each
    assert resumed.asked["q0"] == 0 and resumed.asked["q3"] == 3
    assert (report.written, report.from_model, report.failed, report.resumed_chunks) == (6, 2, 2, 1)
    assert report.attempts == 18  # the same as an uninterrupted run: chunk 0's counts were kept

    clean = tmp_path / "clean"
    pairs.run(_cfg(), ModelConfig(), "tiny", teach, clean, generator=FakeGenerator(POLICY))
    assert (out / "train.parquet").read_bytes() == (clean / "train.parquet").read_bytes()

    # Finished: a rerun loads nothing and generates nothing.
    idle = FakeGenerator(POLICY, fail_on_call=1)
    assert (
        pairs.run(_cfg(), ModelConfig(), "tiny", teach, out, generator=idle).fingerprint
        == read_manifest(out).fingerprint  # type: ignore[union-attr]
    )
    # Other settings: a new fingerprint, so the old chunks are stale and everything is sampled again.
    again = FakeGenerator(POLICY)
    pairs.run(_cfg(max_attempts=2), ModelConfig(), "tiny", teach, out, generator=again)
    assert again.calls == 6  # 3 chunks x 2 rounds


def test_progress_counts_every_item_and_resumed_chunks_at_once(tmp_path: Path) -> None:
    teach = make_teach(tmp_path / "02-teach")
    out = tmp_path / "04-pairs"
    cfg = _cfg(splits=["train", "val"])
    # Killed at the 4th generate call: only chunk 0 (3 rounds) finished and was reported, of 8 train + 2 val items.
    killed = FakeGenerator(POLICY, fail_on_call=4)
    seen: list[tuple[int, int, int]] = []  # (items done, items in total, generate calls made so far)
    with pytest.raises(KeyboardInterrupt):
        pairs.run(
            cfg,
            ModelConfig(),
            "tiny",
            teach,
            out,
            generator=killed,
            progress=lambda done, total: seen.append((done, total, killed.calls)),
        )
    assert seen == [(3, 10, 3)]

    resumed = FakeGenerator(POLICY)
    seen = []
    pairs.run(
        cfg,
        ModelConfig(),
        "tiny",
        teach,
        out,
        generator=resumed,
        progress=lambda done, total: seen.append((done, total, resumed.calls)),
    )
    # Chunk 0 comes from disk before any sampling, so the bar starts at 3 of 10; then train [q3 q4 q5] and [q6 q7]
    # (3 rounds each) and val [q100 q101] (3 rounds): 3 + 3 + 2 + 2 = 10.
    assert seen == [(3, 10, 0), (6, 10, 3), (8, 10, 6), (10, 10, 9)]

    # Already done: nothing to report (the flow shows a skipped stage as complete itself).
    calls: list[tuple[int, int]] = []
    pairs.run(
        cfg,
        ModelConfig(),
        "tiny",
        teach,
        out,
        generator=FakeGenerator(POLICY, fail_on_call=1),
        progress=lambda *call: calls.append(call),
    )
    assert calls == []

    # With a limit: train cut to 5 items, val keeps its 2 -> chunks of 3 + 2 + 2 = 7.
    limited = _cfg(splits=["train", "val"], limit=5)
    pairs.run(
        limited,
        ModelConfig(),
        "tiny",
        teach,
        tmp_path / "limited",
        generator=FakeGenerator(POLICY),
        progress=lambda *call: calls.append(call),
    )
    assert calls == [(3, 7), (5, 7), (7, 7)]


def test_bad_inputs_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `mathwizard teach` first"):
        pairs.run(_cfg(), ModelConfig(), "tiny", tmp_path / "nothing", tmp_path / "out", generator=FakeGenerator({}))
    teach = make_teach(tmp_path / "02-teach", {"train": {}})
    with pytest.raises(DataError, match="train split has no rows"):
        pairs.run(_cfg(), ModelConfig(), "tiny", teach, tmp_path / "out", generator=FakeGenerator({}))
    with pytest.raises(DataError, match=r"no val\.parquet"):
        pairs.run(_cfg(splits=["val"]), ModelConfig(), "tiny", teach, tmp_path / "out", generator=FakeGenerator({}))
    # A missing split is found before any sampling, even when it comes after one that exists.
    full = make_teach(tmp_path / "full", {"train": TRAIN})
    unasked = FakeGenerator(POLICY)
    with pytest.raises(DataError, match=r"no val\.parquet"):
        pairs.run(_cfg(splits=["train", "val"]), ModelConfig(), "tiny", full, tmp_path / "out2", generator=unasked)
    assert unasked.calls == 0
    with pytest.raises(ModelError, match="does not exist"):
        pairs.run(_cfg(), ModelConfig(), str(tmp_path / "no-model"), full, tmp_path / "out3")


# -------------------------------------------------------------------------------------- user prompt
def test_user_prompt_is_a_versioned_file_filled_in_one_pass() -> None:
    template = load_prompt("flawed_user")
    assert template.count("{question}") == 1 and template.count("{chosen}") == 1 and "{{" not in template
    # The text the model sees is the one the inline `str.format` template made before it became a file.
    assert pairs.user_prompt("Q?", "C.") == (
        "Problem:\nQ?\n\n"
        "Correct solution (for reference only; your answer must contain the flaw described above):\nC.\n\n"
        'Write the flawed solution now, in the same format: "### Solution" with numbered steps, then "### Final Answer"'
        " with exactly one \\boxed{} answer."
    )
    # Braces and placeholder names inside the values are text: they are never filled.
    question = "Show that {chosen} = {question}; the set }{ is \\{1, 2\\} and \\boxed{x} is {x}."
    chosen = ISOSCELES.format(b=50, a=80) + " {question}"
    expected = pairs.user_prompt("<Q>", "<C>").replace("<C>", chosen).replace("<Q>", question)
    assert pairs.user_prompt(question, chosen) == expected


def test_question_with_braces_reaches_the_model_and_the_pairs_unchanged(tmp_path: Path) -> None:
    from mathwizard.data.splits import read_table

    question = "[q0] Given {chosen} and }{ and {question}, find x."
    teach = make_teach(tmp_path / "02-teach", {"train": {"q0": TRAIN["q0"]}}, questions={"q0": question})
    fake = FakeGenerator(POLICY)
    pairs.run(_cfg(), ModelConfig(), "tiny", teach, tmp_path / "04-pairs", generator=fake)
    (request,) = fake.requests
    assert request.text == pairs.user_prompt("<Q>", solution("isosceles", 0)).replace("<Q>", question)
    assert read_table(tmp_path / "04-pairs", "train", ["question"]).column("question").to_pylist() == [question]


def test_a_prompt_edit_is_a_new_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teach = make_teach(tmp_path / "02-teach")
    out = tmp_path / "04-pairs"
    pairs.run(_cfg(), ModelConfig(), "tiny", teach, out, generator=FakeGenerator(POLICY))
    before = read_manifest(out).fingerprint  # type: ignore[union-attr]
    assert pairs.expected_fingerprint(_cfg(), ModelConfig(), "tiny", teach) == before

    def edited(name: str, version: str = "v1") -> str:
        text = load_prompt(name, version)
        return text.replace("Write the flawed", "Now write the flawed") if name == "flawed_user" else text

    monkeypatch.setattr(pairs, "load_prompt", edited)
    assert pairs.expected_fingerprint(_cfg(), ModelConfig(), "tiny", teach) != before
    again = FakeGenerator(POLICY)
    pairs.run(_cfg(), ModelConfig(), "tiny", teach, out, generator=again)
    # Every chunk is sampled again, with the edited text.
    assert again.calls == 9 and all("Now write the flawed" in r.text for r in again.requests)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_pairs_on_the_tiny_model(tmp_path: Path, prefect_harness: None) -> None:
    import torch

    from mathwizard.data.splits import read_table

    torch.set_num_threads(1)
    teach = make_teach(tmp_path / "02-teach")
    out = tmp_path / "04-pairs"
    args = ["pairs", "--home", str(tmp_path / "home"), "--sft", "tiny", "--data", str(teach), "--out", str(out)]
    args += ["--max-new-tokens", "8", "--max-attempts", "2", "--batch-size", "4", "--chunk-size", "4"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    # A random tiny model never writes the format in 8 tokens, so the rule writes every pair it can:
    # train 8 items - q2 - q5 = 6, val 2; all 7 sampled train items and 2 val items were asked twice.
    assert (report["from_model"], report["from_rule"], report["failed"]) == (0, 8, 2)
    assert report["splits"]["train"]["written"] == 6 and report["splits"]["val"]["written"] == 2
    assert report["attempts"] == 2 * (7 + 2)
    assert 0 < report["generated_tokens"] <= 8 * report["attempts"]
    printed = " ".join(result.output.split())  # rich wraps long lines
    assert (
        "pairs: 8 pairs (train 6 · val 2): 0 rejected answers from the model, 8 from the rule fallback; 2 excluded"
        in printed
    )
    val = read_table(out, "val", ["strategy", "source"]).to_pydict()
    assert val["strategy"] == ["broken_process", "broken_process"] and set(val["source"]) == {"rule"}
    # Run again: the manifest matches, nothing is sampled.
    again = invoke(args)
    assert again.exit_code == 0 and json.loads((out / "report.json").read_text()) == report


def _report(**counts: int) -> Report:
    return Report(
        **counts,
        model="m",
        max_new_tokens=64,
        fallback="none",
        prompt_version="v1",
        splits={"train": Stats(written=4), "val": Stats(written=1)},
        resumed_chunks=0,
        wall_seconds=1.0,
    )


def test_cli_flags_reach_the_flow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import flows.pairs
    from mathwizard.cli import app

    for name in ("PREFECT_LOCAL_STORAGE_PATH", "PREFECT_LOGGING_EXTRA_LOGGERS"):
        monkeypatch.delenv(name, raising=False)  # the CLI sets them with setdefault; undone after the test
    received = []

    def pairs_flow(settings, sft=None, data=None, out=None):
        received.append((settings, sft, data, out))
        report = _report(items=6, written=5, from_model=3, from_rule=2, failed=1)
        manifest = Manifest(stage="pairs", version=pairs.VERSION, fingerprint="f" * 64, report=report.model_dump())
        return manifest.model_dump(mode="json")

    monkeypatch.setattr(flows.pairs, "pairs_flow", pairs_flow)
    args = ["pairs", "--home", str(tmp_path), "--sft", "m", "--data", "d", "--out", "o", "--backend", "hf"]
    args += ["--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "99", "--max-attempts", "5"]
    args += ["--fallback", "none", "--batch-size", "3", "--chunk-size", "7", "--limit", "11"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ((settings, sft, data, out),) = received
    cfg = settings.pairs
    assert (sft, data, out, settings.model.backend) == ("m", "d", "o", "hf")
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.max_attempts) == (0.7, 0.9, 99, 5)
    assert (cfg.fallback, cfg.batch_size, cfg.chunk_size, cfg.limit) == ("none", 3, 7, 11)
    printed = " ".join(result.output.split())
    assert (
        "pairs: 5 pairs (train 4 · val 1): 3 rejected answers from the model, 2 from the rule fallback; 1 excluded"
        in printed
    )

    bad = CliRunner().invoke(app, ["pairs", "--home", str(tmp_path), "--fallback", "maybe"])
    assert bad.exit_code == 1 and "pairs.fallback" in bad.output and len(received) == 1


def test_task_policy_and_flow_summary() -> None:
    from prefect.cache_policies import NO_CACHE

    from flows.pairs import summary_markdown, summary_rows
    from tasks.stages import pairs as task

    # The stage decides skipping from its manifest, so the task keeps no Prefect cache; an OOM is not retried.
    assert (task.name, task.retries, task.cache_policy) == ("pairs", 0, NO_CACHE)
    report = _report(items=6, written=3, from_model=3, from_rule=0, failed=3, attempts=9, generated_tokens=90)
    report.seconds = 1.5
    report.by_strategy = {s: Counts(items=2, written=1, from_model=1, from_rule=0, failed=1) for s in FLAWED_STRATEGIES}
    rows = summary_rows(report)
    assert rows[:-1] == [
        {"strategy": s, "items": 2, "written": 1, "from_model": 1, "from_rule": 0, "failed": 1}
        for s in FLAWED_STRATEGIES
    ]
    assert rows[-1] == {"strategy": "total", "items": 6, "written": 3, "from_model": 3, "from_rule": 0, "failed": 3}
    assert "3 rejected answers sampled from the model (100%)" in summary_markdown(report)


# --------------------------------------------------------------------------------------------- flow
class BrokenGenerator(FakeGenerator):
    """Like FakeGenerator, but its `fail_on_call`-th call raises an ordinary error (the flow run fails, not crashes)."""

    def __call__(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        if self.fail_on_call == self.calls + 1:
            self.calls += 1
            raise ModelError("CUDA out of memory")
        return super().__call__(requests, params)


def progress_artifacts(state, key: str) -> list:
    """The progress artifacts `key` of the flow run behind `state`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    run_filter = ArtifactFilter(
        key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
    )
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=run_filter)
    assert all(artifact.type == "progress" for artifact in artifacts)
    return artifacts


def task_states(state) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        return [run.state.name for run in client.read_task_runs(flow_run_filter=runs)]


def test_flow_progress_failed_resumed_and_skipped(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    from flows.pairs import pairs_flow
    from mathwizard.config import load_settings

    teach = str(make_teach(tmp_path / "02-teach"))
    settings = load_settings(home=str(tmp_path / "home"), pairs=_cfg(splits=["train", "val"]).model_dump())
    real_run = pairs.run

    def flow_with(generator: FakeGenerator):
        monkeypatch.setattr(pairs, "run", functools.partial(real_run, generator=generator))
        return pairs_flow(settings, sft="tiny", data=teach, return_state=True)

    # The 4th generate call fails: chunk 0 (3 items, 3 rounds) is done, so the bar stops at 3 of 10 = 30 %.
    failed = flow_with(BrokenGenerator(POLICY, fail_on_call=4))
    assert failed.is_failed()
    (artifact,) = progress_artifacts(failed, "pairs-progress")
    assert (float(artifact.data), artifact.description) == (30.0, "pairs (train, val): items done: 3 of 10")

    # The rerun resumes chunk 0 and samples the other 3 chunks: 10 of 10.
    resumed = BrokenGenerator(POLICY)
    done = flow_with(resumed)
    assert done.is_completed() and Report.of(done.result()).written == 8  # 6 train + 2 val (rule)
    assert resumed.calls == 9  # train chunks 1, 2 and val chunk 0, 3 rounds each
    (artifact,) = progress_artifacts(done, "pairs-progress")
    assert (float(artifact.data), artifact.description) == (100.0, "pairs (train, val): items done: 10 of 10")

    # Done already: the stage finds its manifest and returns it; nothing is sampled (a call would fail the run).
    skipped = flow_with(BrokenGenerator(POLICY, fail_on_call=1))
    assert skipped.is_completed() and skipped.result()["fingerprint"] == done.result()["fingerprint"]
    assert task_states(skipped) == ["Completed"]  # no Prefect cache: the manifest is the one authority
    assert progress_artifacts(skipped, "pairs-progress") == []  # a skipped stage reports no progress

"""The teach stage: outputs, counts, failures, resume from the cache, and what its cache key and fingerprint cover."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mathwizard.answers import answers_match, final_answer, follows_format
from mathwizard.config import PrepareConfig, TeacherConfig
from mathwizard.errors import ConfigError, DataError, TeacherError
from mathwizard.stages import teach
from mathwizard.testing import OpenAITestServer

KEY = "sk-test-stage-Fh3Jq8Lw2Xc6"
COLUMNS = [
    "id", "question", "solution", "image", "difficult", "year", "knowledge", "source_solution", "teacher_model",
    "prompt_version",
]  # fmt: skip
SPLIT_SIZES = {"train": 51, "val": 4, "test": 5}  # the bundled sample's 60 problems, split by content hash


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mathwizard.stages import prepare

    out = tmp_path_factory.mktemp("teach-stage") / "01-prepare"
    prepare.run(PrepareConfig(source="sample", workers=1), out)
    return out


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAITestServer]:
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", KEY)
    with OpenAITestServer(api_key=KEY, retry_after=0.01) as srv:
        yield srv


def api(server: OpenAITestServer, **overrides: object) -> TeacherConfig:
    values: dict[str, object] = {
        "kind": "openai", "base_url": server.base_url, "model": "test-teacher", "concurrency": 4, "rpm": None,
        "request_retries": 3, "backoff_s": 0.005, "backoff_max_s": 0.02,
    }  # fmt: skip
    return TeacherConfig(**{**values, **overrides})


def unique_pairs(folder: Path) -> int:
    pairs = set()
    for split in SPLIT_SIZES:
        t = pq.read_table(folder / f"{split}-00000-of-00001.parquet", columns=["question", "solution"])
        pairs |= set(zip(t.column("question").to_pylist(), t.column("solution").to_pylist(), strict=True))
    return len(pairs)


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


def source_solutions(prepared: Path) -> dict[str, str]:
    return {
        row_id: solution
        for split in SPLIT_SIZES
        for row_id, solution in zip(
            *pq.read_table(prepared / f"{split}-00000-of-00001.parquet", columns=["id", "solution"])
            .to_pydict()
            .values(),
            strict=True,
        )
    }


# ------------------------------------------------------------------------------------------ rule teacher
def test_rule_teacher_writes_every_split(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "02-teach"
    manifest = teach.run(TeacherConfig(kind="rule"), prepared, out, tmp_path / "cache")
    assert manifest.counts["items"] == manifest.counts["written"] == 60 and manifest.counts["failed"] == 0
    assert manifest.counts["api_calls"] == 0 and manifest.extra["teacher"] == "rule"
    sources = source_solutions(prepared)
    for split, size in SPLIT_SIZES.items():
        ds = datasets.load_dataset("parquet", data_files=str(out / f"{split}.parquet"), split="train")
        assert ds.column_names == COLUMNS and len(ds) == size == manifest.files[f"{split}.parquet"].rows
        assert isinstance(ds.features["image"], datasets.Image)
        row = ds[0]
        assert row["image"].size[0] > 0  # decodes as a PIL image
        assert follows_format(row["solution"]) and row["source_solution"] == sources[row["id"]]
        assert answers_match(final_answer(row["solution"]), final_answer(row["source_solution"]))
        assert (row["teacher_model"], row["prompt_version"]) == ("rule", "rule-v1")
    assert failures(out) == []
    assert report(out) | {"seconds": 0} == report(out) | {
        "items": 60, "written": 60, "failed": 0, "api_calls": 0, "cache_hits": 0, "retries": 0,
        "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0, "failures_by_reason": {},
    }  # fmt: skip


def test_second_run_is_skipped(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "02-teach"
    first = teach.run(TeacherConfig(kind="rule"), prepared, out, tmp_path / "cache")
    stamp = (out / "train.parquet").stat().st_mtime_ns
    second = teach.run(TeacherConfig(kind="rule", concurrency=3, rpm=10), prepared, out, tmp_path / "cache")
    assert second == first and (out / "train.parquet").stat().st_mtime_ns == stamp  # speed settings: same output


def test_split_and_limit(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "02-teach"
    manifest = teach.run(TeacherConfig(kind="rule", split="train", limit=7), prepared, out, tmp_path / "cache")
    assert manifest.counts["items"] == 7 and set(manifest.files) == {"train.parquet", "failures.jsonl", "report.json"}
    assert pq.read_table(out / "train.parquet").num_rows == 7
    assert not (out / "val.parquet").exists()


def test_plan_cuts_each_split_into_chunks(prepared: Path) -> None:
    chunks = teach.plan(TeacherConfig(kind="rule", chunk_size=20), prepared)
    # train 51 -> 20 + 20 + 11; val 4 -> 4; test 5 -> 5
    assert [(c.split, c.start, c.stop) for c in chunks] == [
        ("train", 0, 20), ("train", 20, 40), ("train", 40, 51), ("val", 0, 4), ("test", 0, 5),
    ]  # fmt: skip


def test_missing_prepare_output_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `mathwizard prepare` first"):
        teach.run(TeacherConfig(kind="rule"), tmp_path / "nothing", tmp_path / "out", tmp_path / "cache")


# ---------------------------------------------------------------------------------------- kind and key
def test_auto_picks_openai_only_with_a_key(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MATHWIZARD_TEACHER_API_KEY", raising=False)
    assert teach.resolve_kind(TeacherConfig()) == "rule"
    without = teach.expected_fingerprint(TeacherConfig(), prepared)
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", KEY)
    assert teach.resolve_kind(TeacherConfig()) == "openai"
    with_key = teach.expected_fingerprint(TeacherConfig(), prepared)
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", "sk-another")
    assert without != with_key == teach.expected_fingerprint(TeacherConfig(), prepared)  # the key itself: not hashed


def test_openai_without_a_key_is_a_config_error(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MATHWIZARD_TEACHER_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="MATHWIZARD_TEACHER_API_KEY or OPENAI_API_KEY") as info:
        teach.run(TeacherConfig(kind="openai"), prepared, tmp_path / "out", tmp_path / "cache")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- API
def test_api_teacher_under_faults_loses_nothing(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    server.configure(
        faults={"503": 0.08, "429": 0.04, "drop": 0.04, "non_json": 0.04, "wrong_answer": 0.15, "length": 0.05},
        seed=11,
    )
    out = tmp_path / "02-teach"
    manifest = teach.run(api(server, max_attempts=2, max_failed_fraction=1.0), prepared, out, tmp_path / "cache")
    c = manifest.counts
    assert c["written"] + c["failed"] == c["items"] == 60
    assert c["api_calls"] == server.requests and c["retries"] > 0 and c["prompt_tokens"] > 0
    excluded = {f["id"] for f in failures(out)}
    assert len(excluded) == c["failed"] and all(
        {"id", "reason", "attempts", "last_error"} <= set(f) for f in failures(out)
    )
    written = set()
    sources = source_solutions(prepared)
    for split in SPLIT_SIZES:
        table = pq.read_table(out / f"{split}.parquet", columns=["id", "solution", "teacher_model", "prompt_version"])
        for row in table.to_pylist():
            assert follows_format(row["solution"])
            assert answers_match(final_answer(row["solution"]), final_answer(sources[row["id"]]))
            assert (row["teacher_model"], row["prompt_version"]) == ("test-teacher", "v1")
            written.add(row["id"])
    assert not written & excluded and len(written) == c["written"]


def test_too_many_failures_raise_after_the_report_and_a_rerun_pays_only_for_them(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    out, cache = tmp_path / "02-teach", tmp_path / "cache"
    server.fail_next(3, "wrong_answer")  # one at a time: the first three items get a wrong answer
    with pytest.raises(TeacherError, match=r"^3 / 60 items failed .*top errors: answer_mismatch \(3\)"):
        teach.run(api(server, concurrency=1, max_attempts=1), prepared, out, cache)
    assert report(out)["failed"] == 3 and report(out)["failures_by_reason"] == {"answer_mismatch": 3}
    assert [f["attempts"] for f in failures(out)] == [1, 1, 1]
    assert not (out / "manifest.json").exists()  # not done: the next run must not skip it

    manifest = teach.run(api(server, concurrency=1, max_attempts=1), prepared, out, cache)
    assert manifest.counts["api_calls"] == 3 and manifest.counts["cache_hits"] == 57  # 60 - 3
    assert manifest.counts["written"] == 60 and failures(out) == []


def test_allowed_failures_finish_the_stage(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    server.fail_next(3, "refusal")
    manifest = teach.run(
        api(server, concurrency=1, max_attempts=1, max_failed_fraction=0.05), prepared, tmp_path / "out", tmp_path / "c"
    )  # 3 / 60 = 5 %
    assert manifest.counts["failed"] == 3 and manifest.extra["failures_by_reason"] == {"refusal": 3}


def test_cache_key_sensitivity(
    prepared: Path, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, unique = tmp_path / "cache", unique_pairs(prepared)
    first = teach.run(api(server), prepared, tmp_path / "a", cache)
    assert first.counts["api_calls"] == unique == server.requests

    same = teach.run(api(server, concurrency=2, rpm=100000), prepared, tmp_path / "b", cache)  # same input
    assert same.counts["api_calls"] == 0 and same.counts["cache_hits"] == 60

    grown = teach.run(api(server, limit=30), prepared, tmp_path / "c", cache)  # a subset: all cached
    assert grown.counts["api_calls"] == 0

    more_attempts = teach.run(api(server, max_attempts=5), prepared, tmp_path / "c2", cache)  # new output, same replies
    assert more_attempts.counts["api_calls"] == 0 and more_attempts.fingerprint != first.fingerprint

    other_model = teach.run(api(server, model="test-teacher-2"), prepared, tmp_path / "d", cache)
    assert other_model.counts["api_calls"] == unique

    original = teach._prompts

    def edited(cfg: TeacherConfig) -> tuple[str, str, str]:
        system, user, reask = original(cfg)
        return system + "\nBe brief.", user, reask

    monkeypatch.setattr(teach, "_prompts", edited)
    reworded = teach.run(api(server), prepared, tmp_path / "e", cache)
    assert reworded.counts["api_calls"] == unique  # a changed prompt re-asks everything it feeds
    assert reworded.fingerprint != first.fingerprint
    assert server.requests == 3 * unique


def test_chunks_then_assemble_match_one_call(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    cfg = api(server, chunk_size=16)
    results = [teach.run_chunk(cfg, prepared, tmp_path / "cache", chunk) for chunk in teach.plan(cfg, prepared)]
    assert sum(r.items for r in results) == 60 and sum(r.api_calls for r in results) == unique_pairs(prepared)
    manifest = teach.assemble(cfg, prepared, tmp_path / "out", tmp_path / "cache", results)
    assert manifest.counts["written"] == 60 and manifest.fingerprint == teach.expected_fingerprint(cfg, prepared)
    assert manifest.counts["api_calls"] == unique_pairs(prepared)


def test_items_never_attempted_are_reported(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    cfg = api(server, chunk_size=20, max_failed_fraction=1.0)
    first = teach.plan(cfg, prepared)[0]  # train[0:20] only
    results = [teach.run_chunk(cfg, prepared, tmp_path / "cache", first)]
    manifest = teach.assemble(cfg, prepared, tmp_path / "out", tmp_path / "cache", results)
    assert manifest.counts["written"] == 20 and manifest.counts["failed"] == 40  # 60 - 20
    assert manifest.extra["failures_by_reason"] == {"not_attempted": 40}


def test_sources_without_an_answer_are_excluded_without_a_request(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    broken = tmp_path / "01-prepare"
    shutil.copytree(prepared, broken)
    path = broken / "train-00000-of-00001.parquet"
    table = pq.read_table(path)
    solutions = table.column("solution").to_pylist()
    solutions[0] = solutions[0].replace("\\boxed", "")
    table = table.set_column(table.schema.get_field_index("solution"), "solution", pa.array(solutions, pa.string()))
    pq.write_table(table, path)

    rule_run = teach.run(TeacherConfig(kind="rule", max_failed_fraction=0.1), broken, tmp_path / "rule", tmp_path / "c")
    assert rule_run.counts["failed"] == 1 and failures(tmp_path / "rule")[0]["reason"] == "no_source_answer"

    api_run = teach.run(api(server, max_failed_fraction=0.1), broken, tmp_path / "api", tmp_path / "c")
    assert api_run.counts["written"] == 59 and api_run.extra["failures_by_reason"] == {"no_source_answer": 1}
    assert server.requests == unique_pairs(broken) - 1


def test_progress_reaches_the_total(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    teach.run(api(server), prepared, tmp_path / "out", tmp_path / "cache", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (60, 60) and [d for d, _ in seen] == sorted(d for d, _ in seen)

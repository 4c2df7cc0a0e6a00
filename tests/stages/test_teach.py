"""The teach stage: outputs, its report, failures, resume from the cache (after errors and kill -9), what its cache
key and fingerprint cover, skipping and redoing by manifest, and the API key kept out of everything."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mathwizard.answers import answers_match, final_answer, follows_format
from mathwizard.config import PrepareConfig, TeacherConfig
from mathwizard.errors import ConfigError, DataError, TeacherError, TransientError
from mathwizard.manifest import describe_file, read_manifest, write_manifest
from mathwizard.stages import teach
from mathwizard.teacher.cache import ReplyCache
from mathwizard.testing import OpenAITestServer
from tests.teacher.helpers import API_KEY, api_config, unique_items

COLUMNS = [
    "id", "question", "solution", "image", "difficult", "year", "knowledge", "source_solution", "teacher_model",
    "prompt_version",
]  # fmt: skip
SPLIT_SIZES = {"train": 51, "val": 4, "test": 5}  # the bundled sample's 60 problems, split by content hash
CONCURRENCY = 4
KILLED_RUN = """
import sys
from pathlib import Path
from mathwizard.config import TeacherConfig
from mathwizard.stages import teach
cfg = TeacherConfig(kind="openai", base_url=sys.argv[1], model="test-teacher", concurrency=int(sys.argv[5]), rpm=None)
teach.run(cfg, Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
"""


def rewrite_upstream(folder: Path, name: str, table: pa.Table) -> None:
    """Replace a file of a finished stage folder and record it in its manifest, as if the stage had written it."""
    pq.write_table(table, folder / name)
    manifest = read_manifest(folder)
    manifest.files[name] = describe_file(folder / name, rows=table.num_rows)
    write_manifest(folder, manifest)


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
    done = teach.Report.of(manifest)
    assert (done.items, done.written, done.failed, done.api_calls, done.teacher) == (60, 60, 0, 0, "rule")
    assert done.splits == {s: teach.SplitCounts(items=n, written=n, failed=0) for s, n in SPLIT_SIZES.items()}
    assert done == teach.Report.model_validate_json((out / "report.json").read_text())  # report.json: the same
    assert done.summary() == "60 of 60 items written by rule, 0 failed; 0 API calls, 0 cache hits"
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
    assert teach.Report.of(manifest).items == 7
    assert set(manifest.files) == {"train.parquet", "failures.jsonl", "report.json"}
    assert pq.read_table(out / "train.parquet").num_rows == 7
    assert not (out / "val.parquet").exists()


def test_missing_prepare_output_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `mathwizard prepare` first"):
        teach.run(TeacherConfig(kind="rule"), tmp_path / "nothing", tmp_path / "out", tmp_path / "cache")


# ---------------------------------------------------------------------------------------- kind and key
def test_auto_picks_openai_only_with_a_key(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MATHWIZARD_TEACHER_API_KEY", raising=False)
    assert teach.resolve_kind(TeacherConfig()) == "rule"
    without = teach.expected_fingerprint(TeacherConfig(), prepared)
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", API_KEY)
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
    manifest = teach.run(api_config(server, max_attempts=2, max_failed_fraction=1.0), prepared, out, tmp_path / "cache")
    c = teach.Report.of(manifest)
    assert c.written + c.failed == c.items == 60
    assert c.api_calls == server.requests and c.retries > 0 and c.prompt_tokens > 0
    excluded = {f["id"] for f in failures(out)}
    assert len(excluded) == c.failed and all(
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
    assert not written & excluded and len(written) == c.written


def test_too_many_failures_raise_after_the_report_and_a_rerun_pays_only_for_them(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    out, cache = tmp_path / "02-teach", tmp_path / "cache"
    server.fail_next(3, "wrong_answer")  # one at a time: the first three items get a wrong answer
    with pytest.raises(TeacherError, match=r"^3 / 60 items failed .*top errors: answer_mismatch \(3\)"):
        teach.run(api_config(server, concurrency=1, max_attempts=1), prepared, out, cache)
    assert report(out)["failed"] == 3 and report(out)["failures_by_reason"] == {"answer_mismatch": 3}
    assert [f["attempts"] for f in failures(out)] == [1, 1, 1]
    assert not (out / "manifest.json").exists()  # not done: the next run must not skip it
    sent = server.requests

    # temperature 0: the same question gets the same answer, so a plain re-run serves the failures from the cache
    with pytest.raises(TeacherError, match=r"with --retry-failed \(teacher.retry_failed\)$"):
        teach.run(api_config(server, concurrency=1, max_attempts=1), prepared, out, cache)
    assert server.requests == sent
    assert (report(out)["api_calls"], report(out)["cache_hits"], report(out)["cached_failures"]) == (0, 57, 3)
    assert [f["cached"] for f in failures(out)] == [True] * 3

    manifest = teach.run(api_config(server, concurrency=1, max_attempts=1, retry_failed=True), prepared, out, cache)
    done = teach.Report.of(manifest)
    assert (done.api_calls, done.cache_hits, done.cached_failures) == (3, 57, 0)  # 60 - 3
    assert done.written == 60 and failures(out) == []


def test_allowed_failures_finish_the_stage(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    server.fail_next(3, "refusal")
    manifest = teach.run(
        api_config(server, concurrency=1, max_attempts=1, max_failed_fraction=0.05),
        prepared,
        tmp_path / "out",
        tmp_path / "c",
    )  # 3 / 60 = 5 %
    done = teach.Report.of(manifest)
    assert done.failed == 3 and done.failures_by_reason == {"refusal": 3}


def test_cache_key_sensitivity(
    prepared: Path, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, unique = tmp_path / "cache", unique_items(prepared)
    first = teach.run(api_config(server), prepared, tmp_path / "a", cache)
    assert teach.Report.of(first).api_calls == unique == server.requests

    same = teach.run(api_config(server, concurrency=2, rpm=100000), prepared, tmp_path / "b", cache)  # same input
    assert (teach.Report.of(same).api_calls, teach.Report.of(same).cache_hits) == (0, 60)

    grown = teach.run(api_config(server, limit=30), prepared, tmp_path / "c", cache)  # a subset: all cached
    assert teach.Report.of(grown).api_calls == 0

    more_attempts = teach.run(
        api_config(server, max_attempts=5), prepared, tmp_path / "c2", cache
    )  # new output, same replies
    assert teach.Report.of(more_attempts).api_calls == 0 and more_attempts.fingerprint != first.fingerprint

    other_model = teach.run(api_config(server, model="test-teacher-2"), prepared, tmp_path / "d", cache)
    assert teach.Report.of(other_model).api_calls == unique

    original = teach._prompts

    def edited(cfg: TeacherConfig) -> tuple[str, str, str]:
        system, user, reask = original(cfg)
        return system + "\nBe brief.", user, reask

    monkeypatch.setattr(teach, "_prompts", edited)
    reworded = teach.run(api_config(server), prepared, tmp_path / "e", cache)
    assert teach.Report.of(reworded).api_calls == unique  # a changed prompt re-asks everything it feeds
    assert reworded.fingerprint != first.fingerprint
    assert server.requests == 3 * unique


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
    rewrite_upstream(broken, path.name, table)

    rule_run = teach.run(TeacherConfig(kind="rule", max_failed_fraction=0.1), broken, tmp_path / "rule", tmp_path / "c")
    assert teach.Report.of(rule_run).failed == 1
    assert failures(tmp_path / "rule")[0]["reason"] == "no_source_answer"

    api_run = teach.run(api_config(server, max_failed_fraction=0.1), broken, tmp_path / "api", tmp_path / "c")
    api_report = teach.Report.of(api_run)
    assert api_report.written == 59 and api_report.failures_by_reason == {"no_source_answer": 1}
    assert server.requests == unique_items(broken) - 1


# -------------------------------------------------------------------------------------------- progress
def test_progress_reaches_the_total(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    out, cache = tmp_path / "out", tmp_path / "cache"
    teach.run(api_config(server), prepared, out, cache, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (60, 60) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert {t for _, t in seen} == {60}  # the total is known from the start

    seen.clear()
    teach.run(api_config(server), prepared, out, cache, progress=lambda d, t: seen.append((d, t)))
    assert seen == []  # skipped: no progress at all (so the UI shows no bar for a stage that did not run)

    seen.clear()  # from the cache only: still counted to the end
    teach.run(
        api_config(server, limit=2), prepared, tmp_path / "again", cache, progress=lambda d, t: seen.append((d, t))
    )
    assert seen[-1] == (6, 6)  # 2 items of each of the 3 splits, all cached


def test_rule_progress_reaches_the_total(prepared: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    teach.run(
        TeacherConfig(kind="rule", split="val"),
        prepared,
        tmp_path / "out",
        tmp_path / "c",
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen[-1] == (4, 4)  # the 4 val items


# ---------------------------------------------------------------------------------------- skip and redo
def test_a_deleted_or_truncated_output_is_redone_from_the_cache(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    out, cache = tmp_path / "02-teach", tmp_path / "cache"
    first = teach.run(api_config(server), prepared, out, cache)
    sent = server.requests
    (out / "val.parquet").unlink()
    again = teach.run(api_config(server), prepared, out, cache)
    parquet = {f"{split}.parquet" for split in SPLIT_SIZES}
    assert {f: again.files[f] for f in parquet} == {f: first.files[f] for f in parquet}  # the same bytes again
    assert teach.Report.of(again).cache_hits == 60 and server.requests == sent  # the redo costs no API call

    path = out / "train.parquet"
    path.write_bytes(path.read_bytes()[:500])
    third = teach.run(api_config(server), prepared, out, cache)
    assert {f: third.files[f] for f in parquet} == {f: first.files[f] for f in parquet}
    assert path.stat().st_size == first.files["train.parquet"].bytes and server.requests == sent


def test_a_damaged_prepare_folder_is_one_line_naming_the_command(prepared: Path, tmp_path: Path) -> None:
    data = tmp_path / "01-prepare"
    shutil.copytree(prepared, data)
    (data / "test-00000-of-00001.parquet").unlink()
    with pytest.raises(DataError) as info:
        teach.run(TeacherConfig(kind="rule"), data, tmp_path / "out", tmp_path / "cache")
    assert str(info.value) == (
        f"{data} is damaged (test-00000-of-00001.parquet is missing); run `mathwizard prepare` again to redo it"
    )
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------ kill -9
def test_kill_9_then_resume_pays_at_most_the_requests_in_flight(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    unique = unique_items(prepared)
    server.configure(latency=0.1)  # 60 requests / 4 at a time x 0.1 s: about 1.5 s of work
    out, cache_dir = tmp_path / "out", tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, server.base_url, str(prepared), str(out), str(cache_dir), str(CONCURRENCY)],
        env=os.environ.copy(),  # the API key comes from the environment (the `api_key` fixture)
    )
    try:
        deadline = time.monotonic() + 60
        while server.requests < 20 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    time.sleep(0.3)  # let the server finish the replies nobody will read
    sent_before = server.requests
    assert 20 <= sent_before < unique, "the kill must land mid-run"
    with ReplyCache.in_dir(cache_dir) as cache:
        cached = len(cache)
    assert sent_before - CONCURRENCY <= cached <= sent_before  # lost: only what was in flight

    manifest = teach.run(api_config(server, concurrency=CONCURRENCY), prepared, out, cache_dir)
    done = teach.Report.of(manifest)
    assert done.written == done.items == 60 and done.failed == 0
    assert done.api_calls == unique - cached
    assert unique <= server.requests <= unique + CONCURRENCY  # never twice the work
    sent = server.requests
    assert teach.run(api_config(server), prepared, out, cache_dir).fingerprint == manifest.fingerprint  # skipped
    assert server.requests == sent


# ---------------------------------------------------------------------------------------- retraining
def test_grown_data_costs_api_calls_only_for_the_new_rows(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    """Weekly retraining: week 1 saw 40 of the sample's rows, week 2 all 60; the cache is shared by both runs."""
    from mathwizard.data.fetch import SAMPLE_IMAGES, SAMPLE_JSONL
    from mathwizard.stages import prepare

    lines = SAMPLE_JSONL.read_text(encoding="utf-8").splitlines()
    weeks = []
    for week, rows in (("week1", lines[:40]), ("week2", lines)):
        jsonl = tmp_path / f"{week}.jsonl"
        jsonl.write_text("\n".join(rows) + "\n", encoding="utf-8")
        cfg = PrepareConfig(source="local", jsonl=str(jsonl), images=str(SAMPLE_IMAGES), max_image_size=64, workers=1)
        prepare.run(cfg, tmp_path / week / "01-prepare")
        weeks.append(tmp_path / week / "01-prepare")
    cache = tmp_path / "cache"  # <home>/cache: shared by every run of the artifact root
    first = teach.Report.of(teach.run(api_config(server), weeks[0], tmp_path / "week1" / "02-teach", cache))
    assert first.written == 40 and server.requests == 40  # one request per row, none cached yet

    server.reset_counts()
    second = teach.Report.of(teach.run(api_config(server), weeks[1], tmp_path / "week2" / "02-teach", cache))
    assert (second.written, second.cache_hits) == (60, 40)
    assert server.requests == 20  # 60 rows - 40 answered last week


# ----------------------------------------------------------------------------------------- the API key
def _files_mentioning(root: Path, needle: str) -> list[str]:
    """Files under `root` whose bytes contain `needle` (SQLite db and WAL included)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_key_stays_out_of_everything_under_faults(
    prepared: Path, server: OpenAITestServer, api_key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.configure(faults={"503": 0.1, "429": 0.05, "drop": 0.05, "wrong_answer": 0.1, "refusal": 0.05}, seed=3)
    caplog.set_level(logging.DEBUG)  # every logger, the openai and httpx ones included
    out, cache_dir = tmp_path / "out", tmp_path / "cache"
    manifest = teach.run(api_config(server, max_failed_fraction=1.0), prepared, out, cache_dir)
    done = teach.Report.of(manifest)
    assert done.api_calls > unique_items(prepared) and done.retries > 0  # faults hit
    assert _files_mentioning(tmp_path, api_key) == []
    assert (cache_dir / "teacher.sqlite").is_file() and (out / "report.json").is_file()
    assert api_key not in caplog.text and caplog.records  # logs were captured, none has the key


def test_key_stays_out_of_a_401(
    prepared: Path, server: OpenAITestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    wrong = "sk-wrong-Yy3Kd9Qp2Rt7Wm5Hc1"
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", wrong)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TeacherError) as info:
        teach.run(api_config(server), prepared, tmp_path / "out", tmp_path / "cache")
    assert server.requests == 1 and server.outcomes == {"401": 1}  # and the server did echo the key back
    rendered = "".join(traceback.format_exception(info.value))
    assert wrong not in rendered and wrong not in repr(info.value) and "Yy3Kd9" not in rendered
    assert wrong not in caplog.text
    assert _files_mentioning(tmp_path, wrong) == []


def test_an_outage_stops_the_stage_and_a_rerun_resumes_from_the_cache(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    out, cache = tmp_path / "02-teach", tmp_path / "cache"
    server.fail_after(20, "503")  # the API goes down after 20 good replies
    with pytest.raises(TransientError, match="items in a row"):
        teach.run(api_config(server, concurrency=2, request_retries=1), prepared, out, cache)
    assert read_manifest(out) is None
    with ReplyCache.in_dir(cache) as replies:
        cached = len(replies)
        assert replies.failure_count() == 0  # a 503 is never cached as a failure
    assert cached == 20 == server.outcomes["ok"]  # every good reply was kept
    stopped = report(out)  # what the stopped attempt did, for the UI and for whoever looks
    assert stopped["stopped"].startswith("TransientError: the teacher API at 127.0.0.1:")
    assert stopped["written"] >= 20 and stopped["failed"] >= 1 and stopped["not_attempted"] >= 1
    assert stopped["written"] + stopped["failed"] + stopped["not_attempted"] == stopped["items"] == 60
    assert {f["reason"] for f in failures(out)} == {"http_503"} and len(failures(out)) == stopped["failed"]

    server.clear()
    server.reset_counts()
    done = teach.Report.of(teach.run(api_config(server, concurrency=2), prepared, out, cache))  # a plain re-run
    assert (done.written, done.cache_hits) == (60, cached)
    assert server.requests == done.api_calls == unique_items(prepared) - cached  # only what was missing


def test_a_key_revoked_mid_run_still_writes_the_report_and_a_rerun_resumes(
    prepared: Path, server: OpenAITestServer, api_key: str, tmp_path: Path
) -> None:
    out, cache = tmp_path / "02-teach", tmp_path / "cache"
    server.fail_after(10, "401")  # ten replies, then the key is refused
    with pytest.raises(TeacherError, match="rejected the API key"):
        teach.run(api_config(server, concurrency=1), prepared, out, cache)
    stopped = report(out)
    assert stopped["stopped"].startswith("TeacherError: the teacher API at") and api_key not in stopped["stopped"]
    assert (stopped["api_calls"], stopped["failed"], failures(out)) == (11, 0, [])  # ten replies and the 401
    assert stopped["written"] >= 10 and stopped["written"] + stopped["not_attempted"] == 60
    assert sum(split["not_attempted"] for split in stopped["splits"].values()) == stopped["not_attempted"]
    assert read_manifest(out) is None  # not done: the re-run must not skip it

    server.clear()
    server.reset_counts()
    done = teach.Report.of(teach.run(api_config(server, concurrency=1), prepared, out, cache))
    assert done.written == 60 and done.stopped is None and done.not_attempted == 0
    assert server.requests == unique_items(prepared) - 10  # only what the stopped attempt had not asked


def test_ctrl_c_writes_the_report_sends_nothing_more_and_closes_what_was_in_flight(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    out, cache = tmp_path / "02-teach", tmp_path / "cache"
    server.configure(latency=0.2)  # 60 items, 2 at a time: about 6 s of work
    armed = threading.Event()

    def ctrl_c(signum: int, frame: object) -> None:
        if armed.is_set():  # only while the stage runs: never into pytest itself
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, ctrl_c)

    def press() -> None:
        while server.requests < 4:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press, daemon=True)
    try:
        armed.set()
        presser.start()
        with pytest.raises(KeyboardInterrupt):
            teach.run(api_config(server, concurrency=2), prepared, out, cache)
    finally:
        armed.clear()
        signal.signal(signal.SIGINT, previous)
    sent = server.requests
    time.sleep(0.5)  # more than two replies' time: anything still running would have sent by now
    assert server.requests == sent < unique_items(prepared)
    assert server.cancelled >= 1  # the requests in flight were cancelled on their connections
    stopped = report(out)
    assert stopped["stopped"] == "interrupted (Ctrl-C)" and stopped["not_attempted"] >= 1
    assert stopped["written"] + stopped["failed"] + stopped["not_attempted"] == 60
    assert read_manifest(out) is None and failures(out) == []


def test_a_stale_report_never_survives_into_a_new_attempt(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    out, cache = tmp_path / "02-teach", tmp_path / "cache"
    server.fail_next(1, "refusal")
    with pytest.raises(TeacherError, match="1 / 60 items failed"):
        teach.run(api_config(server, concurrency=1, max_attempts=1), prepared, out, cache)
    assert (out / "report.json").is_file() and (out / "failures.jsonl").is_file()
    (cache / "teacher.sqlite").write_bytes(b"not a database any more" * 100)  # the next attempt cannot even start
    for name in ("teacher.sqlite-wal", "teacher.sqlite-shm"):
        (cache / name).unlink(missing_ok=True)
    with pytest.raises(DataError, match=r"teacher cache .*teacher\.sqlite is damaged \(file is not a database\)"):
        teach.run(api_config(server, concurrency=1, max_attempts=1), prepared, out, cache)
    assert not (out / "report.json").exists() and not (out / "failures.jsonl").exists()


def test_a_too_long_item_fails_alone_and_is_not_asked_again(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    server.fail_next(1, "too_long")  # one at a time: the first item is too long for the server's context
    cfg = api_config(server, concurrency=1, max_failed_fraction=0.05)
    first = teach.Report.of(teach.run(cfg, prepared, tmp_path / "a", cache))
    assert (first.written, first.failed, first.failures_by_reason) == (59, 1, {"too_long": 1})
    assert first.api_calls == unique_items(prepared) and first.retries == 0  # never retried
    assert failures(tmp_path / "a")[0]["last_error"].startswith("too_long: 400: This model's maximum context length")

    sent = server.requests
    again = teach.Report.of(teach.run(cfg, prepared, tmp_path / "b", cache))  # a new folder, the same cache
    assert (again.api_calls, again.cache_hits, again.cached_failures, again.failed) == (0, 59, 1, 1)
    assert server.requests == sent and failures(tmp_path / "b")[0]["cached"] is True
    assert again.summary().endswith("0 API calls, 59 cache hits, 1 failures from the cache")

    retried = teach.Report.of(teach.run(cfg.model_copy(update={"retry_failed": True}), prepared, tmp_path / "c", cache))
    assert (retried.api_calls, retried.written, retried.failed) == (1, 60, 0)  # asked again: fits now


def test_a_failure_that_can_pass_is_asked_again_by_a_plain_rerun(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    out, cache = tmp_path / "02-teach", tmp_path / "cache"
    server.fail_after(1, "500", n=1)  # the second request: a 500, and no retries allowed
    cfg = api_config(server, concurrency=1, request_retries=0)
    with pytest.raises(TeacherError, match=r"1 / 60 items failed .*http_500"):
        teach.run(cfg, prepared, out, cache)
    assert [f["reason"] for f in failures(out)] == ["http_500"]
    sent = server.requests
    done = teach.Report.of(teach.run(cfg, prepared, out, cache))
    assert (done.api_calls, done.written, done.cached_failures) == (1, 60, 0) and server.requests == sent + 1


def test_a_429_halves_the_in_flight_limit_and_successes_restore_it(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    server.fail_next(1, "429")  # the first request (sent alone) is rate limited
    done = teach.Report.of(teach.run(api_config(server, concurrency=4), prepared, tmp_path / "o", tmp_path / "c"))
    assert (done.concurrency, done.concurrency_min, done.concurrency_final) == (4, 2, 4)
    assert done.written == 60 and done.retries == 1
    assert "concurrency lowered to 2 by timeouts or 429s, ended at 4 of 4" in done.summary()

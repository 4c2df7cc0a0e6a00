"""The runner: retries, Retry-After, re-asks of invalid replies, one request for a wrong key, limits, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mathwizard.answers import final_answer
from mathwizard.errors import TeacherError, TransientError
from mathwizard.teacher.cache import ReplyCache
from mathwizard.teacher.runner import ApiRunner, Item, RateLimiter
from mathwizard.testing import OpenAITestServer
from scripts.make_sample import problems
from tests.teacher.helpers import api_config

SAMPLE = problems()


def items(n: int, offset: int = 0) -> list[Item]:
    out = []
    for i in range(offset, offset + n):
        solution = SAMPLE[i % len(SAMPLE)].solution
        user = f"Problem {i}\n<reference_solution>\n{solution}\n</reference_solution>"
        out.append(
            Item(
                key=f"item-{i}",
                messages=({"role": "system", "content": "Rewrite."}, {"role": "user", "content": user}),
                source_answer=final_answer(solution) or "",
                reask="Invalid: {problems}. Again.",
            )
        )
    return out


class RecordingSleep:
    """Records every backoff the runner asks for and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ReplyCache]:
    with ReplyCache.in_dir(tmp_path) as c:
        yield c


def test_all_items_answered_and_cached(server: OpenAITestServer, cache: ReplyCache) -> None:
    with ApiRunner(api_config(server), cache) as runner:
        outcomes, stats = runner.run(items(12))
    assert [o.ok for o in outcomes] == [True] * 12
    assert stats.api_calls == server.requests == 12 and stats.retries == 0
    assert len(cache) == 12 and cache.get("item-3").text == outcomes[3].text


TRANSPORT = ["429", "500", "502", "503", "drop", "non_json", "bad_json", "bad_completion", "slow"]


@pytest.mark.parametrize("fault", TRANSPORT)
def test_each_transport_fault_is_retried(server: OpenAITestServer, cache: ReplyCache, fault: str) -> None:
    server.fail_next(1, fault)
    with ApiRunner(api_config(server, timeout_s=0.3), cache) as runner:
        (outcome,), stats = runner.run(items(1))
    assert outcome.ok and outcome.attempts == 1
    assert stats.api_calls == 2 and stats.retries == 1  # the fault, then the good reply
    assert server.outcomes.get("ok") == 1


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("wrong_answer", "answer_mismatch"),
        ("missing_answer", "missing_final_answer_header"),
        ("refusal", "refusal"),
        ("length", "truncated"),
    ],
)
def test_invalid_replies_are_asked_again_then_excluded(
    server: OpenAITestServer, cache: ReplyCache, fault: str, reason: str
) -> None:
    server.fail_next(1, fault)
    with ApiRunner(api_config(server, max_attempts=2), cache) as runner:
        (fixed,), _ = runner.run(items(1))
        assert fixed.ok and fixed.attempts == 2  # a bad reply, then a good one

        server.fail_next(2, fault)
        (failed,), stats = runner.run(items(1, offset=1))
    assert not failed.ok and failed.reason == reason and failed.attempts == 2
    assert stats.api_calls == 2
    assert cache.get("item-1") is None  # the bad replies were never cached
    assert cache.get("item-0") is not None


def test_retry_after_is_honoured(server: OpenAITestServer, cache: ReplyCache) -> None:
    server.configure(retry_after=1.5)
    server.fail_next(1, "429")
    sleep = RecordingSleep()
    with ApiRunner(api_config(server, backoff_s=0.01), cache, sleep=sleep) as runner:
        (outcome,), _ = runner.run(items(1))
    assert outcome.ok
    assert len(sleep.waits) == 1 and 1.5 <= sleep.waits[0] <= 1.7  # Retry-After + at most 0.2 s of jitter


def test_backoff_grows_exponentially_with_jitter(server: OpenAITestServer, cache: ReplyCache) -> None:
    server.fail_next(3, "503")
    sleep = RecordingSleep()
    with ApiRunner(api_config(server, backoff_s=1.0, backoff_max_s=60.0), cache, sleep=sleep) as runner:
        (outcome,), stats = runner.run(items(1))
    assert outcome.ok and stats.retries == 3
    # 1 s, 2 s, 4 s bases; each wait lies in [base / 2, base]
    assert [base / 2 <= wait <= base for wait, base in zip(sleep.waits, (1, 2, 4), strict=True)] == [True] * 3


def test_exhausted_retries_fail_the_item_not_the_run(server: OpenAITestServer, cache: ReplyCache) -> None:
    with ApiRunner(api_config(server, request_retries=2), cache) as runner:
        runner.run(items(1))  # the API has answered once
        server.fail_next(3, "500")
        (outcome,), stats = runner.run(items(1, offset=1))
    assert not outcome.ok and outcome.reason == "http_500" and "http_500" in outcome.last_error
    assert stats.api_calls == 3 and stats.retries == 2  # 1 + 2 retries


def test_wrong_key_costs_one_request(
    server: OpenAITestServer, cache: ReplyCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", "sk-wrong-Yy3Kd9Qp2Rt7Wm5")
    with ApiRunner(api_config(server, concurrency=16), cache) as runner:
        with pytest.raises(TeacherError, match="rejected the API key"):
            runner.run(items(300))
        assert server.requests == 1  # the first request goes alone; the 401 stops the other 299
        with pytest.raises(TeacherError):
            runner.run(items(5))  # and nothing more is sent afterwards
    assert server.requests == 1 and len(cache) == 0


def test_a_key_revoked_mid_run_stops_within_the_requests_in_flight(server: OpenAITestServer, cache: ReplyCache) -> None:
    with ApiRunner(api_config(server, concurrency=4), cache) as runner:
        runner.run(items(1))
        server.configure(api_key="sk-rotated")
        with pytest.raises(TeacherError):
            runner.run(items(200, offset=1))
    assert server.requests <= 1 + 4  # the first item, then at most one request per slot


def test_api_down_from_the_start_costs_one_item_of_retries(server: OpenAITestServer, cache: ReplyCache) -> None:
    server.fail_for(600, "503")
    runner = ApiRunner(api_config(server, concurrency=8, request_retries=2), cache)
    with runner, pytest.raises(TransientError, match="did not answer after 2 retries"):
        runner.run(items(100))
    assert server.requests == 3  # only the first item probed: 1 + 2 retries


def test_an_outage_mid_run_stops_the_run(server: OpenAITestServer, cache: ReplyCache) -> None:
    server.fail_after(10, "503")
    with ApiRunner(api_config(server, concurrency=2, request_retries=1), cache) as runner:
        with pytest.raises(TransientError, match="items in a row"):
            runner.run(items(60))
        cached = len(cache)
        assert cached == 10  # every good reply was kept
        # at most max(4 x 2, 2 + 8) = 10 active items, each 1 + 1 tries, before the breaker (4 in a row) trips
        assert server.requests <= 10 + 10 * 2
        sent = server.requests
        with pytest.raises(TransientError):
            runner.run(items(5))  # straight after the stop (within backoff_max_s): fails without a request
        assert server.requests == sent
        server.clear()
        time.sleep(0.05)  # > backoff_max_s = 0.02
        outcomes, stats = runner.run(items(60))  # a later attempt probes again and goes through
    assert all(o.ok for o in outcomes) and stats.api_calls == 60  # the runner itself asks; the stage skips cached


def test_concurrency_is_bounded(server: OpenAITestServer, cache: ReplyCache) -> None:
    server.configure(latency=0.03)
    with ApiRunner(api_config(server, concurrency=3), cache) as runner:
        runner.run(items(30))
    assert 2 <= server.max_in_flight <= 3


def test_rate_limiter_spaces_requests() -> None:
    clock = [0.0]

    async def sleep(seconds: float) -> None:
        clock[0] += seconds

    async def go() -> float:
        limiter = RateLimiter(600, clock=lambda: clock[0], sleep=sleep)  # 10 per second, 10 at once
        for _ in range(25):
            await limiter.take()
        limiter.settle(estimated=1, actual=21)  # the last request was 20 bigger than estimated: debt
        await limiter.take()
        return clock[0]

    # 10 from the full bucket, 15 more at 10/s = 1.5 s; then a debt of 20 + 1 token = 2.1 s more
    assert asyncio.run(go()) == pytest.approx(3.6)


def test_no_limit_means_no_wait() -> None:
    async def forbidden(seconds: float) -> None:
        raise AssertionError("slept")

    async def go() -> None:
        limiter = RateLimiter(None, sleep=forbidden)
        for _ in range(1000):
            await limiter.take(1e6)

    asyncio.run(go())

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
from mathwizard.teacher.runner import AdaptiveLimit, ApiRunner, Item, RateLimiter, _without_reply
from mathwizard.teacher.validate import describe
from mathwizard.testing import OpenAITestServer
from mathwizard.testing.openai_server import answer
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
    # The stop holds for backoff_max_s after the breaker trips: 2 s, so "straight after" holds on a loaded box too.
    config = api_config(server, concurrency=2, request_retries=1, backoff_max_s=2.0)
    with ApiRunner(config, cache) as runner:
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
        time.sleep(2.1)  # > backoff_max_s
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


# ------------------------------------------------------------------------------------ too long, cut off
@pytest.mark.parametrize("fault", ["too_long", "413"])
def test_a_request_too_long_fails_its_item_only(server: OpenAITestServer, cache: ReplyCache, fault: str) -> None:
    server.fail_next(1, fault)  # the first item (sent alone) is too long for the server
    with ApiRunner(api_config(server, concurrency=1), cache) as runner:
        outcomes, stats = runner.run(items(5))
    assert [o.ok for o in outcomes] == [False, True, True, True, True]
    assert (outcomes[0].reason, outcomes[0].attempts, outcomes[0].transient) == ("too_long", 1, False)
    assert stats.api_calls == 5 and stats.retries == 0  # never retried: it would be too long again
    assert cache.failures(["item-0"])["item-0"].reason == "too_long"  # cached with its reason


def test_a_cut_off_reply_is_asked_again_without_its_text(server: OpenAITestServer, cache: ReplyCache) -> None:
    server.fail_next(1, "length")  # half the reply, finish_reason "length"
    with ApiRunner(api_config(server, max_attempts=2), cache) as runner:
        (outcome,), stats = runner.run(items(1))
    assert outcome.ok and outcome.attempts == 2 and stats.api_calls == 2
    first, again = server.plan.history
    assert [m["role"] for m in again] == ["system", "user"]  # roles still alternate, no assistant turn
    assert again[1]["content"].startswith(first[1]["content"])  # the question again, with the reason after it
    assert "cut off at the length limit" in again[1]["content"]
    assert sum(len(m["content"]) for m in again) < sum(len(m["content"]) for m in first) + 600


def test_a_re_ask_that_overflows_the_context_is_sent_without_the_reply(
    server: OpenAITestServer, cache: ReplyCache
) -> None:
    (item,) = items(1)
    reply = answer(list(item.messages))  # the test server's reply; the re-ask carries it (spoilt: one more char)
    reason = describe(["answer_mismatch"])
    with_reply = [*item.messages, {"content": reply + "+1"}, {"content": item.reask.replace("{problems}", reason)}]
    without = _without_reply(item, ["answer_mismatch"])
    sizes = [sum(len(m["content"]) for m in messages) for messages in (without, with_reply)]
    assert sizes[0] < sizes[1]
    server.configure(max_prompt_chars=sum(sizes) // 2)  # room for the re-ask without the reply, not with it
    server.fail_next(1, "wrong_answer")
    with ApiRunner(api_config(server, max_attempts=2), cache) as runner:
        (outcome,), stats = runner.run([item])
    assert outcome.ok and outcome.attempts == 2
    assert server.outcomes == {"wrong_answer": 1, "too_long": 1, "ok": 1} and stats.api_calls == 3
    assert [m["role"] for m in server.plan.history[1]] == ["system", "user", "assistant", "user"]  # too long
    assert [m["role"] for m in server.plan.history[2]] == ["system", "user"]  # the same re-ask, reply left out


def test_content_failures_are_cached_with_their_reason_transient_ones_are_not(
    server: OpenAITestServer, cache: ReplyCache
) -> None:
    with ApiRunner(api_config(server, request_retries=1, max_attempts=1), cache) as runner:
        runner.run(items(1))  # the API has answered once
        server.fail_next(1, "refusal")
        server.fail_next(2, "503")  # queued after it: the next item's request and its one retry
        refused, down = runner.run(items(2, offset=1))[0]
    assert (refused.reason, refused.transient, down.reason, down.transient) == ("refusal", False, "http_503", True)
    cached = cache.failures(["item-1", "item-2"])
    assert set(cached) == {"item-1"} and cached["item-1"].reason == "refusal"
    assert cached["item-1"].text == "I can't help with that request." and cached["item-1"].attempts == 1


# ------------------------------------------------------------------------------------ adaptive concurrency
def test_the_in_flight_limit_halves_once_per_round_and_climbs_back() -> None:
    async def go() -> list[int]:
        limit = AdaptiveLimit(8)
        seen = [limit.current]
        sent = await limit.acquire()  # round 0
        limit.release()
        limit.overloaded(sent)
        limit.overloaded(sent)  # a second timeout from the same round: no second cut
        seen.append(limit.current)
        limit.overloaded(await limit.acquire())  # sent after the cut: cuts again
        limit.release()
        seen.append(limit.current)
        for _ in range(3):
            limit.overloaded(limit._round)
        seen += [limit.current, limit.lowest]  # never below 1
        for _ in range(1 + 2 + 3):  # one round of successes per step: 1 -> 2 -> 3 -> 4
            limit.succeeded()
        seen.append(limit.current)
        for _ in range(100):
            limit.succeeded()
        seen.append(limit.current)  # back to the ceiling, not past it
        return seen

    assert asyncio.run(go()) == [8, 4, 2, 1, 1, 4, 8]


def test_a_lowered_limit_holds_requests_back() -> None:
    async def go() -> tuple[int, int]:
        limit = AdaptiveLimit(4)
        limit.overloaded(0)  # 4 -> 2
        holders = [await limit.acquire() for _ in range(2)]
        waiting = asyncio.ensure_future(limit.acquire())
        await asyncio.sleep(0.01)
        blocked = int(not waiting.done())
        limit.release()
        await asyncio.wait_for(waiting, 1)
        return blocked, len(holders)

    assert asyncio.run(go()) == (1, 2)


def test_a_server_that_queues_lowers_the_limit_and_drops_the_abandoned_requests(
    server: OpenAITestServer, cache: ReplyCache
) -> None:
    # llama.cpp-like: one reply at a time, 0.1 s each; four at once means the fourth waits 0.3 s at the server and
    # times out at 0.35 s: at least one timeout, so the limit comes down; every item still gets its reply
    server.configure(capacity=1, latency=0.1)
    with ApiRunner(api_config(server, concurrency=4, timeout_s=0.35, request_retries=8), cache) as runner:
        outcomes, stats = runner.run(items(12))
    assert all(o.ok for o in outcomes)
    assert stats.concurrency_min <= 2 and 1 <= stats.concurrency_final <= 4
    assert server.cancelled >= 1  # a timed-out request's connection was closed: the server did not compute it


def test_time_waiting_for_a_slot_is_not_timed(server: OpenAITestServer, cache: ReplyCache) -> None:
    server.configure(latency=0.15)
    # one at a time: the fifth item waits 0.6 s for its slot, twice the timeout, and is still not timed out
    with ApiRunner(api_config(server, concurrency=1, timeout_s=0.3), cache) as runner:
        outcomes, stats = runner.run(items(5))
    assert all(o.ok for o in outcomes) and stats.retries == 0 and stats.api_calls == 5


# ----------------------------------------------------------------------------------------- early stops
def test_what_a_stopped_run_finished_is_kept(server: OpenAITestServer, cache: ReplyCache) -> None:
    with ApiRunner(api_config(server, concurrency=1), cache) as runner:
        runner.run(items(1))
        server.fail_after(3, "401")  # the key is revoked after three more replies
        with pytest.raises(TeacherError):
            runner.run(items(10, offset=1))
        finished, stats = runner.partial()
    assert [o.key for o in finished] == ["item-1", "item-2", "item-3"] and all(o.ok for o in finished)
    assert stats.api_calls == 4  # three replies and the 401

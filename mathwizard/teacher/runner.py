"""Runs many teacher requests at once under the API's limits, retrying what can recover, validating every reply.

Policy, per request: an in-flight limit that adapts (halved by a timeout or a 429, down to 1; raised by one per
round of successes, back up to `concurrency`), a requests-per-minute and a tokens-per-minute token bucket, and
tenacity retries (exponential backoff with jitter, or the server's `Retry-After`) on `APIFault`s.
Per item: a reply that fails validation is asked again with the reason (up to `max_attempts`): with the reply and the
reason appended to the conversation, except for a reply cut off at `max_tokens`, whose text is left out (appending
it could only overflow the context); then the item is reported as failed. A request the server finds too long
(`ItemRejected`) fails its item as `too_long` and the run goes on. Valid replies enter the cache, and so do failures
a re-run would meet again (validation, `too_long`), with their reason; timeouts and 5xx never do.
Per run: the first request goes out alone, so a wrong key or model costs one request, not thousands; a
`TeacherError` stops everything at once; and when items keep exhausting their retries (the API is down) the run
stops with a `TransientError`, to be resumed from the cache. However a run stops (those errors, Ctrl-C),
`partial()` then holds what it finished.

The runner owns an event loop in a background thread: callers stay synchronous, and every request of a stage
shares one set of limits, which keeps `concurrency` and `rpm` true for the whole stage.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from mathwizard.config import TeacherConfig
from mathwizard.errors import TeacherError, TransientError
from mathwizard.teacher.cache import CachedFailure, CachedReply, ReplyCache
from mathwizard.teacher.client import APIFault, ItemRejected, Message, OpenAIClient, Reply
from mathwizard.teacher.validate import describe, reply_problems

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of items just finished (e.g. a progress.Tally)
Sleep = Callable[[float], Awaitable[None]]
_CHARS_PER_TOKEN = 3.5  # LaTeX-heavy English; only used to estimate a request's size for the TPM bucket
_OVERLOAD = ("timeout", "http_429")  # faults that say "fewer at once, please"
_SETTLE_S = 2.0  # after Ctrl-C: how long the cancelled requests get to close their connections and be counted


@dataclass(frozen=True)
class Item:
    """One request to make: its cache key, first messages, the answer it must agree with, and a re-ask text."""

    key: str
    messages: tuple[Message, ...]
    source_answer: str
    reask: str  # a template with {problems}


@dataclass
class Outcome:
    key: str
    text: str | None = None
    reason: str | None = None  # why the item failed; None when it succeeded
    attempts: int = 0
    last_error: str = ""
    transient: bool = False  # failed for a reason a later attempt may not meet (timeouts, 5xx): not cached

    @property
    def ok(self) -> bool:
        return self.text is not None


@dataclass
class Stats:
    api_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    concurrency_min: int = 0  # the lowest in-flight limit the run came down to
    concurrency_final: int = 0  # the limit when the run ended

    def add(self, other: Stats) -> None:
        self.api_calls += other.api_calls
        self.retries += other.retries
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens


class AdaptiveLimit:
    """How many requests may be in flight (AIMD, like TCP's congestion window), for one event loop.

    A timeout or a 429 halves the limit (down to 1), once per round: requests sent before the last cut do not cut it
    again, so a burst of timeouts from one overloaded moment halves it once, not down to 1. Each successful reply
    adds 1/limit, so a full round of successes raises the limit by one, back up to `ceiling`.
    """

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self.lowest = ceiling
        self.in_flight = 0
        self._round = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    async def acquire(self) -> int:
        """Wait for a free slot; returns the round the request is sent in (hand it to `overloaded`)."""
        while self.in_flight >= self.current:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # we were handed a slot we will not take: pass it on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.in_flight += 1
        return self._round

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def succeeded(self) -> None:
        before = self.current
        self.limit = min(float(self.ceiling), self.limit + 1.0 / self.current)
        if self.current > before:
            self._wake()

    def overloaded(self, sent_in_round: int) -> None:
        if sent_in_round != self._round:
            return  # sent before the last cut: that cut already answered this overload
        self._round += 1
        self.limit = max(1.0, self.limit / 2)
        self.lowest = min(self.lowest, self.current)
        log.info("teacher API overloaded: at most %d requests in flight now", self.current)

    def _wake(self) -> None:
        free = self.current - self.in_flight
        for waiter in self._waiters:
            if free <= 0:
                break
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class RateLimiter:
    """A token bucket refilled at `per_minute / 60` per second holding one second's worth, allowed into debt.

    Debt lets one large request through a small bucket while keeping the average rate: the next callers wait
    until the bucket is back above zero.
    """

    def __init__(
        self, per_minute: int | None, *, clock: Callable[[], float] = time.monotonic, sleep: Sleep = asyncio.sleep
    ) -> None:
        self.rate = per_minute / 60.0 if per_minute else None
        self.capacity = max(1.0, self.rate or 1.0)
        self.level = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self._lock = asyncio.Lock()  # waiters queue in order

    def _refill(self) -> None:
        now = self._clock()
        if self.rate is not None:
            self.level = min(self.capacity, self.level + (now - self._updated) * self.rate)
        self._updated = now

    async def take(self, amount: float = 1.0) -> None:
        if self.rate is None:
            return
        async with self._lock:
            need = min(amount, self.capacity)
            self._refill()
            while self.level < need - 1e-9:  # tolerance: float sums must not spin on a 1e-17 s sleep
                await self._sleep((need - self.level) / self.rate)
                self._refill()
            self.level -= amount

    def settle(self, estimated: float, actual: float) -> None:
        """Correct the bucket once a request's real size is known."""
        if self.rate is not None:
            self._refill()
            self.level -= actual - estimated


@dataclass
class _Gate:
    """Until one request succeeds, only one item (the prober) may send."""

    opened: asyncio.Event = field(default_factory=asyncio.Event)
    probing: bool = False


class ApiRunner:
    """Sends items to the teacher API under `cfg`'s limits and retry policy; valid replies go into `cache`.

    Args:
        cfg: the teacher settings (model, endpoint, limits, retries, attempts).
        cache: where valid replies are stored, one commit per reply.
        sleep: the coroutine used between retries (tests pass one that records the waits).
        seed: seeds the backoff jitter.

    Raises:
        ConfigError: no API key is configured.
    """

    def __init__(self, cfg: TeacherConfig, cache: ReplyCache, *, sleep: Sleep | None = None, seed: int = 0) -> None:
        self.cfg = cfg
        self.cache = cache
        self._client = OpenAIClient(base_url=cfg.base_url, model=cfg.model, timeout_s=cfg.timeout_s)
        self._sleep = sleep or asyncio.sleep
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-runner", daemon=True)
        self._thread.start()
        self._closed = False
        # Built inside the loop's thread, where they are used.
        self._call(self._setup())

    async def _setup(self) -> None:
        cfg = self.cfg
        self._limit = AdaptiveLimit(cfg.concurrency)
        # Items waiting out a backoff release their request slot; this bound keeps an outage from starting
        # every item of the stage at once.
        self._active = asyncio.Semaphore(max(4 * cfg.concurrency, cfg.concurrency + 8))
        self._requests = RateLimiter(cfg.rpm)
        self._tokens = RateLimiter(cfg.tpm)
        self._gate = _Gate()
        self._abort: BaseException | None = None
        self._abort_at = 0.0
        self._failing_streak = 0
        self._breaker = max(4, cfg.concurrency)
        self._completion_estimate = float(min(cfg.max_tokens, 600))
        self._finished: dict[str, Outcome] = {}
        self._stats = Stats()

    def _call(self, coro: Awaitable[object]) -> object:
        ended = threading.Event()

        async def guarded() -> object:
            try:
                return await coro
            finally:
                ended.set()

        future = asyncio.run_coroutine_threadsafe(guarded(), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            # Interrupted here (Ctrl-C): give the cancelled requests a moment to close their connections (so the
            # server can stop computing) and the run to record what it finished.
            ended.wait(_SETTLE_S)
            raise

    # ------------------------------------------------------------------------------------------ public
    def run(self, items: Sequence[Item], progress: Progress | None = None) -> tuple[list[Outcome], Stats]:
        """Ask for every item (blocking); outcomes in the order of `items`.

        Raises:
            TeacherError: the API refused the work (401, 403, 404, a 400 other than too long); nothing more is sent.
            TransientError: the API kept failing; what succeeded is cached, so a re-run resumes.
            After any of these (or a KeyboardInterrupt), `partial()` holds what the run finished.
        """
        if self._closed:
            raise RuntimeError("the teacher runner is closed")
        self._finished, self._stats = {}, Stats()
        self._limit.lowest = self._limit.current  # the lowest of this run (the limit itself carries over)
        if not items:
            return [], self._stats
        return self._call(self._run(list(items), progress))  # type: ignore[return-value]

    def partial(self) -> tuple[list[Outcome], Stats]:
        """The outcomes of the items the last `run` finished, and its counts, however it ended."""
        self._stats.concurrency_min, self._stats.concurrency_final = self._limit.lowest, self._limit.current
        return list(self._finished.values()), self._stats

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> ApiRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- items
    async def _run(self, items: list[Item], progress: Progress | None) -> tuple[list[Outcome], Stats]:
        if isinstance(self._abort, TransientError):
            # Another chunk of the same stage right after the outage stopped us: fail at once rather than probe
            # again; a later attempt (a task retry, a re-run) probes afresh.
            if time.monotonic() - self._abort_at < min(self.cfg.backoff_max_s, 10.0):
                raise TransientError(str(self._abort))
            self._abort = None
            self._gate = _Gate()
            self._failing_streak = 0
        stats = self._stats
        tasks = [asyncio.ensure_future(self._item(item, stats)) for item in items]
        try:
            for finished in asyncio.as_completed(tasks):
                await finished
                if progress is not None:
                    progress(1)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return [task.result() for task in tasks], self.partial()[1]

    async def _item(self, item: Item, stats: Stats) -> Outcome:
        cfg = self.cfg
        async with self._active:
            outcome = Outcome(item.key)
            messages = list(item.messages)
            problems: list[str] = []
            last_text: str | None = None
            for attempt in range(1, cfg.max_attempts + 1):
                outcome.attempts = attempt
                exhausted: APIFault | None = None
                try:
                    reply = await self._ask(item, messages, problems, stats)
                except APIFault as fault:
                    exhausted = fault
                except ItemRejected as rejected:
                    outcome.reason, outcome.last_error = rejected.reason, str(rejected)
                    return self._failed(outcome, None)
                if exhausted is not None:  # outside the except block: a stop must not chain the fault
                    outcome.reason, outcome.last_error, outcome.transient = exhausted.reason, str(exhausted), True
                    self._finished[item.key] = outcome
                    self._exhausted(exhausted)
                    return outcome
                problems = reply_problems(
                    reply.text, item.source_answer, finish_reason=reply.finish_reason, refusal=reply.refusal
                )
                if not problems:
                    self.cache.put(item.key, _cached(reply, self._client.host, attempt))
                    outcome.text = reply.text
                    self._finished[item.key] = outcome
                    return outcome
                outcome.reason = problems[0]
                outcome.last_error = f"{', '.join(problems)}: {_excerpt(reply.text)}"
                last_text = reply.text
                log.debug("item %s attempt %d invalid: %s", item.key[:12], attempt, ", ".join(problems))
                messages = next_messages(item, reply.text, problems)
            return self._failed(outcome, last_text)

    async def _ask(self, item: Item, messages: list[Message], problems: list[str], stats: Stats) -> Reply:
        """One attempt; a re-ask whose appended reply makes it too long is sent again without that reply."""
        try:
            return await self._request(messages, stats)
        except ItemRejected:
            if len(messages) <= len(item.messages):
                raise
        return await self._request(_without_reply(item, problems), stats)

    def _failed(self, outcome: Outcome, last_text: str | None) -> Outcome:
        """An item that a re-run would fail again the same way: its failure is cached with the reason."""
        failure = CachedFailure(outcome.reason or "unknown", outcome.last_error, outcome.attempts, last_text)
        self.cache.put_failure(outcome.key, failure)
        self._finished[outcome.key] = outcome
        return outcome

    def _exhausted(self, fault: APIFault) -> None:
        """An item used up its retries: stop the run when the API looks down rather than unlucky."""
        self._failing_streak += 1
        never_answered = not self._gate.opened.is_set()
        if never_answered or self._failing_streak >= self._breaker:
            what = "did not answer" if never_answered else f"failed {self._failing_streak} items in a row"
            self._abort = TransientError(
                f"the teacher API at {self._client.host} {what} after {self.cfg.request_retries} retries "
                f"(last: {fault}); re-run to resume, finished items are cached"
            )
            self._abort_at = time.monotonic()
            self._gate.opened.set()  # wake the items waiting for the prober, so they see the abort
            raise self._abort

    # ---------------------------------------------------------------------------------------- requests
    async def _request(self, messages: list[Message], stats: Stats) -> Reply:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.cfg.request_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(APIFault),
            sleep=self._sleep,
            reraise=True,
            before_sleep=lambda state: self._count_retry(state, stats),
        )
        reply: Reply | None = None
        async for attempt in retrying:
            with attempt:
                reply = await self._send(messages, stats)
        assert reply is not None  # tenacity either returned a reply or re-raised
        return reply

    def _count_retry(self, state: RetryCallState, stats: Stats) -> None:
        stats.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        log.debug("retrying after %s (attempt %d)", exc, state.attempt_number)

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with full jitter; the server's Retry-After when it gave one."""
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return retry_after + self._rng.uniform(0, min(1.0, 0.1 * retry_after + 0.05))
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (state.attempt_number - 1))
        return base / 2 + self._rng.uniform(0, base / 2)

    def _check_abort(self) -> None:
        if self._abort is not None:
            raise type(self._abort)(str(self._abort))

    async def _send(self, messages: list[Message], stats: Stats) -> Reply:
        self._check_abort()
        gate = self._gate
        while not gate.opened.is_set():
            if not gate.probing:
                gate.probing = True
                try:
                    reply = await self._send_now(messages, stats)
                except ItemRejected:
                    gate.opened.set()  # the server read the request (key and model are fine): let the others go
                    raise
                finally:
                    gate.probing = False
                gate.opened.set()
                return reply
            await gate.opened.wait()
            self._check_abort()
        return await self._send_now(messages, stats)

    async def _send_now(self, messages: list[Message], stats: Stats) -> Reply:
        estimate = sum(len(m["content"]) for m in messages) / _CHARS_PER_TOKEN + self._completion_estimate
        # Only the wait for a slot and the rate buckets happen here, before the request: the client's timeout
        # starts with the request itself, so time in our own queue never times a request out.
        sent_in_round = await self._limit.acquire()
        try:
            await self._requests.take(1)
            await self._tokens.take(estimate)
            self._check_abort()
            stats.api_calls += 1
            try:
                reply = await self._client.complete(
                    messages, temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens
                )
            except APIFault as fault:
                if fault.reason in _OVERLOAD:
                    self._limit.overloaded(sent_in_round)
                raise
            except ItemRejected:
                self._failing_streak = 0  # the server is up: it read the request
                raise
            except TeacherError as exc:
                self._abort = exc
                self._gate.opened.set()
                raise
        finally:
            self._limit.release()
        self._limit.succeeded()
        self._failing_streak = 0
        stats.prompt_tokens += reply.prompt_tokens
        stats.completion_tokens += reply.completion_tokens
        if reply.prompt_tokens or reply.completion_tokens:
            self._tokens.settle(estimate, reply.prompt_tokens + reply.completion_tokens)
            self._completion_estimate = 0.9 * self._completion_estimate + 0.1 * reply.completion_tokens
        return reply


def next_messages(item: Item, text: str, problems: list[str]) -> list[Message]:
    """The conversation of the next ask after an invalid reply `text`: the reply and the reason appended, except for
    a reply cut off at max_tokens, whose text is left out (appending it could only overflow the context)."""
    if "truncated" in problems:
        return _without_reply(item, ["truncated"])
    return [
        *item.messages,
        {"role": "assistant", "content": text},
        {"role": "user", "content": item.reask.replace("{problems}", describe(problems))},
    ]


def without_reply(item: Item, problems: list[str]) -> list[Message]:
    """The first messages again with the reason appended to the last (for a re-ask the API found too long)."""
    return _without_reply(item, problems)


def _without_reply(item: Item, problems: list[str]) -> list[Message]:
    """The first messages again, the last user message followed by the reason; the rejected reply left out.

    Roles still alternate (system, user), as chat templates such as Gemma's require.
    """
    *first, last = item.messages
    note = "Your previous reply to this request is not shown. " + item.reask.replace("{problems}", describe(problems))
    return [*first, {**last, "content": f"{last['content']}\n\n{note}"}]


def _cached(reply: Reply, host: str, attempts: int) -> CachedReply:
    return CachedReply(
        text=reply.text,
        model=reply.model,
        host=host,
        finish_reason=reply.finish_reason,
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens,
        attempts=attempts,
    )


def _excerpt(text: str, limit: int = 160) -> str:
    flat = " ".join((text or "").split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")

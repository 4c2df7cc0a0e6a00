"""Teacher requests through the OpenAI-compatible Batch API: about half the price, collected within 24 hours.

`BatchRunner.run(items)` takes the items the reply cache lacks (the same keys as online, so both modes share the
cache) and, in rounds, until every item has an outcome:

1. writes their requests into JSONL files within `batch_max_requests` and `batch_max_bytes`, each named by the hash
   of its content (`mathwizard-teach-<sha256>.jsonl`), and records each in the journal (`journal.py`) *before*
   uploading it;
2. uploads each file and creates its batch (the name in the batch's `metadata`), recording each id as it returns;
3. polls the batches with exponential backoff (`batch_poll_s`, doubled up to `batch_poll_max_s`; tenacity);
4. downloads the output and error files of each ended batch, validates every reply exactly as online
   (`validate.reply_problems`), commits valid ones to the cache, and records the other items' state;
5. asks again, in a follow-up batch or online (`batch_reask`), the items whose reply was invalid (up to
   `max_attempts` replies, with the reason, as online) or whose request failed: a 5xx or 429 line, a line that is
   not a completion, a malformed output file line, the unfinished part of an expired, cancelled or failed batch
   (up to `request_retries` times; the finished part of an expired batch is kept).

Durable at every point: a re-run (after `kill -9`, Ctrl-C, a crash, `BatchPending`) reads the journal first and
resumes each batch at its step. A batch recorded without a file id is looked up by its file name before any upload,
one without a batch id by its metadata before any create, so the window between "request sent" and "id recorded"
never costs a second upload or batch; running batches are waited for, never re-sent; an ended batch not yet
collected is downloaded again (downloads are free), and a reply already collected is in the cache. Only what no
batch holds is sent. Waiting is bounded per call (`batch_wait_s`): past it the run stops with `BatchPending` and
a re-run (or the Prefect task's next retry) picks the batches up where they are, so no process has to stay up
for the hours a batch can take.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    stop_before_delay,
    stop_never,
    wait_exponential,
    wait_random_exponential,
)

from mathwizard.config import TeacherConfig
from mathwizard.errors import BatchPending, TeacherError
from mathwizard.manifest import atomic_write_text
from mathwizard.teacher.batch_api import BatchAPI, BatchInfo
from mathwizard.teacher.cache import CachedFailure, CachedReply, ReplyCache
from mathwizard.teacher.client import APIFault, ItemRejected, Reply, _says_too_long, scrub
from mathwizard.teacher.journal import BatchJournal, BatchRow, ItemState
from mathwizard.teacher.runner import ApiRunner, Item, Outcome, Stats, next_messages, without_reply
from mathwizard.teacher.validate import reply_problems

log = logging.getLogger(__name__)

REQUESTS_DIR = "teacher-batches"  # request files, next to the journal, kept until their batch is collected
T = TypeVar("T")


@dataclass
class BatchSummary:
    id: str | None
    name: str
    status: str
    requests: int
    completed: int
    failed: int
    note: str = ""


@dataclass
class BatchStats:
    """What batch mode cost: requests put into batch files, tokens of the batch replies, the batches touched, and
    the online part (items re-asked online, `batch_reask=online`)."""

    batch_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batches: dict[str, BatchSummary] = field(default_factory=dict)  # by name
    events: list[str] = field(default_factory=list)  # expired, cancelled, failed batches, one line each
    online: Stats = field(default_factory=Stats)


class BatchRunner:
    """Asks for items through batches under `cfg`; valid replies go into `cache`; state in the journal in `cache_dir`.

    Args:
        cfg: the teacher settings (model, endpoint, batch limits, polling, attempts).
        cache: the per-item reply cache (shared with online mode).
        cache_dir: where the batch journal and the request files live (next to the cache).
        sleep: the function used between polls and retries (tests pass one that records the waits).

    Raises:
        ConfigError: no API key is configured.
    """

    def __init__(
        self,
        cfg: TeacherConfig,
        cache: ReplyCache,
        cache_dir: Path,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self.api = BatchAPI(base_url=cfg.base_url, model=cfg.model, timeout_s=cfg.timeout_s)
        self.journal = BatchJournal.in_dir(cache_dir)
        self.files = Path(cache_dir) / REQUESTS_DIR
        self._sleep = sleep
        self._faults = 0  # requests without a usable reply, this process
        self._fresh: set[str] = set()  # batches this process prepared: no lookup needed before their upload
        self._finished: dict[str, Outcome] = {}
        self._stats = BatchStats()
        self._progress: Any = None

    def close(self) -> None:
        self.journal.close()
        self.api.close_sync()

    def __enter__(self) -> BatchRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ public
    def run(self, items: Sequence[Item], progress: Any = None) -> tuple[list[Outcome], BatchStats]:
        """Ask for every item (blocking); outcomes in the order of `items`.

        Raises:
            BatchPending: batches still run after `batch_wait_s`; a re-run resumes them (nothing is sent again).
            TeacherError: the API refused the work (a wrong key, model or endpoint); nothing more is sent.
            TransientError: the API kept failing; what was collected is cached, the journal holds the rest.
            After any of these (or a KeyboardInterrupt), `partial()` holds what the run finished.
        """
        self._finished, self._stats, self._progress = {}, BatchStats(), progress
        self._items = {item.key: item for item in items}
        if not items:
            return [], self._stats
        started = time.monotonic()
        while True:
            for row in self._ours(self.journal.open_batches()):
                self._start(row)
            open_rows = self._ours(self.journal.open_batches())  # less any abandoned by _start
            waiting = {key for row in open_rows for key in self.journal.requests(row.name).values()}
            ready = [key for key in self._items if key not in self._finished and key not in waiting]
            if ready:
                states = self._states(ready)
                online = [k for k in ready if self.cfg.batch_reask == "online" and states[k].sent > 0]
                if online:
                    self._ask_online([states[k] for k in online])
                to_batch = [states[k] for k in ready if k not in online and k not in self._finished]
                if to_batch:
                    self._submit(to_batch)
                continue
            if not open_rows:
                break
            for row, info in self._wait(open_rows, started):
                self._collect(row, info)
        return [self._finished[item.key] for item in items], self._stats

    def partial(self) -> tuple[list[Outcome], BatchStats]:
        """The outcomes of the items the last `run` finished, and its counts, however it ended."""
        return list(self._finished.values()), self._stats

    # ------------------------------------------------------------------------------------------ rounds
    def _ours(self, rows: list[BatchRow]) -> list[BatchRow]:
        """The open batches holding any of this run's items (another run's batches are left to it)."""
        return [row for row in rows if not self._items.keys().isdisjoint(self.journal.requests(row.name).values())]

    def _states(self, keys: list[str]) -> dict[str, ItemState]:
        states = self.journal.items(keys)
        for key in keys:
            if key not in states:
                item = self._items[key]
                states[key] = ItemState(
                    key=key,
                    source_answer=item.source_answer,
                    reask=item.reask,
                    base_messages=list(item.messages),
                    next_messages=list(item.messages),
                )
        return states

    def _submit(self, states: list[ItemState]) -> None:
        """Write the requests into files within the limits and record each batch before it is uploaded."""
        cfg = self.cfg
        chunks: list[list[tuple[ItemState, str, bytes]]] = [[]]
        size = 0
        for state in sorted(states, key=lambda s: s.key):
            custom_id = f"{state.key[:40]}-{state.sent + 1}"
            body = {
                "model": cfg.model,
                "messages": state.next_messages,
                "temperature": cfg.temperature,
                "max_tokens": cfg.max_tokens,
            }
            line = (
                json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
                + "\n"
            ).encode()
            if len(line) > cfg.batch_max_bytes:
                self._fail(state, "too_long", f"its request is {len(line):,} bytes, over teacher.batch_max_bytes")
                continue
            if len(chunks[-1]) >= cfg.batch_max_requests or size + len(line) > cfg.batch_max_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append((state, custom_id, line))
            size += len(line)
        for chunk in filter(None, chunks):
            content = b"".join(line for _, _, line in chunk)
            name = f"mathwizard-teach-{hashlib.sha256(content).hexdigest()[:32]}.jsonl"
            atomic_write_text(self.files / name, content.decode())  # before the journal row that points at it
            for state, _, _ in chunk:
                state.sent += 1
            self.journal.prepare(name, {cid: s.key for s, cid, _ in chunk}, len(content), [s for s, _, _ in chunk])
            self._fresh.add(name)
            self._stats.batch_requests += len(chunk)
            log.info("teacher batch %s: %d requests, %s bytes", name, len(chunk), f"{len(content):,}")

    def _start(self, row: BatchRow) -> None:
        """Upload the file and create the batch, whichever is missing; a resumed one is looked up first."""
        resumed = row.name not in self._fresh
        file_id = row.file_id
        if file_id is None and not (self.files / row.name).is_file():
            # Its request file is gone (a cleaned cache folder): use the upload if there was one, else forget the
            # batch; its items, in no open batch now, go into the next one.
            file_id = self._call(lambda: self.api.find_file(row.name, row.bytes, row.created_at))
            if file_id is None:
                log.warning("teacher batch %s: its request file is missing; its items are sent again", row.name)
                self.journal.collect(row.name, (), (), status="abandoned", note="request file missing")
                return
            self.journal.update(row.name, file_id=file_id, status="uploaded")
        if file_id is None:
            content = (self.files / row.name).read_bytes()
            file_id = self._once(
                lambda: self.api.find_file(row.name, len(content), row.created_at),
                lambda: self.api.upload(row.name, content),
                look_first=resumed,
            )
            self.journal.update(row.name, file_id=file_id, status="uploaded")
        if row.batch_id is None:
            info = self._once(
                lambda: self.api.find_batch(row.name, file_id, row.created_at),
                lambda: self.api.create(file_id, row.name),
                look_first=resumed,
            )
            self.journal.update(row.name, batch_id=info.id, status=info.status)
            log.info("teacher batch %s created for %s (%d requests)", info.id, row.name, row.requests)
            self._summary(row, info)

    def _once(self, find: Callable[[], T | None], make: Callable[[], T], *, look_first: bool) -> T:
        """`make()` unless `find()` finds what an earlier attempt made: looked up before every retry, and before the
        first attempt of a resumed batch, so a request whose reply was lost is never made twice."""
        tries = 0

        def attempt() -> T:
            nonlocal tries
            tries += 1
            if look_first or tries > 1:
                found = find()
                if found is not None:
                    return found
            return make()

        return self._call(attempt)

    def _call(self, fn: Callable[[], T]) -> T:
        """`fn()` with the runner's retry policy on APIFaults (backoff with jitter, `request_retries`)."""
        retrying = Retrying(
            stop=stop_after_attempt(self.cfg.request_retries + 1),
            wait=wait_random_exponential(multiplier=self.cfg.backoff_s, max=self.cfg.backoff_max_s),
            retry=retry_if_exception_type(APIFault),
            sleep=self._sleep,
            reraise=True,
        )
        rejected: ItemRejected | None = None
        try:
            return retrying(fn)
        except ItemRejected as exc:
            rejected = exc
        raise TeacherError(
            f"the teacher API at {self.api.host} refused a batch file ({rejected}); lower teacher.batch_max_bytes"
            " or teacher.batch_max_requests"
        )

    # ------------------------------------------------------------------------------------------- waiting
    def _wait(self, rows: list[BatchRow], started: float) -> list[tuple[BatchRow, BatchInfo]]:
        """Poll until at least one batch has ended; BatchPending once `batch_wait_s` has passed since `started`."""
        cfg = self.cfg
        names = {row.name for row in rows}

        def poll() -> list[tuple[BatchRow, BatchInfo]]:
            ended = []
            for row in self.journal.batches(names):
                info = self._call(lambda row=row: self.api.retrieve(row.batch_id))  # type: ignore[arg-type]
                if (info.status, info.completed, info.failed) != (row.status, row.completed, row.failed):
                    self.journal.update(row.name, status=info.status, completed=info.completed, failed=info.failed)
                self._summary(row, info)
                if info.ended:
                    ended.append((row, info))
            self._report_counts()
            return ended

        if cfg.batch_wait_s is None:
            stop: Any = stop_never
        else:
            left = cfg.batch_wait_s - (time.monotonic() - started)
            stop = stop_before_delay(max(left, 0.0))
        retrying = Retrying(
            stop=stop,
            wait=wait_exponential(multiplier=cfg.batch_poll_s, max=cfg.batch_poll_max_s),
            retry=retry_if_result(lambda ended: not ended),
            sleep=self._sleep,
        )
        try:
            return retrying(poll)
        except RetryError:
            pass
        running = [s for s in self._stats.batches.values() if s.name in names]
        done = sum(s.completed + s.failed for s in running)
        total = sum(s.requests for s in running)
        raise BatchPending(
            f"{len(running)} teacher batch(es) still running after teacher.batch_wait_s={cfg.batch_wait_s:g} s"
            f" ({done:,} of {total:,} requests done; {', '.join(str(s.id) for s in running)}); re-run to collect"
            " them: nothing is sent again"
        )

    def _summary(self, row: BatchRow, info: BatchInfo) -> None:
        self._stats.batches[row.name] = BatchSummary(
            id=info.id, name=row.name, status=info.status, requests=row.requests,
            completed=info.completed, failed=info.failed, note=row.note,
        )  # fmt: skip

    def _report_counts(self) -> None:
        if self._progress is None or not hasattr(self._progress, "note"):
            return
        batches = [s for s in self._stats.batches.values() if s.status not in ("collected",)]
        statuses = Counter(s.status for s in batches)
        self._progress.note(
            requests_total=float(sum(s.requests for s in batches)),
            requests_completed=float(sum(s.completed for s in batches)),
            requests_failed=float(sum(s.failed for s in batches)),
            **{f"batches_{status}": float(n) for status, n in sorted(statuses.items())},
        )

    # ------------------------------------------------------------------------------------------ collecting
    def _collect(self, row: BatchRow, info: BatchInfo) -> None:
        """Download an ended batch's output and error files, validate every reply, cache the valid ones, record the
        rest, and mark the batch collected (in that order: a kill in between only repeats the free download)."""
        output = self._call(lambda: self.api.content(info.output_file_id)) if info.output_file_id else b""
        errors = self._call(lambda: self.api.content(info.error_file_id)) if info.error_file_id else b""
        requests = self.journal.requests(row.name)
        states = self._states_of(list(requests.values()))
        seen: set[str] = set()
        malformed = 0
        faults_before = self._faults
        fatal: str | None = None
        done: list[str] = []
        for raw in (output + b"\n" + errors).splitlines():
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                custom_id = record["custom_id"]
            except (ValueError, TypeError, KeyError):
                malformed += 1  # whose request it answers is unknown: that item is asked again below
                continue
            key = requests.get(custom_id)
            if key is None or custom_id in seen or key not in states:
                continue
            seen.add(custom_id)
            fatal = self._apply(states[key], record, done) or fatal
        unfinished = [key for custom_id, key in requests.items() if custom_id not in seen and key in states]
        reason = "missing_reply" if info.status == "completed" else f"batch_{info.status}"
        for key in unfinished:
            self._fault(states[key], reason, f"batch {info.id} ({info.status}) returned no reply for it", done)
        note = ""
        if info.status != "completed" or malformed:
            note = (
                f"batch {info.id} {info.status}: {info.completed:,} of {info.total or row.requests:,} requests done"
                + (f" ({info.errors})" if info.errors else "")
                + (f"; {malformed} malformed output lines" if malformed else "")
                + f"; {self._faults - faults_before:,} without a usable reply asked again"
            )
            self._stats.events.append(note)
            log.warning("teacher %s", note)
        self.journal.collect(
            row.name,
            [states[key] for key in states if key not in done],
            done,
            status=info.status,
            completed=info.completed,
            failed=info.failed,
            note=note,
        )
        (self.files / row.name).unlink(missing_ok=True)
        self._summary(dataclasses.replace(row, note=note), info)
        if fatal is not None:
            raise TeacherError(fatal)

    def _states_of(self, keys: list[str]) -> dict[str, ItemState]:
        """Journal states of a batch's items (an item of another run's batch is validated from its own state)."""
        return self.journal.items(keys)

    def _apply(self, state: ItemState, record: dict[str, Any], done: list[str]) -> str | None:
        """One reply line; returns a message when it says every request would fail (a wrong model or setting)."""
        response = record.get("response") or {}
        error = record.get("error")
        status = response.get("status_code") if isinstance(response, dict) else None
        if status == 200:
            try:
                reply = self.api.parse_body(response.get("body"))
            except APIFault as fault:
                self._fault(state, fault.reason, str(fault), done)
                return None
            self._stats.prompt_tokens += reply.prompt_tokens
            self._stats.completion_tokens += reply.completion_tokens
            self._validate(state, reply, done)
            return None
        if isinstance(status, int):
            body = response.get("body")
            message = scrub(json.dumps(body) if not isinstance(body, str) else body, self.api._secret)
            if status == 429 or status >= 500 or status in (408, 409):
                self._fault(state, f"http_{status}", message, done)
            elif status == 413 or (status == 400 and _says_too_long(body, message)):
                if len(state.next_messages) > len(state.base_messages):  # the appended reply made it too long
                    state.next_messages = without_reply(self._item(state), [state.last_reason or "answer_mismatch"])
                    state.faults = 0
                else:
                    self._fail(state, "too_long", f"{status}: {message}", done)
            else:
                return self.api._fatal_message(status, message)
            return None
        code = (error or {}).get("code") if isinstance(error, dict) else None
        detail = scrub(json.dumps(error), self.api._secret) if error else "no response and no error"
        self._fault(state, str(code or "missing_reply"), detail, done)
        return None

    def _validate(self, state: ItemState, reply: Reply, done: list[str]) -> None:
        state.asks += 1
        state.faults = 0
        problems = reply_problems(
            reply.text, state.source_answer, finish_reason=reply.finish_reason, refusal=reply.refusal
        )
        if not problems:
            self.cache.put(
                state.key,
                CachedReply(
                    text=reply.text, model=reply.model, host=self.api.host, finish_reason=reply.finish_reason,
                    prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens, attempts=state.asks,
                ),
            )  # fmt: skip
            self._finish(Outcome(state.key, text=reply.text, attempts=state.asks), done)
            return
        state.last_text, state.last_reason = reply.text, problems[0]
        flat = " ".join(reply.text.split())
        state.last_error = f"{', '.join(problems)}: {flat[:157] + '...' if len(flat) > 160 else flat!r}"
        if state.asks >= self.cfg.max_attempts:
            self._fail(state, problems[0], state.last_error, done, text=reply.text)
        else:
            state.next_messages = next_messages(self._item(state), reply.text, problems)

    def _item(self, state: ItemState) -> Item:
        return Item(state.key, tuple(state.base_messages), state.source_answer, state.reask)  # type: ignore[arg-type]

    def _fault(self, state: ItemState, reason: str, detail: str, done: list[str]) -> None:
        """A request without a usable reply: sent again, up to `request_retries` times in a row; then the item
        fails for this run (not cached: a re-run tries again)."""
        state.faults += 1
        self._faults += 1
        if state.faults > self.cfg.request_retries:
            state.faults = 0
            if state.key not in self._items:
                return
            outcome = Outcome(state.key, reason=reason, attempts=state.asks, last_error=detail[:300], transient=True)
            self._finished[state.key] = outcome
            if self._progress is not None:
                self._progress(1)

    def _fail(
        self, state: ItemState, reason: str, detail: str, done: list[str] | None = None, text: str | None = None
    ) -> None:
        """A failure a re-run would meet again: cached with its reason, as online."""
        self.cache.put_failure(state.key, CachedFailure(reason, detail, max(state.asks, 1), text))
        self._finish(Outcome(state.key, reason=reason, attempts=state.asks, last_error=detail), done)

    def _finish(self, outcome: Outcome, done: list[str] | None) -> None:
        if done is not None:
            done.append(outcome.key)
        else:
            self.journal.save((), [outcome.key])
        if outcome.key in self._items:
            self._finished[outcome.key] = outcome
            if self._progress is not None:
                self._progress(1)

    # ---------------------------------------------------------------------------------------- online re-asks
    def _ask_online(self, states: list[ItemState]) -> None:
        """Items asked again online (`batch_reask=online`), each with the attempts it has left."""
        groups: dict[int, list[ItemState]] = {}
        for state in states:
            groups.setdefault(max(1, self.cfg.max_attempts - state.asks), []).append(state)
        for left, group in sorted(groups.items()):
            items = [
                Item(s.key, tuple(s.next_messages), s.source_answer, s.reask)  # type: ignore[arg-type]
                for s in group
            ]
            cfg = self.cfg.model_copy(update={"max_attempts": left})
            with ApiRunner(cfg, self.cache) as runner:
                stopped: BaseException | None = None
                try:
                    outcomes, stats = runner.run(items, self._progress)
                except BaseException as exc:
                    outcomes, stats = runner.partial()
                    stopped = exc
            self._stats.online.add(stats)
            by_key = {s.key: s for s in group}
            finished: list[str] = []
            for outcome in outcomes:
                state = by_key[outcome.key]
                outcome.attempts += state.asks
                if not outcome.ok and not outcome.transient:
                    # the runner cached it with its own count; a re-run serves it only with the item's total
                    self.cache.put_failure(
                        outcome.key, CachedFailure(outcome.reason or "unknown", outcome.last_error, outcome.attempts)
                    )
                if outcome.ok or not outcome.transient:
                    finished.append(outcome.key)
                self._finished[outcome.key] = outcome  # the runner reported it to the progress already
            self.journal.save((), finished)
            if stopped is not None:
                raise stopped

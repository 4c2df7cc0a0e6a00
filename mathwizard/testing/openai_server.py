"""An OpenAI-compatible chat-completions server for tests and benchmarks, with injectable latency and faults.

Its "model" answers correctly: it finds the `<reference_solution>` in the prompt and applies the rule teacher.
Faults are drawn at random (`faults={"503": 0.05}`), queued (`fail_next(3, "503")`), held for a while
(`fail_for(2.0, "503")`) or started after some good replies (`fail_after(20, "503")`: an outage mid-run).
Transport faults (429, 5xx, 4xx, too_long: a 400 `context_length_exceeded` in llama-cpp-python's wording, 413,
drop, non_json, bad_json, bad_completion) reply at once, as real gateways do; answer faults (wrong_answer,
missing_answer, refusal, length: half the reply with `finish_reason: length`) and normal replies take `latency`
seconds; `slow` waits `slow_s` seconds (longer than the client's timeout) before answering.

Like a real inference server it can have a context (`max_prompt_chars`: a longer prompt gets the too_long 400) and a
capacity (`capacity=1`: one reply computed at a time, the others wait in the server's queue, as llama.cpp's server
does). A request whose client goes away (a timeout closes the connection) while it waits or is computed is dropped
and counted in `cancelled`, as a server that watches its connections would.

Batch API: the Files routes (`POST /v1/files` multipart, `GET /v1/files`, `GET /v1/files/{id}`, `GET
/v1/files/{id}/content`, `DELETE /v1/files/{id}`) and the Batches routes (`POST /v1/batches`, `GET /v1/batches`,
`GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`) in OpenAI's wire format. A batch moves one step per status
check (`GET /v1/batches/{id}`): validating -> in_progress -> (`batch_chunk` requests answered per check, all at once
by default) -> finalizing -> completed, with its output and error files. `fail_batches(["expired"])` makes the next
batches fail (at validation), expire or be cancelled halfway (their output keeps the finished half; the rest are
`batch_expired` / `batch_cancelled` lines of the error file). Each request line meets the same faults as an online
request (a 5xx or 429 becomes an error-file line, `drop` no line at all, `bad_json` / `non_json` a malformed output
line, `bad_completion` a 200 line without choices, answer faults a spoiled reply); `malformed_lines=N` garbles the
next N output lines. `holds={"files.create": 30}` holds that route's reply (after its work is done) until the time
passes or the client goes away: the window a `kill -9` tests. `calls` counts requests per route, `billed` the
requests and tokens answered 200, online and in batches (a download is never billed).

Usage:
    with OpenAITestServer(latency=0.05, faults={"503": 0.1}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
        ...
        server.requests  # chat-completion requests received, faults included

    python -m mathwizard.testing.openai_server --port 8000 --latency 0.2 --fault 503=0.05 --fault drop=0.02
    (then `RemoteTestServer("http://127.0.0.1:8000")` controls it; `spawn_test_server()` does both)
"""

from __future__ import annotations

import argparse
import contextlib
import email.policy
import json
import random
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, deque
from email.parser import BytesParser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mathwizard.answers import final_answer
from mathwizard.teacher.rule import RuleError, rewrite

TRANSPORT_FAULTS = (
    "429",
    "500",
    "502",
    "503",
    "400",
    "401",
    "403",
    "404",
    "413",
    "too_long",
    "drop",
    "non_json",
    "bad_json",
    "bad_completion",
)
ANSWER_FAULTS = ("wrong_answer", "missing_answer", "refusal", "length", "slow")
FAULTS = TRANSPORT_FAULTS + ANSWER_FAULTS
BATCH_FAULTS = ("failed", "expired", "cancelled")
ROUTES = (
    "chat.completions", "files.create", "files.list", "files.retrieve", "files.content", "files.delete",
    "batches.create", "batches.list", "batches.retrieve", "batches.cancel",
)  # fmt: skip
_BATCH_PATH = re.compile(r"(?:/v1)?/(files|batches)(?:/([^/]+))?(?:/(content|cancel))?")
_SOURCE = re.compile(r"<reference_solution>\s*(.*?)\s*</reference_solution>", re.DOTALL)


class _BatchMixin:
    """The Files and Batches API state of a `FaultPlan` (its lock guards it)."""

    lock: threading.Lock
    files: dict[str, dict[str, Any]]
    batches: dict[str, dict[str, Any]]
    billed: Counter[str]
    batch_faults: deque[str]
    batch_chunk: int | None
    malformed_lines: int
    max_prompt_chars: int | None
    next_fault: Any

    def bill(self, mode: str, completion: dict[str, Any]) -> None:
        usage = completion.get("usage") or {}
        with self.lock:
            self.billed[f"{mode}_requests"] += 1
            self.billed[f"{mode}_prompt_tokens"] += int(usage.get("prompt_tokens", 0))
            self.billed[f"{mode}_completion_tokens"] += int(usage.get("completion_tokens", 0))

    def batch_call(
        self, route: str, ident: str | None, body: bytes, content_type: str, query: dict[str, str]
    ) -> tuple[int, Any]:
        """(status, JSON-able reply or bytes) of one Files/Batches request; an error's reply is its message."""
        if route == "files.create":
            return self._upload(body, content_type)
        if route == "files.list":
            with self.lock:
                found = [f["meta"] for f in self.files.values()]
            if "purpose" in query:
                found = [f for f in found if f["purpose"] == query["purpose"]]
            found.sort(key=lambda f: (f["created_at"], f["id"]), reverse=query.get("order", "desc") == "desc")
            return 200, _page(found, query)
        if route == "batches.create":
            return self._create_batch(body)
        if route == "batches.list":
            with self.lock:
                found = sorted((b["meta"] for b in self.batches.values()), key=lambda b: (b["created_at"], b["id"]))
            return 200, _page(found[::-1], query)
        if route.startswith("files."):
            with self.lock:
                file = self.files.get(ident or "")
                if file is None:
                    return 404, f"No such File object: {ident}"
                if route == "files.delete":
                    del self.files[ident or ""]
                    return 200, {"id": ident, "object": "file", "deleted": True}
                return 200, file["content"] if route == "files.content" else dict(file["meta"])
        with self.lock:
            batch = self.batches.get(ident or "")
        if batch is None:
            return 404, f"No such Batch object: {ident}"
        if route == "batches.cancel":
            with self.lock:
                meta = batch["meta"]
                if meta["status"] in ("validating", "in_progress", "finalizing"):
                    meta.update(status="cancelling", cancelling_at=int(time.time()))
                return 200, dict(meta)
        self._advance(batch)  # batches.retrieve: one step per status check
        with self.lock:
            return 200, json.loads(json.dumps(batch["meta"]))

    def _upload(self, body: bytes, content_type: str) -> tuple[int, Any]:
        if not content_type.startswith("multipart/form-data"):
            return 400, "expected multipart/form-data with 'file' and 'purpose'"
        message = BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        fields: dict[str, Any] = {}
        filename = "upload.jsonl"
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                filename = part.get_filename() or filename
            fields[str(name)] = part.get_payload(decode=True)
        if "file" not in fields or "purpose" not in fields:
            return 400, "expected the fields 'file' and 'purpose'"
        content = fields["file"] or b""
        meta = {
            "id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(content),
            "created_at": int(time.time()), "filename": filename, "purpose": fields["purpose"].decode(),
            "status": "processed", "expires_at": None, "status_details": None,
        }  # fmt: skip
        with self.lock:
            self.files[meta["id"]] = {"meta": meta, "content": content}
        return 200, dict(meta)

    def _create_batch(self, body: bytes) -> tuple[int, Any]:
        try:
            request = json.loads(body)
            file_id = request["input_file_id"]
        except (ValueError, KeyError, TypeError):
            return 400, "the body must be JSON with 'input_file_id', 'endpoint' and 'completion_window'"
        with self.lock:
            file = self.files.get(file_id)
            if file is None:
                return 404, f"No such File object: {file_id}"
            if request.get("endpoint") != "/v1/chat/completions":
                return 400, f"endpoint {request.get('endpoint')!r} is not served here"
            lines = [line for line in file["content"].decode().splitlines() if line.strip()]
            now = int(time.time())
            meta = {
                "id": f"batch_{uuid.uuid4().hex[:24]}", "object": "batch", "endpoint": request["endpoint"],
                "errors": None, "input_file_id": file_id, "completion_window": request.get("completion_window", "24h"),
                "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
                "in_progress_at": None, "expires_at": now + 86_400, "finalizing_at": None, "completed_at": None,
                "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "metadata": request.get("metadata"),
            }  # fmt: skip
            fault = self.batch_faults.popleft() if self.batch_faults else None
            self.batches[meta["id"]] = {"meta": meta, "lines": lines, "done": 0, "out": [], "err": [], "fault": fault}
        return 200, dict(meta)

    def _advance(self, batch: dict[str, Any]) -> None:
        """One step of the batch's life; requests are answered outside the lock."""
        with self.lock:
            meta, status = batch["meta"], batch["meta"]["status"]
            now = int(time.time())
            if status == "validating":
                if batch["fault"] == "failed":
                    meta["errors"] = {
                        "object": "list",
                        "data": [{"code": "invalid_request", "message": "injected validation failure", "line": 1,
                                  "param": None}],
                    }  # fmt: skip
                    meta.update(status="failed", failed_at=now)
                else:
                    meta.update(status="in_progress", in_progress_at=now)
                return
            if status == "finalizing":
                self._finish(batch, "completed", "completed_at")
                return
            if status == "cancelling":
                self._finish(batch, "cancelled", "cancelled_at")
                return
            if status != "in_progress":
                return
            total = len(batch["lines"])
            start = batch["done"]
            stop = total if self.batch_chunk is None else min(total, start + self.batch_chunk)
            if batch["fault"] in ("expired", "cancelled"):
                stop = min(stop, total // 2)
            batch["done"] = stop
        for line in batch["lines"][start:stop]:
            self._answer_line(batch, line)
        with self.lock:
            meta["request_counts"].update(completed=len(batch["out"]), failed=len(batch["err"]))
            if batch["fault"] in ("expired", "cancelled") and batch["done"] >= total // 2:
                if batch["fault"] == "expired":
                    self._finish(batch, "expired", "expired_at")
                else:
                    meta.update(status="cancelling", cancelling_at=now)
            elif batch["done"] >= total:
                meta.update(status="finalizing", finalizing_at=now)

    def _answer_line(self, batch: dict[str, Any], line: str) -> None:
        try:
            request = json.loads(line)
            custom_id, body = request["custom_id"], request["body"]
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            with self.lock:
                batch["err"].append(
                    json.dumps(
                        {
                            "id": _request_id(),
                            "custom_id": None,
                            "response": None,
                            "error": {"code": "invalid_json_line", "message": "not a request"},
                        }
                    )
                )
            return  # fmt: skip
        fault = self.next_fault(count=False)
        record: dict[str, Any] = {"id": _request_id(), "custom_id": custom_id, "response": None, "error": None}
        prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
        if self.max_prompt_chars is not None and prompt_chars > self.max_prompt_chars:
            fault = "too_long"
        if fault in ("429", "500", "502", "503", "400", "401", "403", "404", "413", "too_long"):
            status = 400 if fault == "too_long" else int(fault)
            error = {"message": f"{HTTPStatus(status).phrase} (injected)", "type": "invalid_request_error",
                     "param": None, "code": "context_length_exceeded" if fault == "too_long" else None}  # fmt: skip
            record["response"] = {"status_code": status, "request_id": _request_id(), "body": {"error": error}}
            with self.lock:
                batch["err"].append(json.dumps(record))
            return
        if fault == "drop":
            return  # no line at all
        if fault in ("bad_json", "non_json"):
            with self.lock:
                batch["out"].append('{"id": "batch_req_1", "custom_id": "' + custom_id[:8])
            return
        completion = _completion_body(body, messages, None if fault == "slow" else fault)
        if fault == "bad_completion":
            completion.pop("choices")
        else:
            self.bill("batch", completion)
        record["response"] = {"status_code": 200, "request_id": _request_id(), "body": completion}
        text = json.dumps(record)
        with self.lock:
            if self.malformed_lines > 0:
                self.malformed_lines -= 1
                text = text[: len(text) // 2]  # cut mid-line: the client cannot tell whose reply it was
            batch["out"].append(text)

    def _finish(self, batch: dict[str, Any], status: str, stamp: str) -> None:
        """Write the output and error files (the unanswered requests as expired/cancelled errors); call locked."""
        meta = batch["meta"]
        if status in ("expired", "cancelled"):
            for line in batch["lines"][batch["done"] :]:
                try:
                    custom_id = json.loads(line)["custom_id"]
                except (ValueError, KeyError, TypeError):
                    continue
                error = {"code": f"batch_{status}", "message": f"This request could not be executed before the batch"
                         f" was {status}."}  # fmt: skip
                batch["err"].append(json.dumps({"id": _request_id(), "custom_id": custom_id, "response": None,
                                                "error": error}))  # fmt: skip
        now = int(time.time())
        for kind, key in (("out", "output_file_id"), ("err", "error_file_id")):
            if batch[kind]:
                content = ("\n".join(batch[kind]) + "\n").encode()
                file_id = f"file-{uuid.uuid4().hex[:24]}"
                self.files[file_id] = {
                    "meta": {"id": file_id, "object": "file", "bytes": len(content), "created_at": now,
                             "filename": f"{meta['id']}_{kind}.jsonl", "purpose": "batch_output", "status": "processed",
                             "expires_at": None, "status_details": None},
                    "content": content,
                }  # fmt: skip
                meta[key] = file_id
        meta["request_counts"].update(completed=len(batch["out"]), failed=len(batch["err"]))
        meta.update({"status": status, stamp: now})


class FaultPlan(_BatchMixin):
    """What the server does next; shared by its handler threads (every method takes the lock)."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        faults: dict[str, float] | None = None,
        retry_after: float | None = 1.0,
        slow_s: float = 5.0,
        api_key: str | None = None,
        seed: int = 0,
        capacity: int | None = None,
        max_prompt_chars: int | None = None,
        batch_chunk: int | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.latency = latency
        self.capacity = capacity
        self.slots = threading.Semaphore(capacity) if capacity else None
        self.max_prompt_chars = max_prompt_chars
        self.faults: dict[str, float] = {}
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.api_key = api_key
        self._rng = random.Random(seed)
        self._queue: deque[str] = deque()
        self._window: tuple[float, str] | None = None
        self._after: list = []  # [requests still fine, fault, how many to fail (None: until cleared)]
        self.requests = 0
        self.outcomes: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0
        self.history: deque[list[dict[str, Any]]] = deque(maxlen=1000)  # the messages of recent requests, in order
        self.calls: Counter[str] = Counter()  # requests per route: chat.completions, files.create, batches.retrieve...
        self.billed: Counter[str] = Counter()  # {online,batch}_{requests,prompt_tokens,completion_tokens}
        self.holds: dict[str, float] = {}
        self.batch_chunk = batch_chunk  # batch requests answered per status check (None: all at once)
        self.malformed_lines = 0
        self.batch_faults: deque[str] = deque()
        self.files: dict[str, dict[str, Any]] = {}  # id -> {"meta": file object, "content": bytes}
        self.batches: dict[str, dict[str, Any]] = {}  # id -> {"meta": batch object, ...}
        self.configure(faults=faults or {})

    def configure(self, **options: Any) -> None:
        with self.lock:
            for name, value in options.items():
                if name == "faults":
                    unknown = set(value) - set(FAULTS)
                    if unknown:
                        raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
                    if sum(value.values()) > 1.0:
                        raise ValueError("fault probabilities must sum to at most 1")
                    self.faults = dict(value)
                elif name in ("latency", "retry_after", "slow_s", "api_key", "max_prompt_chars", "malformed_lines"):
                    setattr(self, name, value)
                elif name == "capacity":  # while no request is being served
                    self.capacity = value
                    self.slots = threading.Semaphore(value) if value else None
                elif name == "seed":
                    self._rng = random.Random(value)
                elif name == "holds":
                    unknown = set(value) - set(ROUTES)
                    if unknown:
                        raise ValueError(f"unknown routes {sorted(unknown)}; known: {', '.join(ROUTES)}")
                    self.holds = {route: float(seconds) for route, seconds in value.items()}
                elif name == "batch_chunk":
                    self.batch_chunk = None if value is None else int(value)
                else:
                    raise ValueError(f"unknown option {name!r}")

    def fail_next(self, n: int, fault: str = "503") -> None:
        _check_fault(fault)
        with self.lock:
            self._queue.extend([fault] * n)

    def fail_for(self, seconds: float, fault: str = "503") -> None:
        _check_fault(fault)
        with self.lock:
            self._window = (time.monotonic() + seconds, fault)

    def fail_after(self, ok: int, fault: str = "503", n: int | None = None) -> None:
        """Answer the next `ok` requests normally, then fail `n` of them (None: every one until `clear`)."""
        _check_fault(fault)
        with self.lock:
            self._after = [ok, fault, n]

    def fail_batches(self, faults: list[str]) -> None:
        """The next batches created fail at validation (`failed`), expire or are cancelled halfway, in this order."""
        unknown = set(faults) - set(BATCH_FAULTS)
        if unknown:
            raise ValueError(f"unknown batch faults {sorted(unknown)}; known: {', '.join(BATCH_FAULTS)}")
        with self.lock:
            self.batch_faults.extend(faults)

    def clear(self) -> None:
        """No more faults of any kind, and no held routes."""
        with self.lock:
            self.faults, self._window, self._after = {}, None, []
            self._queue.clear()
            self.holds, self.malformed_lines = {}, 0
            self.batch_faults.clear()

    def reset_counts(self) -> None:
        with self.lock:
            self.requests = 0
            self.outcomes.clear()
            self.max_in_flight = self.in_flight
            self.cancelled = 0
            self.history.clear()
            self.calls.clear()
            self.billed.clear()

    def enter(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def next_fault(self, *, count: bool = True) -> str | None:
        """Counts the request (online ones only) and picks its fault: the queue first, then the window, then chance."""
        with self.lock:
            self.requests += count
            if self._queue:
                return self._queue.popleft()
            if self._after:
                if self._after[0] > 0:
                    self._after[0] -= 1
                    return None
                fault, left = self._after[1], self._after[2]
                if left is None or left > 0:
                    if left is not None:
                        self._after[2] = left - 1
                    return fault
                self._after = []
            if self._window is not None:
                until, fault = self._window
                if time.monotonic() < until:
                    return fault
                self._window = None
            roll = self._rng.random()
            for fault, probability in self.faults.items():
                roll -= probability
                if roll < 0:
                    return fault
            return None

    def record(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "outcomes": dict(self.outcomes),
                "max_in_flight": self.max_in_flight,
                "cancelled": self.cancelled,
                "calls": dict(self.calls),
                "billed": dict(self.billed),
                "batches": {bid: b["meta"]["status"] for bid, b in self.batches.items()},
            }


def _route(kind: str, method: str, ident: str | None, action: str | None) -> str | None:
    table = {
        ("files", "POST", False, None): "files.create",
        ("files", "GET", False, None): "files.list",
        ("files", "GET", True, None): "files.retrieve",
        ("files", "GET", True, "content"): "files.content",
        ("files", "DELETE", True, None): "files.delete",
        ("batches", "POST", False, None): "batches.create",
        ("batches", "GET", False, None): "batches.list",
        ("batches", "GET", True, None): "batches.retrieve",
        ("batches", "POST", True, "cancel"): "batches.cancel",
    }
    return table.get((kind, method, ident is not None, action))


def _page(items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """A cursor page (`after`, `limit`), as OpenAI's list routes return."""
    if "after" in query:
        ids = [item["id"] for item in items]
        items = items[ids.index(query["after"]) + 1 :] if query["after"] in ids else []
    limit = int(query.get("limit", 20))
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex[:16]}"


def _completion_body(request: dict[str, Any], messages: list[dict[str, Any]], fault: str | None) -> dict[str, Any]:
    """A chat completion answering `messages` (the rule teacher), spoiled by an answer fault."""
    text, finish = _spoil(answer(messages), fault) if fault else (answer(messages), "stop")
    prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "test-teacher"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt_chars // 4,
            "completion_tokens": len(text) // 4,
            "total_tokens": prompt_chars // 4 + len(text) // 4,
        },
    }


def _check_fault(fault: str) -> None:
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")


def answer(messages: list[dict[str, Any]]) -> str:
    """The model: the rule teacher's rewrite of the reference solution found in the first user message that has one."""
    for message in messages:
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str) and (match := _SOURCE.search(content)):
            try:
                return rewrite(match.group(1))
            except RuleError:
                break
    return "### Solution\n1. The prompt holds no reference solution with a final answer.\n### Final Answer\n"


def _spoil(text: str, fault: str) -> tuple[str, str]:
    """A wrong reply of kind `fault` derived from the right one; returns (text, finish_reason)."""
    if fault == "wrong_answer":
        right = final_answer(text) or ""
        return text.replace(f"\\boxed{{{right}}}", f"\\boxed{{{right}+1}}"), "stop"
    if fault == "missing_answer":
        return text.split("### Final Answer")[0].rstrip(), "stop"
    if fault == "refusal":
        return "I can't help with that request.", "stop"
    if fault == "length":
        return text[: max(1, len(text) // 2)], "length"
    return text, "stop"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    disable_nagle_algorithm = True  # headers and body go out as two writes; Nagle would hold the body ~40 ms
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    # ---------------------------------------------------------------------------------------- helpers
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:  # the client gave up (timeout) and closed the connection
            self.close_connection = True

    def _json(self, status: int, data: Any, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers=headers)

    def _error(
        self, status: int, message: str, kind: str, headers: dict | None = None, code: str | None = None
    ) -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, headers)

    def _too_long(self, prompt_tokens: int, max_tokens: int) -> None:
        limit = (self.server.plan.max_prompt_chars or 8192) // 4
        self._error(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.",
            "invalid_request_error",
            code="context_length_exceeded",
        )

    def _client_gone(self) -> bool:
        """The client closed its connection (no pipelining: while a reply is pending it sends nothing else)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _compute(self, seconds: float) -> bool:
        """Wait for a slot (the server's queue), then `seconds` of "inference"; False when the client left first."""
        slots = self.server.plan.slots
        if slots is not None:
            while not slots.acquire(timeout=0.01):
                if self._client_gone():
                    return False
        try:
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.01))
                if self._client_gone():
                    return False
            return True
        finally:
            if slots is not None:
                slots.release()

    # ---------------------------------------------------------------------------------------- routes
    def do_GET(self) -> None:
        plan = self.server.plan
        if self._batch_api("GET", b""):
            return
        if self.path.rstrip("/") == "/_control/stats":
            self._json(200, plan.stats())
        elif self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "test-teacher", "object": "model"}]})
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_DELETE(self) -> None:
        if not self._batch_api("DELETE", b""):
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:
        body = self._body()
        if self._batch_api("POST", body):
            return
        if self.path.startswith("/_control/"):
            self._control(self.path.removeprefix("/_control/").strip("/"), body)
        elif self.path.rstrip("/").endswith("/chat/completions"):
            self.server.plan.enter()
            try:
                self._completion(body)
            finally:
                self.server.plan.leave()
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def _control(self, action: str, body: bytes) -> None:
        plan = self.server.plan
        args = json.loads(body or b"{}")
        try:
            if action == "configure":
                plan.configure(**args)
            elif action == "fail_next":
                plan.fail_next(int(args["n"]), args.get("fault", "503"))
            elif action == "fail_for":
                plan.fail_for(float(args["seconds"]), args.get("fault", "503"))
            elif action == "fail_after":
                n = args.get("n")
                plan.fail_after(int(args["ok"]), args.get("fault", "503"), None if n is None else int(n))
            elif action == "fail_batches":
                plan.fail_batches(list(args["faults"]))
            elif action == "clear":
                plan.clear()
            elif action == "reset":
                plan.reset_counts()
            else:
                raise ValueError(f"unknown control action {action!r}")
        except (ValueError, KeyError, TypeError) as exc:
            self._error(400, str(exc), "invalid_request_error")
            return
        self._json(200, {"ok": True, **plan.stats()})

    def _completion(self, body: bytes) -> None:
        plan = self.server.plan
        with plan.lock:
            plan.calls["chat.completions"] += 1
        fault = plan.next_fault()
        try:
            request = json.loads(body)
            messages = request["messages"]
        except (ValueError, KeyError, TypeError):
            request = messages = None
        if isinstance(messages, list):
            with plan.lock:
                plan.history.append(messages)
        given = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if plan.api_key is not None and given != plan.api_key:
            fault = "401"
        if fault in TRANSPORT_FAULTS:
            plan.record(fault)
            self._transport_fault(fault, given)
            return
        if not isinstance(request, dict) or not isinstance(messages, list):
            plan.record("400")
            self._error(400, "the body must be JSON with a 'messages' list", "invalid_request_error")
            return
        prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
        if plan.max_prompt_chars is not None and prompt_chars > plan.max_prompt_chars:
            plan.record("too_long")
            self._too_long(prompt_chars // 4, int(request.get("max_tokens") or 0))
            return
        finished = self._compute(plan.slow_s if fault == "slow" else plan.latency)
        plan.record(fault or "ok")
        if not finished:
            with plan.lock:
                plan.cancelled += 1
            self.close_connection = True
            return
        completion = _completion_body(request, messages, fault)
        plan.bill("online", completion)
        self._json(200, completion)

    # ------------------------------------------------------------------------------------------ batch API
    def _batch_api(self, method: str, body: bytes) -> bool:
        """Serve a Files or Batches request (False: the path is not one of theirs)."""
        parts = urlsplit(self.path)
        match = _BATCH_PATH.fullmatch(parts.path.rstrip("/"))
        if match is None:
            return False
        kind, ident, action = match.groups()
        route = _route(kind, method, ident, action)
        if route is None:
            self._error(404, f"no route {method} {parts.path}", "invalid_request_error")
            return True
        plan = self.server.plan
        with plan.lock:
            plan.calls[route] += 1
        given = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if plan.api_key is not None and given != plan.api_key:
            self._transport_fault("401", given)
            return True
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        status, reply = plan.batch_call(route, ident, body, self.headers.get("Content-Type") or "", query)
        hold = plan.holds.get(route)
        if hold:  # the work is done; the reply waits (the window between "request sent" and "id recorded")
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline and not self._client_gone():
                time.sleep(0.01)
        if isinstance(reply, bytes):
            self._send(status, reply, content_type="application/octet-stream")
        elif status >= 400:
            self._error(status, str(reply), "invalid_request_error")
        else:
            self._json(status, reply)
        return True

    def _transport_fault(self, fault: str, given_key: str) -> None:
        plan = self.server.plan
        if fault == "429":
            headers = {} if plan.retry_after is None else {"Retry-After": f"{plan.retry_after:g}"}
            self._error(429, "Rate limit reached for requests; please try again later.", "requests", headers)
        elif fault in ("500", "502", "503"):
            self._error(int(fault), HTTPStatus(int(fault)).phrase, "server_error")
        elif fault == "401":
            # Like some real servers, echo the key we were given: the client must scrub it.
            self._error(401, f"Incorrect API key provided: {given_key}.", "invalid_request_error")
        elif fault in ("400", "403", "404", "413"):
            self._error(int(fault), f"{HTTPStatus(int(fault)).phrase} (injected)", "invalid_request_error")
        elif fault == "too_long":
            self._too_long(2100, 0)
        elif fault == "drop":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        elif fault == "non_json":
            self._send(200, b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        elif fault == "bad_json":
            self._send(200, b'{"id": "chatcmpl-1", "choices": [')
        elif fault == "bad_completion":
            self._json(200, {"id": "chatcmpl-1", "object": "chat.completion", "model": "test-teacher"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many clients connect at once at the start of a run
    plan: FaultPlan

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that went away (killed, timed out): nothing to report
        super().handle_error(request, client_address)


class OpenAITestServer:
    """The server in a background thread of this process; `base_url` ends in `/v1` like OpenAI's."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **plan: Any) -> None:
        self.plan = FaultPlan(**plan)
        self._server = _Server((host, port), _Handler)
        self._server.plan = self.plan
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def requests(self) -> int:
        """Chat-completion requests received so far, faulted ones included."""
        return self.plan.stats()["requests"]

    @property
    def outcomes(self) -> dict[str, int]:
        """Requests by what the server did: ok, or the fault's name."""
        return self.plan.stats()["outcomes"]

    @property
    def max_in_flight(self) -> int:
        """The most chat-completion requests the server was handling at once."""
        return self.plan.stats()["max_in_flight"]

    @property
    def cancelled(self) -> int:
        """Requests dropped because their client closed the connection before the reply was ready."""
        return self.plan.stats()["cancelled"]

    @property
    def calls(self) -> dict[str, int]:
        """Requests per route (`chat.completions`, `files.create`, `batches.create`, `batches.retrieve`, ...)."""
        return self.plan.stats()["calls"]

    @property
    def billed(self) -> dict[str, int]:
        """Requests and tokens answered 200, by mode: `online_requests`, `batch_prompt_tokens`, ..."""
        return self.plan.stats()["billed"]

    def fail_batches(self, faults: list[str]) -> None:
        self.plan.fail_batches(faults)

    def configure(self, **options: Any) -> None:
        self.plan.configure(**options)

    def fail_next(self, n: int, fault: str = "503") -> None:
        self.plan.fail_next(n, fault)

    def fail_for(self, seconds: float, fault: str = "503") -> None:
        self.plan.fail_for(seconds, fault)

    def fail_after(self, ok: int, fault: str = "503", n: int | None = None) -> None:
        self.plan.fail_after(ok, fault, n)

    def clear(self) -> None:
        self.plan.clear()

    def reset_counts(self) -> None:
        self.plan.reset_counts()

    def start(self) -> OpenAITestServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="openai-test-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RemoteTestServer:
    """Controls a server running elsewhere (another process) through its `/_control` routes."""

    def __init__(self, url: str, process: subprocess.Popen | None = None) -> None:
        self.url = url.rstrip("/")
        self.process = process

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def _post(self, action: str, **args: Any) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/_control/{action}", data=json.dumps(args).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_control/stats", timeout=10) as response:
            return json.loads(response.read())

    @property
    def requests(self) -> int:
        return self.stats()["requests"]

    @property
    def outcomes(self) -> dict[str, int]:
        return self.stats()["outcomes"]

    @property
    def max_in_flight(self) -> int:
        return self.stats()["max_in_flight"]

    @property
    def cancelled(self) -> int:
        return self.stats()["cancelled"]

    @property
    def calls(self) -> dict[str, int]:
        return self.stats()["calls"]

    @property
    def billed(self) -> dict[str, int]:
        return self.stats()["billed"]

    def fail_batches(self, faults: list[str]) -> None:
        self._post("fail_batches", faults=faults)

    def configure(self, **options: Any) -> None:
        self._post("configure", **options)

    def fail_next(self, n: int, fault: str = "503") -> None:
        self._post("fail_next", n=n, fault=fault)

    def fail_for(self, seconds: float, fault: str = "503") -> None:
        self._post("fail_for", seconds=seconds, fault=fault)

    def fail_after(self, ok: int, fault: str = "503", n: int | None = None) -> None:
        self._post("fail_after", ok=ok, fault=fault, n=n)

    def clear(self) -> None:
        self._post("clear")

    def reset_counts(self) -> None:
        self._post("reset")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RemoteTestServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_test_server(*, port: int = 0, **plan: Any) -> RemoteTestServer:
    """Start the server in a subprocess (so it does not compete for this process's GIL) and return its control."""
    args = [sys.executable, "-m", "mathwizard.testing.openai_server", "--port", str(port)]
    for name, value in plan.items():
        if name == "faults":
            args += [arg for fault, p in value.items() for arg in ("--fault", f"{fault}={p}")]
        elif value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline() if process.stdout else ""
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"the test server did not start: {line!r}")
    return RemoteTestServer(line.split()[-1].removesuffix("/v1"), process)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per normal reply")
    parser.add_argument("--fault", action="append", default=[], metavar="NAME=P", help=f"one of {', '.join(FAULTS)}")
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds sent with 429")
    parser.add_argument("--slow-s", type=float, default=5.0, help="seconds a 'slow' reply takes")
    parser.add_argument("--api-key", default=None, help="answer 401 unless this key is sent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity", type=int, default=None, help="replies computed at once (others queue)")
    parser.add_argument("--max-prompt-chars", type=int, default=None, help="longer prompts get a too_long 400")
    parser.add_argument("--batch-chunk", type=int, default=None, help="batch requests answered per status check")
    args = parser.parse_args(argv)
    faults = {name: float(p) for name, p in (item.split("=", 1) for item in args.fault)}
    server = OpenAITestServer(
        host=args.host, port=args.port, latency=args.latency, faults=faults, retry_after=args.retry_after,
        slow_s=args.slow_s, api_key=args.api_key, seed=args.seed, capacity=args.capacity,
        max_prompt_chars=args.max_prompt_chars,
    )  # fmt: skip
    server.configure(batch_chunk=args.batch_chunk)
    print(f"listening on {server.base_url}", flush=True)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._server.server_close()


if __name__ == "__main__":
    main()

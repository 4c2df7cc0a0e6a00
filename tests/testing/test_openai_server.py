"""The test server itself: its model, fault scheduling, counters, and the subprocess entry point."""

from __future__ import annotations

import json
import time

import openai
import pytest

from mathwizard.testing import OpenAITestServer, spawn_test_server
from mathwizard.testing.openai_server import FaultPlan, answer

SOURCE = r"\textbf{Solution:} $\because AB=AC$, \\ $\therefore \angle B=\boxed{40^\circ}$."


def _ask(base_url: str, key: str = "k") -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=5)
    content = f"<reference_solution>\n{SOURCE}\n</reference_solution>"
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}])


def test_the_model_applies_the_rule_teacher_to_the_prompts_source() -> None:
    content = f"Problem: ...\n<reference_solution>\n{SOURCE}\n</reference_solution>"
    text = answer([{"role": "system", "content": "x"}, {"role": "user", "content": content}])
    steps = [r"1. $\because AB=AC$", r"2. $\therefore \angle B=40^\circ$."]
    assert text == "\n".join(["### Solution", *steps, "### Final Answer", r"\boxed{40^\circ}"])
    assert answer([{"role": "user", "content": "no source here"}]).endswith("### Final Answer\n")


def test_fault_schedule_queue_then_window_then_chance() -> None:
    plan = FaultPlan(faults={"503": 1.0})
    plan.fail_next(2, "429")
    assert [plan.next_fault() for _ in range(3)] == ["429", "429", "503"]
    plan.clear()
    plan.fail_for(60, "drop")
    assert plan.next_fault() == "drop"
    plan.clear()
    plan.fail_after(2, "500", n=1)
    assert [plan.next_fault() for _ in range(4)] == [None, None, "500", None]
    assert plan.stats()["requests"] == 3 + 1 + 4
    with pytest.raises(ValueError, match="unknown fault"):
        plan.fail_next(1, "teapot")


def test_random_faults_follow_their_rates() -> None:
    plan = FaultPlan(faults={"503": 0.1, "wrong_answer": 0.1}, seed=7)
    picks = [plan.next_fault() for _ in range(2000)]
    assert 150 <= picks.count("503") <= 250 and 150 <= picks.count("wrong_answer") <= 250  # ~200 each


def test_counts_requests_and_outcomes() -> None:
    with OpenAITestServer(api_key="good") as server:
        assert _ask(server.base_url, "good").choices[0].message.content.endswith("\\boxed{40^\\circ}")
        server.fail_next(1, "wrong_answer")
        assert _ask(server.base_url, "good").choices[0].message.content.endswith("\\boxed{40^\\circ+1}")
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key provided: bad"):
            _ask(server.base_url, "bad")
        assert server.requests == 3 and server.outcomes == {"ok": 1, "wrong_answer": 1, "401": 1}
        server.reset_counts()
        assert server.requests == 0


def test_subprocess_server_is_controlled_over_http() -> None:
    with spawn_test_server(latency=0.0, retry_after=0.5, capacity=2, max_prompt_chars=10_000) as server:
        assert _ask(server.base_url).choices[0].finish_reason == "stop"
        server.fail_next(1, "503")
        with pytest.raises(openai.InternalServerError):
            _ask(server.base_url)
        server.fail_next(1, "429")
        with pytest.raises(openai.RateLimitError) as info:
            _ask(server.base_url)
        assert info.value.response.headers["retry-after"] == "0.5"
        assert server.requests == 3 and server.outcomes == {"ok": 1, "503": 1, "429": 1} and server.cancelled == 0
    assert server.process is not None and server.process.poll() is not None  # stopped


def test_a_context_limit_and_the_too_long_faults_answer_like_real_servers() -> None:
    with OpenAITestServer(max_prompt_chars=100) as server:
        with pytest.raises(openai.BadRequestError) as info:
            _ask(server.base_url)  # the prompt holds 120+ characters
        assert info.value.code == "context_length_exceeded"
        assert "This model's maximum context length is 25 tokens" in info.value.message  # llama-cpp-python's words
        server.configure(max_prompt_chars=None)
        server.fail_next(1, "too_long")
        with pytest.raises(openai.BadRequestError) as info:
            _ask(server.base_url)
        assert info.value.code == "context_length_exceeded"
        server.fail_next(1, "413")
        with pytest.raises(openai.APIStatusError) as big:
            _ask(server.base_url)
        assert big.value.status_code == 413
        assert server.outcomes == {"too_long": 2, "413": 1}
        assert [m[0]["content"].startswith("<reference_solution>") for m in server.plan.history] == [True] * 3


def test_a_capacity_queues_requests_and_drops_those_whose_client_left() -> None:
    import threading

    with OpenAITestServer(capacity=1, latency=0.3) as server:
        replies: list[str] = []
        worker = threading.Thread(target=lambda: replies.append(_ask(server.base_url).choices[0].finish_reason))
        worker.start()
        time.sleep(0.05)
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=0.2)
        with pytest.raises(openai.APITimeoutError):  # queued behind the first: 0.25 s to wait, 0.2 s allowed
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": SOURCE}])
        worker.join()
        time.sleep(0.1)
        assert replies == ["stop"] and server.cancelled == 1 and server.max_in_flight == 2


# ------------------------------------------------------------------------------------------ Batch API
def _batch_line(custom_id: str, source: str = SOURCE) -> str:
    content = f"<reference_solution>\n{source}\n</reference_solution>"
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 100}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_the_batch_api_speaks_openais_wire_format() -> None:
    """The real openai client: upload, list, create with metadata, status steps per check, output file, billing."""
    with OpenAITestServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=5)
        content = "\n".join(_batch_line(f"r{i}") for i in range(3)).encode() + b"\n"
        file = client.files.create(file=("requests.jsonl", content, "application/jsonl"), purpose="batch")
        assert (file.filename, file.bytes, file.purpose) == ("requests.jsonl", len(content), "batch")
        assert [f.id for f in client.files.list(purpose="batch")] == [file.id]
        assert client.files.content(file.id).content == content
        batch = client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"name": "x"}
        )
        assert (batch.status, batch.request_counts.total, batch.metadata) == ("validating", 3, {"name": "x"})
        statuses = [client.batches.retrieve(batch.id).status for _ in range(4)]
        assert statuses == ["in_progress", "finalizing", "completed", "completed"]
        done = client.batches.retrieve(batch.id)
        assert (done.request_counts.completed, done.request_counts.failed, done.error_file_id) == (3, 0, None)
        lines = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
        assert [line["custom_id"] for line in lines] == ["r0", "r1", "r2"]
        reply = openai.types.chat.ChatCompletion.model_validate(lines[0]["response"]["body"])
        assert reply.choices[0].message.content.endswith(r"\boxed{40^\circ}")
        assert [b.id for b in client.batches.list()] == [batch.id]
        assert server.billed["batch_requests"] == 3 and server.requests == 0  # no online request
        assert server.calls == {
            "files.create": 1, "files.list": 1, "files.content": 2, "batches.create": 1, "batches.retrieve": 5,
            "batches.list": 1,
        }  # fmt: skip
        client.files.delete(file.id)
        assert [f.id for f in client.files.list(purpose="batch")] == []


def test_batch_faults_error_lines_and_cancel() -> None:
    with OpenAITestServer(batch_chunk=None) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=5)
        content = ("\n".join(_batch_line(f"r{i}") for i in range(4)) + "\n").encode()
        file = client.files.create(file=("r.jsonl", content, "application/jsonl"), purpose="batch")

        def run(*checks: int) -> openai.types.Batch:
            batch = client.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            for _ in range(max(checks, default=4)):
                info = client.batches.retrieve(batch.id)
            return info

        server.fail_next(1, "503")
        server.fail_next(1, "drop")
        server.configure(malformed_lines=1)
        mixed = run()
        errors = [json.loads(line) for line in client.files.content(mixed.error_file_id).text.splitlines()]
        assert errors[0]["custom_id"] == "r0" and errors[0]["response"]["status_code"] == 503
        output = client.files.content(mixed.output_file_id).text.splitlines()
        assert len(output) == 2  # r1 dropped (no line at all); r2's line cut in half
        with pytest.raises(ValueError):
            json.loads(output[0])

        server.fail_batches(["failed", "expired"])
        failed = run()
        assert (failed.status, failed.errors.data[0].code, failed.output_file_id) == ("failed", "invalid_request", None)
        expired = run()
        assert (expired.status, expired.request_counts.completed) == ("expired", 2)
        codes = [
            json.loads(line)["error"]["code"] for line in client.files.content(expired.error_file_id).text.splitlines()
        ]
        assert codes == ["batch_expired", "batch_expired"]

        server.configure(batch_chunk=1)
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        client.batches.retrieve(batch.id)  # in_progress
        client.batches.retrieve(batch.id)  # one request answered
        assert client.batches.cancel(batch.id).status == "cancelling"
        cancelled = client.batches.retrieve(batch.id)
        assert (cancelled.status, cancelled.request_counts.completed, cancelled.request_counts.failed) == (
            "cancelled",
            1,
            3,
        )


def test_batch_routes_check_the_key() -> None:
    with OpenAITestServer(api_key="right") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0, timeout=5)
        with pytest.raises(openai.AuthenticationError):
            client.files.create(file=("r.jsonl", b"{}\n", "application/jsonl"), purpose="batch")
        assert server.calls == {"files.create": 1} and server.plan.files == {}

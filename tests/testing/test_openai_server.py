"""The test server itself: its model, fault scheduling, counters, and the subprocess entry point."""

from __future__ import annotations

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

"""The one-request client: how each server fault surfaces, and that the key is scrubbed from every message."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from mathwizard.errors import ConfigError, TeacherError
from mathwizard.teacher.client import (
    APIFault,
    ItemRejected,
    OpenAIClient,
    Reply,
    _says_too_long,
    retry_after_seconds,
    scrub,
)
from mathwizard.testing import OpenAITestServer

MESSAGES = [
    {"role": "system", "content": "Rewrite."},
    {"role": "user", "content": "<reference_solution>\n$AB=\\boxed{5}$\n</reference_solution>"},
]


def _complete(server: OpenAITestServer, timeout_s: float = 5.0) -> Reply:
    async def go() -> Reply:
        client = OpenAIClient(base_url=server.base_url, model="test-teacher", timeout_s=timeout_s)
        try:
            return await client.complete(MESSAGES, temperature=0.0, max_tokens=64)
        finally:
            await client.close()

    return asyncio.run(go())


def test_a_good_reply(server: OpenAITestServer) -> None:
    reply = _complete(server)
    assert reply.finish_reason == "stop" and reply.text.endswith("\\boxed{5}")
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    assert server.requests == 1


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("429", "http_429"),
        ("500", "http_500"),
        ("502", "http_502"),
        ("503", "http_503"),
        ("drop", "connection"),
        ("non_json", "invalid_body"),
        ("bad_json", "invalid_body"),
        ("bad_completion", "invalid_body"),
        ("slow", "timeout"),
    ],
)
def test_transport_faults_are_retryable(server: OpenAITestServer, fault: str, reason: str) -> None:
    server.fail_next(1, fault)
    with pytest.raises(APIFault) as info:
        _complete(server, timeout_s=0.3)  # the server's slow reply takes 1 s
    assert info.value.reason == reason
    assert info.value.__context__ is None and info.value.__cause__ is None  # no openai exception rides along
    if fault == "429":
        assert info.value.retry_after == pytest.approx(0.01)


@pytest.mark.parametrize("fault", ["too_long", "413"])
def test_a_request_too_long_for_the_server_fails_the_item_not_the_stage(server: OpenAITestServer, fault: str) -> None:
    server.fail_next(1, fault)
    with pytest.raises(ItemRejected) as info:
        _complete(server)
    assert info.value.reason == "too_long" and info.value.__context__ is None
    assert ("maximum context length" if fault == "too_long" else "413") in str(info.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [  # the wording of real servers
        ({"code": "context_length_exceeded", "type": "invalid_request_error"}, "..."),  # OpenAI, llama-cpp-python
        ({"code": "string_above_max_length"}, "Invalid 'messages[1].content': string too long."),  # OpenAI
        ({"code": 400, "type": "exceed_context_size_error"}, "the request exceeds the available context size"),
        (None, "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens"),  # vLLM
        (
            None,
            "'max_tokens' is too large: 2048. This model's maximum context length is 2048 tokens and your request"
            " has 900 input tokens (2048 > 2048 - 900)",
        ),  # vLLM: the prompt plus max_tokens, so per item too
        (None, "prompt is too long: 213000 tokens > 200000 maximum"),
    ],
)
def test_context_length_wordings_are_recognised(body: dict | None, message: str) -> None:
    assert _says_too_long(body, message)


@pytest.mark.parametrize(
    "message",
    [  # 400s that every request would meet: the stage stops
        "max_tokens is too large: 200000. This model supports at most 16384 completion tokens.",
        "Invalid model name passed in model=gpt-5-nano-x",
        "Unsupported value: 'temperature' does not support 0.0 with this model.",
        "Bad Request (injected)",
    ],
)
def test_other_400s_are_not_too_long(message: str) -> None:
    assert not _says_too_long({"code": "invalid_value", "type": "invalid_request_error"}, message)


def test_a_timed_out_request_is_cancelled_on_its_connection(server: OpenAITestServer) -> None:
    server.fail_next(1, "slow")  # the server would answer after 1 s; the client gives up at 0.3 s
    with pytest.raises(APIFault, match="timeout"):
        _complete(server, timeout_s=0.3)
    deadline = time.monotonic() + 5
    while server.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.cancelled == 1  # the connection was closed, so the server dropped the reply nobody would read


@pytest.mark.parametrize(
    ("fault", "hint"), [("400", "teacher.max_tokens"), ("403", "refused"), ("404", "teacher.model")]
)
def test_client_errors_stop_with_a_hint(server: OpenAITestServer, fault: str, hint: str) -> None:
    server.fail_next(1, fault)
    with pytest.raises(TeacherError, match=hint) as info:
        _complete(server)
    assert "\n" not in str(info.value) and info.value.__context__ is None


def test_a_wrong_key_is_a_teacher_error_without_the_key(
    server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "sk-wrong-Yy3Kd9Qp2Rt7Wm5"
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", wrong)
    with pytest.raises(TeacherError, match="rejected the API key") as info:
        _complete(server)
    assert server.outcomes == {"401": 1}  # the server echoed the key it got...
    assert wrong not in str(info.value) and wrong[-6:] not in str(info.value)  # ...and we dropped it


def test_answer_faults_arrive_as_replies(server: OpenAITestServer) -> None:
    server.fail_next(1, "length")
    assert _complete(server).finish_reason == "length"
    server.fail_next(1, "refusal")
    assert _complete(server).text == "I can't help with that request."


def test_no_key_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MATHWIZARD_TEACHER_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="MATHWIZARD_TEACHER_API_KEY or OPENAI_API_KEY"):
        OpenAIClient(base_url=None, model="m", timeout_s=1)


def test_scrub() -> None:
    secret = "sk-proj-abcdef123456"
    text = f"Incorrect API key provided: {secret}.\nAuthorization: Bearer {secret} and sk-abc1****wxyz"
    cleaned = scrub(text, secret)
    assert "abcdef123456" not in cleaned and "abc1" not in cleaned and "\n" not in cleaned
    assert scrub("x" * 400).endswith("...") and len(scrub("x" * 400)) == 300


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= retry_after_seconds({"retry-after": in_a_minute}) <= 60

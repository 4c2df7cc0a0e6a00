"""One chat completion against an OpenAI-compatible API, with no retries of its own (the runner owns the policy).

Errors come out in three kinds: `APIFault` (429, 5xx, timeouts, dropped connections, bodies that are not a
completion), which the runner retries; `ItemRejected` (413, or a 400 saying the prompt exceeds the model's context),
which fails that one item as `too_long` and lets the stage go on; and `TeacherError` (every other 4xx: a wrong key,
model or endpoint, a setting the API refuses), which stops the stage, because every request would meet it. The API
key is read from the environment / `.env` when the client is built, never passed in, and scrubbed from every
message we raise: some servers echo the key they were given in their 401 replies.

The timeout counts time on the wire only (connecting, sending, waiting for and reading the reply), never time spent
waiting for a connection of our own pool; an abandoned request's connection is closed (httpx closes it on a timeout
or a cancellation), so a server that watches its connections stops computing the reply nobody will read.
"""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from typing import Any

from mathwizard.config import load_secrets
from mathwizard.errors import ConfigError, TeacherError, TransientError
from mathwizard.teacher.cache import endpoint_host

Message = dict[str, str]

_KEYLIKE = re.compile(r"\b(sk|pk|rk|key)-[A-Za-z0-9_\-*.]{3,}", re.IGNORECASE)
_KEY_PHRASE = re.compile(r"(api[ _-]?key[^:]{0,20}:\s*)\S+", re.IGNORECASE)
_BEARER = re.compile(r"(bearer\s+)\S+", re.IGNORECASE)
_RETRY_AFTER_CAP_S = 600.0
# A request longer than the model's context, in the wording of OpenAI (`context_length_exceeded`,
# `string_above_max_length`), llama-cpp-python and vLLM ("This model's maximum context length is ..."), llama.cpp's
# own server ("exceeds the available context size", `exceed_context_size_error`) and others ("prompt is too long").
_TOO_LONG_CODES = {"context_length_exceeded", "string_above_max_length", "exceed_context_size_error"}
_TOO_LONG_TEXT = re.compile(
    r"context[ _-]?length|maximum context|context (window|size)|exceeds? (the )?(available )?context"
    r"|prompt is too long|too many tokens|input is too long",
    re.IGNORECASE,
)


class APIFault(TransientError):
    """A failed request worth retrying; `reason` is short and stable (`http_503`, `timeout`, ...) for reports."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class ItemRejected(Exception):
    """The API refused this one request for what it holds (it is too long): the item fails, the stage goes on."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None
    refusal: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int


def api_key_configured() -> bool:
    key = load_secrets().teacher_api_key
    return key is not None and bool(key.get_secret_value().strip())


def scrub(text: str, secret: str | None = None) -> str:
    """`text` on one line, without the secret or anything that looks like a key, cut to a readable length."""
    if secret:
        text = text.replace(secret, "***")
    text = _KEY_PHRASE.sub(r"\1***", text)
    text = _BEARER.sub(r"\1***", text)
    text = _KEYLIKE.sub(r"\1-***", text)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, `retry-after` as seconds or an HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return min(max(float(value) / 1000, 0.0), _RETRY_AFTER_CAP_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), _RETRY_AFTER_CAP_S)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(when.timestamp() - time.time(), 0.0), _RETRY_AFTER_CAP_S)


class OpenAIClient:
    """`openai.AsyncOpenAI` with the key from the environment, our timeout, and `max_retries=0`."""

    def __init__(self, *, base_url: str | None, model: str, timeout_s: float) -> None:
        key = load_secrets().teacher_api_key
        secret = key.get_secret_value().strip() if key is not None else ""
        if not secret:
            raise ConfigError(
                "teacher.kind=openai needs an API key: set MATHWIZARD_TEACHER_API_KEY or OPENAI_API_KEY "
                "(environment or .env), or use --teacher rule"
            )
        self.model = model
        self.base_url = base_url
        self.host = endpoint_host(base_url)
        self.timeout_s = timeout_s
        self._secret = secret
        import openai  # here, not at module level: the stage module and the CLI import fast

        # pool=None: waiting for a free connection of our own is not time on the wire and never times a request out
        timeout = openai.Timeout(timeout_s, pool=None)
        self._client = openai.AsyncOpenAI(api_key=secret, base_url=base_url, timeout=timeout, max_retries=0)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIClient(host={self.host!r}, model={self.model!r})"

    async def complete(self, messages: list[Message], *, temperature: float, max_tokens: int) -> Reply:
        """One request; raises APIFault (retry it), ItemRejected (fail the item) or TeacherError (stop the stage)."""
        # Errors are built outside the except blocks: raising inside would chain the openai exception, whose
        # request carries the Authorization header and whose message may carry the key.
        problem: Exception | None = None
        raw: Any = None
        try:
            raw = await self._client.chat.completions.create(
                model=self.model, messages=messages, temperature=temperature, max_tokens=max_tokens
            )
        except Exception as exc:
            problem = self.translate(exc)
        if problem is not None:
            raise problem
        return self._parse(raw)

    def translate(self, exc: Exception) -> Exception:
        """An openai exception as ours: APIFault (retry), ItemRejected (fail the item) or TeacherError (stop).

        The result is raised by the caller outside its except block: raising inside would chain the openai exception,
        whose request carries the Authorization header and whose message may carry the key. Anything that is not an
        openai error comes back as it is.
        """
        import openai

        if isinstance(exc, openai.APITimeoutError):
            return APIFault("timeout", f"no reply within {self.timeout_s:g} s")
        if isinstance(exc, openai.APIConnectionError):
            return APIFault("connection", self._scrub(_cause(exc)))
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            message = self._scrub(_status_message(exc))
            if status == 429:
                return APIFault("http_429", message, retry_after_seconds(exc.response.headers))
            if status >= 500 or status in (408, 409):
                return APIFault(f"http_{status}", message, retry_after_seconds(exc.response.headers))
            if status == 413 or (status == 400 and _says_too_long(exc.body, message)):
                return ItemRejected("too_long", f"{status}: {message}")
            return TeacherError(self._fatal_message(status, message))
        if isinstance(exc, openai.APIResponseValidationError):
            return APIFault("invalid_body", self._scrub(str(exc)))
        if isinstance(exc, ValueError | TypeError):  # a JSON content type with a body that is not JSON
            return APIFault("invalid_body", self._scrub(f"{type(exc).__name__}: {exc}"))
        return exc

    def _parse(self, raw: Any) -> Reply:
        from openai.types.chat import ChatCompletion

        problem = None
        try:
            if not isinstance(raw, ChatCompletion):
                problem = f"expected a chat completion, got {type(raw).__name__}: {str(raw)[:80]!r}"
            elif not raw.choices:
                problem = "the completion has no choices"
            else:
                choice = raw.choices[0]
                message = choice.message
                usage = raw.usage
                return Reply(
                    text=message.content or "",
                    finish_reason=choice.finish_reason,
                    refusal=getattr(message, "refusal", None),
                    model=raw.model or self.model,
                    prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                    completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                )
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            problem = f"malformed completion ({type(exc).__name__})"
        raise APIFault("invalid_body", self._scrub(problem or "malformed completion"))

    def _fatal_message(self, status: int, message: str) -> str:
        where = f"the teacher API at {self.host}"
        if status == 401:
            return (
                f"{where} rejected the API key (401: {message}); set MATHWIZARD_TEACHER_API_KEY or OPENAI_API_KEY"
                " to a valid key"
            )
        if status == 403:
            return f"{where} refused access (403: {message}); check that the key may use model {self.model!r}"
        if status == 404:
            return (
                f"{where} does not know model {self.model!r} or the endpoint (404: {message}); "
                "check teacher.model and teacher.base_url"
            )
        return (
            f"{where} rejected the request ({status}: {message}); "
            "check teacher.model, teacher.max_tokens and teacher.temperature"
        )

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secret)

    async def close(self) -> None:
        await self._client.close()


def _says_too_long(body: Any, message: str) -> bool:
    """A 400 body saying the request exceeds the model's context (not a wrong model, key or setting)."""
    error = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(error, dict) and (error.get("code") in _TOO_LONG_CODES or error.get("type") in _TOO_LONG_CODES):
        return True
    return bool(_TOO_LONG_TEXT.search(message))


def _status_message(exc: Any) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("error") or body
        return str(message)
    return str(exc.message)


def _cause(exc: BaseException) -> str:
    """The innermost reason of a connection error (openai says only "Connection error.")."""
    seen: list[str] = [str(exc)]
    inner = exc.__cause__ or exc.__context__
    while inner is not None and len(seen) < 4:
        seen.append(f"{type(inner).__name__}: {inner}")
        inner = inner.__cause__ or inner.__context__
    return seen[-1] if len(seen) > 1 else seen[0]

"""The Files and Batches endpoints of an OpenAI-compatible API, through the real `openai` client, with our errors.

One call each, no retries (the batch runner owns the policy), errors as in `client.py`: `APIFault` (429, 5xx,
timeouts: retry), `TeacherError` (a wrong key, model or endpoint: stop) and, for a batch's own reply lines,
`ItemRejected` (too long). The key is read from the environment when the client is built and scrubbed from every
message, as for chat completions. Lookups by name (`find_file`, `find_batch`) let a re-run find an upload or a
batch whose id a killed run never recorded, instead of paying for it twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mathwizard.teacher.client import APIFault, OpenAIClient, Reply

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
METADATA_KEY = "mathwizard_batch"  # the batch's name (its request file's name) in the batch's metadata
TERMINAL = ("completed", "failed", "expired", "cancelled")
_LOOKBACK_S = 2 * 86_400  # lists are newest first: older entries than this before our record cannot be ours


@dataclass(frozen=True)
class BatchInfo:
    """What we read of a batch (`openai.types.Batch`)."""

    id: str
    status: str
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    errors: str = ""  # why a batch failed validation, one line

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


class BatchAPI(OpenAIClient):
    """`openai.OpenAI` (synchronous: a handful of calls per batch) with the key from the environment.

    Raises:
        ConfigError: no API key is configured.
    """

    def __init__(self, *, base_url: str | None, model: str, timeout_s: float) -> None:
        super().__init__(base_url=base_url, model=model, timeout_s=timeout_s)
        import openai

        self._sync = openai.OpenAI(api_key=self._secret, base_url=base_url, timeout=timeout_s, max_retries=0)

    def __repr__(self) -> str:  # never show the key
        return f"BatchAPI(host={self.host!r}, model={self.model!r})"

    def _do(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        problem: Exception | None = None
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            problem = self.translate(exc)
        raise problem  # outside the except block: never chained to the openai error (it holds the key)

    # ------------------------------------------------------------------------------------------ files
    def upload(self, name: str, content: bytes) -> str:
        """Upload a JSONL request file named `name`; returns its file id."""
        file = self._do(self._sync.files.create, file=(name, content, "application/jsonl"), purpose="batch")
        return str(file.id)

    def find_file(self, name: str, size: int, since: float) -> str | None:
        """The id of an uploaded batch file named `name` of `size` bytes, created after `since` (epoch s), if any."""

        def scan() -> str | None:
            for file in self._sync.files.list(purpose="batch", order="desc", limit=100):
                if file.filename == name and int(file.bytes or 0) == size:
                    return str(file.id)
                if file.created_at and file.created_at < since - _LOOKBACK_S:
                    break
            return None

        return self._do(scan)

    def content(self, file_id: str) -> bytes:
        """The bytes of a file (a batch's output or error file)."""
        return self._do(lambda: self._sync.files.content(file_id).content)

    # ---------------------------------------------------------------------------------------- batches
    def create(self, file_id: str, name: str) -> BatchInfo:
        """Create a batch of the requests in `file_id`, its `name` in the metadata (for `find_batch`)."""
        batch = self._do(
            self._sync.batches.create,
            input_file_id=file_id,
            endpoint=ENDPOINT,
            completion_window=COMPLETION_WINDOW,
            metadata={METADATA_KEY: name},
        )
        return _info(batch)

    def find_batch(self, name: str, file_id: str, since: float) -> BatchInfo | None:
        """A batch created after `since` for `file_id` with `name` in its metadata, if any."""

        def scan() -> BatchInfo | None:
            for batch in self._sync.batches.list(limit=100):
                if (batch.metadata or {}).get(METADATA_KEY) == name and batch.input_file_id == file_id:
                    return _info(batch)
                if batch.created_at and batch.created_at < since - _LOOKBACK_S:
                    break
            return None

        return self._do(scan)

    def retrieve(self, batch_id: str) -> BatchInfo:
        return _info(self._do(self._sync.batches.retrieve, batch_id))

    def cancel(self, batch_id: str) -> BatchInfo:
        return _info(self._do(self._sync.batches.cancel, batch_id))

    # ------------------------------------------------------------------------------------------ replies
    def parse_body(self, body: Any) -> Reply:
        """A reply line's chat completion as a `Reply`; APIFault('invalid_body') when it is not one."""
        from openai.types.chat import ChatCompletion

        try:
            raw = ChatCompletion.model_validate(body)
        except Exception as exc:  # pydantic's ValidationError, or a body that is not a mapping
            raise APIFault("invalid_body", self._scrub(f"not a chat completion ({type(exc).__name__})")) from None
        return self._parse(raw)

    def close_sync(self) -> None:
        self._sync.close()


def _info(batch: Any) -> BatchInfo:
    counts = batch.request_counts
    errors = ""
    if batch.errors is not None and getattr(batch.errors, "data", None):
        errors = "; ".join(f"{e.code}: {e.message}" for e in batch.errors.data[:3])
    return BatchInfo(
        id=str(batch.id),
        status=str(batch.status),
        input_file_id=str(batch.input_file_id),
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        total=int(getattr(counts, "total", 0) or 0),
        completed=int(getattr(counts, "completed", 0) or 0),
        failed=int(getattr(counts, "failed", 0) or 0),
        errors=" ".join(errors.split()),
    )

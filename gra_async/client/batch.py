"""The OpenAI Batch API of one endpoint: upload a JSONL file, start a batch, poll it, read its files.

Formats (OpenAI's, which other providers copy): an input line is `{"custom_id", "method":
"POST", "url": "/v1/chat/completions", "body"}`; an output line is `{"custom_id",
"response": {"status_code", "body"}, "error"}`, and the error file's lines carry `error`
alone. Every request here retries transient faults by the run's `RetryPolicy`; `poll`
survives any number of them, since a batch may take its whole completion window.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from gra_async.client._http import Timeouts, Transport
from gra_async.client._types import ChatRequest
from gra_async.client.retry import RetryPolicy, error_for_status
from gra_async.config import EndpointConfig
from gra_async.errors import EndpointError, MalformedResponse, RetriesExhausted, TransientError

__all__ = ["BatchApi", "BatchLine", "BatchStatus", "request_line"]

log = logging.getLogger("gra_async")

TERMINAL = frozenset({"completed", "expired", "cancelled", "failed"})
BatchState = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                     "cancelling", "cancelled"]


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestCounts(_Reply):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchStatus(_Reply):
    """The fields of a batch object that a run acts on."""

    id: str
    status: BatchState
    input_file_id: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: RequestCounts | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class _LineResponse(_Reply):
    status_code: int
    body: Any = None


class _LineError(_Reply):
    code: str | None = None
    message: str | None = None


class BatchLine(_Reply):
    """One line of an output or error file."""

    custom_id: str
    response: _LineResponse | None = None
    error: _LineError | None = None


def request_line(custom_id: str, model: str, request: ChatRequest) -> bytes:
    """One input line: the same body the endpoint would send online."""
    body: dict[str, Any] = {"model": model, "messages": request.messages,
                            "max_tokens": request.max_tokens, "temperature": request.temperature}
    if request.response_format is not None:
        body["response_format"] = request.response_format
    if request.seed is not None:
        body["seed"] = request.seed
    return orjson.dumps({"custom_id": custom_id, "method": "POST",
                         "url": "/v1/chat/completions", "body": body})


def parse_lines(data: bytes) -> Iterator[BatchLine]:
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            yield BatchLine.model_validate_json(raw)
        except ValidationError:
            log.warning("skipped a batch result line that is not one (%d bytes)", len(raw))


class BatchApi:
    """Files and batches of one endpoint (its base URL and key)."""

    def __init__(
        self, config: EndpointConfig, transport: Transport, *, policy: RetryPolicy | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.label = config.label
        self._base = config.base_url
        self._transport = transport
        self._policy = policy or RetryPolicy()
        self._sleep = sleep
        self._key = config.api_key()
        self._auth = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._timeouts = Timeouts(connect=config.connect_timeout, read=config.read_timeout)

    async def _request(
        self, method: str, path: str, *, body: bytes | None = None, content_type: str | None = None,
    ) -> bytes:
        headers = dict(self._auth)
        if content_type is not None:
            headers["Content-Type"] = content_type
        attempt = 0
        while True:
            try:
                response = await self._transport.request(
                    method, f"{self._base}{path}", headers=headers, body=body,
                    timeouts=self._timeouts, label=self.label)
                if response.status >= 300:
                    raise error_for_status(response.status, response.headers, response.body,
                                           label=self.label, wall_clock=time.time, secret=self._key)
                return response.body
            except TransientError as error:
                if attempt >= self._policy.max_retries:
                    raise RetriesExhausted(f"{error} (gave up after {attempt + 1} attempts)",
                                           last=error) from None
                await self._sleep(self._policy.delay(attempt, error))
                attempt += 1

    def _json(self, body: bytes, what: str) -> Any:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise MalformedResponse(f"{self.label}: {what} is not JSON",
                                    endpoint=self.label) from None

    def _status(self, body: bytes) -> BatchStatus:
        try:
            return BatchStatus.model_validate(self._json(body, "the batch object"))
        except ValidationError as exc:
            raise MalformedResponse(f"{self.label}: not a batch object ({exc.error_count()} "
                                    "problems)", endpoint=self.label) from None

    async def upload(self, data: bytes, name: str) -> str:
        """POST /files (multipart, purpose=batch); the file's id."""
        boundary = f"gra-{secrets.token_hex(12)}"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
                f"batch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"{name}\"\r\nContent-Type: application/jsonl\r\n\r\n").encode()
        body += data + f"\r\n--{boundary}--\r\n".encode()
        reply = self._json(await self._request(
            "POST", "/files", body=body, content_type=f"multipart/form-data; boundary={boundary}"),
            "the file object")
        if not isinstance(reply, dict) or not isinstance(reply.get("id"), str):
            raise MalformedResponse(f"{self.label}: the upload gave no file id", endpoint=self.label)
        return str(reply["id"])

    async def create(self, file_id: str, window: str, metadata: dict[str, str]) -> BatchStatus:
        body = orjson.dumps({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                             "completion_window": window, "metadata": metadata})
        return self._status(await self._request("POST", "/batches", body=body,
                                                content_type="application/json"))

    async def retrieve(self, batch_id: str) -> BatchStatus:
        return self._status(await self._request("GET", f"/batches/{batch_id}"))

    async def find(self, file_id: str) -> BatchStatus | None:
        """The batch made from `file_id`, if one was made (a crash may have lost its id)."""
        reply = self._json(await self._request("GET", "/batches?limit=100"), "the batch list")
        for item in reply.get("data", []) if isinstance(reply, dict) else []:
            if isinstance(item, dict) and item.get("input_file_id") == file_id:
                return BatchStatus.model_validate(item)
        return None

    async def content(self, file_id: str) -> bytes:
        return await self._request("GET", f"/files/{file_id}/content")

    async def poll(
        self, batch_id: str, *, first: float, longest: float,
        seen: Callable[[BatchStatus], None] = lambda _: None,
    ) -> BatchStatus:
        """Wait until the batch ends, backing off from `first` to `longest` seconds between
        looks; transient faults (5xx, resets) only lengthen the wait."""
        wait = first
        while True:
            await self._sleep(wait)
            try:
                status = await self.retrieve(batch_id)
            except RetriesExhausted as exc:
                log.info("%s: batch %s not readable now (%s); polling on", self.label, batch_id,
                         exc.last)
                wait = min(wait * 2, longest)
                continue
            except EndpointError:
                raise
            seen(status)
            if status.done:
                return status
            wait = min(wait * 2, longest)

"""The fake server's Batch API: files, batches and their lifecycle, in the OpenAI formats.

    POST /v1/files                  multipart/form-data with `purpose` = "batch" and `file`
    GET  /v1/files/ID/content       the file's bytes (inputs, outputs, error files)
    POST /v1/batches                {"input_file_id", "endpoint", "completion_window", "metadata"}
    GET  /v1/batches[?limit=N]      newest first
    GET  /v1/batches/ID             the batch object; its status follows the clock
    POST /v1/batches/ID/cancel      cancelling, then cancelled at the next look

A batch is `validating` for the first 10% of `batch_delay`, `in_progress` until 80%,
`finalizing` until its end, then ends as the next `batch_script` entry says (default
`completed`). Its lines are answered when it ends: `batch_line_error_rate` of them go to
the error file, `batch_line_fail_rate` get `status_code` 500 in the output file, and an
expired batch has done only `batch_expire_done` of them (the rest go to the error file
with code `batch_expired`, as OpenAI writes them). `batch_poll_script` gives the next
polls of a batch an HTTP status or "reset" instead of the object. Stats (`/_stats`
`batches`): files, batches, and `custom_ids` {id: times submitted in a created batch}.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

if TYPE_CHECKING:
    from gra_async.testing.fake_server import FakeOpenAIServer, Knobs

__all__ = ["FakeBatches"]

RESET = -1  # the status `handle` returns for "reset the connection"
TERMINAL = ("completed", "expired", "cancelled", "failed")


@dataclass(slots=True)
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    window: str
    metadata: dict[str, Any]
    created: float
    delay: float
    outcome: str
    total: int
    status: str = "validating"
    cancel_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    times: dict[str, int] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        counts = self.counts or {"total": self.total, "completed": 0, "failed": 0}
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": None,
            "input_file_id": self.input_file_id, "completion_window": self.window,
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": int(self.created),
            "expires_at": int(self.created) + 86400, "request_counts": counts,
            "metadata": self.metadata,
            **{f"{name}_at": at for name, at in self.times.items()},
        }


def _error(status: int, message: str) -> tuple[int, bytes]:
    return status, orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                           "param": None, "code": None}})


def _multipart(content_type: bytes, body: bytes) -> dict[str, tuple[str | None, bytes]] | None:
    """Form fields of a multipart body: name -> (file name, bytes); None if it is not one."""
    kind, _, params = content_type.decode("latin-1").partition(";")
    if kind.strip().lower() != "multipart/form-data" or "boundary=" not in params:
        return None
    boundary = params.split("boundary=", 1)[1].split(";")[0].strip().strip('"').encode()
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        disposition = next((line for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-disposition")), b"")
        attrs = dict(item.strip().split(b"=", 1) for item in disposition.split(b";")[1:]
                     if b"=" in item)
        name = attrs.get(b"name", b"").strip(b'"').decode()
        filename = attrs.get(b"filename")
        fields[name] = (None if filename is None else filename.strip(b'"').decode(),
                        value.removesuffix(b"\r\n"))
    return fields


class FakeBatches:
    def __init__(self, server: FakeOpenAIServer) -> None:
        self._server = server
        self._files: dict[str, tuple[str, bytes]] = {}  # id -> (purpose, bytes)
        self._batches: dict[str, _Batch] = {}
        self._outcomes: deque[str] = deque()
        self._polls: deque[Any] = deque()
        self._ids = 0
        self._rng = random.Random(0)
        self.custom_ids: Counter[str] = Counter()
        self.created = 0

    def scripts(self, knobs: Knobs, changed: set[str]) -> None:
        if "batch_script" in changed:
            self._outcomes = deque(knobs.batch_script)
        if "batch_poll_script" in changed:
            self._polls = deque(knobs.batch_poll_script)

    def reset_stats(self) -> None:
        self.custom_ids = Counter()
        self.created = 0

    def stats(self) -> dict[str, Any]:
        return {"files": len(self._files), "created": self.created,
                "open": sum(b.status not in TERMINAL for b in self._batches.values()),
                "custom_ids": dict(self.custom_ids)}

    def _id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-fake-{self._ids}"

    def handle(
        self, method: bytes, path: str, query: bytes, body: bytes, content_type: bytes,
    ) -> tuple[int, bytes]:
        parts = path.strip("/").split("/")[1:]  # drop "v1"
        if parts == ["files"] and method == b"POST":
            return self._upload(content_type, body)
        if len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
            found = self._files.get(parts[1])
            if found is None:
                return _error(404, f"No such File object: {parts[1]}")
            return 200, found[1]
        if parts == ["batches"] and method == b"POST":
            return self._create(body)
        if parts == ["batches"]:
            limit = int(parse_qs(query.decode("latin-1")).get("limit", ["20"])[0])
            newest = sorted(self._batches.values(), key=lambda b: -int(b.id.rsplit("-", 1)[1]))
            data = [self._advance(b).public() for b in newest[:limit]]
            return 200, orjson.dumps({"object": "list", "data": data, "has_more": False})
        if len(parts) in (2, 3) and parts[0] == "batches":
            batch = self._batches.get(parts[1])
            if batch is None:
                return _error(404, f"No such Batch object: {parts[1]}")
            if len(parts) == 3 and parts[2] == "cancel" and method == b"POST":
                if batch.status not in TERMINAL:
                    batch.status = "cancelling"
                    batch.cancel_at = time.time()
                return 200, orjson.dumps(batch.public())
            if self._polls:
                fate = self._polls.popleft()
                if fate == "reset":
                    return RESET, b""
                if isinstance(fate, int) and fate != 200:
                    return _error(fate, f"scripted {fate} (fake server knob `batch_poll_script`)")
            return 200, orjson.dumps(self._advance(batch).public())
        return _error(404, f"no route {path}")

    def _upload(self, content_type: bytes, body: bytes) -> tuple[int, bytes]:
        fields = _multipart(content_type, body)
        if fields is None:
            return _error(400, "expected multipart/form-data with `purpose` and `file`")
        purpose = fields.get("purpose", (None, b""))[1].decode()
        upload = fields.get("file")
        if purpose != "batch" or upload is None or upload[0] is None:
            return _error(400, "a batch input file needs purpose=batch and a `file` part")
        seen: set[str] = set()
        for number, line in enumerate(upload[1].splitlines(), 1):
            try:
                item = orjson.loads(line)
                custom_id = item["custom_id"]
                ok = item["method"] == "POST" and item["url"] == "/v1/chat/completions"
                ok = ok and isinstance(item["body"], dict)
            except (orjson.JSONDecodeError, KeyError, TypeError):
                return _error(400, f"line {number}: not a batch request line")
            if not ok or custom_id in seen:
                return _error(400, f"line {number}: bad method/url/body or duplicate custom_id")
            seen.add(custom_id)
        file_id = self._id("file")
        self._files[file_id] = ("batch", upload[1])
        return 200, orjson.dumps({"id": file_id, "object": "file", "bytes": len(upload[1]),
                                  "created_at": int(time.time()), "filename": upload[0],
                                  "purpose": "batch"})

    def _create(self, body: bytes) -> tuple[int, bytes]:
        try:
            request = orjson.loads(body)
            file_id = request["input_file_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(400, "expected {input_file_id, endpoint, completion_window}")
        found = self._files.get(file_id)
        if found is None:
            return _error(400, f"No such File object: {file_id}")
        if request.get("endpoint") != "/v1/chat/completions":
            return _error(400, "endpoint must be /v1/chat/completions")
        lines = [orjson.loads(line) for line in found[1].splitlines() if line.strip()]
        for line in lines:
            self.custom_ids[line["custom_id"]] += 1
        self.created += 1
        knobs = self._server.knobs
        batch = _Batch(self._id("batch"), file_id, request["endpoint"],
                       str(request.get("completion_window", "24h")),
                       dict(request.get("metadata") or {}), time.time(), knobs.batch_delay,
                       self._outcomes.popleft() if self._outcomes else "completed", len(lines))
        batch.times["created"] = int(batch.created)
        self._batches[batch.id] = batch
        return 200, orjson.dumps(batch.public())

    def _advance(self, batch: _Batch) -> _Batch:
        """The batch's status at this moment; its lines are answered when it ends."""
        if batch.status in TERMINAL:
            return batch
        now = time.time()
        if batch.status == "cancelling":
            self._finish(batch, "cancelled", done=0.0)
            return batch
        age = now - batch.created
        if age >= batch.delay:
            done = self._server.knobs.batch_expire_done if batch.outcome == "expired" else 1.0
            self._finish(batch, batch.outcome, done=0.0 if batch.outcome in (
                "cancelled", "failed") else done)
        elif age >= 0.8 * batch.delay:
            batch.status = "finalizing"
            batch.times.setdefault("finalizing", int(now))
        elif age >= 0.1 * batch.delay:
            batch.status = "in_progress"
            batch.times.setdefault("in_progress", int(now))
        return batch

    def _finish(self, batch: _Batch, status: str, *, done: float) -> None:
        knobs = self._server.knobs
        lines = [orjson.loads(line) for line in self._files[batch.input_file_id][1].splitlines()
                 if line.strip()]
        outputs: list[bytes] = []
        errors: list[bytes] = []
        cut = round(done * len(lines))
        for i, line in enumerate(lines):
            custom_id = line["custom_id"]
            request_id = f"req-fake-{self._ids}-{i}"
            if i >= cut:
                if status == "expired":
                    errors.append(orjson.dumps({
                        "id": f"batch_req_{i}", "custom_id": custom_id, "response": None,
                        "error": {"code": "batch_expired", "message": "This request could not "
                                  "be executed before the completion window expired."}}))
                continue
            roll = self._rng.random()
            if roll < knobs.batch_line_error_rate:
                errors.append(orjson.dumps({
                    "id": f"batch_req_{i}", "custom_id": custom_id, "response": None,
                    "error": {"code": "server_error", "message": "injected line error"}}))
                continue
            if roll < knobs.batch_line_error_rate + knobs.batch_line_fail_rate:
                code, body = 500, {"error": {"message": "injected 500", "type": "server_error"}}
            else:
                code, body = self._server.batch_line(line["body"])
            outputs.append(orjson.dumps({
                "id": f"batch_req_{i}", "custom_id": custom_id, "error": None,
                "response": {"status_code": code, "request_id": request_id, "body": body}}))
        if outputs:
            batch.output_file_id = self._id("file")
            self._files[batch.output_file_id] = ("batch_output", b"\n".join(outputs) + b"\n")
        if errors:
            batch.error_file_id = self._id("file")
            self._files[batch.error_file_id] = ("batch_output", b"\n".join(errors) + b"\n")
        ok = sum(1 for raw in outputs if b'"status_code":200' in raw)
        batch.counts = {"total": len(lines), "completed": ok, "failed": len(lines) - ok}
        batch.status = status
        batch.times[status] = int(time.time())

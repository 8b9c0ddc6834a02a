"""A fake OpenAI-compatible server on 127.0.0.1 with fault knobs, for every test and benchmark.

Real HTTP, never mocks: the client under test goes through its own sockets, pool, parser and
retry policy exactly as it would against vLLM or llama.cpp. The server must not be the bottleneck
of a benchmark at 1000-2000 req/s on 2 cores shared with the client, so it is a bare
`asyncio.Protocol` with httptools parsing, orjson bodies and prebuilt header bytes, on uvloop
when importable; simulated latency is one `loop.call_later` timer per request, not a task.

Endpoints:
    POST /v1/chat/completions   the model (auth, 404 for unknown models, every knob below)
    POST /v1/embeddings         embeddings of `input` (a string or a list of them): a hashed bag
                                of words, EMBED_DIM floats of unit length, so texts with the same
                                words in any order have cosine 1 and texts sharing no word ~0.
                                Auth, 404 for unknown models, and the fault knobs of chat calls
                                (latency, capacity, rpm/tpm, the *_rate knobs, status_script,
                                down); "truncate" answers normally. Counted in `/_stats`:
                                `embedding_requests`, `embedded_texts`, and `embeddings`
                                {embedding_key(model, text): n}, so a test can assert no text
                                was embedded twice.
    GET  /v1/models             configured model names, OpenAI list format (auth)
    POST /v1/files, GET /v1/files/ID/content, POST /v1/batches, GET /v1/batches[/ID],
    POST /v1/batches/ID/cancel  the Batch API (auth; `_fake_batches.py`, knobs `batch_*`)
    GET  /health                200 (503 or reset while `down`), no auth
    GET  /_stats[?bodies=1]     counters as JSON, no auth (`bodies=1`: the last 1000 requests)
    POST /_control              set knobs with a JSON object (partial update), no auth;
                                `{"reset_stats": true}` zeroes the counters; `{"restore": true}`
                                puts every knob back to its start value, zeroes the counters and
                                drops the other connections, as if restarted. GET shows knobs.

Knobs (same names as flags at start: `--error-rate 0.1`; or all at once: `--knobs JSON`):
    latency, jitter      seconds before a chat reply; jitter is uniform +-, never below 0
    capacity             slots, as a model server's batch (0: unlimited). A reply takes its
                         latency only once it holds a slot; beyond the slots requests wait in
                         one FIFO queue, never a 429 (vLLM queues the same way). A closed
                         connection gives its slot or its place back, as vLLM aborts the request.
    degrade              slowdown past the knee (as KV-cache preemption does): a request starting
                         while W others wait takes latency * (1 + degrade * min(W, capacity) /
                         capacity), so a full queue and degrade 1 halve the throughput
    rpm, tpm             requests / tokens per minute over a sliding 60 s window (0: no limit).
                         Over it: 429 with `Retry-After` and `retry-after-ms`; while set, every
                         chat reply carries `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
                         (reset: time until one more unit is free, like "1.5s"). A request is
                         admitted while the window's tokens plus its prompt (chars/4) fit in tpm;
                         each 200 reply adds its total tokens. Setting rpm or tpm starts a fresh
                         window.
    error_rate           fraction answered 500, 502 or 503 with an OpenAI error body
    reset_rate           fraction whose connection is reset (RST) without a response
    hang_rate            fraction never answered; the connection stays open until the client quits
    malformed_rate       fraction answered 200 with the JSON body cut in half
    truncate_rate        fraction with finish_reason "length" and the content cut in half
    seed                 seeds the fault RNG: one draw per chat request in arrival order, so a
                         seed places the faults at the same request indexes every run; it
                         also varies the replies (servers with different seeds answer a
                         prompt differently, as different replicas' samples would)
    dribble              seconds over which each chat body is sent, in small pieces
    down, down_mode      every request to /v1 and /health fails: "503" (default), "reset", or
    down_for             "refuse" (the listening socket closes, open connections are reset);
                         down_for > 0 brings it back up after that many seconds ("refuse" needs it)
    api_key              required as `Authorization: Bearer KEY` on /v1 (else 401 like vLLM);
                         set from the environment with `--api-key-env VAR`, never logged
    models               served model names (unknown model: 404 NotFoundError)
    status_script        the next chat requests' fates, in order, then normal: HTTP statuses
                         (200 answers normally) or "reset", "hang", "malformed", "truncate".
                         Scripted requests skip the rate limiter and the random faults.
    retry_after          seconds sent on every 429 (default: 1 for scripted ones; for rate limits
                         the time until a slot frees, `Retry-After` rounded up to whole seconds)
    json_schema_modes    accepted `response_format` types ("json_schema", "json_object");
    unsupported_format_status   others get this status (500, as llama.cpp does for json_schema)
    rules                scripted replies: a list of {"content": str, "model": str?,
                         "contains": str?, "times": int?}; the first rule whose model matches and
                         whose `contains` is a substring of the joined message contents answers
                         (at most `times` times); otherwise the default reply

Default replies: with a schema (`{"type": "json_schema", "json_schema": {"schema": ...}}` or
`{"type": "json_object", "schema": ...}`) a JSON value valid against it (every property, enums,
min/max, lengths, $ref; `pattern` is ignored), its numbers and words drawn from a hash of the
model and the messages, so distinct requests get distinct, reproducible scores; without one a
short plain text about the last user message. The n-th identical request gets the n-th variant
(counted in `calls`, so `reset_stats` restarts it) unless it asks for temperature 0, which always
gets the same reply, as from a real model. A reply longer than `max_tokens` (4 chars a token) is cut there with
finish_reason "length", as a real server does. `stream: true` is refused with 400.

`/_stats`: `requests` (to /v1), `chat_requests`, `status` {"200": n, ...}, `models` {name: n},
`faults` {"reset"|"hang"|"malformed"|"truncated": n}, `rule_hits` (per rule), `in_flight`,
`in_flight_peak`, `connections` {"opened", "open"}, `script_left`, `capacity` {"running",
"waiting", "waiting_peak", "served", "queued", "wait_total", "service_total"} (seconds; `served`
counts replies that held a slot, `queued` those of them that waited first), and `calls`:
{call_key(model, messages): n}, so a test can assert no call was sent twice.
`GET /metrics`: `vllm:num_requests_running` and `vllm:num_requests_waiting` gauges in the
Prometheus text format, as vLLM names them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qs

import orjson

from gra_async.testing._fake_batches import FakeBatches

try:  # the `testing` extra: the package itself does not need it
    import httptools
except ModuleNotFoundError as _missing:
    if _missing.name != "httptools":
        raise
    _HTTPTOOLS = False
else:
    _HTTPTOOLS = True

EMBED_DIM: Final = 64  # of /v1/embeddings vectors
MISSING_HTTPTOOLS: Final = (
    "the fake server needs httptools, which gra-async does not install by default: "
    "pip install 'gra-async[testing]'"
)

__all__ = [
    "FakeOpenAIServer",
    "FakeServerProcess",
    "Knobs",
    "call_key",
    "main",
]

FAULT_STEPS: Final = ("reset", "hang", "malformed", "truncate")
JSON_MODES: Final = ("json_schema", "json_object")
BATCH_OUTCOMES: Final = ("completed", "expired", "cancelled", "failed")
DOWN_MODES: Final = ("503", "reset", "refuse")
KEEP_BODIES: Final = 1000
WINDOW: Final = 60.0  # seconds, for rpm/tpm
DRIBBLE_PIECES: Final = 16
LISTEN_BACKLOG: Final = 4096  # asyncio's default of 100 drops SYNs when 500 clients connect at once
SCRIPTED_RETRY_AFTER: Final = 1.0
API_KEY_ENV: Final = "GRA_FAKE_SERVER_API_KEY"  # how FakeServerProcess hands the key to the child

Step = int | Literal["reset", "hang", "malformed", "truncate"]


# --------------------------------------------------------------------------------------------
# Knobs


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """One scripted reply: the first rule that matches a chat request answers it."""

    content: str
    model: str | None = None
    contains: str | None = None
    times: int | None = None  # None: unlimited


@dataclasses.dataclass(frozen=True, slots=True)
class Knobs:
    """Everything that shapes the server's behaviour; replaced whole on each update."""

    latency: float = 0.0
    jitter: float = 0.0
    capacity: int = 0
    degrade: float = 0.0
    rpm: int = 0
    tpm: int = 0
    error_rate: float = 0.0
    reset_rate: float = 0.0
    hang_rate: float = 0.0
    malformed_rate: float = 0.0
    truncate_rate: float = 0.0
    dribble: float = 0.0
    down: bool = False
    down_mode: str = "503"
    down_for: float = 0.0
    api_key: str | None = None
    models: tuple[str, ...] = ("fake-model",)
    status_script: tuple[Step, ...] = ()
    retry_after: float | None = None
    json_schema_modes: tuple[str, ...] = JSON_MODES
    unsupported_format_status: int = 500
    rules: tuple[Rule, ...] = ()
    seed: int = 0
    batch_delay: float = 0.2
    batch_script: tuple[str, ...] = ()
    batch_line_error_rate: float = 0.0
    batch_line_fail_rate: float = 0.0
    batch_expire_done: float = 0.5
    batch_poll_script: tuple[Step, ...] = ()

    def public(self) -> dict[str, Any]:
        """The knobs as JSON-ready data, with the API key masked."""
        data = dataclasses.asdict(self)
        data["api_key"] = None if self.api_key is None else "***"
        return data


class KnobError(ValueError):
    """A knob update was refused; the message names the knob and what it accepts."""


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KnobError(f"{name}: expected a number, got {value!r}")
    return float(value)


def _seconds(value: Any, name: str) -> float:
    out = _number(value, name)
    if not out >= 0 or math.isinf(out):
        raise KnobError(f"{name}: expected seconds >= 0, got {value!r}")
    return out


def _fraction(value: Any, name: str) -> float:
    out = _number(value, name)
    if not 0 <= out <= 1:
        raise KnobError(f"{name}: expected a fraction between 0 and 1, got {value!r}")
    return out


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KnobError(f"{name}: expected an integer >= 0, got {value!r}")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise KnobError(f"{name}: expected true or false, got {value!r}")
    return value


def _names(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise KnobError(f"{name}: expected a list of names, got {value!r}")
    return tuple(value)


def _status(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 200 <= value <= 599:
        raise KnobError(f"{name}: expected an HTTP status 200-599, got {value!r}")
    return value


def _script(value: Any, name: str) -> tuple[Step, ...]:
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
        value = [int(p) if p.isdigit() else p for p in value]
    if not isinstance(value, list | tuple):
        raise KnobError(f"{name}: expected a list like [429, 500, 200], got {value!r}")
    steps: list[Step] = []
    for step in value:
        if step in FAULT_STEPS:
            steps.append(step)
        else:
            try:
                steps.append(_status(step, name))
            except KnobError:
                raise KnobError(
                    f"{name}: {step!r} is neither an HTTP status nor one of {', '.join(FAULT_STEPS)}"
                ) from None
    return tuple(steps)


def _rules(value: Any, name: str) -> tuple[Rule, ...]:
    if not isinstance(value, list | tuple):
        raise KnobError(f"{name}: expected a list of rule objects, got {value!r}")
    fields = {"content", "model", "contains", "times"}
    rules: list[Rule] = []
    for i, item in enumerate(value):
        if isinstance(item, Rule):
            rules.append(item)
            continue
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise KnobError(f"{name}[{i}]: expected an object with a string 'content'")
        if extra := set(item) - fields:
            raise KnobError(f"{name}[{i}]: unknown keys {sorted(extra)} (use {sorted(fields)})")
        for key in ("model", "contains"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise KnobError(f"{name}[{i}].{key}: expected a string")
        times = item.get("times")
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
            raise KnobError(f"{name}[{i}].times: expected an integer >= 1")
        rules.append(Rule(item["content"], item.get("model"), item.get("contains"), times))
    return tuple(rules)


def _modes(value: Any, name: str) -> tuple[str, ...]:
    modes = _names(value, name) if value not in ([], ()) else ()
    if bad := [m for m in modes if m not in JSON_MODES]:
        raise KnobError(f"{name}: unknown modes {bad} (use {', '.join(JSON_MODES)})")
    return modes


def _down_mode(value: Any, name: str) -> str:
    value = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if value not in DOWN_MODES:
        raise KnobError(f"{name}: expected one of {', '.join(DOWN_MODES)}, got {value!r}")
    return str(value)


def _api_key(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise KnobError(f"{name}: expected a string or null")
    return value


def _retry_after(value: Any, name: str) -> float | None:
    return None if value is None else _seconds(value, name)


def _outcomes(value: Any, name: str) -> tuple[str, ...]:
    names = _names(value, name)
    for outcome in names:
        if outcome not in BATCH_OUTCOMES:
            raise KnobError(f"{name}: {outcome!r} is not one of {', '.join(BATCH_OUTCOMES)}")
    return names


def _seed(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KnobError(f"{name}: expected an integer, got {value!r}")
    return value


# One table drives /_control validation and the command-line flags.
_KNOB_PARSERS: Final[dict[str, Callable[[Any, str], Any]]] = {
    "latency": _seconds,
    "jitter": _seconds,
    "capacity": _count,
    "degrade": _seconds,
    "rpm": _count,
    "tpm": _count,
    "error_rate": _fraction,
    "reset_rate": _fraction,
    "hang_rate": _fraction,
    "malformed_rate": _fraction,
    "truncate_rate": _fraction,
    "dribble": _seconds,
    "down": _flag,
    "down_mode": _down_mode,
    "down_for": _seconds,
    "api_key": _api_key,
    "models": _names,
    "status_script": _script,
    "retry_after": _retry_after,
    "json_schema_modes": _modes,
    "unsupported_format_status": _status,
    "rules": _rules,
    "seed": _seed,
    "batch_delay": _seconds,
    "batch_script": _outcomes,
    "batch_line_error_rate": _fraction,
    "batch_line_fail_rate": _fraction,
    "batch_expire_done": _fraction,
    "batch_poll_script": _script,
}
_KNOB_HELP: Final = {
    "latency": "seconds before each chat reply",
    "jitter": "uniform +- seconds around latency",
    "capacity": "slots; more requests wait in a FIFO queue (0: unlimited)",
    "degrade": "slowdown of service past the knee (see the module docstring)",
    "rpm": "requests per minute (sliding 60 s window; 0: unlimited)",
    "tpm": "tokens per minute (sliding 60 s window; 0: unlimited)",
    "error_rate": "fraction answered 500/502/503",
    "reset_rate": "fraction whose connection is reset without a reply",
    "hang_rate": "fraction never answered",
    "malformed_rate": "fraction answered 200 with broken JSON",
    "truncate_rate": 'fraction cut in half with finish_reason "length"',
    "dribble": "seconds over which each chat body is sent in pieces",
    "down": "start down",
    "down_mode": "how down fails: 503, reset or refuse",
    "down_for": "seconds until down clears itself (0: until told)",
    "models": "served model names, comma-separated",
    "status_script": "fates of the next chat requests, e.g. 429,500,reset,200",
    "retry_after": "seconds to send on every 429",
    "json_schema_modes": "accepted response_format types, comma-separated",
    "unsupported_format_status": "status for other response_format types",
    "rules": "scripted replies as a JSON list (see the module docstring)",
    "seed": "seed of the fault RNG",
    "batch_delay": "seconds from a batch's creation to its end (validating, in_progress, finalizing)",
    "batch_script": "ends of the next batches, e.g. expired,completed (then completed)",
    "batch_line_error_rate": "fraction of a batch's lines that go to its error file",
    "batch_line_fail_rate": "fraction of a batch's lines answered with status_code 500",
    "batch_expire_done": "fraction of an expired batch's lines that were done",
    "batch_poll_script": "fates of the next batch polls (GET /v1/batches/ID), e.g. 503,reset",
}
_FAULT_RATES: Final = ("reset_rate", "hang_rate", "error_rate", "malformed_rate", "truncate_rate")


def updated_knobs(knobs: Knobs, changes: Mapping[str, Any]) -> Knobs:
    """Validate a partial update and return the new knobs; raise KnobError naming the bad key."""
    values: dict[str, Any] = {}
    for name, raw in changes.items():
        parser = _KNOB_PARSERS.get(name)
        if parser is None:
            raise KnobError(f"unknown knob {name!r} (known: {', '.join(sorted(_KNOB_PARSERS))})")
        values[name] = parser(raw, name)
    new = dataclasses.replace(knobs, **values)
    if sum(getattr(new, rate) for rate in _FAULT_RATES) > 1 + 1e-9:
        raise KnobError(f"the fault rates ({', '.join(_FAULT_RATES)}) add up to more than 1")
    if new.down and new.down_mode == "refuse" and new.down_for <= 0:
        raise KnobError('down_mode "refuse" needs down_for > 0: nothing could reach /_control')
    return new


# --------------------------------------------------------------------------------------------
# Replies


def embedding_key(model: str, text: str) -> str:
    """How `/_stats` names one embedded text."""
    return hashlib.sha256(orjson.dumps([model, text])).hexdigest()


_WORD: Final = re.compile(r"\w+")


@functools.lru_cache(maxsize=65536)
def _word_vector(word: str) -> tuple[float, ...]:
    rng = random.Random(int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(),
                                       "big"))
    return tuple(rng.gauss(0.0, 1.0) for _ in range(EMBED_DIM))


def embed_text(text: str) -> list[float]:
    """The fake embedding: a seeded normal vector per distinct lower-cased word, summed, unit
    length. Reordered words give the same vector, which MinHash's word 3-shingles do not see."""
    total = [0.0] * EMBED_DIM
    for word in sorted(set(_WORD.findall(text.casefold()))):  # one order: the same float sum
        total = [a + b for a, b in zip(total, _word_vector(word), strict=True)]
    norm = math.sqrt(sum(x * x for x in total)) or 1.0
    return [round(x / norm, 6) for x in total]


def call_key(model: str, messages: Any) -> str:
    """The `calls` key of `/_stats`: sha256 of the canonical JSON of model and messages."""
    return hashlib.sha256(_canonical(model, messages)).hexdigest()


def _canonical(model: str, messages: Any) -> bytes:
    return orjson.dumps({"messages": messages, "model": model}, option=orjson.OPT_SORT_KEYS)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(
            part["text"] for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


_VOCABULARY: Final = """alpha amber anchor apple arch atlas basin beacon birch bishop blossom border bridge brook
    canyon carbon castle cedar channel chapter cipher circle citadel clover comet copper coral
    crystal delta desert dialect engine falcon fern fiber forest fossil galaxy garden glacier
    granite harbor harvest helix horizon island ivory jasper kernel lantern lattice ledger lemon
    lighthouse linen lotus magnet maple marble meadow mercury meteor mirror mosaic nebula needle
    oasis orbit orchard origami oxygen paddle palette panther pepper pilot planet plaza polygon
    prairie prism quartz quiver radar raven reef ribbon river rocket saddle saffron satellite
    scholar shadow signal silver sketch spiral spruce summit tablet tempest thistle timber
    tundra turbine valley vector velvet violet volcano walnut willow window zephyr"""
_WORDS: Final = tuple(_VOCABULARY.split())


def _words(rng: random.Random, count: int) -> str:
    # Words drawn per request (not a fixed phrase plus an id) keep distinct requests' texts far
    # apart for the pipeline's near-duplicate filter.
    return " ".join(rng.choices(_WORDS, k=count))


class _SchemaFiller:
    """Builds one value valid against a JSON schema, drawing choices from a seeded RNG."""

    MAX_DEPTH: Final = 12

    def __init__(self, root: Mapping[str, Any], rng: random.Random, topic: str) -> None:
        self.root = root
        self.rng = rng
        self.topic = topic

    def value(self, schema: Any, depth: int = 0) -> Any:
        if not isinstance(schema, Mapping):
            return self._string({})  # `true` / `{}`-like schemas accept anything
        if depth > self.MAX_DEPTH:
            return None
        if "$ref" in schema:
            return self.value(self._resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                non_null = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")]
                return self.value((non_null or options)[0], depth + 1)
        if isinstance(schema.get("allOf"), list):
            return self.value(self._merge(schema), depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema)

    def _resolve(self, ref: Any) -> Any:
        node: Any = self.root
        if not isinstance(ref, str) or not ref.startswith("#"):
            return {}
        for part in ref[1:].split("/"):
            if part:
                part = part.replace("~1", "/").replace("~0", "~")
                node = node.get(part, {}) if isinstance(node, Mapping) else {}
        return node

    def _merge(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = self._resolve(part["$ref"]) if isinstance(part, Mapping) and "$ref" in part else part
            if not isinstance(part, Mapping):
                continue
            for key, val in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **val}
                elif key == "required":
                    merged["required"] = [*merged.get("required", []), *val]
                else:
                    merged.setdefault(key, val)
        return merged

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        out = {name: self.value(sub, depth + 1) for name, sub in props.items()}
        for name in schema.get("required", ()):
            if isinstance(name, str) and name not in out:
                out[name] = self._string({})
        return out

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        if depth > self.MAX_DEPTH // 2:  # recursive schemas: stop growing, stay valid
            size = int(schema.get("minItems", 0))
        else:
            low = int(schema.get("minItems", 1))
            high = int(schema.get("maxItems", max(low, 3)))
            size = self.rng.randint(low, max(low, high))
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        items = schema.get("items", {})
        return [
            self.value(prefix[i] if i < len(prefix) else items, depth + 1) for i in range(size)
        ]

    @staticmethod
    def _bounds(schema: Mapping[str, Any], step: float) -> tuple[float, float]:
        low = _opt_number(schema.get("minimum"))
        high = _opt_number(schema.get("maximum"))
        if "exclusiveMinimum" in schema and (x := _opt_number(schema["exclusiveMinimum"])) is not None:
            low = x + step
        if "exclusiveMaximum" in schema and (x := _opt_number(schema["exclusiveMaximum"])) is not None:
            high = x - step
        if low is None:
            low = 0.0 if high is None else high - 100
        if high is None:
            high = low + 100
        return low, max(low, high)

    def _integer(self, schema: Mapping[str, Any]) -> int:
        low, high = self._bounds(schema, 1)
        first, last = math.ceil(low), math.floor(high)
        return first + int(self.rng.random() * (max(first, last) - first + 1))

    def _number(self, schema: Mapping[str, Any]) -> float:
        low, high = self._bounds(schema, 0.01)
        value = round(low + self.rng.random() * (high - low), 2)
        return min(max(value, low), high)

    def _string(self, schema: Mapping[str, Any]) -> str:
        fmt = schema.get("format")
        if fmt == "date-time":
            return "2024-05-17T12:00:00Z"
        if fmt == "date":
            return "2024-05-17"
        if fmt == "email":
            return f"{self.rng.choice(_WORDS)}@example.com"
        if fmt in ("uri", "url"):
            return f"https://example.com/{self.rng.choice(_WORDS)}"
        if fmt == "uuid":
            return str(_uuid(self.rng))
        text = f"{self.topic} {_words(self.rng, self.rng.randint(6, 14))}".strip()
        min_len = int(schema.get("minLength", 0))
        while len(text) < min_len:
            text += " " + _words(self.rng, 8)
        max_len = schema.get("maxLength")
        return text[: int(max_len)] if isinstance(max_len, int) else text


def _asks_for_metadata(schema: Any) -> bool:
    """gra-async's metadata call: its schema asks for `keywords` and `summary`."""
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    return isinstance(props, Mapping) and {"keywords", "summary"} <= set(props)


_SAMPLE_INSTRUCTION: Final = re.compile(r"<instruction>\s*(.*?)\s*</instruction>", re.DOTALL)


def _metadata_reply(text: str, rng: random.Random) -> dict[str, Any]:
    """Keywords and a summary that describe the sample in the prompt, as a model would:
    its longest distinct words, and a sentence about its instruction."""
    found = _SAMPLE_INSTRUCTION.search(text)
    words = re.findall(r"[A-Za-z][A-Za-z-]{3,}", found.group(1) if found else text)
    keywords = sorted(dict.fromkeys(w.casefold() for w in words), key=lambda w: (-len(w), w))[:3]
    subject = " ".join(words[:8]) or rng.choice(_WORDS)
    return {"keywords": keywords or [rng.choice(_WORDS)],
            "summary": f"A task about {subject}, answered in one reply."}


def _opt_number(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) else None  # not bool


def _uuid(rng: random.Random) -> str:
    raw = f"{rng.getrandbits(128):032x}"
    return f"{raw[:8]}-{raw[8:12]}-4{raw[13:16]}-a{raw[17:20]}-{raw[20:32]}"


def _topic(messages: Sequence[Any]) -> str:
    """A few words of the last user message, so replies visibly answer it."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            words = _content_text(message.get("content")).split()
            return " ".join(words[:6])
    return ""


# --------------------------------------------------------------------------------------------
# HTTP plumbing

_REASONS: Final = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
    422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}
_ERROR_TYPES: Final = {
    400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
    404: "NotFoundError", 408: "RequestTimeoutError", 409: "ConflictError",
    422: "UnprocessableEntityError", 429: "RateLimitError", 500: "InternalServerError",
    502: "BadGatewayError", 503: "ServiceUnavailableError",
}


def _http(status: int, body: bytes, headers: bytes = b"", keep_alive: bool = True) -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s%s\r\n" % (
        status, _REASONS.get(status, "Error").encode(), len(body), headers,
        b"" if keep_alive else b"connection: close\r\n",
    )
    return head + body


def _error_body(status: int, message: str) -> bytes:
    kind = _ERROR_TYPES.get(status, "ServerError" if status >= 500 else "APIError")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})


def _seconds_text(value: float) -> str:
    """OpenAI-style durations: "1.5s", "0.25s"."""
    return f"{max(value, 0.0):.3f}".rstrip("0").rstrip(".") + "s"


def _number_text(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


SEND: Final = 0
RESET: Final = 1
HANG: Final = 2


@dataclasses.dataclass(slots=True)
class _Reply:
    """What to do with one request: the response bytes and when/how to deliver them."""

    payload: bytes = b""
    fate: int = SEND
    delay: float = 0.0
    dribble: float = 0.0
    close: bool = False
    serve: bool = False  # a model reply: under `capacity` it needs a slot for its delay


IDLE: Final = 0
WAITING: Final = 1
RUNNING: Final = 2


class _Slot:
    """One request awaiting its turn on a connection (HTTP/1.1 answers in request order)."""

    __slots__ = ("conn", "queued_at", "ready", "reply", "state", "timer")

    def __init__(self, reply: _Reply, conn: _Connection) -> None:
        self.reply = reply
        self.conn = conn
        self.ready = False
        self.timer: asyncio.TimerHandle | None = None
        self.state = IDLE  # WAITING / RUNNING while it holds a place under `capacity`
        self.queued_at = 0.0


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, delivers replies in order, after their delays."""

    def __init__(self, server: FakeOpenAIServer) -> None:
        self.server = server
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[_Slot] = deque()
        self.busy = False  # a dribbled reply is being written
        self.closed = False
        self.dribble_timer: asyncio.TimerHandle | None = None
        self.url = b""
        self.auth: bytes | None = None
        self.content_type = b""
        self.body: list[bytes] = []
        self.expect_continue = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.dribble_timer is not None:
            self.dribble_timer.cancel()
        for _ in self._forget():
            self.server.request_finished()
        self.server.connection_closed(self)

    def _forget(self) -> list[_Slot]:
        """Drop every pending reply, giving back its place under `capacity`."""
        slots = list(self.queue)
        self.queue.clear()
        for slot in slots:
            if slot.timer is not None:
                slot.timer.cancel()
            self.server.withdraw(slot)
        return slots

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send_and_close(400, "upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._send_and_close(400, f"malformed HTTP request: {exc}")

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.auth = None
        self.content_type = b""
        self.body = []
        self.expect_continue = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 13 and name.lower() == b"authorization":
            self.auth = value
        elif len(name) == 12 and name.lower() == b"content-type":
            self.content_type = value
        elif len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True  # curl sends it for bodies over 1 KiB, then waits 1 s

    def on_headers_complete(self) -> None:
        if self.expect_continue and self.transport is not None and not self.closed:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.closed:
            return
        body = b"".join(self.body)
        self.body = []
        self.server.content_type = self.content_type
        reply = self.server.handle(self.parser.get_method(), self.url, self.auth, body, self)
        if not self.parser.should_keep_alive():
            reply.close = True
        self.enqueue(reply)

    # delivery
    def enqueue(self, reply: _Reply) -> None:
        slot = _Slot(reply, self)
        self.queue.append(slot)
        self.server.request_started()
        if reply.fate == HANG:
            return
        if reply.serve and self.server.knobs.capacity:
            self.server.admit(slot)
        elif reply.delay > 0:
            slot.timer = self.loop.call_later(reply.delay, self._ready, slot)
        else:
            self._ready(slot)

    def ready(self, slot: _Slot) -> None:
        self._ready(slot)

    def _ready(self, slot: _Slot) -> None:
        slot.ready = True
        slot.timer = None
        self._pump()

    def _pump(self) -> None:
        while self.queue and not self.busy and not self.closed:
            slot = self.queue[0]
            if not slot.ready:
                return
            self.queue.popleft()
            self.server.request_finished()
            reply = slot.reply
            if reply.fate == RESET:
                self.reset()
                return
            if reply.dribble > 0:
                self._dribble(reply)
                return
            assert self.transport is not None
            self.transport.write(reply.payload)
            if reply.close:
                self.closed = True
                self.transport.close()

    def _dribble(self, reply: _Reply) -> None:
        assert self.transport is not None
        self.busy = True
        split = reply.payload.index(b"\r\n\r\n") + 4
        self.transport.write(reply.payload[:split])
        body = reply.payload[split:]
        size = max(1, math.ceil(len(body) / DRIBBLE_PIECES))
        pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        interval = reply.dribble / len(pieces)
        self.dribble_timer = self.loop.call_later(
            interval, self._dribble_next, pieces, 0, interval, reply.close
        )

    def _dribble_next(self, pieces: list[bytes], index: int, interval: float, close: bool) -> None:
        if self.closed or self.transport is None:
            return
        self.transport.write(pieces[index])
        if index + 1 < len(pieces):
            self.dribble_timer = self.loop.call_later(
                interval, self._dribble_next, pieces, index + 1, interval, close
            )
            return
        self.dribble_timer = None
        self.busy = False
        if close:
            self.closed = True
            self.transport.close()
        else:
            self._pump()

    def _send_and_close(self, status: int, message: str) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.write(_http(status, _error_body(status, message), keep_alive=False))
            self.transport.close()

    def drop(self) -> None:
        """Forget every pending reply and reset the connection (for `restore`)."""
        self._forget()
        if self.dribble_timer is not None:
            self.dribble_timer.cancel()
        self.reset()

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), so the client sees a reset, not a clean EOF."""
        if self.transport is None or self.closed:
            return
        self.closed = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


# --------------------------------------------------------------------------------------------
# The server


class _Stats:
    """Counters behind `GET /_stats`; all mutated on the event loop thread only."""

    def __init__(self) -> None:
        self.requests = 0  # every request to /v1/*
        self.chat_requests = 0
        self.embedding_requests = 0
        self.embedded_texts = 0
        self.embeddings: Counter[str] = Counter()
        self.status: Counter[int] = Counter()
        self.models: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.rule_hits: Counter[int] = Counter()
        self.calls: Counter[str] = Counter()
        self.bodies: deque[Any] = deque(maxlen=KEEP_BODIES)
        self.in_flight_peak = 0
        self.connections_opened = 0
        self.served = 0  # replies that held a slot under `capacity`
        self.queued = 0  # of them, those that waited for it
        self.wait_total = 0.0
        self.service_total = 0.0
        self.waiting_peak = 0


class FakeOpenAIServer:
    """The server itself, in the running event loop; `main` and `FakeServerProcess` wrap it."""

    def __init__(self, knobs: Knobs | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.knobs = knobs or Knobs()
        self.stats = _Stats()
        self.in_flight = 0
        self.connections: set[_Connection] = set()
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._up_timer: asyncio.TimerHandle | None = None
        self._started = time.time()
        self._next_id = 0
        self._initial = self.knobs
        self._relisten: asyncio.Task[None] | None = None
        # `capacity`: slots in use and the FIFO queue; a withdrawn slot stays in the deque
        # (state IDLE) and is skipped, so a disconnect costs O(1).
        self.running = 0
        self.waiting = 0
        self._queue: deque[_Slot] = deque()
        self.content_type = b""  # of the request being handled (multipart uploads)
        self.batches = FakeBatches(self)
        self._apply_side_effects(self.knobs, set(_KNOB_PARSERS))

    # lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen and return the bound port (useful with port 0)."""
        if not _HTTPTOOLS:
            raise RuntimeError(MISSING_HTTPTOOLS)
        self.host = host
        await self._listen(port)
        return self.port

    async def _listen(self, port: int) -> None:
        self._server = await self.loop.create_server(
            lambda: _Connection(self), self.host, port, backlog=LISTEN_BACKLOG, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.knobs.down and self.knobs.down_mode == "refuse":
            self._stop_listening()

    def _stop_listening(self, spare: _Connection | None = None) -> None:
        """Refuse new connections and reset the open ones, but `spare` (the /_control caller)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.connections):
            if conn is not spare:
                conn.reset()

    async def stop(self) -> None:
        """Stop listening and drop every connection, hung ones included."""
        if self._up_timer is not None:
            self._up_timer.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if server is not None:
            await server.wait_closed()

    # bookkeeping called by connections
    def connection_opened(self, conn: _Connection) -> None:
        self.connections.add(conn)
        self.stats.connections_opened += 1

    def connection_closed(self, conn: _Connection) -> None:
        self.connections.discard(conn)

    def request_started(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.stats.in_flight_peak:
            self.stats.in_flight_peak = self.in_flight

    def request_finished(self) -> None:
        self.in_flight -= 1

    # capacity: slots and the FIFO queue
    def admit(self, slot: _Slot) -> None:
        if self.running < self.knobs.capacity:
            self._serve(slot, 0.0)
            return
        slot.state = WAITING
        slot.queued_at = self.loop.time()
        self._queue.append(slot)
        self.waiting += 1
        if self.waiting > self.stats.waiting_peak:
            self.stats.waiting_peak = self.waiting

    def _serve(self, slot: _Slot, waited: float) -> None:
        k = self.knobs
        delay = slot.reply.delay
        if k.degrade and self.waiting:
            delay *= 1.0 + k.degrade * min(self.waiting, k.capacity) / k.capacity
        slot.state = RUNNING
        self.running += 1
        stats = self.stats
        stats.served += 1
        stats.service_total += delay
        if waited > 0:
            stats.queued += 1
            stats.wait_total += waited
        slot.timer = self.loop.call_later(delay, self._served, slot)

    def _served(self, slot: _Slot) -> None:
        slot.state = IDLE
        self.running -= 1
        self._fill()
        slot.conn.ready(slot)

    def withdraw(self, slot: _Slot) -> None:
        """The client went away: its slot or its place in the queue is free again."""
        if slot.state == RUNNING:
            self.running -= 1
            slot.state = IDLE
            self._fill()
        elif slot.state == WAITING:
            self.waiting -= 1
            slot.state = IDLE

    def _fill(self) -> None:
        queue, now = self._queue, self.loop.time()
        while queue and self.running < self.knobs.capacity:
            slot = queue.popleft()
            if slot.state != WAITING:
                continue
            self.waiting -= 1
            self._serve(slot, now - slot.queued_at)
        if not self.knobs.capacity:  # capacity lifted: everything waiting goes at once
            while queue:
                slot = queue.popleft()
                if slot.state == WAITING:
                    self.waiting -= 1
                    self._serve(slot, now - slot.queued_at)

    # knobs
    def update(self, changes: Mapping[str, Any], origin: _Connection | None = None) -> None:
        """Apply a partial knob update (raises KnobError and changes nothing if one is bad).

        Two actions ride along: `reset_stats` zeroes the counters; `restore` first puts every
        knob back to its start value and drops every connection but `origin` (the one asking),
        so one server can serve many tests or benchmark scenarios as if freshly started.
        """
        changes = dict(changes)
        actions = {name: changes.pop(name, False) for name in ("reset_stats", "restore")}
        for name, value in actions.items():
            if not isinstance(value, bool):
                raise KnobError(f"{name}: expected true or false, got {value!r}")
        new = updated_knobs(self._initial if actions["restore"] else self.knobs, changes)
        if actions["restore"]:
            for conn in list(self.connections):
                if conn is not origin:
                    conn.drop()
            self.in_flight = len(origin.queue) if origin is not None else 0
            self.knobs = new
            self._apply_side_effects(new, set(_KNOB_PARSERS), origin)
        else:
            self.knobs = new
            self._apply_side_effects(new, set(changes), origin)
        if actions["reset_stats"] or actions["restore"]:
            self.reset_stats()

    def reset_stats(self) -> None:
        self.batches.reset_stats()
        self.stats = _Stats()
        self.stats.in_flight_peak = self.in_flight

    def _apply_side_effects(
        self, new: Knobs, changed: set[str], origin: _Connection | None = None
    ) -> None:
        if "seed" in changed:
            self._fault_rng = random.Random(new.seed)
            self._jitter_rng = random.Random(new.seed ^ 0x5EED)
        if "status_script" in changed:
            self._script: deque[Step] = deque(new.status_script)
        if "rules" in changed:
            self._rule_left = [rule.times for rule in new.rules]
        if {"batch_script", "batch_poll_script"} & changed:
            self.batches.scripts(new, changed)
        if "rpm" in changed:
            self._request_window: deque[float] = deque()
        if "tpm" in changed:
            self._token_window: deque[tuple[float, int]] = deque()
            self._tokens_in_window = 0
        if "capacity" in changed:
            self._fill()  # more slots: start what waits (fewer: running replies finish first)
        if "api_key" in changed:
            self._auth = None if new.api_key is None else b"Bearer " + new.api_key.encode()
        if {"down", "down_mode", "down_for"} & changed:
            self._apply_down(new, origin)

    def _apply_down(self, new: Knobs, origin: _Connection | None) -> None:
        if self._up_timer is not None:
            self._up_timer.cancel()
            self._up_timer = None
        if new.down and new.down_for > 0:
            self._up_timer = self.loop.call_later(new.down_for, self._come_up)
        refusing = new.down and new.down_mode == "refuse"
        if refusing and self._server is not None:
            self._stop_listening(spare=origin)
        elif (
            not refusing and self._server is None and self.port
            and (self._relisten is None or self._relisten.done())
        ):
            self._relisten = self.loop.create_task(self._listen(self.port))

    def _come_up(self) -> None:
        self._up_timer = None
        self.update({"down": False})

    # requests
    def handle(
        self, method: bytes, url: bytes, auth: bytes | None, body: bytes,
        origin: _Connection | None = None,
    ) -> _Reply:
        """Route one request; the hot path is /v1/chat/completions."""
        path, _, query = url.partition(b"?")
        if path == b"/v1/chat/completions":
            if method != b"POST":
                return self._v1(405, _error_body(405, "use POST"))
            return self._chat(auth, body)
        if path == b"/v1/models":
            return self._models(auth)
        if path == b"/v1/embeddings":
            if method != b"POST":
                return self._v1(405, _error_body(405, "use POST"))
            return self._embeddings(auth, body)
        if path.startswith((b"/v1/files", b"/v1/batches")):
            self.stats.requests += 1
            reply = self._down_reply() or self._unauthorized(auth)
            if reply is not None:
                return reply
            status, payload = self.batches.handle(method, path.decode("latin-1"), query, body,
                                                  self.content_type)
            if status < 0:
                self.stats.faults["reset"] += 1
                return _Reply(fate=RESET)
            return self._v1(status, payload)
        if path == b"/health":
            if not self.knobs.down:
                return _Reply(_http(200, b'{"status":"ok"}'))
            if self.knobs.down_mode == "503":
                return _Reply(_http(503, _error_body(503, "the server is down")))
            return _Reply(fate=RESET)
        if path == b"/metrics":
            text = (
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="{self.knobs.models[0]}"}} {self.running}\n'
                "# TYPE vllm:num_requests_waiting gauge\n"
                f'vllm:num_requests_waiting{{model_name="{self.knobs.models[0]}"}} {self.waiting}\n'
            )
            return _Reply(_http(200, text.encode()))
        if path == b"/_stats":
            bodies = parse_qs(query.decode("latin-1")).get("bodies", ["0"])[0] not in ("0", "")
            return _Reply(_http(200, self.stats_json(bodies)))
        if path == b"/_control":
            return self._control(method, body, origin)
        return _Reply(_http(404, _error_body(404, f"no route {path.decode('latin-1')}")))

    def _v1(self, status: int, body: bytes, headers: bytes = b"", delay: float = 0.0) -> _Reply:
        self.stats.status[status] += 1
        return _Reply(_http(status, body, headers), delay=delay)

    def _down_reply(self) -> _Reply | None:
        if not self.knobs.down:
            return None
        if self.knobs.down_mode == "503":
            return self._v1(503, _error_body(503, "the server is down (fake server knob `down`)"))
        self.stats.faults["reset"] += 1
        return _Reply(fate=RESET)

    def _unauthorized(self, auth: bytes | None) -> _Reply | None:
        if self._auth is None or auth == self._auth:
            return None
        return self._v1(401, b'{"error":"Unauthorized"}')

    def _models(self, auth: bytes | None) -> _Reply:
        self.stats.requests += 1
        reply = self._down_reply() or self._unauthorized(auth)
        if reply is not None:
            return reply
        created = int(self._started)
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "gra-async-fake"}
            for name in self.knobs.models
        ]
        return self._v1(200, orjson.dumps({"object": "list", "data": data}))

    def _control(self, method: bytes, body: bytes, origin: _Connection | None) -> _Reply:
        if method == b"POST":
            try:
                changes = orjson.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise KnobError("expected a JSON object of knobs")
                self.update(changes, origin)
            except orjson.JSONDecodeError as exc:
                return _Reply(_http(400, _error_body(400, f"/_control body is not JSON: {exc}")))
            except KnobError as exc:
                return _Reply(_http(400, _error_body(400, str(exc))))
        return _Reply(_http(200, orjson.dumps({"knobs": self.knobs.public()})))

    def stats_json(self, bodies: bool = False) -> bytes:
        s = self.stats
        data: dict[str, Any] = {
            "requests": s.requests,
            "chat_requests": s.chat_requests,
            "embedding_requests": s.embedding_requests,
            "embedded_texts": s.embedded_texts,
            "embeddings": dict(s.embeddings),
            "status": {str(code): n for code, n in sorted(s.status.items())},
            "models": dict(s.models),
            "faults": dict(s.faults),
            "rule_hits": [s.rule_hits[i] for i in range(len(self.knobs.rules))],
            "in_flight": self.in_flight,
            "in_flight_peak": s.in_flight_peak,
            "connections": {"opened": s.connections_opened, "open": len(self.connections)},
            "script_left": len(self._script),
            "capacity": {
                "running": self.running, "waiting": self.waiting,
                "waiting_peak": s.waiting_peak, "served": s.served, "queued": s.queued,
                "wait_total": s.wait_total, "service_total": s.service_total,
            },
            "calls": dict(s.calls),
            "batches": self.batches.stats(),
        }
        if bodies:
            data["bodies"] = list(s.bodies)
        return orjson.dumps(data)

    def _v1_request(self, auth: bytes | None, body: bytes) -> tuple[Any, _Reply | None]:
        """A /v1 POST's JSON body, or the reply that refuses it (down, auth, not JSON)."""
        self.stats.requests += 1
        reply = self._down_reply() or self._unauthorized(auth)
        if reply is not None:
            return None, reply
        try:
            return orjson.loads(body), None
        except orjson.JSONDecodeError as exc:
            return None, self._v1(400, _error_body(400, f"request body is not valid JSON: {exc}"))

    def _chat(self, auth: bytes | None, body: bytes) -> _Reply:
        stats, knobs = self.stats, self.knobs
        request, refused = self._v1_request(auth, body)
        if refused is not None:
            return refused
        problem = _request_problem(request)
        if problem:
            return self._v1(400, _error_body(400, problem))
        model: str = request["model"]
        messages: list[Any] = request["messages"]
        stats.chat_requests += 1
        stats.models[model] += 1
        stats.bodies.append(request)
        digest = hashlib.sha256(_canonical(model, messages)).digest()
        key = digest.hex()
        stats.calls[key] += 1
        if model not in knobs.models:
            return self._v1(404, _error_body(404, f"The model `{model}` does not exist."))
        schema, format_problem = _response_schema(request.get("response_format"), knobs)
        if format_problem:
            status = knobs.unsupported_format_status
            return self._v1(status, _error_body(status, format_problem))

        # The same prompt sampled again (temperature > 0, or unset: OpenAI's default is 1) gets
        # a new reply, as from a real model; otherwise a pipeline's dedup would see copies.
        variant = 0 if request.get("temperature") == 0 else stats.calls[key] - 1
        # `seed` too: replicas started with different seeds are different models, not
        # copies that answer a repeated prompt alike (16 replicas made 16 calls/sample).
        reply_seed = int.from_bytes(digest[:8], "big") + variant + (knobs.seed << 64)
        text = "\n".join(_content_text(m.get("content")) for m in messages)
        prompt_tokens = max(1, math.ceil(len(text) / 4))
        step: Step | None = self._script.popleft() if self._script else None
        headers = b""
        if step is None:
            now = self.loop.time()
            limited, headers = self._admit(now, prompt_tokens)
            if limited is not None:
                return limited
            step = self._draw()
        elif step == 429:
            wait = SCRIPTED_RETRY_AFTER if knobs.retry_after is None else knobs.retry_after
            return self._too_many(wait, "scripted 429 (fake server knob `status_script`)", b"")
        elif isinstance(step, int) and step != 200:
            return self._v1(
                step, _error_body(step, f"scripted {step} (fake server knob `status_script`)"),
                delay=self._delay(),
            )
        return self._complete(request, model, messages, text, prompt_tokens, reply_seed, schema,
                              step, headers)

    def _embeddings(self, auth: bytes | None, body: bytes) -> _Reply:
        stats = self.stats
        request, refused = self._v1_request(auth, body)
        if refused is not None:
            return refused
        texts = request.get("input") if isinstance(request, dict) else None
        texts = [texts] if isinstance(texts, str) else texts
        model = request.get("model") if isinstance(request, dict) else None
        if (not isinstance(model, str) or not isinstance(texts, list) or not texts
                or not all(isinstance(t, str) for t in texts)):
            return self._v1(400, _error_body(400, "expected a model and an input string or list "
                                                  "of strings"))
        stats.embedding_requests += 1
        stats.models[model] += 1
        stats.bodies.append(request)
        if model not in self.knobs.models:
            return self._v1(404, _error_body(404, f"The model `{model}` does not exist."))
        stats.embedded_texts += len(texts)
        for text in texts:
            stats.embeddings[embedding_key(model, text)] += 1
        tokens = max(1, math.ceil(sum(len(t) for t in texts) / 4))
        step: Step | None = self._script.popleft() if self._script else None
        headers = b""
        if step is None:
            limited, headers = self._admit(self.loop.time(), tokens)
            if limited is not None:
                return limited
            step = self._draw()
        elif step == 429:
            wait = SCRIPTED_RETRY_AFTER if self.knobs.retry_after is None else self.knobs.retry_after
            return self._too_many(wait, "scripted 429 (fake server knob `status_script`)", b"")
        if step in ("reset", "hang"):
            stats.faults[str(step)] += 1
            return _Reply(fate=RESET if step == "reset" else HANG, delay=self._delay())
        if isinstance(step, int) and step != 200:
            return self._v1(step, _error_body(step, f"injected {step} (fake server knob)"),
                            headers, self._delay())
        if self.knobs.tpm:
            self._token_window.append((self.loop.time(), tokens))
            self._tokens_in_window += tokens
        payload = orjson.dumps({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": embed_text(text)}
                     for i, text in enumerate(texts)],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })
        if step == "malformed":
            stats.faults["malformed"] += 1
            payload = payload[: len(payload) // 2]
        reply = self._v1(200, payload, headers, self._delay())
        reply.serve = True
        return reply

    def batch_line(self, request: Any) -> tuple[int, dict[str, Any]]:
        """One Batch API line's answer: (status code, body), as the chat route would answer
        it with no fault, and counted in `calls` the same way."""
        problem = _request_problem(request)
        if problem:
            return 400, orjson.loads(_error_body(400, problem))
        model, messages = request["model"], request["messages"]
        self.stats.models[model] += 1
        digest = hashlib.sha256(_canonical(model, messages)).digest()
        self.stats.calls[digest.hex()] += 1
        if model not in self.knobs.models:
            return 404, orjson.loads(_error_body(404, f"The model `{model}` does not exist."))
        schema, format_problem = _response_schema(request.get("response_format"), self.knobs)
        if format_problem:
            return 400, orjson.loads(_error_body(400, format_problem))
        variant = 0 if request.get("temperature") == 0 else self.stats.calls[digest.hex()] - 1
        text = "\n".join(_content_text(m.get("content")) for m in messages)
        prompt_tokens = max(1, math.ceil(len(text) / 4))
        content = self._content(model, messages, text, int.from_bytes(digest[:8], "big") + variant,
                                schema)
        finish = "stop"
        limit = request.get("max_tokens") or request.get("max_completion_tokens")
        if isinstance(limit, int) and limit > 0 and len(content) > 4 * limit:
            content, finish = content[: 4 * limit], "length"
        completion_tokens = math.ceil(len(content) / 4)
        self._next_id += 1
        return 200, {
            "id": f"chatcmpl-fake-{self._next_id}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def _draw(self) -> Step:
        """One RNG draw per request places the faults (see `seed`)."""
        k = self.knobs
        r = self._fault_rng.random()
        for name, rate in (("reset", k.reset_rate), ("hang", k.hang_rate)):
            if r < rate:
                return name  # type: ignore[return-value]
            r -= rate
        if r < k.error_rate:
            return (500, 502, 503)[min(2, int(3 * r / k.error_rate))]
        r -= k.error_rate
        if r < k.malformed_rate:
            return "malformed"
        r -= k.malformed_rate
        return "truncate" if r < k.truncate_rate else 200

    def _delay(self) -> float:
        k = self.knobs
        if k.jitter:
            return max(0.0, k.latency + self._jitter_rng.uniform(-k.jitter, k.jitter))
        return k.latency

    def _complete(
        self, request: dict[str, Any], model: str, messages: list[Any], text: str,
        prompt_tokens: int, reply_seed: int, schema: Any, step: Step, headers: bytes,
    ) -> _Reply:
        stats, knobs = self.stats, self.knobs
        if step == "reset" or step == "hang":
            stats.faults[step] += 1
            return _Reply(fate=RESET if step == "reset" else HANG, delay=self._delay())
        if isinstance(step, int) and step != 200:
            body = _error_body(step, f"injected {step} (fake server knob `error_rate`)")
            return self._v1(step, body, headers, self._delay())

        content = self._content(model, messages, text, reply_seed, schema)
        finish = "stop"
        limit = request.get("max_tokens") or request.get("max_completion_tokens")
        if isinstance(limit, int) and limit > 0 and len(content) > 4 * limit:
            content, finish = content[: 4 * limit], "length"
        if step == "truncate":
            stats.faults["truncated"] += 1
            content, finish = content[: len(content) // 2], "length"
        completion_tokens = math.ceil(len(content) / 4)
        if knobs.tpm:
            self._token_window.append((self.loop.time(), prompt_tokens + completion_tokens))
            self._tokens_in_window += prompt_tokens + completion_tokens
        self._next_id += 1
        body = orjson.dumps({
            "id": f"chatcmpl-fake-{self._next_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
                "logprobs": None,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        })
        if step == "malformed":
            stats.faults["malformed"] += 1
            body = body[: len(body) // 2]
        reply = self._v1(200, body, headers, self._delay())
        reply.dribble = knobs.dribble
        reply.serve = True
        return reply

    def _content(
        self, model: str, messages: list[Any], text: str, reply_seed: int, schema: Any
    ) -> str:
        # A rule by model alone scripts the GRA roles' replies; gra-async's metadata call
        # goes to a generator too, and is answered from its sample unless a rule names
        # text of its prompt (`contains`).
        metadata = _asks_for_metadata(schema)
        for i, rule in enumerate(self.knobs.rules):
            if rule.model is not None and rule.model != model:
                continue
            if rule.contains is not None and rule.contains not in text:
                continue
            if metadata and rule.contains is None:
                continue
            left = self._rule_left[i]
            if left is not None:
                if left <= 0:
                    continue
                self._rule_left[i] = left - 1
            self.stats.rule_hits[i] += 1
            return rule.content
        rng = random.Random(reply_seed)
        topic = _topic(messages)
        if metadata:
            return orjson.dumps(_metadata_reply(text, rng)).decode()
        if schema is not None:
            filler = _SchemaFiller(schema if isinstance(schema, Mapping) else {}, rng, topic)
            return orjson.dumps(filler.value(schema)).decode()
        lead = f"About {topic!r}: " if topic else ""
        return f"{lead}{_words(rng, 24)}."

    def _admit(self, now: float, prompt_tokens: int) -> tuple[_Reply | None, bytes]:
        """Sliding-window rpm/tpm: (a 429 reply or None, the rate-limit headers)."""
        k = self.knobs
        if not (k.rpm or k.tpm):
            return None, b""
        horizon = now - WINDOW
        requests, tokens = self._request_window, self._token_window
        while requests and requests[0] <= horizon:
            requests.popleft()
        while tokens and tokens[0][0] <= horizon:
            self._tokens_in_window -= tokens.popleft()[1]
        wait, why = 0.0, ""
        if k.rpm and len(requests) >= k.rpm:
            wait, why = requests[0] + WINDOW - now, f"{k.rpm} requests per minute"
        if k.tpm and self._tokens_in_window + prompt_tokens > k.tpm:
            wait, why = max(wait, self._token_wait(now, prompt_tokens)), f"{k.tpm} tokens per minute"
        if k.rpm and not why:
            requests.append(now)
        headers = b""
        if k.rpm:
            reset = requests[0] + WINDOW - now if requests else 0.0
            headers += b"x-ratelimit-limit-requests: %d\r\nx-ratelimit-remaining-requests: %d\r\n" \
                b"x-ratelimit-reset-requests: %s\r\n" % (
                    k.rpm, max(0, k.rpm - len(requests)), _seconds_text(reset).encode())
        if k.tpm:
            reset = tokens[0][0] + WINDOW - now if tokens else 0.0
            spent = self._tokens_in_window + (0 if why else prompt_tokens)
            headers += b"x-ratelimit-limit-tokens: %d\r\nx-ratelimit-remaining-tokens: %d\r\n" \
                b"x-ratelimit-reset-tokens: %s\r\n" % (
                    k.tpm, max(0, k.tpm - spent), _seconds_text(reset).encode())
        if why:
            return self._too_many(wait, f"rate limit of {why} reached", headers), b""
        return None, headers

    def _token_wait(self, now: float, need: int) -> float:
        """Seconds until enough served tokens leave the window for `need` more."""
        used = self._tokens_in_window
        for stamp, spent in self._token_window:
            used -= spent
            if used + need <= self.knobs.tpm:
                return stamp + WINDOW - now
        return WINDOW  # larger than the whole budget: it will never fit, as on the real API

    def _too_many(self, wait: float, why: str, headers: bytes) -> _Reply:
        if self.knobs.retry_after is not None:
            wait = self.knobs.retry_after
        value = _number_text(wait) if self.knobs.retry_after is not None else str(math.ceil(wait))
        headers += b"retry-after: %s\r\nretry-after-ms: %d\r\n" % (
            value.encode(), round(wait * 1000))
        return self._v1(429, _error_body(429, f"Rate limit exceeded: {why}"), headers)


def _request_problem(request: Any) -> str:
    if not isinstance(request, dict):
        return "request body must be a JSON object"
    if not isinstance(request.get("model"), str):
        return "'model' is required and must be a string"
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' is required and must be a non-empty list"
    if not all(isinstance(m, dict) for m in messages):
        return "each message must be an object"
    if request.get("stream"):
        return "the fake server does not stream; send stream=false"
    return ""


def _response_schema(fmt: Any, knobs: Knobs) -> tuple[Any, str]:
    """(schema or None, problem): which schema the reply must follow, if any."""
    if fmt is None:
        return None, ""
    if not isinstance(fmt, dict):
        return None, "'response_format' must be an object"
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None, ""
    if kind not in JSON_MODES or kind not in knobs.json_schema_modes:
        return None, f"response_format type {kind!r} is not supported by this server"
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
    else:
        schema = fmt.get("schema")
    if schema is None:  # json mode without a schema: any JSON object will do
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    return schema, ""


# --------------------------------------------------------------------------------------------
# Command line


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gra_async.testing.fake_server",
        description="Fake OpenAI-compatible server for tests and benchmarks. Prints 'READY <port>'.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="require the key held by this environment variable")
    parser.add_argument("--knobs", metavar="JSON", help="a JSON object of knobs, as for /_control")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    for name, kind in _KNOB_PARSERS.items():
        if name == "api_key":
            continue  # only from the environment: a flag would show the key in `ps`
        flag, text = "--" + name.replace("_", "-"), _KNOB_HELP[name]
        if kind is _flag:
            parser.add_argument(flag, dest=name, action="store_const", const=True, help=text)
        elif kind in (_seconds, _fraction, _retry_after):
            parser.add_argument(flag, dest=name, type=float, metavar="X", help=text)
        elif kind in (_count, _seed, _status):
            parser.add_argument(flag, dest=name, type=int, metavar="N", help=text)
        elif kind is _rules:
            parser.add_argument(flag, dest=name, type=orjson.loads, metavar="JSON", help=text)
        else:
            parser.add_argument(flag, dest=name, metavar="A,B", help=text)
    return parser


def _knobs_from_args(args: argparse.Namespace) -> Knobs:
    changes: dict[str, Any] = {}
    if args.knobs:
        loaded = orjson.loads(args.knobs)
        if not isinstance(loaded, dict):
            raise KnobError("--knobs: expected a JSON object")
        changes.update(loaded)
    for name in _KNOB_PARSERS:
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise KnobError(f"--api-key-env: environment variable {args.api_key_env} is not set")
        changes["api_key"] = key
    return updated_knobs(Knobs(), changes)


async def _serve(host: str, port: int, knobs: Knobs) -> None:
    server = FakeOpenAIServer(knobs)
    bound = await server.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(f"READY {bound}\n")
    sys.stdout.flush()
    await stop.wait()
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; exit 2 on bad flags or without httptools."""
    args = _build_parser().parse_args(argv)
    if not _HTTPTOOLS:
        print(f"fake_server: {MISSING_HTTPTOOLS}", file=sys.stderr)
        return 2
    try:
        knobs = _knobs_from_args(args)
    except (KnobError, orjson.JSONDecodeError) as exc:
        print(f"fake_server: {exc}", file=sys.stderr)
        return 2
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not args.no_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(args.host, args.port, knobs))
    return 0


# --------------------------------------------------------------------------------------------
# Client side: a server in a subprocess


class FakeServerProcess:
    """A fake server running as a child process, with a small synchronous control client.

    A subprocess, not a thread: the server gets its own interpreter and GIL, as a real model
    server would, so benchmarks measure the client and not contention with the server.
    """

    def __init__(self, process: subprocess.Popen[bytes], host: str, port: int) -> None:
        self.process = process
        self.host = host
        self.port = port

    @classmethod
    def start(
        cls,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout: float = 20.0,
        uvloop: bool = True,
        **knobs: Any,
    ) -> FakeServerProcess:
        """Spawn `python -m gra_async.testing.fake_server` with these knobs; wait for READY."""
        if not _HTTPTOOLS:  # the child runs this interpreter: it would fail the same way
            raise RuntimeError(MISSING_HTTPTOOLS)
        env = dict(os.environ)
        argv = [sys.executable, "-m", "gra_async.testing.fake_server", "--host", host,
                "--port", str(port)]
        api_key = knobs.pop("api_key", None)
        if api_key:
            env[API_KEY_ENV] = api_key  # the environment, never argv: argv is visible in `ps`
            argv += ["--api-key-env", API_KEY_ENV]
        if knobs:
            argv += ["--knobs", orjson.dumps(_jsonable(knobs)).decode()]
        if not uvloop:
            argv.append("--no-uvloop")
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        try:
            bound = _await_ready(process, timeout)
        except BaseException:
            _terminate(process)
            raise
        return cls(process, host, bound)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes: `http://127.0.0.1:PORT/v1`."""
        return f"{self.url}/v1"

    def control(self, **knobs: Any) -> dict[str, Any]:
        """Change knobs (partial update); returns the knobs now in force (api_key masked)."""
        result: dict[str, Any] = self._call("POST", "/_control", _jsonable(knobs))
        return result

    def reset_stats(self) -> None:
        self._call("POST", "/_control", {"reset_stats": True})

    def restore(self, **knobs: Any) -> dict[str, Any]:
        """Back to the start knobs (then these), stats zeroed, other connections dropped."""
        return self.control(restore=True, **knobs)

    def stats(self, bodies: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_stats?bodies=1" if bodies else "/_stats")
        return result

    def close(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 5 s. Safe to call twice."""
        _terminate(self.process)

    def __enter__(self) -> FakeServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        import http.client  # here, not at the top: it would add ~40 ms to every server start

        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            body = None if payload is None else orjson.dumps(payload)
            conn.request(method, path, body=body, headers={"content-type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"fake server {method} {path}: HTTP {response.status}: {data!r}")
        return orjson.loads(data)


def _jsonable(knobs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: [dataclasses.asdict(r) for r in v] if k == "rules" and v and isinstance(v[0], Rule)
            else v for k, v in knobs.items()}


def _await_ready(process: subprocess.Popen[bytes], timeout: float) -> int:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"fake server printed no READY line within {timeout} s")
    line = process.stdout.readline().decode(errors="replace").strip()
    kind, _, port = line.partition(" ")
    if kind != "READY" or not port.isdigit():
        code = process.poll()
        raise RuntimeError(f"fake server did not start (exit code {code}, said {line!r})")
    return int(port)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


if __name__ == "__main__":
    sys.exit(main())

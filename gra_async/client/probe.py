"""Ask an endpoint, before any work, whether it answers, takes our key and serves the model."""

from __future__ import annotations

import asyncio

import orjson

from gra_async.client._http import Timeouts, Transport
from gra_async.client.endpoint import Endpoint
from gra_async.errors import NotFoundError, TransientError, UnreachableError

__all__ = ["probe"]

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

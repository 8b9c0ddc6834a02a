"""The client layer: endpoints, their pool, retries and the HTTP transports.

Nothing here knows about samples, reviews or the journal; the pipeline calls `EndpointPool.chat`
and `EndpointPool.embed`.
"""

from __future__ import annotations

from gra_async.client._h1 import H1Transport
from gra_async.client._http import AiohttpTransport, HttpResponse, Timeouts, Transport
from gra_async.client._types import (
    ChatReply,
    ChatRequest,
    EmbedReply,
    EmbedRequest,
    EndpointStats,
    Message,
)
from gra_async.client.endpoint import Endpoint
from gra_async.client.pool import EndpointPool
from gra_async.client.probe import probe, probe_embeddings
from gra_async.client.retry import RetryPolicy

__all__ = [
    "AiohttpTransport",
    "ChatReply",
    "ChatRequest",
    "EmbedReply",
    "EmbedRequest",
    "Endpoint",
    "EndpointPool",
    "EndpointStats",
    "H1Transport",
    "HttpResponse",
    "Message",
    "RetryPolicy",
    "Timeouts",
    "Transport",
    "probe",
    "probe_embeddings",
]

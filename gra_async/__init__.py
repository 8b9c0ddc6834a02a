"""gra-async: instruction-tuning data from a team of small LLMs (generator, reviewers, adjudicator).

    import gra_async

    config = gra_async.load_config("gra.toml", run={"target": 100})
    summary = gra_async.run(config)              # or: await gra_async.Synthesizer(config).run()
    for sample in gra_async.read_samples(config.run.run_dir):
        print(sample.instruction, sample.mean)
"""

from __future__ import annotations

import logging

from gra_async.config import (
    EndpointConfig,
    GateConfig,
    GenerationConfig,
    PlannerConfig,
    RunConfig,
    RunSettings,
    load_config,
)
from gra_async.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ConnectionFailed,
    EndpointError,
    GraError,
    Interrupted,
    InvalidReply,
    MalformedResponse,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeout,
    RetriesExhausted,
    RunDirError,
    SeedError,
    ServerError,
    TaskFailed,
    TransientError,
    UnreachableError,
    UsageError,
    UserError,
)
from gra_async.pipeline import Draft
from gra_async.samples import Adjudication, FailedReview, Review, Sample, read_samples
from gra_async.scoring import Decision, Panel, ScoredReview
from gra_async.synthesizer import RunSummary, StopReason, Synthesizer, TokenUsage, run

__version__ = "0.1.0"

__all__ = [
    "Adjudication",
    "AuthenticationError",
    "BadRequestError",
    "ConfigError",
    "ConnectionFailed",
    "Decision",
    "Draft",
    "EndpointConfig",
    "EndpointError",
    "FailedReview",
    "GateConfig",
    "GenerationConfig",
    "GraError",
    "Interrupted",
    "InvalidReply",
    "MalformedResponse",
    "NotFoundError",
    "Panel",
    "PermissionDeniedError",
    "PlannerConfig",
    "RateLimitError",
    "RequestTimeout",
    "RetriesExhausted",
    "Review",
    "RunConfig",
    "RunDirError",
    "RunSettings",
    "RunSummary",
    "Sample",
    "ScoredReview",
    "SeedError",
    "ServerError",
    "StopReason",
    "Synthesizer",
    "TaskFailed",
    "TokenUsage",
    "TransientError",
    "UnreachableError",
    "UsageError",
    "UserError",
    "__version__",
    "load_config",
    "read_samples",
    "run",
]

# A library logs and never prints: the application (our CLI, or yours) decides where to.
logging.getLogger("gra_async").addHandler(logging.NullHandler())

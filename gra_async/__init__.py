"""gra-async: instruction-tuning data from a team of small LLMs (generator, reviewers, adjudicator).

    import gra_async

    config = gra_async.load_config("gra.toml", run={"target": 100})
    summary = gra_async.run(config)              # or: await gra_async.Synthesizer(config).run()
    for sample in gra_async.read_samples(config.run.run_dir):
        print(sample.instruction, sample.mean)
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from gra_async.config import (
    BatchConfig,
    EndpointConfig,
    GateConfig,
    GenerationConfig,
    PlannerConfig,
    RefineConfig,
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
    MissingDependency,
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

if TYPE_CHECKING:
    from gra_async.pilot import Estimate, estimate
    from gra_async.pipeline import Draft
    from gra_async.quality import QualityReport, write_report
    from gra_async.refining import Refiner, RefineStopReason, RefineSummary, refine, refine_async
    from gra_async.regating import RegateSummary, regate, regate_async
    from gra_async.samples import Adjudication, FailedReview, Review, Sample, read_samples
    from gra_async.scoring import Decision, Panel, ScoredReview
    from gra_async.synthesizer import RunSummary, StopReason, Synthesizer, TokenUsage, run

# Loaded on first use: the pipeline pulls in numpy, datasketch and scipy (~0.5 s), which
# `gra-async status` and a script that only reads samples never need.
_LAZY = {
    "Draft": "gra_async.pipeline",
    **dict.fromkeys(("Estimate", "estimate"), "gra_async.pilot"),
    **dict.fromkeys(("QualityReport", "write_report"), "gra_async.quality"),
    **dict.fromkeys(("Adjudication", "FailedReview", "Review", "Sample", "read_samples"),
                    "gra_async.samples"),
    **dict.fromkeys(("Decision", "Panel", "ScoredReview"), "gra_async.scoring"),
    **dict.fromkeys(("RegateSummary", "regate", "regate_async"), "gra_async.regating"),
    **dict.fromkeys(("RefineStopReason", "RefineSummary", "Refiner", "refine", "refine_async"),
                    "gra_async.refining"),
    **dict.fromkeys(("RunSummary", "StopReason", "Synthesizer", "TokenUsage", "run"),
                    "gra_async.synthesizer"),
}

__version__ = "0.1.0"

__all__ = [
    "Adjudication",
    "AuthenticationError",
    "BadRequestError",
    "BatchConfig",
    "ConfigError",
    "ConnectionFailed",
    "Decision",
    "Draft",
    "EndpointConfig",
    "EndpointError",
    "Estimate",
    "FailedReview",
    "GateConfig",
    "GenerationConfig",
    "GraError",
    "Interrupted",
    "InvalidReply",
    "MalformedResponse",
    "MissingDependency",
    "NotFoundError",
    "Panel",
    "PermissionDeniedError",
    "PlannerConfig",
    "QualityReport",
    "RateLimitError",
    "RefineConfig",
    "RefineStopReason",
    "RefineSummary",
    "Refiner",
    "RegateSummary",
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
    "estimate",
    "load_config",
    "read_samples",
    "refine",
    "refine_async",
    "regate",
    "regate_async",
    "run",
    "write_report",
]



def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gra_async' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# A library logs and never prints: the application (our CLI, or yours) decides where to.
logging.getLogger("gra_async").addHandler(logging.NullHandler())

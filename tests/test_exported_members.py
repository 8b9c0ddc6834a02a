"""The public surface of `import gra_async`, pinned: a name added or lost is a decision."""

from __future__ import annotations

import gra_async

EXPORTED = [
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


def test_all_is_pinned() -> None:
    assert gra_async.__all__ == EXPORTED


def test_every_exported_name_exists_and_says_where_it_lives() -> None:
    for name in gra_async.__all__:
        member = getattr(gra_async, name)
        if name in ("__version__", "StopReason", "RefineStopReason"):
            continue
        # Public objects live in the package; what they are is documented.
        assert member.__module__.startswith("gra_async"), name
        assert (member.__doc__ or "").strip(), f"{name} has no docstring"


def test_errors_share_one_root() -> None:
    errors = [getattr(gra_async, n) for n in gra_async.__all__
              if isinstance(getattr(gra_async, n), type) and n.endswith(("Error", "Exhausted",
                                                                         "Failed", "Reply",
                                                                         "Interrupted"))]
    assert len(errors) >= 20
    assert all(issubclass(e, gra_async.GraError) for e in errors)

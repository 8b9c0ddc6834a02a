"""One task's life and the run that drives thousands of them (docs/architecture.md).

    _scheduler   rounds, admission, the cancel scope, what a decision does to the run
    _steps       the GRA steps of one task: generate -> copy check -> filters -> reviews
                 -> gate -> adjudicator
    _calls       the journaled call layer: resume from the journal, run-wide slots, re-asks
    _records     typed records of a sample (`Draft`, `SampleBody`, ...) and their JSON form
    _progress    the counters the display and `RunSummary` read
"""

from __future__ import annotations

from gra_async.pipeline._progress import Progress
from gra_async.pipeline._records import Adjudication, DecisionName, Draft, FailedReview, SampleBody
from gra_async.pipeline._scheduler import Pipeline, plan_size
from gra_async.pipeline._steps import Filter, Gate, GateVerdict

__all__ = [
    "Adjudication",
    "DecisionName",
    "Draft",
    "FailedReview",
    "Filter",
    "Gate",
    "GateVerdict",
    "Pipeline",
    "Progress",
    "SampleBody",
    "plan_size",
]

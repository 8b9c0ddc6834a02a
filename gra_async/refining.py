"""GRA-Refined (`refine`, the paper's Table 2): the team reviews and improves an existing dataset.

    async with gra_async.Refiner(config) as refiner:   # config.planner.seeds: the dataset
        summary = await refiner.refine()

Each seed sample is one task (planner.SeedPlan): reviewed by the panel, disputed ones
adjudicated, a rejected one rewritten by the generator with the reviewers' feedback and
reviewed again, `refine.max_rewrites` times at most (pipeline/_refine.py). The run
directory is a normal one: the same journal, resume, limits, `status` and `export`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gra_async._concurrency import block_on
from gra_async.client import Transport
from gra_async.config import RunConfig
from gra_async.errors import UsageError
from gra_async.pipeline import Gate
from gra_async.store import JournalReader
from gra_async.synthesizer import RunSummary, Synthesizer

__all__ = ["RefineStopReason", "RefineSummary", "Refiner", "refine", "refine_async"]

# done: every seed of the plan was decided. stopped / budget / all_failed: as a run's.
RefineStopReason = Literal["done", "stopped", "budget", "all_failed"]


@dataclass(frozen=True, slots=True)
class RefineSummary:
    """How a refine ended. Counts are the run directory's totals; calls are this session's."""

    run_dir: Path
    seeds: int  # seeds in the plan (this shard's, with `run.shard`)
    kept: int  # accepted as they were
    rewritten: int  # accepted after a rewrite
    dropped: int  # rejected after the last rewrite, or duplicates of an accepted sample
    duplicates: int  # of the dropped
    failed: int  # no valid review
    rewrites: int  # rewrites made, of every finished seed
    adjudicated: int  # this session's adjudications
    calls: int
    calls_reused: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    stop_reason: RefineStopReason
    elapsed: float
    run: RunSummary  # the same run seen as a generation run (usage, rejections, budget)

    @property
    def done(self) -> bool:
        return self.stop_reason == "done"

    def explain(self) -> str:
        counts = (f"{self.kept} kept, {self.rewritten} rewritten, {self.dropped} dropped "
                  f"({self.duplicates} duplicates), {self.failed} failed of {self.seeds} seeds")
        if self.done:
            return f"refined: {counts}; {self.rewrites} rewrites"
        return f"{self.run.explain()} ({counts})"


def _summary(run: RunSummary) -> RefineSummary:
    reader = JournalReader(run.run_dir)
    try:
        origins = {str(o): n for o, n in reader.body_counts("accepted", "origin")}
        rewrites = sum(int(r or 0) * n for state in ("accepted", "rejected")
                       for r, n in reader.body_counts(state, "rewrites"))
    finally:
        reader.close()
    finished = run.accepted + run.rejected + run.failed
    reason: RefineStopReason
    if run.stop_reason in ("target", "plan_exhausted") and finished >= run.target:
        reason = "done"
    elif run.stop_reason in ("budget", "all_failed"):
        reason = run.stop_reason
    else:
        reason = "stopped"
    return RefineSummary(
        run_dir=run.run_dir, seeds=run.target, kept=origins.get("kept", 0),
        rewritten=origins.get("rewritten", 0), dropped=run.rejected, duplicates=run.duplicates,
        failed=run.failed, rewrites=rewrites, adjudicated=run.adjudicated, calls=run.calls,
        calls_reused=run.calls_reused, prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens, cost=run.cost, stop_reason=reason,
        elapsed=run.elapsed, run=run)


class Refiner(Synthesizer):
    """A `Synthesizer` whose tasks are the seeds of `config.planner.seeds`, one each.

    Opened, stopped and resumed as a `Synthesizer` is (`stop`, `abandon`, `progress`);
    `gate` replaces the decision rule for the seeds and their rewrites alike (filters see
    generated drafts only: a refine has none);
    `refine()` runs it and says how it ended. `run()` gives the same run's `RunSummary`,
    whose target is the number of seeds.
    """

    _refine = True

    def __init__(self, config: RunConfig | Mapping[str, Any], *, gate: Gate | None = None,
                 force: bool = False, retry_failed: bool = False,
                 transport: Transport | None = None) -> None:
        super().__init__(config, gate=gate, force=force, retry_failed=retry_failed,
                         transport=transport)
        if self.config.planner.seeds is None:
            raise UsageError("refine needs the dataset to refine: set planner.seeds (or "
                             "pass seeds=...)")

    async def refine(self) -> RefineSummary:
        """Review (and rewrite) every seed not decided yet; resumable whatever ends it."""
        return _summary(await self.run())

    @staticmethod
    def summarize(run: RunSummary) -> RefineSummary:
        """The refine's summary of what `run()` returned."""
        return _summary(run)


def _config(config: RunConfig | Mapping[str, Any], seeds: str | Path | None,
            run_dir: str | Path | None, max_rewrites: int | None) -> RunConfig:
    if isinstance(config, RunConfig) and seeds is None and run_dir is None and max_rewrites is None:
        return config
    data = (config.model_dump(exclude_unset=True) if isinstance(config, RunConfig)
            else dict(config))
    for section, key, value in (("planner", "seeds", seeds), ("run", "run_dir", run_dir),
                                ("refine", "max_rewrites", max_rewrites)):
        if value is not None:
            data[section] = {**data.get(section, {}), key: value}
    return RunConfig.model_validate(data)


async def refine_async(
    config: RunConfig | Mapping[str, Any], *, seeds: str | Path | None = None,
    run_dir: str | Path | None = None, max_rewrites: int | None = None,
    gate: Gate | None = None, force: bool = False, transport: Transport | None = None,
) -> RefineSummary:
    """Refine the dataset `seeds` (or `config.planner.seeds`) into `run_dir` (or
    `config.run.run_dir`); `max_rewrites` overrides `refine.max_rewrites`."""
    refiner = Refiner(_config(config, seeds, run_dir, max_rewrites), gate=gate, force=force,
                      transport=transport)
    async with refiner:
        return await refiner.refine()


def refine(config: RunConfig | Mapping[str, Any], **kwargs: Any) -> RefineSummary:
    """`refine_async` for scripts: blocks until the refine ends. Inside a running event loop
    raises `UsageError`: await `gra_async.refine_async(...)` there."""
    return block_on(refine_async(config, **kwargs), "refine")

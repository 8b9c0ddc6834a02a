"""`gra-async estimate` / `gra_async.estimate`: a small pilot of the real run, and what the whole run will take.

The pilot is the first `tasks` tasks of the run's own plan, journaled in its run directory:
the real run skips them and reuses every reply, so the pilot is paid for once. From the
journal it projects calls, tokens and cost per accepted sample, per role and model, to the
target; and the wall time at the configured concurrency and rate limits. The acceptance
rate carries the projection's uncertainty: its Wilson interval (95%) bounds the cost.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from gra_async import defaults
from gra_async._concurrency import run_coroutine
from gra_async.accounting import batch_prices, spend
from gra_async.client import Transport
from gra_async.config import RunConfig
from gra_async.errors import ConfigError, UsageError
from gra_async.store import JournalReader

__all__ = ["Estimate", "ModelProjection", "estimate", "project", "run_pilot", "wilson_interval"]

_Z95 = 1.959964


def wilson_interval(successes: int, trials: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: sound at 0 or n successes and small n,
    where the normal approximation gives an interval of width zero."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class ModelProjection:
    """One role and model: what each accepted sample costs there, and the whole run."""

    role: str
    model: str
    calls_per_sample: float
    prompt_tokens_per_sample: float
    completion_tokens_per_sample: float
    projected_calls: int
    projected_cost: float | None


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a pilot says the run to `target` will take; `None` where the pilot cannot say
    (no sample accepted yet: raise `tasks`)."""

    run_dir: Path
    mode: str
    target: int
    pilot_tasks: int  # finished tasks the projection rests on (earlier sessions included)
    pilot_accepted: int
    pilot_calls: int
    pilot_cost: float | None  # spent so far, at the prices the calls were billed
    accept_rate: float
    accept_interval: tuple[float, float]  # Wilson, 95%
    projected_calls: int | None
    projected_prompt_tokens: int | None
    projected_completion_tokens: int | None
    projected_cost: float | None  # the whole run, the pilot included
    cost_interval: tuple[float, float] | None  # from the acceptance rate's interval
    projected_seconds: float | None  # online: at the concurrency and limits; batch: waves x window
    online_seconds: float | None
    batch_waves: int | None
    models: tuple[ModelProjection, ...]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        return data

    def table(self) -> str:
        """The estimate for people: one line per role and model, then the totals."""
        lo, hi = self.accept_interval
        lines = [f"pilot: {self.pilot_tasks} tasks, {self.pilot_accepted} accepted, "
                 f"{self.pilot_calls} calls" + _money(" ", self.pilot_cost),
                 f"accept rate {self.accept_rate:.1%} (95% interval {lo:.1%}-{hi:.1%})",
                 f"{'role':<12}{'model':<28}{'calls/sample':>13}{'in/sample':>11}"
                 f"{'out/sample':>11}{'calls':>10}{'cost':>12}"]
        for m in self.models:
            lines.append(f"{m.role:<12}{m.model:<28}{m.calls_per_sample:>13.2f}"
                         f"{m.prompt_tokens_per_sample:>11.0f}{m.completion_tokens_per_sample:>11.0f}"
                         f"{m.projected_calls:>10}{_money('', m.projected_cost):>12}")
        if self.projected_calls is None:
            lines.append(f"target {self.target}: cannot project, no sample accepted in the "
                         "pilot (raise --tasks)")
            return "\n".join(lines)
        cost = _money("", self.projected_cost)
        if self.cost_interval is not None:
            cost += f" ({_money('', self.cost_interval[0])}-{_money('', self.cost_interval[1])})"
        lines.append(f"target {self.target} ({self.mode}): {self.projected_calls} calls, "
                     f"{self.projected_prompt_tokens} tokens in, "
                     f"{self.projected_completion_tokens} out, cost {cost}")
        if self.projected_seconds is not None:
            when = f"about {_duration(self.projected_seconds)}"
            if self.mode == "batch":
                when = (f"at most {_duration(self.projected_seconds)} ({self.batch_waves} "
                        f"waves within their completion window; online it would take "
                        f"{_duration(self.online_seconds or 0.0)})")
            lines.append(f"wall time {when}")
        return "\n".join(lines)


def _money(prefix: str, value: float | None) -> str:
    return "" if value is None else f"{prefix}${value:,.4f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _window_seconds(window: str) -> float:
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0}.get(window[-1:], 0.0)
    try:
        return float(window[:-1]) * unit
    except ValueError:
        return 0.0


def estimate(config: RunConfig | Mapping[str, Any], **kwargs: Any) -> Estimate:
    """`run_pilot(config, **kwargs)` for scripts: blocks until the pilot is done.

    Inside a running event loop raises `UsageError`: await `gra_async.pilot.run_pilot` there.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise UsageError("gra_async.estimate() cannot block inside a running event loop; use "
                         "`await gra_async.pilot.run_pilot(config)`")
    if not isinstance(config, RunConfig):
        config = RunConfig.model_validate(config)
    return run_coroutine(run_pilot(config, **kwargs))


async def run_pilot(
    config: RunConfig, *, tasks: int = defaults.ESTIMATE_TASKS, force: bool = False,
    transport: Transport | None = None,
) -> Estimate:
    """Run the pilot (`tasks` tasks of round 1, online) in `config`'s run directory, then
    project the run to `config.run.target`. A task finished there already is not run again."""
    from gra_async.synthesizer import Synthesizer

    if tasks < 1:
        raise ConfigError(f"--tasks {tasks}: the pilot needs at least one task")
    run = config.run
    pilot = config.model_copy(update={"run": run.model_copy(update={
        "max_tasks": tasks, "rounds": 1, "mode": "online"})})
    async with Synthesizer(pilot, force=force, transport=transport) as synth:
        live = synth.live_config
        await synth.run()
    return project(live.model_copy(update={"run": run}), run.run_dir)


def project(config: RunConfig, run_dir: Path) -> Estimate:
    """The projection from what the journal in `run_dir` holds (pure reading)."""
    reader = JournalReader(run_dir)
    try:
        counts = reader.state_counts()
        totals = reader.call_totals()
        rows = reader.spend_rows()
        latencies = reader.latencies()
        prices_meta = orjson.loads(reader.meta("prices") or "{}")
        batch_meta = orjson.loads(reader.meta("batch_prices") or "{}")
    finally:
        reader.close()
    endpoints = [e for role in config.endpoints.values() for e in role]
    prices = {m: (float(a), float(b)) for m, (a, b) in prices_meta.items()}
    for e in endpoints:
        if e.model is not None:
            prices.setdefault(e.model, (e.price_in, e.price_out))
    discounts = {e.model: e.batch_discount for e in endpoints if e.model is not None}
    batched = {m: (float(a), float(b)) for m, (a, b) in batch_meta.items()} or batch_prices(
        prices, discounts)
    priced = any(a or b for a, b in prices.values())
    batch = config.run.mode == "batch"
    unit = batched if batch else prices  # what the calls still to make will be billed at

    finished = counts["accepted"] + counts["rejected"] + counts["failed"]
    accepted = counts["accepted"]
    rate = accepted / finished if finished else 0.0
    lo, hi = wilson_interval(accepted, finished)
    target = config.run.target
    left = max(target - accepted, 0)
    calls_done = sum(r[2] for r in totals)
    spent = spend(rows, prices, batched) if priced else None

    models: list[ModelProjection] = []
    more_calls = more_in = more_out = 0.0
    more_cost = 0.0
    call_seconds = 0.0  # sum of latencies of the calls still to make, for Little's law
    per_model_calls: dict[str, float] = {}
    per_model_tokens: dict[str, float] = {}
    for role, model, n, t_in, t_out in totals:
        t_in, t_out = t_in or 0, t_out or 0
        per = (n / accepted, t_in / accepted, t_out / accepted) if accepted else (0.0, 0.0, 0.0)
        calls_left = per[0] * left
        p_in, p_out = unit.get(model, (0.0, 0.0))
        cost_left = (per[1] * p_in + per[2] * p_out) * left / 1e6
        model_spent = spend([r for r in rows if r[0] == model], prices, batched)
        share = model_spent * n / max(1, sum(r[2] for r in totals if r[1] == model))
        models.append(ModelProjection(
            role, model, *per, projected_calls=round(n + calls_left),
            projected_cost=share + cost_left if priced and accepted else None))
        more_calls += calls_left
        more_in += per[1] * left
        more_out += per[2] * left
        more_cost += cost_left
        call_seconds += calls_left * latencies.get(model, 0.0)
        per_model_calls[model] = per_model_calls.get(model, 0.0) + calls_left
        per_model_tokens[model] = per_model_tokens.get(model, 0.0) + (per[1] + per[2]) * left

    if not accepted and left:
        return Estimate(run_dir, config.run.mode, target, finished, accepted, calls_done, spent,
                        rate, (lo, hi), None, None, None, None, None, None, None, None,
                        tuple(models))

    t_in_done = sum(r[3] or 0 for r in totals)
    t_out_done = sum(r[4] or 0 for r in totals)
    cost_interval = None
    projected_cost = None
    if priced and spent is not None:
        projected_cost = spent + more_cost
        # More calls per accepted sample at a lower rate, fewer at a higher one.
        cost_interval = (spent + more_cost * rate / hi if hi else spent,
                         spent + more_cost * rate / lo if lo else math.inf)
    online = _online_seconds(config, call_seconds, per_model_calls, per_model_tokens)
    waves = None
    seconds: float | None = online
    if batch:
        tasks_left = left / rate if rate else 0.0
        waves = config.run.rounds * max(1, math.ceil(tasks_left / config.batch.slice)) * (
            3 if config.gate.adjudicator else 2)
        seconds = waves * _window_seconds(config.batch.completion_window) or None
    return Estimate(
        run_dir, config.run.mode, target, finished, accepted, calls_done, spent, rate, (lo, hi),
        projected_calls=round(calls_done + more_calls),
        projected_prompt_tokens=round(t_in_done + more_in),
        projected_completion_tokens=round(t_out_done + more_out),
        projected_cost=projected_cost, cost_interval=cost_interval,
        projected_seconds=seconds, online_seconds=online, batch_waves=waves,
        models=tuple(models))


def _online_seconds(
    config: RunConfig, call_seconds: float, calls: Mapping[str, float],
    tokens: Mapping[str, float],
) -> float:
    """The slowest of the bounds the run meets: the run's concurrency (Little's law over
    the pilot's latencies), each model's endpoint caps, and each model's rpm and tpm."""
    run = config.run
    by_model: dict[str, list[Any]] = {}
    for role in config.endpoints.values():
        for e in role:
            by_model.setdefault(e.model or "", []).append(e)
    capacity = sum(e.max_concurrency or run.concurrency
                   for es in by_model.values() for e in {id(x): x for x in es}.values())
    slots = min(run.concurrency, capacity) if capacity else run.concurrency
    bounds = [call_seconds / slots]
    for model, n in calls.items():
        endpoints = list({(e.base_url, e.model): e for e in by_model.get(model, [])}.values())
        if endpoints and all(e.rpm for e in endpoints):
            bounds.append(n / sum(e.rpm for e in endpoints) * 60.0)
        if endpoints and all(e.tpm for e in endpoints):
            bounds.append(tokens.get(model, 0.0) / sum(e.tpm for e in endpoints) * 60.0)
    return max(bounds)

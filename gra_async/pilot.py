"""`gra-async estimate` / `gra_async.estimate`: a small pilot of the real run, and what the whole run will take.

The pilot is the first tasks of the run's own plan, journaled in its run directory: the
real run skips them and reuses every reply, so the pilot is paid for once. From the
journal it projects calls, tokens and cost to the target, per role and model, counting
the tasks still to run by outcome (accepted, rejected, duplicate) and those the target
cuts off in flight; and the wall time at the configured concurrency and rate limits. The
cost's 95% interval takes in the acceptance rate's Wilson interval and the run's own
luck, and the pilot grows until that interval is as narrow as asked (`precision`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
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

log = logging.getLogger("gra_async")


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
    cost_interval: tuple[float, float] | None  # 95%: the rate's interval and the run's luck
    projected_seconds: float | None  # online: at the concurrency and limits; batch: waves x window
    online_seconds: float | None
    batch_waves: int | None
    models: tuple[ModelProjection, ...]
    calls_interval: tuple[float, float] | None = None  # 95%, as cost_interval

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
    config: RunConfig, *, tasks: int = defaults.ESTIMATE_TASKS,
    precision: float = defaults.ESTIMATE_PRECISION, force: bool = False,
    transport: Transport | None = None,
) -> Estimate:
    """Run the pilot (round 1, online) in `config`'s run directory, then project the run to
    `config.run.target`. A task finished there already is not run again.

    The pilot starts with `tasks` tasks and grows while the projected cost's 95% interval
    is wider than +-`precision` of the point (0: exactly `tasks`), until the pilot has
    spent `defaults.ESTIMATE_MAX_SHARE` of the projected cost or the plan or target ends
    it. Measured (bench/estimate_bench.py): a 20-task pilot knows an acceptance rate of 0.4
    to +-0.2, and its projections ranged 0.73-1.41x the full run's cost; the cost's
    interval is what has to shrink, and only more tasks shrink it.
    """
    from gra_async.synthesizer import Synthesizer

    if tasks < 1:
        raise ConfigError(f"--tasks {tasks}: the pilot needs at least one task")
    if precision < 0:
        raise ConfigError(f"--precision {precision}: give a fraction such as 0.25, or 0 for "
                          "a pilot of exactly --tasks tasks")
    run = config.run
    # Round 1's goal bounds the pilot: a pilot past it would leave the run's first round
    # with more accepted samples than it would have made itself.
    goal = math.ceil(run.target / run.rounds)
    size = tasks
    while True:
        pilot = config.model_copy(update={"run": run.model_copy(update={
            "max_tasks": size, "rounds": 1, "mode": "online", "target": goal})})
        async with Synthesizer(pilot, force=force, transport=transport) as synth:
            live = synth.live_config
            await synth.run()
        force = False
        result = project(live.model_copy(update={"run": run}), run.run_dir)
        grow = _pilot_size(result, size, tasks, precision, goal)
        if grow is None:
            return result
        log.info("pilot of %d tasks: cost interval too wide, growing to %d", size, grow)
        size = grow


def _pilot_size(result: Estimate, size: int, step: int, precision: float, goal: int,
                ) -> int | None:
    """The next pilot size, or None when this pilot is enough (or cannot grow)."""
    if not precision or result.pilot_tasks < size or result.pilot_accepted >= goal:
        return None  # fixed size, the plan ran out (or tasks failed for good), round 1 met
    if result.projected_calls is None or result.calls_interval is None:
        return 2 * size if size < 8 * step else None  # nothing accepted yet
    # Dollars when priced, else calls: the same interval either way.
    if result.projected_cost is not None and result.cost_interval is not None:
        point, (low, high), done = result.projected_cost, result.cost_interval, result.pilot_cost
    else:
        point, (low, high) = float(result.projected_calls), result.calls_interval
        done = float(result.pilot_calls)
    if high <= point * (1 + precision) and low >= point * (1 - precision):
        return None
    # No larger than its share of the run: the tasks the run takes, at the pilot's cost each.
    cap = int(defaults.ESTIMATE_MAX_SHARE * result.pilot_tasks * point / done) if done else size
    if cap <= size:
        return None
    # The interval's width goes as 1/sqrt(accepted): the tasks it needs at this rate, then
    # no more than doubling per step (the rate may be off by as much).
    width = max((high - point) / point, (point - low) / point)
    wanted = result.pilot_tasks * (width / precision) ** 2 * 1.1
    return int(min(max(wanted, size + step), 2 * size, cap))


@dataclass(slots=True)
class _Usage:
    """Calls and tokens per (role, model) over a group of tasks."""

    tasks: int = 0
    calls: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def add(self, role: str, model: str, n: int, t_in: int, t_out: int) -> None:
        got = self.calls.setdefault((role, model), [0, 0, 0])
        got[0] += n
        got[1] += t_in
        got[2] += t_out

    def mean(self) -> dict[tuple[str, str], tuple[float, float, float]]:
        if not self.tasks:
            return {}
        return {k: (n / self.tasks, a / self.tasks, b / self.tasks)
                for k, (n, a, b) in self.calls.items()}


def _outcomes(rows: list[tuple[str, str | None, str | None, float, str, str, int, int, int]],
              ) -> tuple[dict[str, _Usage], list[str]]:
    """Usage per outcome ("accepted", "duplicate", "rejected" with failed, "cut": calls of
    tasks with no finished sample) and the finished tasks' outcomes in finishing order."""
    groups = {k: _Usage() for k in ("accepted", "duplicate", "rejected", "cut")}
    order: list[str] = []
    seen: set[str] = set()
    for task_id, state, decision, _updated, role, model, n, t_in, t_out in rows:
        if state == "accepted":
            kind = "accepted"
        elif state in ("rejected", "failed"):
            kind = "duplicate" if decision == "duplicate" else "rejected"
        else:
            kind = "cut"
        if task_id not in seen:
            seen.add(task_id)
            groups[kind].tasks += 1
            if kind != "cut":
                order.append(kind)
        groups[kind].add(role, model, n, t_in, t_out)
    return groups, order


def _in_flight_cap(config: RunConfig) -> int:
    """Tasks in flight at once, as the scheduler admits them."""
    run = config.run
    if run.max_in_flight:
        return run.max_in_flight
    if run.mode == "batch":
        return config.batch.slice
    caps = {(e.base_url, e.model): e.max_concurrency or run.concurrency
            for role in config.endpoints.values() for e in role}
    return min(run.concurrency, sum(caps.values()) or run.concurrency)


def project(config: RunConfig, run_dir: Path) -> Estimate:
    """The projection from what the journal in `run_dir` holds (pure reading).

    The run still to go is counted in tasks, by outcome: each accepted sample still needed
    costs what the pilot's accepted tasks cost (their metadata call included), and the
    tasks it takes at the acceptance rate cost what the pilot's rejected ones and its
    duplicates cost, at the duplicate rate of the pilot's later half. Then the tasks the
    target cuts off in flight, paid for and never finished.
    """
    reader = JournalReader(run_dir)
    try:
        counts = reader.state_counts()
        usage_rows = reader.task_usage()
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

    groups, order = _outcomes(usage_rows)
    finished = counts["accepted"] + counts["rejected"] + counts["failed"]
    accepted = counts["accepted"]
    rate = accepted / finished if finished else 0.0
    lo, hi = wilson_interval(accepted, finished)
    target = config.run.target
    left = max(target - accepted, 0)
    spent = spend(rows, prices, batched) if priced else None
    totals: dict[tuple[str, str], list[int]] = {}
    for group in groups.values():
        for key, (n, t_in, t_out) in group.calls.items():
            got = totals.setdefault(key, [0, 0, 0])
            for i, v in enumerate((n, t_in, t_out)):
                got[i] += v
    calls_done = sum(v[0] for v in totals.values())

    if not accepted and left:
        done = tuple(ModelProjection(role, model, 0.0, 0.0, 0.0, n, None)
                     for (role, model), (n, _, _) in sorted(totals.items()))
        return Estimate(run_dir, config.run.mode, target, finished, accepted, calls_done, spent,
                        rate, (lo, hi), None, None, None, None, None, None, None, None, done)

    # Duplicates are checked against the accepted set, which grows: a pilot's first tasks
    # meet fewer of them than the run's later ones, so the later half of the pilot counts
    # if it saw more. Measured (bench/estimate_bench.py, case dedup): a 20-task pilot had
    # 0.10 duplicates, 0.20 in its later half, and the run after it 0.13; the grown pilot
    # (232 tasks) 0.13 against 0.135 after it. Passing review (duplicates aside) stays.
    dup_all = groups["duplicate"].tasks / finished if finished else 0.0
    late = order[len(order) // 2:]
    dup_late = late.count("duplicate") / len(late) if late else 0.0
    dup = max(dup_all, dup_late)
    passing = accepted / max(1, finished - groups["duplicate"].tasks)
    future_rate = min(1.0, passing * (1 - dup)) or rate
    scale = future_rate / rate if rate else 1.0

    tail = _tail_tasks(config, left, future_rate) if left else 0.0
    means = {k: g.mean() for k, g in groups.items()}
    every = _Usage(tasks=finished)
    for kind in ("accepted", "duplicate", "rejected"):
        for (role, model), (n, t_in, t_out) in groups[kind].calls.items():
            every.add(role, model, n, t_in, t_out)
    per_task = every.mean()

    def more(p: float, extra: float = 0.0, cut: float = 1.0,
             ) -> dict[tuple[str, str], tuple[float, float, float]]:
        """Calls and tokens still to come per (role, model) at acceptance rate `p`, with
        `extra` more tasks (the run's luck) and `cut` times the tail."""
        tasks_left = left / p + extra if p else 0.0
        other = max(tasks_left - left, 0.0)
        dup_tasks = min(tasks_left * dup, other) if groups["duplicate"].tasks else 0.0
        got: dict[tuple[str, str], list[float]] = {}
        for kind, count in (("accepted", left), ("duplicate", dup_tasks),
                            ("rejected", max(other - dup_tasks, 0.0)), ("tail", tail * cut)):
            for key, values in (per_task if kind == "tail" else means[kind]).items():
                acc = got.setdefault(key, [0.0, 0.0, 0.0])
                for i, v in enumerate(values):
                    acc[i] += v * count
        return {k: (a, b, c) for k, (a, b, c) in got.items()}

    def cost(usage: Mapping[tuple[str, str], tuple[float, float, float]]) -> float:
        return sum((t_in * unit.get(m, (0.0, 0.0))[0] + t_out * unit.get(m, (0.0, 0.0))[1])
                   / 1e6 for (_, m), (_, t_in, t_out) in usage.items())

    def calls(usage: Mapping[tuple[str, str], tuple[float, float, float]]) -> float:
        return sum(n for n, _, _ in usage.values())

    point = more(future_rate)
    models: list[ModelProjection] = []
    call_seconds = 0.0  # sum of latencies of the calls still to make, for Little's law
    per_model_calls: dict[str, float] = {}
    per_model_tokens: dict[str, float] = {}
    model_spent = {m: spend([r for r in rows if r[0] == m], prices, batched) for m in prices}
    model_calls: dict[str, int] = {}
    for (_, model), (n, _, _) in totals.items():
        model_calls[model] = model_calls.get(model, 0) + n
    for key in sorted(set(totals) | set(point)):
        role, model = key
        n_done, in_done, out_done = totals.get(key, [0, 0, 0])
        n_more, in_more, out_more = point.get(key, (0.0, 0.0, 0.0))
        share = model_spent.get(model, 0.0) * n_done / max(1, model_calls.get(model, 0))
        models.append(ModelProjection(
            role, model, (n_done + n_more) / target, (in_done + in_more) / target,
            (out_done + out_more) / target, projected_calls=round(n_done + n_more),
            projected_cost=share + cost({key: point[key]}) if priced and key in point else (
                share if priced else None)))
        call_seconds += n_more * latencies.get(model, 0.0)
        per_model_calls[model] = per_model_calls.get(model, 0.0) + n_more
        per_model_tokens[model] = per_model_tokens.get(model, 0.0) + in_more + out_more

    # The rate's interval, and the run's own luck: the tasks that L more accepted samples
    # take vary as a negative binomial's, sd sqrt(L (1 - p)) / p. The tail is a fit
    # within a factor of two of what was measured.
    p_lo, p_hi = lo * scale, min(1.0, hi * scale)
    slow = _Z95 * math.sqrt(left * (1 - p_lo)) / p_lo if p_lo else 0.0
    fast = _Z95 * math.sqrt(left * (1 - p_hi)) / p_hi if p_hi else 0.0
    cheap, dear = more(p_hi, -fast, 0.5), (more(p_lo, slow, 2.0) if p_lo else None)

    def interval(measure: Callable[[Mapping[tuple[str, str], tuple[float, float, float]]], float],
                 done: float) -> tuple[float, float]:
        mid = done + measure(point)
        return (min(done + measure(cheap), mid),
                max(done + measure(dear), mid) if dear is not None else math.inf)

    calls_interval = interval(calls, calls_done)
    cost_interval = None
    projected_cost = None
    if priced and spent is not None:
        projected_cost = spent + cost(point)
        cost_interval = interval(cost, spent)
    online = _online_seconds(config, call_seconds, per_model_calls, per_model_tokens)
    waves = None
    seconds: float | None = online
    if batch:
        tasks_left = left / future_rate if future_rate else 0.0
        waves = config.run.rounds * max(1, math.ceil(tasks_left / config.batch.slice)) * (
            3 if config.gate.adjudicator else 2)
        seconds = waves * _window_seconds(config.batch.completion_window) or None
    return Estimate(
        run_dir, config.run.mode, target, finished, accepted, calls_done, spent, rate, (lo, hi),
        projected_calls=round(calls_done + sum(v[0] for v in point.values())),
        projected_prompt_tokens=round(sum(v[1] for v in totals.values())
                                      + sum(v[1] for v in point.values())),
        projected_completion_tokens=round(sum(v[2] for v in totals.values())
                                          + sum(v[2] for v in point.values())),
        projected_cost=projected_cost, cost_interval=cost_interval,
        projected_seconds=seconds, online_seconds=online, batch_waves=waves,
        models=tuple(models), calls_interval=calls_interval)


def _tail_tasks(config: RunConfig, left: int, rate: float) -> float:
    """Tasks' worth of calls the run pays for and never finishes: those in flight when a
    round's goal is met (cancelled, or withdrawn once it is met). Measured
    (bench/estimate_bench.py): 3 tasks cut at 8 tasks in flight, 4-10 at 16, 8-15 at 32,
    16-34 at 64 (63 calls of a 627-call run to 60 samples: 10%); and no more than half of
    what the scheduler lets in flight for the samples still needed (1.5x at the acceptance
    rate, pipeline/_scheduler.py `_room`)."""
    per_round = 0.25 * _in_flight_cap(config) + 2
    needed = 1.5 * left / rate / 2 if rate else per_round
    return config.run.rounds * min(per_round, needed)


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

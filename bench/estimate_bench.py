"""Estimate benchmark: does a pilot's projection land within +-25% of the full run's cost?

    python bench/estimate_bench.py                 # every case, one fake server, ~20 s of CPU
    python bench/estimate_bench.py --case dedup    # one case (repeatable flag)
    python bench/estimate_bench.py --json          # one JSON object per case
    python bench/estimate_bench.py --seeds 3       # three plans (run seeds) per case
    python bench/estimate_bench.py --precision 0   # 20-task pilots that do not grow (before)

Each case runs `gra_async.estimate` (the pilot, journaled in a fresh run directory), then
the full `gra_async.run` in the same directory, and compares the projection with what the
run spent: the journaled calls priced as billed (batch replies at the discount). The
fake server's replies are a hash of the request, so a case gives the same figures on
every run, bar the order in which concurrent tasks finish.

The cases vary what the projection has to model: the acceptance rate (the scripted
reviewer's score against rev-c's random one), duplicates that grow with the accepted set
(the generator answers every task whose first example is one of 18 seeds with one fixed
sample per seed), the adjudicator on and off, two rounds, targets 60..500, concurrency
8..64, and batch mode.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gra_async
from gra_async import defaults
from gra_async.accounting import batch_prices, spend
from gra_async.defaults import CRITERIA
from gra_async.store import JournalReader
from gra_async.testing.fake_server import FakeServerProcess

MODELS = ("gen-a", "rev-b", "rev-c", "adj-d")
PRICE_IN, PRICE_OUT = 10.0, 30.0  # dollars per million tokens
SEEDS = Path(gra_async.__file__).parent / "data" / "seeds.jsonl"


def review(score: int) -> str:
    return json.dumps({"scores": dict.fromkeys(CRITERIA, score), "feedback": "ok"})


def verdict(decision: str) -> str:
    return json.dumps({"decision": decision, "reason": f"the adjudicator says {decision}"})


def duplicate_rules(every: int = 3) -> list[dict[str, Any]]:
    """One fixed generation per seed (every `every`-th of the bundled ones) for the tasks
    whose first example it is: once that sample is accepted, those tasks make duplicates,
    so the duplicate rate grows with the accepted set, as a real model's repeats do."""
    rules = []
    lines = SEEDS.read_text().splitlines()
    for i, line in enumerate(lines[::every]):
        seed = json.loads(line)
        sample = {"instruction": f"Fixed task {i}: explain {seed['domain']} item {i} in "
                                 f"plain words for a beginner reader",
                  "response": f"Fixed answer {i} about {seed['domain']}: " + " ".join(
                      f"word{i}x{j}" for j in range(40))}
        rules.append({"model": "gen-a", "content": json.dumps(sample),
                      "contains": f'<example n="1">\n<instruction>\n{seed["instruction"]}'})
    return rules


@dataclass(frozen=True)
class Case:
    name: str
    target: int
    concurrency: int
    score: int = 8  # rev-b's scripted score: 8 -> ~30% accepted, 9 -> ~50%
    adjudicator: str | None = "reject"  # the adjudicator's scripted verdict; None: random
    gate_adjudicator: bool = True
    rounds: int = 1
    mode: str = "online"
    dedup: bool = False
    tasks: int = 20
    extra: dict[str, Any] = field(default_factory=dict)


CASES = (
    Case("test-config", target=60, concurrency=8),
    Case("accept-50", target=200, concurrency=32, score=9),
    Case("adj-random", target=120, concurrency=16, adjudicator=None),
    Case("no-adjudicator", target=100, concurrency=16, gate_adjudicator=False),
    Case("dedup", target=150, concurrency=16, score=9, dedup=True),
    Case("rounds-2", target=120, concurrency=16, rounds=2),
    Case("c64-t500", target=500, concurrency=64, score=9),
    Case("c64-t60", target=60, concurrency=64, score=9),
    Case("batch", target=100, concurrency=16, mode="batch"),
    Case("pilot-40", target=300, concurrency=32, tasks=40, adjudicator=None, dedup=True),
)


def team(url: str) -> dict[str, Any]:
    price = {"price_in": PRICE_IN, "price_out": PRICE_OUT}
    return {"generator": [{"base_url": url, "model": "gen-a", **price}],
            "reviewer": [{"base_url": url, "model": "rev-b", **price},
                         {"base_url": url, "model": "rev-c", **price}],
            "adjudicator": [{"base_url": url, "model": "adj-d", **price}]}


def run_config(case: Case, url: str, run_dir: Path) -> gra_async.RunConfig:
    return gra_async.RunConfig.model_validate({
        "run": {"run_dir": str(run_dir), "target": case.target, "concurrency": case.concurrency,
                "rounds": case.rounds, "mode": case.mode},
        "gate": {"adjudicator": case.gate_adjudicator},
        "batch": {"poll_interval": 0.05, "poll_max": 0.2, "slice": 64},
        "endpoints": team(url), **case.extra})


def spent(run_dir: Path) -> float:
    """What the journaled calls cost as billed: the truth the estimate is measured against."""
    reader = JournalReader(run_dir)
    try:
        rows = reader.spend_rows()
    finally:
        reader.close()
    prices = dict.fromkeys(MODELS, (PRICE_IN, PRICE_OUT))
    return spend(rows, prices, batch_prices(prices, dict.fromkeys(MODELS, 0.5)))


def anatomy(run_dir: Path) -> dict[str, Any]:
    """Where the full run's money went: finished tasks by outcome, and the calls of tasks
    the target cut off (journaled, paid, their sample back to `planned`)."""
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        states = dict(conn.execute(
            "SELECT CASE WHEN state = 'rejected' THEN 'rejected:' || "
            "json_extract(body, '$.decision') ELSE state END, count(*) FROM samples "
            "WHERE state IN ('accepted', 'rejected', 'failed') GROUP BY 1").fetchall())
        cut = conn.execute(
            "SELECT count(*), count(DISTINCT c.task_id) FROM calls c LEFT JOIN samples s "
            "ON s.task_id = c.task_id WHERE s.state IS NULL OR s.state NOT IN "
            "('accepted', 'rejected', 'failed')").fetchone()
        calls = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
        abandoned = conn.execute(
            "SELECT value FROM meta WHERE key = 'abandoned_calls'").fetchone()
    return {"states": states, "calls": calls, "cut_calls": cut[0], "cut_tasks": cut[1],
            "abandoned_calls": int(abandoned[0]) if abandoned else 0}


def measure(case: Case, server: FakeServerProcess, root: Path, *, precision: float,
            seed: int = 0) -> dict[str, Any]:
    server.restore()
    rules: list[dict[str, Any]] = [{"model": "rev-b", "content": review(case.score)}]
    if case.adjudicator is not None:
        rules.append({"model": "adj-d", "content": verdict(case.adjudicator)})
    if case.dedup:
        rules += duplicate_rules()
    server.control(latency=0.002, batch_delay=0.05, rules=rules)
    run_dir = root / f"{case.name}-{seed}"
    conf = run_config(case, server.base_url, run_dir)
    conf = conf.model_copy(update={"run": conf.run.model_copy(update={"seed": seed})})
    got = gra_async.estimate(conf, tasks=case.tasks, precision=precision)
    full = gra_async.run(conf)
    cost = spent(run_dir)
    assert got.projected_cost is not None and got.cost_interval is not None
    lo, hi = got.cost_interval
    return {"case": case.name if not seed else f"{case.name}/{seed}", "target": case.target, "concurrency": case.concurrency,
            "mode": case.mode, "pilot_tasks": got.pilot_tasks,
            "pilot_accept_rate": round(got.accept_rate, 3),
            "full_accept_rate": round(full.accepted / max(1, full.accepted + full.rejected
                                                          + full.failed), 3),
            "reached": full.reached_target,
            "predicted": round(got.projected_cost, 4), "low": round(lo, 4), "high": round(hi, 4),
            "actual": round(cost, 4), "ratio": round(got.projected_cost / cost, 3),
            "covered": lo <= cost <= hi,
            "projected_calls": got.projected_calls, **anatomy(run_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--precision", type=float, default=defaults.ESTIMATE_PRECISION,
                        help="the pilot's precision (0: exactly the case's tasks, as before "
                             "the pilot grew)")
    parser.add_argument("--seeds", type=int, default=1, help="run seeds per case (plans)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.case or c.name in args.case]
    server = FakeServerProcess.start(timeout=20.0, models=list(MODELS), latency=0.002)
    root = Path(tempfile.mkdtemp(prefix="estimate-bench-"))
    worst = 0.0
    try:
        if not args.json:
            print(f"{'case':<15}{'T':>5}{'C':>4}{'pilot':>6}{'p.rate':>7}{'f.rate':>7}"
                  f"{'predicted':>11}{'interval':>20}{'actual':>9}{'ratio':>7}  in?")
        for case, seed in ((c, s) for c in cases for s in range(args.seeds)):
            row = measure(case, server, root, precision=args.precision, seed=seed)
            worst = max(worst, abs(row["ratio"] - 1))
            if args.json:
                print(json.dumps(row), flush=True)
                continue
            interval = f"{row['low']:.2f}-{row['high']:.2f}"
            print(f"{row['case']:<15}{row['target']:>5}{row['concurrency']:>4}"
                  f"{row['pilot_tasks']:>6}{row['pilot_accept_rate']:>7.2f}"
                  f"{row['full_accept_rate']:>7.2f}{row['predicted']:>11.3f}{interval:>20}"
                  f"{row['actual']:>9.3f}{row['ratio']:>7.2f}  {'yes' if row['covered'] else 'NO'}"
                  f"  {row['states']} cut {row['cut_calls']} calls/{row['cut_tasks']} tasks",
                  flush=True)
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"worst |ratio - 1|: {worst:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

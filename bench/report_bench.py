"""Report benchmark: how long `gra-async report` takes on a large journal.

    python bench/report_bench.py                 # 100,000 samples, 4 calls each
    python bench/report_bench.py --samples 20000

Builds a synthetic journal through the store's own API (`Journal.record_sample` and
`record_call`, the writer thread and its commits), three reviewer models whose scores
share a per-sample quality plus noise, an adjudicator on disagreement, duplicates and
failures; then times `write_report` on it (reading, statistics, figures, page).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from gra_async.defaults import CRITERIA
from gra_async.quality import write_report
from gra_async.store import CallRecord, Journal, SampleRecord

REVIEWERS = (("rev-b", 0.5), ("rev-c", -0.5), ("rev-e", 0.0))
DOMAINS = ("math", "code", "writing", "science", "history", "health", "law", "travel")


def _body(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    quality = rng.gauss(7, 1.5)
    reviews = []
    for model, bias in REVIEWERS:
        scores = {c: max(1, min(10, round(quality + bias + rng.gauss(0, 1)))) for c in CRITERIA}
        reviews.append({"model": model, "scores": scores, "mean": sum(scores.values()) / len(scores),
                        "feedback": "fine"})
    means = [r["mean"] for r in reviews]
    mean = sum(means) / len(means)
    std = (sum((m - mean) ** 2 for m in means) / len(means)) ** 0.5
    body: dict[str, Any] = {
        "instruction": "Explain " + "word " * rng.randint(5, 60),
        "response": "Answer " * rng.randint(20, 400), "generator": "gen-a", "tokens": 900,
        "reviews": reviews, "failed_reviews": [], "mean": mean, "std": std, "adjudication": None,
        "decision": "accept" if mean >= 7 else "reject",
    }
    if std > 1.0:
        body["adjudication"] = {"model": "adj-d", "decision": rng.choice(["accept", "reject"]),
                                "reason": "weighed the reviews"}
        body["decision"] = body["adjudication"]["decision"]
    draw = rng.random()
    if draw < 0.05:
        body.update(decision="duplicate", reviews=[], mean=None, std=None, adjudication=None,
                    duplicate_of=rng.choice(["seed:s1", f"r1-{max(i - 1, 0):07d}"]))
    elif draw < 0.07:
        return "failed", {"decision": "failed", "failure": "invalid reviewer reply",
                          "reason": "invalid reviewer reply after 3 tries from rev-b: not JSON"}
    return ("accepted" if body["decision"] == "accept" else "rejected"), body


async def build(run_dir: Path, samples: int) -> None:
    rng = random.Random(0)
    journal = Journal.open(run_dir, {"gate": {"criteria": list(CRITERIA), "accept_mean": 7.0,
                                              "disagreement_std": 1.5}})
    journal.start()
    for i in range(samples):
        task = f"r1-{i:07d}"
        state, body = _body(rng, i)
        journal.record_sample(SampleRecord(task, 1, i, state, rng.choice(DOMAINS), ("s1",), body))
        for slot, (role, model) in enumerate((("generator", "gen-a"), ("reviewer", "rev-b"),
                                              ("reviewer", "rev-c"), ("reviewer", "rev-e"))):
            journal.record_call(CallRecord(
                f"{task}/{slot}", task, role, model, f"{model}@http://127.0.0.1:8000/v1", "{}",
                "stop", 300, 150, rng.lognormvariate(-0.7, 0.4), 1 + (rng.random() < 0.02)))
        if i % 5000 == 0:
            await journal.flush()  # bounds the writer's queue
    journal.set_meta("prices", '{"gen-a": [0.2, 0.6], "rev-b": [0.1, 0.3], "rev-c": [0.1, 0.3], '
                               '"rev-e": [0.1, 0.3]}')
    await journal.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="gra-report-bench-"))
    try:
        started = time.perf_counter()
        asyncio.run(build(run_dir, args.samples))
        size = (run_dir / "journal.sqlite").stat().st_size / 1e6
        print(f"journal: {args.samples} samples, {4 * args.samples} calls, {size:.0f} MB, "
              f"built in {time.perf_counter() - started:.1f} s")
        for _ in range(args.repeat):
            written = write_report(run_dir)
            print(f"report: {written.seconds:.2f} s, {written.path.stat().st_size / 1e3:.0f} kB, "
                  f"{written.figures} figures")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS {rss:.0f} MB")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Journal benchmarks: resume start-up on a large journal, and memory against plan size.

    python bench/journal_bench.py resume --calls 100000 [--reindex]
    python bench/journal_bench.py memory --seeds 10000 100000 [--unlabelled] [--target 2000]

`resume` writes a journal of N calls (3 per task, a few tasks left unfinished) through the
real writer, accepted samples indexed for dedup as a run does, then times what a resume
does before its first call: open the journal, load the finished tasks and the replies
of unfinished tasks; and, timed apart, the dedup index reloaded from the fingerprints
in the journal (a worker thread does it beside the first calls). `--reindex` also
times hashing every accepted sample again (what a journal made with another dedup
layout needs).

`memory` runs the pipeline (fake server, latency 50 ms, C=200) on generated seed files of
each size and prints the peak RSS of each run, measured in its own process. With
--unlabelled the seeds carry no domain, so the run also clusters them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gra_async.dedup import Deduplicator, layout
from gra_async.store import CallRecord, Journal, SampleRecord


def _text(t: int) -> str:
    return (f"Task {t}: " + "explain something specific " * 8 + f"\nAnswer {t}: "
            + "a detailed and careful reply " * 30)


async def _fill(run_dir: Path, calls: int) -> None:
    journal = Journal.open(run_dir, {"bench": 1})
    dedup = Deduplicator(store=journal.fingerprints(layout()))
    journal.start()
    tasks = calls // 3
    for t in range(tasks):
        task_id = f"r1-{t:07d}"
        for slot in range(3):
            journal.record_call(CallRecord(
                f"{task_id}/{slot}", task_id, ("generator", "reviewer", "reviewer")[slot],
                "model", "model@http://127.0.0.1:1/v1", '{"scores": {"clarity": 9}, "feedback": "'
                + "words " * 40 + '"}', "stop", 300, 60, 0.5, 1))
        if t % 100 == 99:
            continue  # left unfinished: resume must reload its replies
        state = "accepted" if t % 2 else "rejected"
        body = {"instruction": f"Task {t}", "response": _text(t), "decision": state[:-2],
                "reviews": [], "tokens": 900}
        if state == "accepted":
            dedup.add(task_id, _text(t))
        journal.record_sample(SampleRecord(task_id, 1, t, state, "domain", ("s1", "s2"), body))
        if t % 1000 == 999:
            await asyncio.sleep(0)  # let the writer keep up, as a run's pace would
    await journal.close()


def resume(calls: int, reindex: bool) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="gra-journal-"))
    try:
        started = time.perf_counter()
        asyncio.run(_fill(run_dir, calls))
        written = time.perf_counter() - started
        size = (run_dir / "journal.sqlite").stat().st_size / 2**20
        started = time.perf_counter()
        journal = Journal.open(run_dir, {"bench": 1})
        dedup = Deduplicator(store=journal.fingerprints(layout()))
        finished = journal.finished_tasks()
        cached = journal.unfinished_calls()
        counts = journal.state_counts()
        missing = sum(1 for _ in journal.accepted(unindexed=True))
        startup = time.perf_counter() - started
        started = time.perf_counter()
        loaded = dedup.load()
        reload = time.perf_counter() - started
        refill = 0.0
        if reindex:
            asyncio.run(journal.close())
            journal = Journal.open(run_dir, {"bench": 1})
            dedup = Deduplicator(store=journal.fingerprints("another-layout"))
            started = time.perf_counter()
            for record in journal.accepted(unindexed=True):
                dedup.add(record.task_id, _text(record.index))
                journal.commit_fingerprint(record.task_id)
            refill = time.perf_counter() - started
        asyncio.run(journal.close())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"journal: {calls} calls, {sum(counts.values())} samples, {size:.0f} MiB, "
          f"written in {written:.1f} s (hashing each accepted sample for the dedup index included)")
    print(f"resume start-up: {startup:.2f} s (finished {len(finished)}, unfinished replies "
          f"{len(cached)}, accepted {counts['accepted']}, of which unindexed {missing})")
    print(f"dedup index reloaded from the journal ({loaded} samples; worker thread, beside "
          f"the first calls): {reload:.2f} s")
    if reindex:
        print(f"re-indexing {counts['accepted']} accepted samples (another layout): {refill:.1f} s")


def memory(sizes: list[int], unlabelled: bool, target: int) -> None:
    for size in sizes:
        flags = ["--target", str(target), *(["--unlabelled"] if unlabelled else [])]
        out = subprocess.run([sys.executable, __file__, "_memory_child", str(size), *flags],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip())


def _memory_child(size: int, unlabelled: bool, target: int) -> None:
    from gra_async.config import load_config
    from gra_async.runner import open_run
    from gra_async.testing.fake_server import FakeServerProcess

    work = Path(tempfile.mkdtemp(prefix="gra-mem-"))
    seeds = work / "seeds.jsonl"
    with open(seeds, "w") as handle:
        for i in range(size):
            record = {"instruction": f"Question {i} about topic{i % 40}: " + "please explain " * 10,
                      "response": f"Answer {i}: " + "a reasonably long response text " * 12}
            if not unlabelled:
                record["domain"] = f"d{i % 40}"
            handle.write(json.dumps(record) + "\n")
    review = json.dumps({"scores": {c: 9 for c in ("correctness", "clarity", "completeness",
                                                       "relevance", "coherence", "ethicality")},
                         "feedback": "ok"})
    server = FakeServerProcess.start(models=["g", "r"], latency=0.05,
                                     rules=[{"model": "r", "content": review}])
    url = server.base_url
    config = load_config(None, environ={}, overrides={
        "run": {"run_dir": work / "run", "target": target, "concurrency": 200},
        "planner": {"seeds": seeds},
        "endpoints": {"generator": [{"base_url": url, "model": "g", "max_concurrency": 200}],
                      "reviewer": [{"base_url": url, "model": "r", "max_concurrency": 200}]},
    })

    async def go() -> None:
        async with open_run(config) as run:
            await run.pipeline.run()

    try:
        started = time.perf_counter()
        asyncio.run(go())
        wall = time.perf_counter() - started
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kind = "unlabelled" if unlabelled else "labelled"
    print(f"seeds={size:>7} ({kind})  target={target}  C=200  wall={wall:.1f}s  peak RSS={rss:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("resume")
    r.add_argument("--calls", type=int, default=100_000)
    r.add_argument("--reindex", action="store_true")
    m = sub.add_parser("memory")
    m.add_argument("--seeds", type=int, nargs="+", default=[10_000, 100_000])
    m.add_argument("--unlabelled", action="store_true")
    m.add_argument("--target", type=int, default=2000)
    c = sub.add_parser("_memory_child")
    c.add_argument("size", type=int)
    c.add_argument("--unlabelled", action="store_true")
    c.add_argument("--target", type=int, default=2000)
    args = parser.parse_args()
    if args.what == "resume":
        resume(args.calls, args.reindex)
    elif args.what == "memory":
        memory(args.seeds, args.unlabelled, args.target)
    else:
        _memory_child(args.size, args.unlabelled, args.target)


if __name__ == "__main__":
    main()

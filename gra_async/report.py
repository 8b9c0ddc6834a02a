"""Read a run directory for people and scripts: `status` counts and the `export` files.

Both read committed rows only, through a read-only connection, so they work while a run
is writing and can never damage it.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from gra_async.accounting import failure_kind, spend
from gra_async.errors import RunDirError
from gra_async.store import TERMINAL_STATES, JournalReader, SampleRecord

__all__ = ["export", "format_status", "sample_row", "status_report"]

EXPORT_FIELDS = ("id", "instruction", "response", "domain", "seed_ids", "generator", "reviews",
                 "mean", "std", "decision", "adjudication", "tokens")


def status_report(run_dir: Path) -> dict[str, Any]:
    """The keys the README promises (`planned`, `accepted`, `rejected`, `failed`, `in_progress`,
    `calls`, all integers) and more: tokens and calls per role and model, failure reasons,
    rate and ETA."""
    reader = JournalReader(run_dir)
    try:
        counts = reader.state_counts()
        in_progress = counts["generated"] + counts["reviewed"] + counts["adjudicating"]
        finished = counts["accepted"] + counts["rejected"] + counts["failed"]
        plan = int(reader.meta("plan_size") or 0)
        target = int(reader.meta("target") or 0)
        totals = reader.call_totals()
        failures: Counter[str] = Counter()
        for kind, reason, n in reader.body_counts("failed", "failure", "reason"):
            failures[str(kind or failure_kind(str(reason or "?")))] += n
        decisions = {str(decision): n for decision, n in reader.body_counts("rejected", "decision")}
        sessions = reader.session_spans()
        prices = {m: (float(a), float(b))
                  for m, (a, b) in orjson.loads(reader.meta("prices") or "{}").items()}
        batched = {m: (float(a), float(b))
                   for m, (a, b) in orjson.loads(reader.meta("batch_prices") or "{}").items()}
        spent = spend(reader.spend_rows(), prices, batched)
        budget = orjson.loads(reader.meta("budget") or "null")
        batches = reader.batches(open_only=True)
        endpoints = orjson.loads(reader.meta("endpoints") or "[]")
        abandoned = (int(reader.meta("abandoned_calls") or 0),
                     int(reader.meta("abandoned_tokens") or 0))
    finally:
        reader.close()
    # Seconds the sessions ran (start to last call), not the hours between them.
    active = sum(last - start for start, last in sessions)
    rate = counts["accepted"] / active if active > 0 else None
    left = max(target - counts["accepted"], 0)
    return {
        # The plan's tasks not finished yet, those in progress included (README: `planned`):
        # only a finished task lowers it, so it never moves up during a run.
        "planned": max(plan - finished, counts["planned"] + in_progress),
        "accepted": counts["accepted"],
        "rejected": counts["rejected"],
        "failed": counts["failed"],
        "in_progress": in_progress,
        "calls": sum(row[2] for row in totals),
        "duplicates": decisions.get("duplicate", 0),
        "target": target,
        "reached_target": bool(target) and counts["accepted"] >= target,
        "by_model": [
            {"role": role, "model": model, "calls": n, "prompt_tokens": t_in or 0,
             "completion_tokens": t_out or 0}
            for role, model, n, t_in, t_out in totals
        ],
        "failures": dict(failures.most_common()),
        # The latest session's endpoints: health, failures, timeouts (updated every few s).
        "endpoints": endpoints,
        # Calls cut off in flight (target, stop, kill -9): a server or gateway may have
        # finished and billed them; their tokens are estimated (prompt + completion budget).
        "abandoned_calls": abandoned[0],
        "abandoned_tokens": abandoned[1],
        # Batch replies at their discounted price; None when no price is configured.
        "cost": spent if any(a or b for a, b in prices.values()) else None,
        "budget": budget,  # run.max_cost of the latest session; None: none
        # Batch API jobs submitted and not read back yet, with the provider's status.
        "batches": [{"batch_id": b.batch_id, "file_id": b.file_id, "model": b.model,
                     "status": b.status, "calls": len(b.calls), **b.counts} for b in batches],
        "accepted_per_second": rate,
        "sessions": len(sessions),
        "active_seconds": active,
        "eta_seconds": (left / rate) if rate else None,
        "updated": time.time(),
    }


def format_status(report: dict[str, Any]) -> str:
    lines = [
        f"accepted {report['accepted']}/{report['target']}  rejected {report['rejected']} "
        f"(duplicates {report['duplicates']})  failed {report['failed']}  "
        f"in progress {report['in_progress']}  planned {report['planned']}  calls {report['calls']}",
    ]
    if report["accepted_per_second"]:
        eta = report["eta_seconds"]
        lines.append(f"rate {report['accepted_per_second']:.3f} accepted/s"
                     + (f", ETA {eta / 60:.1f} min" if eta else ""))
    for row in report["by_model"]:
        lines.append(f"  {row['role']:<12}{row['model']:<32}{row['calls']:>8} calls "
                     f"{row['prompt_tokens']:>10} in {row['completion_tokens']:>10} out")
    for e in report["endpoints"]:
        if e["health"] != "ok" or e["timeouts"] or e["failed"]:
            lines.append(f"  {e['endpoint']}: {e['health']}, {e['failed']} failed attempts, "
                         f"{e['timeouts']} timeouts" + (f" ({e['last_error']})" if e["last_error"] else ""))
    if report["abandoned_calls"]:
        lines.append(f"  abandoned in flight: {report['abandoned_calls']} calls "
                     f"(~{report['abandoned_tokens']} tokens a server may still bill)")
    if report["cost"] is not None:
        budget = f" of a ${report['budget']:.4f} budget" if report.get("budget") else ""
        lines.append(f"  cost ${report['cost']:.4f} at the configured prices{budget}")
    for b in report.get("batches", []):
        done = f", {b.get('completed', 0)} done, {b.get('failed', 0)} failed" if "total" in b else ""
        lines.append(f"  batch {b['batch_id'] or b['file_id']} ({b['model']}): {b['status']}, "
                     f"{b['calls']} calls{done}")
    for reason, n in report["failures"].items():
        lines.append(f"  failed x{n}: {reason}")
    return "\n".join(lines)


def sample_row(record: SampleRecord) -> dict[str, Any]:
    """One exported sample: the fields the README lists, then our extras."""
    body = dict(record.body)
    row: dict[str, Any] = {
        "id": record.task_id,
        "instruction": body.pop("instruction", None),
        "response": body.pop("response", None),
        "domain": record.domain,
        "seed_ids": list(record.seed_ids),
        "generator": body.pop("generator", None),
        "reviews": body.pop("reviews", []),
        "mean": body.pop("mean", None),
        "std": body.pop("std", None),
        "decision": body.pop("decision", None),
        "adjudication": body.pop("adjudication", None),
        "tokens": body.pop("tokens", 0),
        "round": record.round,
    }
    row.update(body)  # failed_reviews, duplicate_of, reason
    return row


def export(run_dir: Path, out: Path, fmt: str, *, include_all: bool = False) -> tuple[int, Path]:
    """Write the samples (accepted only, unless `include_all`) and a run summary next to them.

    One pass over the journal serves the rows and the summary. JSONL is written row by
    row; Parquet holds the columns (Arrow), never a list of Python rows.
    """
    states = TERMINAL_STATES if include_all else ("accepted",)
    tally = _Tally()
    reader = JournalReader(run_dir)
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = (sample_row(r) for r in tally.counted(reader.samples()) if r.state in states)
        written = _write_jsonl(rows, tmp) if fmt == "jsonl" else _write_parquet(rows, tmp)
        totals = reader.call_totals()
        os.replace(tmp, out)
        summary_path = out.with_name(out.stem + ".summary.json")
        summary_path.write_bytes(orjson.dumps(tally.summary(totals), option=orjson.OPT_INDENT_2))
    except OSError as exc:
        raise RunDirError(f"{out}: cannot write the export ({exc.strerror or exc})") from None
    finally:
        reader.close()
    return written, summary_path


def _write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> int:
    written = 0
    with open(path, "wb") as handle:
        for row in rows:
            handle.write(orjson.dumps(row) + b"\n")
            written += 1
    return written


def _write_parquet(rows: Iterable[dict[str, Any]], path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Chunks may disagree on a column's type (all-null so far, a field only some rows
    # have): concatenation promotes them to one schema.
    tables = [pa.Table.from_pylist(chunk) for chunk in _chunks(rows, 2048)]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    pq.write_table(table, path)
    return int(table.num_rows)


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class _Tally:
    """What the summary needs, counted while the samples stream past."""

    def __init__(self) -> None:
        self.states: Counter[str] = Counter()
        self.decisions: Counter[str] = Counter()
        self.adjudicated = 0

    def counted(self, samples: Iterable[SampleRecord]) -> Iterator[SampleRecord]:
        for sample in samples:
            self.states[sample.state] += 1
            self.decisions[str(sample.body.get("decision"))] += 1
            self.adjudicated += bool(sample.body.get("adjudication"))
            yield sample

    def summary(self, totals: list[tuple[str, str, int, int, int]]) -> dict[str, Any]:
        finished = sum(self.states.values())
        return {
            "samples": finished,
            "decisions": dict(self.decisions),
            "acceptance_rate": self.states["accepted"] / finished if finished else None,
            "adjudication_rate": self.adjudicated / finished if finished else None,
            "tokens": [
                {"role": role, "model": model, "calls": n, "prompt_tokens": t_in or 0,
                 "completion_tokens": t_out or 0}
                for role, model, n, t_in, t_out in totals
            ],
        }

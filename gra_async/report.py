"""Read a run directory for people and scripts: `status` counts and the `export` files.

Both read committed rows only, through a read-only connection, so they work while a run
is writing and can never damage it.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from gra_async.accounting import failure_kind, token_cost
from gra_async.errors import RunDirError
from gra_async.store import JournalReader, SampleRecord

__all__ = ["export", "format_status", "sample_row", "status_report"]

EXPORT_FIELDS = ("id", "instruction", "response", "domain", "seed_ids", "generator", "reviews",
                 "mean", "std", "decision", "adjudication", "tokens")


def status_report(run_dir: Path) -> dict[str, Any]:
    """The keys of DESIGN.md §6 (`planned`, `accepted`, `rejected`, `failed`, `in_progress`,
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
        failures: Counter[str] = Counter(
            str(s.body.get("failure") or failure_kind(str(s.body.get("reason", "?"))))
            for s in reader.samples(("failed",))
        )
        decisions: Counter[str] = Counter(
            str(s.body.get("decision")) for s in reader.samples(("rejected",))
        )
        span = reader.time_span()
        prices = {m: (float(a), float(b))
                  for m, (a, b) in orjson.loads(reader.meta("prices") or "{}").items()}
    finally:
        reader.close()
    rate = None
    if span is not None and span[1] > span[0]:
        rate = counts["accepted"] / (span[1] - span[0])
    left = max(target - counts["accepted"], 0)
    return {
        "planned": max(plan - finished - in_progress, counts["planned"]),
        "accepted": counts["accepted"],
        "rejected": counts["rejected"],
        "failed": counts["failed"],
        "in_progress": in_progress,
        "calls": sum(row[2] for row in totals),
        "duplicates": decisions.get("duplicate", 0),
        "target": target,
        "by_model": [
            {"role": role, "model": model, "calls": n, "prompt_tokens": t_in or 0,
             "completion_tokens": t_out or 0}
            for role, model, n, t_in, t_out in totals
        ],
        "failures": dict(failures.most_common()),
        "cost": token_cost({key: n for role, model, _, t_in, t_out in totals
                            for key, n in (((role, model, "in"), t_in or 0),
                                           ((role, model, "out"), t_out or 0))}, prices),
        "accepted_per_second": rate,
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
    if report["cost"] is not None:
        lines.append(f"  cost ${report['cost']:.4f} at the configured prices")
    for reason, n in report["failures"].items():
        lines.append(f"  failed x{n}: {reason}")
    return "\n".join(lines)


def sample_row(record: SampleRecord) -> dict[str, Any]:
    """One exported sample: the fields of DESIGN.md §6, then our extras."""
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
    """Write the samples (accepted only, unless `include_all`) and a run summary next to them."""
    reader = JournalReader(run_dir)
    try:
        states = ("accepted", "rejected", "failed") if include_all else ("accepted",)
        everything = list(reader.samples())  # one read serves the rows and the summary
        rows = [sample_row(r) for r in everything if r.state in states]
        counts = reader.state_counts()
        totals = reader.call_totals()
    finally:
        reader.close()
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "jsonl":
            with open(tmp, "wb") as handle:
                for row in rows:
                    handle.write(orjson.dumps(row) + b"\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, out)
        summary_path = out.with_name(out.stem + ".summary.json")
        summary_path.write_bytes(orjson.dumps(_summary(counts, totals, everything),
                                              option=orjson.OPT_INDENT_2))
    except OSError as exc:
        raise RunDirError(f"{out}: cannot write the export ({exc.strerror or exc})") from None
    return len(rows), summary_path


def _summary(counts: dict[str, int], totals: list[tuple[str, str, int, int, int]],
             samples: list[SampleRecord]) -> dict[str, Any]:
    finished = counts["accepted"] + counts["rejected"] + counts["failed"]
    decisions = Counter(str(s.body.get("decision")) for s in samples)
    adjudicated = sum(1 for s in samples if s.body.get("adjudication"))
    return {
        "samples": finished,
        "decisions": dict(decisions),
        "acceptance_rate": counts["accepted"] / finished if finished else None,
        "adjudication_rate": adjudicated / finished if finished else None,
        "tokens": [
            {"role": role, "model": model, "calls": n, "prompt_tokens": t_in or 0,
             "completion_tokens": t_out or 0}
            for role, model, n, t_in, t_out in totals
        ],
    }

"""Read a run directory for people and scripts: `status` counts and the `export` files.

Both read committed rows only, through a read-only connection, so they work while a run
is writing and can never damage it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from gra_async import defaults
from gra_async.accounting import failure_kind, spend
from gra_async.errors import ConfigError, RunDirError
from gra_async.formats import (
    TRAINING_FORMATS,
    ExportFormat,
    dataset_card,
    hf_schema,
    llamafactory_entry,
    sample_schema,
    training_record,
)
from gra_async.store import TERMINAL_STATES, JournalReader, SampleRecord

if TYPE_CHECKING:
    import pyarrow as pa

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
        # A duplicate with a similarity is one the embedding stage found (a paraphrase).
        semantic = sum(n for decision, similar, n in reader.body_counts(
            "rejected", "decision", "similarity") if decision == "duplicate" and similar is not None)
        embedded = reader.embedding_totals()
        snapshot = orjson.loads(reader.meta("config") or "{}")
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
        refined = "refine" in orjson.loads(reader.meta("config") or "{}")
        origins = {str(o): n for o, n in reader.body_counts("accepted", "origin")} if refined else {}
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
        "semantic_duplicates": semantic,  # of `duplicates`, found by embedding cosine
        "embedded_texts": embedded[0],  # texts the embedder was sent (each once)
        "embedding_tokens": embedded[1],
        # The run's config had an embedder (and planner.semantic on): paraphrases checked.
        "semantic_dedup": bool((snapshot.get("endpoints") or {}).get("embedder")),
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
        # A `refine` run: seeds kept as they were, accepted after a rewrite, dropped.
        "refine": {"seeds": target, "kept": origins.get("kept", 0),
                   "rewritten": origins.get("rewritten", 0),
                   "dropped": counts["rejected"]} if refined else None,
    }


def format_status(report: dict[str, Any]) -> str:
    semantic = (f"{report['semantic_duplicates']} by embedding" if report["semantic_dedup"]
                else "semantic dedup off")
    lines = [
        f"accepted {report['accepted']}/{report['target']}  rejected {report['rejected']} "
        f"(duplicates {report['duplicates']}, {semantic})  failed {report['failed']}  "
        f"in progress {report['in_progress']}  planned {report['planned']}  calls {report['calls']}",
    ]
    if report.get("refine"):
        r = report["refine"]
        lines.append(f"refine: {r['kept']} kept, {r['rewritten']} rewritten, {r['dropped']} "
                     f"dropped of {r['seeds']} seeds")
    if report["accepted_per_second"]:
        eta = report["eta_seconds"]
        lines.append(f"rate {report['accepted_per_second']:.3f} accepted/s"
                     + (f", ETA {eta / 60:.1f} min" if eta else ""))
    for row in report["by_model"]:
        lines.append(f"  {row['role']:<12}{row['model']:<32}{row['calls']:>8} calls "
                     f"{row['prompt_tokens']:>10} in {row['completion_tokens']:>10} out")
    if report["embedded_texts"]:
        lines.append(f"  {'embedder':<12}{report['embedded_texts']:>8} texts embedded "
                     f"{report['embedding_tokens']:>10} in")
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


def export(
    run_dir: Path, out: Path, fmt: ExportFormat, *, include_all: bool = False,
    with_provenance: bool = False, llamafactory: bool = False,
) -> tuple[int, Path]:
    """Write the samples (accepted only, unless `include_all`) and a run summary next to them.

    One pass over the journal serves the rows and the summary. Files are written row by
    row (JSON, JSONL) or by chunks of columns (Parquet, Arrow), never as a list of every
    row; each is written beside its place and renamed, so a reader never sees half of one.
    `llamafactory` adds (or replaces) this export's entry in the `dataset_info.json` next
    to it.
    """
    if llamafactory and fmt == "hf":
        raise ConfigError("--llamafactory: LLaMA-Factory reads files, not a dataset folder; "
                          "export --format alpaca, sharegpt or openai for it")
    states = TERMINAL_STATES if include_all else ("accepted",)
    tally = _Tally()
    reader = JournalReader(run_dir)
    tmp = out.with_name(out.name + ".tmp")
    try:
        config = orjson.loads(reader.meta("config") or "{}")
        criteria = tuple(config.get("gate", {}).get("criteria") or defaults.CRITERIA)
        out.parent.mkdir(parents=True, exist_ok=True)
        rows: Iterator[dict[str, Any]] = (
            sample_row(r) for r in tally.counted(reader.samples()) if r.state in states)
        if fmt in TRAINING_FORMATS:
            rows = (training_record(row, fmt, with_provenance=with_provenance) for row in rows)
        if fmt == "hf":
            written = _write_hf(rows, tmp, hf_schema(criteria, with_provenance=with_provenance,
                                                     refined="refine" in config))
        elif fmt == "parquet":
            written = _write_parquet(rows, tmp, sample_schema(criteria))
        elif out.suffix == ".json":  # a JSON array, as Stanford Alpaca ships its data
            written = _write_json_array(rows, tmp)
        else:
            written = _write_jsonl(rows, tmp)
        summary = tally.summary(reader.call_totals())
        if fmt == "hf":
            (tmp / "README.md").write_text(dataset_card(out.name, config, summary), encoding="utf-8")
        _replace(tmp, out)
        summary_path = (out / "summary.json" if fmt == "hf"
                        else out.with_name(out.stem + ".summary.json"))
        summary_path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        if llamafactory:
            _add_llamafactory_entry(out, run_dir.resolve().name, fmt)
    except OSError as exc:
        raise RunDirError(f"{out}: cannot write the export ({exc.strerror or exc})") from None
    finally:
        reader.close()
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.unlink(missing_ok=True)
    return written, summary_path


def _replace(tmp: Path, out: Path) -> None:
    """`tmp` becomes `out`; a folder export replaces the old folder whole."""
    if tmp.is_dir() and out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _add_llamafactory_entry(out: Path, name: str, fmt: ExportFormat) -> None:
    """LLaMA-Factory's `dataset_info.json` lists many datasets: ours is added, not written over."""
    info_path = out.with_name("dataset_info.json")
    try:
        info = orjson.loads(info_path.read_bytes()) if info_path.exists() else {}
    except orjson.JSONDecodeError:
        raise ConfigError(f"{info_path}: not valid JSON; fix or remove it before adding "
                          "this export to it") from None
    info[name] = llamafactory_entry(fmt, out.name)
    tmp = info_path.with_name(info_path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
    os.replace(tmp, info_path)


def _write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> int:
    written = 0
    with open(path, "wb") as handle:
        for row in rows:
            handle.write(orjson.dumps(row) + b"\n")
            written += 1
    return written


def _write_json_array(rows: Iterable[dict[str, Any]], path: Path) -> int:
    written = 0
    with open(path, "wb") as handle:
        handle.write(b"[")
        for row in rows:
            handle.write((b",\n" if written else b"\n") + orjson.dumps(row))
            written += 1
        handle.write(b"\n]\n")
    return written


def _write_parquet(rows: Iterable[dict[str, Any]], path: Path, schema: pa.Schema) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    written = 0
    with pq.ParquetWriter(path, schema) as writer:
        for chunk in _chunks(rows, 2048):
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            written += len(chunk)
    return written


def _write_hf(rows: Iterable[dict[str, Any]], folder: Path, schema: pa.Schema) -> int:
    """What `datasets.Dataset.save_to_disk` writes: an Arrow stream, its state and its info.

    Written with pyarrow alone, so exporting needs no `datasets` install; the features
    are left out of the info, and `datasets` reads them from the Arrow schema.
    """
    import pyarrow as pa

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = "data-00000-of-00001.arrow"
    written = 0
    digest = hashlib.sha256()
    with pa.OSFile(str(folder / data), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for chunk in _chunks(rows, 2048):
            batch = pa.RecordBatch.from_pylist(chunk, schema=schema)
            writer.write_batch(batch)
            digest.update(orjson.dumps([r.get("instruction") for r in chunk]))
            written += len(chunk)
    state: dict[str, Any] = {"_data_files": [{"filename": data}], "_fingerprint": digest.hexdigest()[:16],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": None}
    info = {"citation": "", "description": "Samples synthesized by gra-async (GRA method)",
            "homepage": "", "license": ""}
    (folder / "state.json").write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))
    (folder / "dataset_info.json").write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
    return written


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

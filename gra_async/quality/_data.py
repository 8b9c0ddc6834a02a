"""One read-only pass over a run directory: the numbers every section of the report needs.

Samples are streamed from the journal; what is kept per sample is a few numbers (scores,
lengths, codes), never its text, so memory is ~100 bytes a sample plus its scores.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from gra_async.accounting import failure_kind, token_cost
from gra_async.dedup import normalize
from gra_async.store import TERMINAL_STATES, JournalReader

__all__ = ["EndpointCalls", "RunData", "load_run"]

# The journal keeps no token count per field: lengths are estimated at ~4 characters a
# token (English; the same estimate the client uses for its TPM budget).
CHARS_PER_TOKEN = 4
_CALL_BATCH = 8192


@dataclass(slots=True)
class EndpointCalls:
    """The journaled (successful) calls of one endpoint."""

    calls: int = 0
    retried_calls: int = 0  # calls that needed more than one attempt
    extra_attempts: int = 0  # failed attempts before a success
    latencies: list[float] = field(default_factory=list)


@dataclass(slots=True)
class RunData:
    run_dir: Path
    read_at: float
    criteria: tuple[str, ...]
    accept_mean: float | None
    disagreement_std: float | None
    states: Counter[str]
    # Per finished sample, in plan order (round, index).
    accepted: npt.NDArray[np.bool_]
    decisions: list[str]
    means: npt.NDArray[np.float64]  # panel mean, NaN without reviews
    stds: npt.NDArray[np.float64]
    instruction_tokens: npt.NDArray[np.float64]  # estimated (CHARS_PER_TOKEN), NaN for failed
    response_tokens: npt.NDArray[np.float64]
    # Reviews: scores[s, r, c] of sample s by reviewer model r on criterion c (NaN: none).
    reviewers: tuple[str, ...]
    scores: npt.NDArray[np.float64]
    review_means: npt.NDArray[np.float64]  # [s, r]
    adjudications: dict[str, Counter[str]]  # model -> called / accepted / rejected / overturned
    rejections: Counter[str]
    duplicates: Counter[str]
    similarities: list[float]  # embedding cosine of each semantic duplicate
    failures: Counter[str]
    domains: dict[str, Counter[str]]  # domain -> state counts
    seeds_per_domain: dict[str, int] | None  # None: no seeds.sqlite to read
    tokens: list[tuple[str, str, int, int, int]]  # role, model, calls, prompt, completion
    prices: dict[str, tuple[float, float]]
    endpoint_calls: dict[str, EndpointCalls]
    endpoint_session: list[dict[str, Any]]  # the latest session's endpoint stats (meta)

    @property
    def finished(self) -> int:
        return len(self.decisions)

    def cost(self) -> float | None:
        return token_cost({key: n for role, model, _, t_in, t_out in self.tokens
                           for key, n in (((role, model, "in"), t_in or 0),
                                          ((role, model, "out"), t_out or 0))}, self.prices)


def _digest(instruction: str, response: str) -> bytes:
    return hashlib.blake2b(normalize(f"{instruction}\n{response}").encode(), digest_size=8).digest()


class _Samples:
    """Accumulates the per-sample columns while the journal streams past."""

    def __init__(self, criteria: tuple[str, ...], accept_mean: float | None) -> None:
        self.criteria = criteria
        self.accept_mean = accept_mean
        self.states: Counter[str] = Counter()
        self.decisions: list[str] = []
        self.means: list[float] = []
        self.stds: list[float] = []
        self.lengths: list[tuple[float, float]] = []
        self.reviewer_index: dict[str, int] = {}
        self.review_rows: list[tuple[int, int, list[float], float]] = []
        self.adjudications: dict[str, Counter[str]] = defaultdict(Counter)
        self.rejections: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.domains: dict[str, Counter[str]] = defaultdict(Counter)
        self.copies: list[tuple[str, bytes]] = []  # (original task id, the copy's digest)
        self.similarities: list[float] = []  # embedding cosines of the semantic duplicates

    def add(self, state: str, domain: str, body: dict[str, Any]) -> None:
        i = len(self.decisions)
        decision = str(body.get("decision") or state)
        self.states[state] += 1
        self.decisions.append(decision)
        self.domains[domain][state] += 1
        mean, std = body.get("mean"), body.get("std")
        self.means.append(np.nan if mean is None else float(mean))
        self.stds.append(np.nan if std is None else float(std))
        instruction, response = str(body.get("instruction") or ""), str(body.get("response") or "")
        if state == "failed":
            self.lengths.append((np.nan, np.nan))
        else:
            self.lengths.append((len(instruction) / CHARS_PER_TOKEN, len(response) / CHARS_PER_TOKEN))
        for review in body.get("reviews") or ():
            column = self.reviewer_index.setdefault(str(review["model"]), len(self.reviewer_index))
            given = review.get("scores") or {}
            row = [float(given[c]) if c in given else np.nan for c in self.criteria]
            self.review_rows.append((i, column, row, float(review.get("mean") or np.nanmean(row))))
        adjudication = body.get("adjudication")
        if adjudication:
            tally = self.adjudications[str(adjudication["model"])]
            tally["called"] += 1
            tally[str(adjudication["decision"])] += 1
            if mean is not None and self.accept_mean is not None:
                panel_accepts = float(mean) >= self.accept_mean
                tally["overturned"] += panel_accepts != (adjudication["decision"] == "accept")
        if state == "rejected":
            self.rejections[self._rejection(decision, body)] += 1
        if decision == "duplicate":
            original = str(body.get("duplicate_of") or "")
            if body.get("similarity") is not None:  # the embedding stage found it
                kind = "seed paraphrase" if original.startswith("seed:") else "paraphrase"
                self.duplicates[kind] += 1
                self.similarities.append(float(body["similarity"]))
            elif original.startswith("seed:"):
                self.duplicates["seed copy"] += 1
            else:
                self.copies.append((original, _digest(instruction, response)))
        if state == "failed":
            self.failures[str(body.get("failure") or failure_kind(str(body.get("reason") or "?")))] += 1

    @staticmethod
    def _rejection(decision: str, body: dict[str, Any]) -> str:
        if decision == "duplicate":
            return "duplicate"
        if decision == "filtered":
            return "filtered: " + str(body.get("reason") or "?")[:60]
        if body.get("adjudication"):
            return "adjudicator rejected"
        if not body.get("reviews"):
            return "rejected without reviews"
        return "panel mean below the bar"

    def classify_copies(self, originals: dict[str, bytes]) -> None:
        """Copies of accepted samples: the same normalized text (exact) or a MinHash near-copy."""
        for original, digest in self.copies:
            kind = "exact copy" if originals.get(original) == digest else "near-copy"
            self.duplicates[kind] += 1

    def scores(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        n, k, c = len(self.decisions), len(self.reviewer_index), len(self.criteria)
        scores = np.full((n, k, c), np.nan)
        means = np.full((n, k), np.nan)
        for i, column, row, mean in self.review_rows:
            scores[i, column] = row
            means[i, column] = mean
        return scores, means


def _config(reader: JournalReader) -> dict[str, Any]:
    with contextlib.suppress(orjson.JSONDecodeError):
        config = orjson.loads(reader.meta("config") or "{}")
        if isinstance(config, dict):
            return config
    return {}


def _originals(reader: JournalReader, ids: Iterable[str]) -> dict[str, bytes]:
    wanted = sorted(set(ids))
    out: dict[str, bytes] = {}
    for start in range(0, len(wanted), 500):
        for record in reader.samples_by_id(wanted[start:start + 500]):
            body = record.body
            out[record.task_id] = _digest(str(body.get("instruction") or ""),
                                          str(body.get("response") or ""))
    return out


def _seeds_per_domain(run_dir: Path) -> dict[str, int] | None:
    """The first round's seed pool per domain (later rounds add accepted samples to it)."""
    path = run_dir / "seeds.sqlite"
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return {str(d): int(n) for d, n in conn.execute(
                "SELECT domain, count(*) FROM seeds WHERE joined <= 1 GROUP BY domain")}
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return None


def _endpoint_calls(reader: JournalReader) -> dict[str, EndpointCalls]:
    out: dict[str, EndpointCalls] = defaultdict(EndpointCalls)
    last = 0
    while rows := reader.calls_after(last, _CALL_BATCH):
        for rowid, _role, _model, endpoint, _t_in, _t_out, latency, attempts in rows:
            tally = out[endpoint]
            tally.calls += 1
            tally.retried_calls += attempts > 1
            tally.extra_attempts += attempts - 1
            tally.latencies.append(latency)
            last = rowid
    return dict(out)


def load_run(run_dir: Path) -> RunData:
    """Everything the report shows, read from committed rows only (safe during a run)."""
    reader = JournalReader(run_dir)
    try:
        read_at = time.time()
        config = _config(reader)
        gate = config.get("gate") or {}
        criteria = tuple(str(c) for c in gate.get("criteria") or ())
        accept_mean = gate.get("accept_mean")
        samples = _Samples(criteria, None if accept_mean is None else float(accept_mean))
        for record in reader.samples(TERMINAL_STATES):
            samples.add(record.state, record.domain, dict(record.body))
        samples.classify_copies(_originals(reader, (o for o, _ in samples.copies)))
        tokens = reader.call_totals()
        prices = {m: (float(a), float(b))
                  for m, (a, b) in orjson.loads(reader.meta("prices") or "{}").items()}
        endpoint_session = list(orjson.loads(reader.meta("endpoints") or "[]"))
        endpoint_calls = _endpoint_calls(reader)
    finally:
        reader.close()
    scores, review_means = samples.scores()
    lengths = np.array(samples.lengths, dtype=np.float64).reshape(-1, 2)
    return RunData(
        run_dir=run_dir, read_at=read_at, criteria=criteria,
        accept_mean=samples.accept_mean,
        disagreement_std=None if gate.get("disagreement_std") is None else float(gate["disagreement_std"]),
        states=samples.states,
        accepted=np.array([d == "accept" for d in samples.decisions], dtype=np.bool_),
        decisions=samples.decisions,
        means=np.array(samples.means, dtype=np.float64),
        stds=np.array(samples.stds, dtype=np.float64),
        instruction_tokens=lengths[:, 0], response_tokens=lengths[:, 1],
        reviewers=tuple(samples.reviewer_index), scores=scores, review_means=review_means,
        adjudications=dict(samples.adjudications), rejections=samples.rejections,
        duplicates=samples.duplicates, similarities=samples.similarities,
        failures=samples.failures,
        domains=dict(samples.domains), seeds_per_domain=_seeds_per_domain(run_dir),
        tokens=tokens, prices=prices, endpoint_calls=endpoint_calls,
        endpoint_session=endpoint_session,
    )

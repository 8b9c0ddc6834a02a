"""Hostile servers: full pipeline runs against the fake server with faults injected.

Each scenario runs `gra_async.cli.main(["run", ...])` in-process against real loopback HTTP
servers and then checks the same bookkeeping invariants (`assert_books_balance`):

* the run completes (exit 0, possibly "plan exhausted");
* every planned task ended accepted, rejected or failed, a failed one with its reason;
* nothing is counted twice or lost: export ids are unique, `status` totals equal the export's
  rows, the journal holds exactly the replies the servers sent (when no task was cut off);
* `PRAGMA integrity_check` says ok.

Runs plan a fixed number of tasks (`run.max_tasks`) with a target they cannot reach, so the
whole plan is worked through and the counts are exact; one scenario stops at its target instead.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from gra_async.cli import main
from gra_async.defaults import CRITERIA

from .conftest import FakeServer, start_fake_server

GEN, REV_B, REV_C, ADJ = "gen-a", "rev-b", "rev-c", "adj-d"
UNREACHABLE_TARGET = 10_000  # runs work through their whole plan (max_tasks) and stop there

TERMINAL_DECISIONS = {"accept", "reject", "duplicate", "failed"}


# --- replies ---------------------------------------------------------------------------------


def review(score: int, feedback: str = "fine") -> str:
    return json.dumps({"scores": dict.fromkeys(CRITERIA, score), "feedback": feedback})


def verdict(decision: str) -> str:
    return json.dumps({"decision": decision, "reason": f"the adjudicator says {decision}"})


def mixed_panel_rules() -> list[dict[str, Any]]:
    """rev-b always likes the sample; rev-c scores and the adjudicator decides at random (the
    server's default replies), so agreement, disagreement, accept and reject all occur."""
    return [{"model": REV_B, "content": review(9)}]


# --- config and runs -------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)


def write_config(
    path: Path,
    *,
    generators: Sequence[str],
    reviewers: str,
    adjudicator: str,
    endpoint: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
    gate: Mapping[str, Any] | None = None,
) -> Path:
    """A gra.toml with `generators` as replicas of gen-a, rev-b and rev-c on `reviewers`,
    adj-d on `adjudicator`; `endpoint` settings apply to every endpoint."""
    extra = [f"{key} = {toml_value(value)}" for key, value in (endpoint or {}).items()]
    lines: list[str] = []
    if run:
        lines += ["[run]", *(f"{key} = {toml_value(value)}" for key, value in run.items())]
    if gate:
        lines += ["[gate]", *(f"{key} = {toml_value(value)}" for key, value in gate.items())]
    members = [("generator", url, GEN) for url in generators]
    members += [("reviewer", reviewers, REV_B), ("reviewer", reviewers, REV_C),
                ("adjudicator", adjudicator, ADJ)]
    for role, url, model in members:
        lines += [f"[[endpoints.{role}]]", f"base_url = {json.dumps(url)}",
                  f"model = {json.dumps(model)}", *extra]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class RunResult:
    code: int
    out: str
    err: str
    elapsed: float


def run_gra(args: list[str], capsys: pytest.CaptureFixture[str]) -> RunResult:
    capsys.readouterr()
    started = time.monotonic()
    code = main(args)
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    return RunResult(code, captured.out, captured.err, elapsed)


def run_with(
    config: Path, run_dir: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> RunResult:
    result = run_gra(["run", "--config", str(config), "--run-dir", str(run_dir), *extra], capsys)
    # 3: the plan ran out short of the target (most of these runs aim past their plan).
    short = ("plan exhausted: ", "every task failed: ")
    assert result.code == 0 or (result.code == 3 and any(s in result.err for s in short)), result.err
    assert "Traceback" not in result.err
    return result


# --- the books -------------------------------------------------------------------------------


@dataclass
class Books:
    status: dict[str, Any]
    rows: list[dict[str, Any]]  # export --all
    accepted: list[dict[str, Any]]  # export
    states: dict[str, int]  # samples per journal state
    calls: list[tuple[str, str, int]]  # (role, endpoint, attempts) per journaled call

    def decisions(self) -> Counter[str]:
        return Counter(str(r["decision"]) for r in self.rows)


def export_rows(run_dir: Path, out: Path, *flags: str) -> list[dict[str, Any]]:
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out), *flags]) == 0
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


def assert_books_balance(
    run_dir: Path, result: RunResult, capsys: pytest.CaptureFixture[str], *,
    planned: int | None = None,
) -> Books:
    """The invariants every scenario must keep; `planned`: tasks the plan held, all finished."""
    capsys.readouterr()
    assert main(["status", "--run-dir", str(run_dir), "--json"]) == 0
    status = dict(json.loads(capsys.readouterr().out))
    rows = export_rows(run_dir, run_dir / "all.jsonl", "--all")
    accepted = export_rows(run_dir, run_dir / "accepted.jsonl")
    capsys.readouterr()
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        states = dict(conn.execute("SELECT state, count(*) FROM samples GROUP BY state").fetchall())
        calls = [(str(r), str(e), int(a)) for r, e, a in
                 conn.execute("SELECT role, endpoint, attempts FROM calls")]
        call_keys = conn.execute("SELECT count(DISTINCT key), count(*) FROM calls").fetchone()
    books = Books(status, rows, accepted, states, calls)

    # Every task ended somewhere final: no sample is left mid-way in the journal.
    assert status["in_progress"] == 0
    assert set(states) <= {"planned", "accepted", "rejected", "failed"}, states
    # Nothing counted twice.
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "a task was exported twice"
    assert len({r["id"] for r in accepted}) == len(accepted)
    assert {r["id"] for r in accepted} <= set(ids)
    assert call_keys[0] == call_keys[1] == status["calls"]
    # status agrees with the exports and with the run's own summary line.
    assert status["accepted"] == len(accepted) == states.get("accepted", 0)
    assert status["accepted"] + status["rejected"] + status["failed"] == len(rows)
    assert status["failed"] == states.get("failed", 0)
    assert (f"({status['accepted']} accepted)" in result.out
            or f": {status['accepted']} of " in result.err), (result.out, result.err)
    # Every finished task has a decision; a failed one says why.
    for row in rows:
        assert row["decision"] in TERMINAL_DECISIONS, row
        if row["decision"] == "failed":
            assert isinstance(row.get("reason"), str) and row["reason"].strip(), row
        else:
            assert row["instruction"] and row["response"] and row["generator"] == GEN
        if row["decision"] == "accept":
            assert row["reviews"], "accepted without a single valid review"
    if planned is not None:
        assert len(rows) == planned, f"{planned} tasks planned, {len(rows)} finished"
        assert status["planned"] == 0
        assert "plan exhausted" in result.err or "every task failed" in result.err
    return books


def good_replies(server: FakeServer) -> int:
    """Chat replies the server answered 200 with a whole body (probes and malformed ones out)."""
    stats = server.stats()
    probes = int(stats["requests"]) - int(stats["chat_requests"])  # GET /v1/models (never down)
    return int(stats["status"].get("200", 0)) - probes - int(stats["faults"].get("malformed", 0))


@pytest.fixture
def server() -> Iterator[FakeServer]:
    started = start_fake_server(latency=0.01, jitter=0.01)
    try:
        yield started
    finally:
        started.close()


# --- scenarios -------------------------------------------------------------------------------


def test_429_storm_with_retry_after(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """40 answers in a row are 429 with Retry-After 0.2 s; every call waits it out, none fails."""
    storm, wait, concurrency, tasks = 40, 0.2, 8, 30
    server.control(status_script=[429] * storm, retry_after=wait, rules=mixed_panel_rules())
    config = write_config(tmp_path / "gra.toml", generators=[server.base_url],
                          reviewers=server.base_url, adjudicator=server.base_url,
                          run={"max_tasks": tasks})
    result = run_with(config, tmp_path / "run", capsys, "--target", str(UNREACHABLE_TARGET),
                      "--concurrency", str(concurrency))
    books = assert_books_balance(tmp_path / "run", result, capsys, planned=tasks)

    stats = server.stats()
    assert stats["status"]["429"] == storm and stats["script_left"] == 0
    assert books.status["failed"] == 0, books.status["failures"]
    assert books.decisions()["accept"] > 0
    # Each 429 cost exactly one retry of the call that got it, and the retry was journaled
    # with the reply: no answer lost, none counted twice.
    assert sum(attempts - 1 for _, _, attempts in books.calls) == storm
    assert len(books.calls) == good_replies(server)
    # Retry-After was honoured: 40 waits of 0.2 s shared by at most 8 call slots.
    assert result.elapsed >= storm * wait / concurrency


def test_mixed_server_faults(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """5% 5xx, 1% resets, 0.5% hangs, 1% malformed bodies, all at once; 1 s read timeout."""
    server.control(error_rate=0.05, reset_rate=0.01, hang_rate=0.005, malformed_rate=0.01,
                   seed=11, rules=mixed_panel_rules())
    tasks = 120
    config = write_config(tmp_path / "gra.toml", generators=[server.base_url],
                          reviewers=server.base_url, adjudicator=server.base_url,
                          endpoint={"read_timeout": 1, "connect_timeout": 1},
                          run={"max_tasks": tasks})
    result = run_with(config, tmp_path / "run", capsys, "--target", str(UNREACHABLE_TARGET),
                      "--concurrency", "32")
    books = assert_books_balance(tmp_path / "run", result, capsys, planned=tasks)

    stats = server.stats()
    faults = stats["faults"]
    server_errors = sum(n for code, n in stats["status"].items() if code.startswith("5"))
    # Every kind of fault really happened (else this test proves nothing).
    assert server_errors > 0 and faults.get("reset", 0) > 0
    assert faults.get("hang", 0) > 0 and faults.get("malformed", 0) > 0
    injected = server_errors + faults["reset"] + faults["hang"] + faults["malformed"]
    # A few percent of faults are absorbed by retries: nothing fails for them.
    assert books.status["failed"] == 0, books.status["failures"]
    assert sum(attempts - 1 for _, _, attempts in books.calls) == injected
    assert len(books.calls) == good_replies(server)
    assert {"accept", "reject"} <= set(books.decisions())
    assert any(r["adjudication"] for r in books.rows)


def test_dribbled_replies(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every body arrives in 16 pieces over 0.3 s; the read timeout covers the whole body."""
    dribble, tasks = 0.3, 12
    server.control(dribble=dribble, rules=mixed_panel_rules())
    config = write_config(tmp_path / "gra.toml", generators=[server.base_url],
                          reviewers=server.base_url, adjudicator=server.base_url,
                          endpoint={"read_timeout": 5}, run={"max_tasks": tasks})
    result = run_with(config, tmp_path / "run", capsys, "--target", str(UNREACHABLE_TARGET),
                      "--concurrency", "16")
    books = assert_books_balance(tmp_path / "run", result, capsys, planned=tasks)
    assert books.status["failed"] == 0
    assert all(attempts == 1 for _, _, attempts in books.calls)
    assert len(books.calls) == good_replies(server)
    with sqlite3.connect(tmp_path / "run" / "journal.sqlite") as conn:
        latencies = [float(x) for (x,) in conn.execute("SELECT latency FROM calls")]
        contents = [str(c) for (c,) in conn.execute("SELECT content FROM calls")]
    assert min(latencies) >= dribble * 0.9  # the whole body was waited for ...
    for content in contents:  # ... and reassembled: every reply is whole JSON
        orjson.loads(content)


def test_truncated_replies(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Half the replies are cut in half with finish_reason "length": re-asked within the
    budget; tasks out of budget fail saying the reply was cut off, reviews never score 0."""
    server.control(truncate_rate=0.5, seed=3, rules=mixed_panel_rules())
    tasks = 40
    config = write_config(tmp_path / "gra.toml", generators=[server.base_url],
                          reviewers=server.base_url, adjudicator=server.base_url,
                          run={"max_tasks": tasks})
    result = run_with(config, tmp_path / "run", capsys, "--target", str(UNREACHABLE_TARGET),
                      "--concurrency", "8")
    books = assert_books_balance(tmp_path / "run", result, capsys, planned=tasks)
    truncated = server.stats()["faults"]["truncated"]
    assert truncated > 0
    # Truncated replies are whole HTTP answers: journaled, then found invalid and re-asked.
    assert len(books.calls) == good_replies(server)
    failed = [r for r in books.rows if r["decision"] == "failed"]
    failed_reviews = [f for r in books.rows for f in r.get("failed_reviews", [])]
    assert failed or failed_reviews, "at 50% truncation some call should run out of budget"
    for item in [*(r["reason"] for r in failed), *(f["error"] for f in failed_reviews)]:
        assert "after 3 tries" in item and "cut off" in item, item
    for row in books.rows:
        for rev in row["reviews"]:
            assert set(rev["scores"]) == set(CRITERIA)
            assert all(1 <= s <= 10 for s in rev["scores"].values())


def test_schema_breaking_replies(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Garbage from each role for a while, then good replies. One task at a time, so the
    fate of every task is known in advance."""
    bad_scores = json.dumps({"scores": dict.fromkeys(CRITERIA, 42), "feedback": "wow"})
    rules = [
        {"model": GEN, "content": '{"instruction": "", "response": "..."}', "times": 3},
        {"model": REV_B, "content": "I liked it a lot!", "times": 6},
        {"model": REV_C, "content": bad_scores, "times": 9},
        {"model": ADJ, "content": '{"decision": "maybe"}', "times": 3},
        {"model": REV_B, "content": review(9)},
        {"model": REV_C, "content": review(5)},  # mean 7, std 2: disagreement -> adjudicator
        {"model": ADJ, "content": verdict("accept")},
    ]
    server.control(rules=rules, latency=0.0, jitter=0.0)
    config = write_config(tmp_path / "gra.toml", generators=[server.base_url],
                          reviewers=server.base_url, adjudicator=server.base_url,
                          run={"max_tasks": 10}, gate={"min_reviews": 1})  # partial panels decide
    result = run_with(config, tmp_path / "run", capsys, "--target", "3", "--concurrency", "1")
    books = assert_books_balance(tmp_path / "run", result, capsys)
    rows = sorted(books.rows, key=lambda r: str(r["id"]))
    assert [r["id"] for r in rows] == [f"r1-{i:07d}" for i in range(7)]
    assert [r["decision"] for r in rows] == ["failed", "failed", "failed", "accept", "failed",
                                             "accept", "accept"]
    reasons = [str(r.get("reason", "")) for r in rows]

    def says(reason: str, *parts: str) -> bool:
        return all(part in reason for part in parts)

    assert says(reasons[0], "generator", GEN, "after 3 tries", "instruction is empty"), reasons
    assert reasons[1] == reasons[2], reasons
    assert reasons[1].startswith("no valid review"), reasons
    assert says(reasons[1], "reviewer", REV_B, "after 3 tries", "not JSON"), reasons
    assert says(reasons[4], "adjudicator", ADJ, "after 3 tries", "decision"), reasons
    # Task 3: rev-c's out-of-range scores are a recorded failed review, never a zero score;
    # rev-b alone decides.
    lone = rows[3]
    assert [r["model"] for r in lone["reviews"]] == [REV_B] and lone["mean"] == 9
    (failed_review,) = lone["failed_reviews"]
    assert failed_review["model"] == REV_C and "outside 1-10" in failed_review["error"]
    assert all(r["adjudication"]["decision"] == "accept" for r in rows[5:])
    assert server.stats()["rule_hits"][:4] == [3, 6, 9, 3]  # every bad reply asked for again


@pytest.mark.parametrize("down_mode", ["503", "refuse"])
def test_generator_replica_goes_down_and_comes_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], down_mode: str
) -> None:
    """Two replicas serve the generator; one goes down for 1 s mid-run. The other takes the
    load (no task fails), the cooled-down one gets traffic again once it is back."""
    outage = 1.0
    servers = [start_fake_server(latency=0.02, jitter=0.005) for _ in range(3)]
    try:
        steady, flaky, panel = servers
        panel.control(rules=mixed_panel_rules())
        # Enough work to outlast the outage with room to spare: with 200 tasks a clean-clone
        # CI run once saw no generator retry at all.
        tasks = 400
        # The flaky replica is listed first: it wins ties on load, so once it is healthy
        # again it takes most of the work, which makes its recovery plain to see.
        config = write_config(
            tmp_path / "gra.toml", generators=[flaky.base_url, steady.base_url],
            reviewers=panel.base_url, adjudicator=panel.base_url,
            endpoint={"cooldown_after": 2, "cooldown": 0.1, "read_timeout": 2,
                      "connect_timeout": 1},
            run={"max_tasks": tasks},
        )
        seen: dict[str, int] = {}

        def saboteur() -> None:
            deadline = time.monotonic() + 30
            while flaky.stats()["chat_requests"] < 10 and time.monotonic() < deadline:
                time.sleep(0.02)
            seen["before"] = flaky.stats()["chat_requests"]
            if down_mode == "refuse":  # the socket closes: only the timer can bring it back
                flaky.control(down=True, down_mode="refuse", down_for=outage)
                time.sleep(outage + 0.2)
            else:
                flaky.control(down=True, down_mode="503")
                time.sleep(outage)
                flaky.control(down=False)
            seen["back"] = flaky.stats()["chat_requests"]

        thread = threading.Thread(target=saboteur, daemon=True)
        thread.start()
        result = run_with(config, tmp_path / "run", capsys, "--target", str(UNREACHABLE_TARGET),
                          "--concurrency", "6")
        thread.join(timeout=10)
        books = assert_books_balance(tmp_path / "run", result, capsys, planned=tasks)

        assert {"before", "back"} <= set(seen), "the run ended before the outage was over"
        assert books.status["failed"] == 0, books.status["failures"]
        flaky_stats = flaky.stats()
        # The outage was felt (503s or refused/reset connections) and retried elsewhere ...
        retried = sum(attempts - 1 for role, _, attempts in books.calls if role == "generator")
        assert retried >= 1
        # ... and the replica got work again after it came back.
        assert flaky_stats["chat_requests"] - seen["back"] >= 20, (seen, flaky_stats)
        generator_endpoints = Counter(e for role, e, _ in books.calls if role == "generator")
        assert {f"{GEN}@{steady.base_url}", f"{GEN}@{flaky.base_url}"} == set(generator_endpoints)
        # Replies the servers sent all reached the journal exactly once.
        if down_mode == "503":
            probes = 5  # GET /v1/models once per endpoint: 2 generators, 3 panel models
            sent = sum(s.stats()["status"].get("200", 0) for s in servers) - probes
            assert len(books.calls) == sent
    finally:
        for s in servers:
            s.close()


def test_faults_with_target_reached_leave_nothing_in_progress(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Faults plus the target cut-off: tasks in flight at the target go back to `planned`,
    and a second run with a higher target picks them up."""
    server.control(error_rate=0.05, reset_rate=0.02, malformed_rate=0.02, seed=5,
                   rules=[{"contains": "Score the sample", "content": review(9)}])
    config = write_config(tmp_path / "gra.toml", generators=[server.base_url],
                          reviewers=server.base_url, adjudicator=server.base_url,
                          endpoint={"read_timeout": 1})
    run_dir = tmp_path / "run"
    first = run_with(config, run_dir, capsys, "--target", "25", "--concurrency", "16")
    books = assert_books_balance(run_dir, first, capsys)
    assert books.status["accepted"] == 25
    assert len(books.calls) <= good_replies(server)
    second = run_with(config, run_dir, capsys, "--target", "40", "--concurrency", "16")
    books = assert_books_balance(run_dir, second, capsys)
    assert books.status["accepted"] == 40
    # Only calls cut off in flight at a target (at most --concurrency per run) were answered
    # without reaching the journal; journaled replies were reused, never sent again.
    assert len(books.calls) <= good_replies(server) <= len(books.calls) + 2 * 16


def test_summary_counts_this_sessions_failed_tasks(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.control(rules=[{"model": GEN, "content": "no JSON here"}])
    config = write_config(tmp_path / "gra.toml", generators=[server.base_url],
                          reviewers=server.base_url, adjudicator=server.base_url,
                          run={"max_tasks": 3})
    result = run_with(config, tmp_path / "run", capsys, "--target", "1")
    books = assert_books_balance(tmp_path / "run", result, capsys, planned=3)
    assert books.status["failed"] == 3
    shown = re.findall(r"failed\s+(\d+)", result.out)
    assert shown and shown[-1] == "3", result.out


def test_reasking_an_invalid_reply_changes_the_request(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "gra.toml", generators=[server.base_url],
                          reviewers=server.base_url, adjudicator=server.base_url,
                          run={"max_tasks": 2})
    config.write_text(config.read_text() + "[generation]\nreview_max_tokens = 16\n")
    result = run_with(config, tmp_path / "run", capsys, "--target", "1", "--concurrency", "1")
    assert_books_balance(tmp_path / "run", result, capsys, planned=2)
    bodies = [orjson.dumps(b, option=orjson.OPT_SORT_KEYS)
              for b in server.stats(bodies=True)["bodies"]]
    repeats = Counter(bodies).most_common(1)[0][1]
    assert repeats == 1, f"one request was sent {repeats} times, identically"

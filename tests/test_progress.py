"""The live display tells the truth: each endpoint once with its roles, run totals and this
session's figures labelled as such, `planned` counting down, no phrase broken by a wrap,
and `status` rates over the time sessions ran."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import orjson
import pytest
from rich.console import Console

import gra_async
from gra_async.client import EndpointStats
from gra_async.pipeline import Progress
from gra_async.progress import ProgressDisplay, headline, status_lines
from gra_async.report import status_report
from gra_async.store import Journal, SampleRecord

from .conftest import FakeServer, status_json


def resumed_progress() -> Progress:
    """A second session: 40 accepted, 30 rejected, 5 failed before it; 7 / 4 / 1 in it."""
    progress = Progress(target=100, accepted=47, rejected=34, failed=6, duplicates=3,
                        filtered=1, adjudicated=2, in_progress=12, calls_sent=123456,
                        calls_reused=7890, accepted_at_start=40, finished_at_start=75,
                        failed_at_start=5)
    progress.started = time.monotonic() - 100
    return progress


def stats(label: str, roles: tuple[str, ...]) -> EndpointStats:
    return EndpointStats(label=label, model=label.split("@")[0], in_flight=3, window=64.0,
                         requests=1000, succeeded=990, failed=10, retries=8, rate_limited=2,
                         tokens_in=100_000, tokens_out=50_000, latency_mean=0.5, roles=roles)


class TestStatusLine:
    def test_run_totals_and_this_sessions_figures_are_labelled(self) -> None:
        line = headline(resumed_progress(), plan=1000)
        run, session = line.split("  |  ")
        assert run == "run: accepted 47/100  rejected 34  failed 6  planned 913"
        assert session.startswith("this session: accepted 7  rejected 4 (dup 3, filtered 1)  "
                                  "failed 1  in progress 12  acceptance 58%  adjudicated 2  "
                                  "calls 123456 (+7890 reused)  0.07 accepted/s  ETA ")

    @pytest.mark.parametrize("width", [80, 120])
    def test_a_wrap_never_breaks_a_phrase(self, width: int) -> None:
        display = ProgressDisplay(resumed_progress(), lambda: [
            stats("qwen2.5-7b-instruct@http://127.0.0.1:8001/v1", ("generator",)),
            stats("smollm2@http://127.0.0.1:8002/v1", ("generator", "reviewer", "adjudicator"))],
            plan=1000)
        console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(display.render(width))
        text = console.export_text()
        lines = text.splitlines()
        assert all(len(line) <= width for line in lines)
        lines = [line.rstrip() for line in lines]
        status = [line.strip() for line in lines[:lines.index("endpoints, this session")]]
        run_phrases, session_phrases = (part.split("  ") for part in
                                        headline(resumed_progress(), 1000).split("  |  "))
        for phrase in run_phrases + session_phrases:
            if phrase.startswith("ETA") or "accepted/s" in phrase:
                continue  # moves with the clock
            assert any(phrase in line for line in status), (phrase, status)
        assert status[0].startswith("run: ") and any(
            line.startswith("this session: ") for line in status)
        assert text.count("smollm2@") == 1 and "gen,rev,adj" in text
        table = lines[lines.index("endpoints, this session") + 1:]
        assert "…" not in table[0] and len(table) == 3  # every header whole, a line per endpoint

    def test_planned_only_goes_down(self) -> None:
        progress = resumed_progress()
        seen = []
        for change in ("start", "finish", "park", "finish", "cancel"):
            if change == "finish":
                progress.accepted += 1
            elif change in ("park", "cancel"):
                progress.in_progress -= 1  # back to `planned` in the journal, unfinished
            run = status_lines(progress, 200, plan=1000)[0]
            seen.append(int(run.split("planned ")[1].split()[0]))
        assert seen == sorted(seen, reverse=True) and seen[0] > seen[-1]


def test_one_server_in_three_roles_appears_once(fake_server: FakeServer, tmp_path: Path) -> None:
    url = fake_server.base_url
    one = [{"base_url": url, "model": "gen-a"}]
    config = gra_async.RunConfig.model_validate({
        "run": {"run_dir": str(tmp_path), "target": 2},
        "endpoints": {"generator": one, "reviewer": one, "adjudicator": one}})

    async def go() -> list[EndpointStats]:
        async with gra_async.Synthesizer(config) as synth:
            await synth.run()
            return synth.endpoint_stats()

    (only,) = asyncio.run(go())
    assert only.roles == ("generator", "reviewer", "adjudicator")
    # Calls in flight when the target is reached are cut off: the server may have seen them.
    assert only.succeeded <= fake_server.stats()["chat_requests"] <= only.succeeded + only.abandoned
    (row,) = status_json(tmp_path)["endpoints"]
    assert row["roles"] == ["generator", "reviewer", "adjudicator"]


def test_status_rates_leave_out_the_time_between_sessions(tmp_path: Path) -> None:
    """Two sessions, at t=100 and t=1000, each with calls for 50 s: 100 s of work, not 950."""
    async def make() -> None:
        journal = Journal.open(tmp_path, {"test": 1})
        journal.start()
        for i in range(4):
            journal.record_sample(SampleRecord(f"r1-{i}", 1, i, "accepted", "d", (), {}))
        await journal.close()

    asyncio.run(make())
    conn = sqlite3.connect(tmp_path / "journal.sqlite")
    with conn:
        for i, created in enumerate((110.0, 150.0, 1010.0, 1050.0)):
            conn.execute("INSERT INTO calls VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                         (f"k{i}", f"r1-{i}", "generator", "m", "m@u", "", "stop", 1, 1, 0.1, 1,
                          created))
        conn.execute("INSERT INTO meta VALUES ('sessions', ?)",
                     (orjson.dumps([100.0, 1000.0]).decode(),))
    report = status_report(tmp_path)
    assert report["sessions"] == 2 and report["active_seconds"] == pytest.approx(100.0)
    assert report["accepted_per_second"] == pytest.approx(4 / 100)
    # A journal from before sessions were recorded: its calls are one session of their own.
    with conn:
        conn.execute("UPDATE meta SET value = '[1000.0]' WHERE key = 'sessions'")
    report = status_report(tmp_path)
    assert report["sessions"] == 2 and report["active_seconds"] == pytest.approx(40.0 + 50.0)
    conn.close()


def test_each_session_is_recorded(fake_server: FakeServer, tmp_path: Path) -> None:
    from .test_pipeline import fixed_team, review, synthesize

    fake_server.control(rules=[{"model": m, "content": review(9)} for m in ("rev-b", "rev-c")])
    synthesize(tmp_path, endpoints=fixed_team(fake_server), target=2)
    synthesize(tmp_path, endpoints=fixed_team(fake_server), target=4)
    report = status_json(tmp_path)
    assert report["sessions"] == 2 and report["accepted"] == 4
    assert report["accepted_per_second"] == pytest.approx(4 / report["active_seconds"])

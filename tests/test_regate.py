"""`regate`: a finished run decided again under another gate, from its journaled reviews.

The fake server's reviewers score at random (seeded by the prompt), so a run holds panels
of every mean and spread. Its request counters prove what a regate sent: never a
generator or reviewer call, an adjudicator call only for a disputed sample without a
journaled verdict.
"""

from __future__ import annotations

import hashlib
import statistics
from pathlib import Path
from typing import Any

import pytest

import gra_async
from gra_async.cli import main
from gra_async.report import status_report

from .conftest import FakeServer
from .test_pipeline import ADJ, exported, fixed_team, synthesize

OPEN_GATE = {"accept_mean": 1.0, "disagreement_std": 10.0}  # everything accepted, nothing disputed
TASKS = 12


def make_run(server: FakeServer, run_dir: Path) -> list[dict[str, Any]]:
    summary = synthesize(run_dir, endpoints=fixed_team(server), target=TASKS,
                         run={"max_tasks": TASKS}, gate=OPEN_GATE)
    assert summary.accepted == TASKS
    return exported(run_dir)


def digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "journal.sqlite").read_bytes()
                          + (run_dir / "config.json").read_bytes()).hexdigest()


def chat_requests(server: FakeServer) -> dict[str, int]:
    return dict(server.stats()["models"])


class TestRegate:
    def test_a_higher_bar_decides_from_the_reviews_alone(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        samples = make_run(fake_server, tmp_path / "src")
        bar = statistics.median(s["mean"] for s in samples)
        before, source = chat_requests(fake_server), digest(tmp_path / "src")
        summary = gra_async.regate(tmp_path / "src", tmp_path / "dst", accept_mean=bar)
        assert chat_requests(fake_server) == before  # no call of any kind
        assert digest(tmp_path / "src") == source  # the source is never written
        want = sorted(s["id"] for s in samples if s["mean"] >= bar)
        assert 0 < len(want) < TASKS
        assert sorted(s["id"] for s in exported(tmp_path / "dst")) == want
        assert summary.accepted == len(want) and summary.rejected == TASKS - len(want)
        assert summary.changed == TASKS - len(want) and summary.adjudicator_calls == 0
        # The reviews and provenance travel unchanged; only the decision is new.
        kept = {s["id"]: s for s in exported(tmp_path / "dst", include_all=True)}
        for sample in samples:
            assert kept[sample["id"]]["reviews"] == sample["reviews"]
            assert kept[sample["id"]]["decision"] == ("accept" if sample["mean"] >= bar else "reject")

    def test_disputed_samples_ask_the_adjudicator_once(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        samples = make_run(fake_server, tmp_path / "src")
        disputed = [s for s in samples if s["std"] > 0.5]
        assert disputed
        adjudicator = [gra_async.EndpointConfig(base_url=fake_server.base_url, model=ADJ)]
        before = chat_requests(fake_server)
        first = gra_async.regate(tmp_path / "src", tmp_path / "dst", disagreement_std=0.5,
                                 endpoints=adjudicator)
        after = chat_requests(fake_server)
        assert {m: after.get(m, 0) - before.get(m, 0) for m in after if after[m] != before.get(m)} \
            == {ADJ: len(disputed)}
        assert first.adjudicator_calls == len(disputed) and first.verdicts_reused == 0
        rows = {s["id"]: s for s in exported(tmp_path / "dst", include_all=True)}
        for sample in disputed:
            assert rows[sample["id"]]["adjudication"]["model"] == ADJ
            assert rows[sample["id"]]["decision"] == rows[sample["id"]]["adjudication"]["decision"]
        # Re-gating the re-gated run with the same gate: every verdict is journaled now.
        second = gra_async.regate(tmp_path / "dst", tmp_path / "dst2", disagreement_std=0.5)
        assert chat_requests(fake_server) == after
        assert second.adjudicator_calls == 0 and second.changed == 0
        assert [s["id"] for s in exported(tmp_path / "dst2")] == [s["id"] for s in exported(tmp_path / "dst")]

    def test_no_adjudicator_lets_the_mean_decide(self, fake_server: FakeServer, tmp_path: Path) -> None:
        samples = make_run(fake_server, tmp_path / "src")
        before = chat_requests(fake_server)
        assert main(["regate", "--run-dir", str(tmp_path / "src"), "--out-run-dir",
                     str(tmp_path / "dst"), "--disagreement-std", "0", "--accept-mean", "5",
                     "--no-adjudicator"]) == 0
        assert chat_requests(fake_server) == before
        assert [s["id"] for s in exported(tmp_path / "dst")] == [
            s["id"] for s in samples if s["mean"] >= 5]

    def test_the_new_run_is_a_run_directory(self, fake_server: FakeServer, tmp_path: Path) -> None:
        make_run(fake_server, tmp_path / "src")
        gra_async.regate(tmp_path / "src", tmp_path / "dst", accept_mean=6.0)
        got = status_report(tmp_path / "dst")
        assert got["in_progress"] == 0 and got["accepted"] + got["rejected"] == TASKS
        assert main(["export", "--run-dir", str(tmp_path / "dst"), "--format", "alpaca"]) == 0
        # A resume with the new gate and a higher target continues it: only new tasks run.
        kept = [s["id"] for s in exported(tmp_path / "dst")]
        more = synthesize(tmp_path / "dst", endpoints=fixed_team(fake_server),
                          target=got["accepted"] + 2,
                          gate={**OPEN_GATE, "accept_mean": 6.0}, run={"max_tasks": 40})
        assert more.reached_target and more.calls_reused == 0
        now = [s["id"] for s in exported(tmp_path / "dst")]
        assert now[:len(kept)] == kept and len(now) == len(kept) + 2
        assert status_report(tmp_path / "dst")["accepted"] == len(kept) + 2
        assert not (tmp_path / "dst.partial").exists()


class TestRegateRefuses:
    def test_a_needed_adjudicator_without_endpoints(
        self, fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        make_run(fake_server, tmp_path / "src")
        code = main(["regate", "--run-dir", str(tmp_path / "src"), "--out-run-dir",
                     str(tmp_path / "dst"), "--disagreement-std", "0"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert "--endpoint adjudicator=" in err and "--no-adjudicator" in err
        assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()

    @pytest.mark.parametrize(("flags", "needle"), [
        (["--out-run-dir", "{src}"], "is the source run"),
        (["--out-run-dir", "{existing}"], "exists already"),
        (["--out-run-dir", "{dst}", "--accept-mean", "11"], "gate.accept_mean"),
    ], ids=["same", "exists", "bad-bar"])
    def test_bad_input_is_one_line(
        self, fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        flags: list[str], needle: str,
    ) -> None:
        make_run(fake_server, tmp_path / "src")
        (tmp_path / "existing").mkdir()
        paths = {"src": tmp_path / "src", "existing": tmp_path / "existing", "dst": tmp_path / "d"}
        argv = ["regate", "--run-dir", str(tmp_path / "src"),
                *[f.format(**paths) for f in flags]]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err

    def test_not_a_run(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["regate", "--run-dir", str(tmp_path), "--out-run-dir", str(tmp_path / "d")]) == 2
        assert "no journal.sqlite" in capsys.readouterr().err

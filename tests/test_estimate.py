"""`estimate`: a pilot journaled in the run directory, and a projection that the full run meets."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import gra_async
from gra_async.cli import main
from gra_async.pilot import wilson_interval

from .conftest import FakeServer, status_json
from .test_budget import config, journal_spend, write_config
from .test_pipeline import ADJ, REV_B, review, verdict


@pytest.fixture
def mixed(fake_server: FakeServer) -> FakeServer:
    # rev-c scores at random: some samples pass, some fail, some go to the adjudicator.
    fake_server.control(latency=0.01, rules=[{"model": REV_B, "content": review(8)},
                                            {"model": ADJ, "content": verdict("reject")}])
    return fake_server


class TestWilson:
    @pytest.mark.parametrize(("k", "n", "lo", "hi"), [
        (0, 20, 0.0, 0.161), (20, 20, 0.839, 1.0), (10, 20, 0.299, 0.701), (1, 1, 0.207, 1.0),
    ], ids=["none", "all", "half", "one"])
    def test_known_values(self, k: int, n: int, lo: float, hi: float) -> None:
        got = wilson_interval(k, n)
        assert got == pytest.approx((lo, hi), abs=1e-3)

    def test_no_trials_says_nothing(self) -> None:
        assert wilson_interval(0, 0) == (0.0, 1.0)


class TestEstimate:
    def test_the_projection_meets_the_full_run(self, mixed: FakeServer, tmp_path: Path) -> None:
        target = 60
        conf = config(mixed, tmp_path, target=target)
        got = gra_async.estimate(conf, tasks=20)
        assert got.pilot_tasks == 20 and 0 < got.pilot_accepted < 20
        lo, hi = got.accept_interval
        assert lo < got.accept_rate < hi
        assert got.projected_cost is not None and got.cost_interval is not None
        assert got.cost_interval[0] < got.projected_cost < got.cost_interval[1]
        pilot_requests = mixed.stats()["chat_requests"]
        assert pilot_requests == got.pilot_calls

        full = gra_async.run(conf)
        assert full.reached_target
        cost = journal_spend(tmp_path)
        # A 20-task pilot knows the acceptance rate to about +-20 points: the honest claim is
        # the interval it gives, not the point (measured: $3.39 projected in [$2.10, $6.63],
        # $2.40 spent, after metadata calls joined every accepted sample).
        low, high = got.cost_interval
        assert low <= cost <= high, (got.projected_cost, got.cost_interval, cost)
        assert abs(got.projected_cost - cost) <= 0.5 * cost, (got.projected_cost, cost)
        with sqlite3.connect(tmp_path / "journal.sqlite") as conn:
            calls = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
        assert got.projected_calls is not None
        assert abs(got.projected_calls - calls) <= 0.5 * calls
        # The pilot's replies were reused, never sent again: every request the server saw
        # is journaled once, or was cut off in flight when the target was reached.
        assert mixed.stats()["chat_requests"] == calls + status_json(tmp_path)["abandoned_calls"]
        print(f"projected ${got.projected_cost:.4f} in {got.cost_interval} vs ${cost:.4f}; "
              f"calls {got.projected_calls} vs {calls}")

    def test_batch_mode_applies_the_discount(self, mixed: FakeServer, tmp_path: Path) -> None:
        online = gra_async.estimate(config(mixed, tmp_path / "a", target=40), tasks=10)
        mixed.reset_stats()  # the same replies again: the server's variants restart
        batch = gra_async.estimate(config(mixed, tmp_path / "b", target=40, mode="batch"),
                                       tasks=10)
        assert online.projected_cost is not None and batch.projected_cost is not None
        assert online.pilot_cost is not None and batch.pilot_cost == pytest.approx(online.pilot_cost)
        # The pilot ran online at full price; what is left is billed at half.
        left = online.projected_cost - online.pilot_cost
        assert batch.projected_cost - batch.pilot_cost == pytest.approx(left / 2, rel=1e-6)
        assert batch.batch_waves is not None and batch.batch_waves >= 3


class TestCli:
    def test_json_and_table(
        self, mixed: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        conf = write_config(tmp_path / "gra.toml", mixed)
        run_dir = tmp_path / "run"
        base = ["estimate", "--config", str(conf), "--run-dir", str(run_dir), "--target", "500"]
        assert main([*base, "--tasks", "8", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        for key in ("projected_cost", "projected_calls", "projected_seconds", "accept_rate"):
            assert key in out, key
        assert out["pilot_tasks"] == 8 and out["target"] == 500
        assert out["projected_calls"] > 8 * 3 and out["projected_seconds"] > 0
        sent = mixed.stats()["chat_requests"]
        # A second estimate on the same directory reuses the pilot: nothing is sent.
        assert main([*base, "--tasks", "8"]) == 0
        table = capsys.readouterr().out
        assert mixed.stats()["chat_requests"] == sent
        assert "accept rate" in table and "95% interval" in table and "target 500" in table
        assert "generator" in table and "reviewer" in table

    def test_bad_tasks_is_exit_2(
        self, mixed: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        conf = write_config(tmp_path / "gra.toml", mixed)
        assert main(["estimate", "--config", str(conf), "--run-dir", str(tmp_path / "r"),
                     "--tasks", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: --tasks 0")

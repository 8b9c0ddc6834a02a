"""`--max-cost` / `run.max_cost`: a budget that holds, against the fake server's reported usage."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

import gra_async
from gra_async.cli import main

from .conftest import FakeServer, status_json
from .test_pipeline import ADJ, GEN, REV_B, REV_C, review, verdict

# Dollars per million tokens: a generation's worst case (768 tokens out) is ~3 cents.
PRICE_IN, PRICE_OUT = 10.0, 30.0


def priced_team(server: FakeServer) -> dict[str, Any]:
    url = server.base_url
    price = {"price_in": PRICE_IN, "price_out": PRICE_OUT}
    return {"generator": [{"base_url": url, "model": GEN, **price}],
            "reviewer": [{"base_url": url, "model": REV_B, **price},
                         {"base_url": url, "model": REV_C, **price}],
            "adjudicator": [{"base_url": url, "model": ADJ, **price}]}


def journal_spend(run_dir: Path) -> float:
    """What the servers reported, priced: the bill the budget is about."""
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        t_in, t_out = conn.execute(
            "SELECT sum(prompt_tokens), sum(completion_tokens) FROM calls").fetchone()
    return float((t_in or 0) * PRICE_IN + (t_out or 0) * PRICE_OUT) / 1e6


def config(server: FakeServer, run_dir: Path, **run: Any) -> gra_async.RunConfig:
    return gra_async.RunConfig.model_validate(
        {"run": {"run_dir": str(run_dir), "concurrency": 8, **run},
         "endpoints": priced_team(server)})


@pytest.fixture
def scored(fake_server: FakeServer) -> FakeServer:
    # Half the samples accepted: rev-c scores at random, the adjudicator rejects.
    fake_server.control(latency=0.01, rules=[{"model": REV_B, "content": review(9)},
                                            {"model": ADJ, "content": verdict("reject")}])
    return fake_server


def write_config(path: Path, server: FakeServer, *, prices: bool = True) -> Path:
    lines = []
    for role, models in (("generator", [GEN]), ("reviewer", [REV_B, REV_C]),
                         ("adjudicator", [ADJ])):
        for model in models:
            lines += [f"[[endpoints.{role}]]", f'base_url = "{server.base_url}"',
                      f'model = "{model}"']
            if prices:
                lines += [f"price_in = {PRICE_IN}", f"price_out = {PRICE_OUT}"]
    path.write_text("\n".join(lines) + "\n")
    return path


class TestApi:
    def test_stops_at_the_budget_and_resumes_past_it(self, scored: FakeServer, tmp_path: Path) -> None:
        budget = 0.25
        first = gra_async.run(config(scored, tmp_path, target=200, max_cost=budget))
        assert first.stop_reason == "budget" and not first.reached_target
        assert first.budget == budget
        billed = journal_spend(tmp_path)
        # Every call the server answered is journaled (the calls in flight at the stop were
        # let finish), and together they stay within the budget.
        assert scored.stats()["chat_requests"] == first.calls
        assert first.spent == pytest.approx(billed)
        assert billed <= budget
        assert billed > 0.8 * budget, "stopped long before the budget was used"
        assert first.explain().startswith(f"budget reached: spent ${first.spent:.4f} of the $0.2500 budget")
        got = status_json(tmp_path)
        assert got["budget"] == budget and got["cost"] == pytest.approx(billed)
        assert got["in_progress"] == 0

        # The same budget again: what the journal says was spent counts, so almost nothing
        # more goes out, and the total still holds.
        again = gra_async.run(config(scored, tmp_path, target=200, max_cost=budget))
        assert again.stop_reason == "budget"
        assert journal_spend(tmp_path) <= budget
        assert again.spent == pytest.approx(journal_spend(tmp_path))

        # A higher budget continues where it stopped, reusing every journaled reply.
        more = gra_async.run(config(scored, tmp_path, target=first.accepted + 2, max_cost=10.0))
        assert more.reached_target and more.stop_reason == "target"
        assert more.spent == pytest.approx(journal_spend(tmp_path))
        assert more.spent is not None and more.spent > billed

    def test_no_budget_counts_spend_and_never_stops(self, scored: FakeServer, tmp_path: Path) -> None:
        summary = gra_async.run(config(scored, tmp_path, target=3))
        assert summary.reached_target and summary.budget is None
        assert summary.spent == pytest.approx(journal_spend(tmp_path))
        assert status_json(tmp_path)["budget"] is None

    def test_a_budget_below_one_call_sends_nothing(self, scored: FakeServer, tmp_path: Path) -> None:
        summary = gra_async.run(config(scored, tmp_path, target=5, max_cost=0.0001))
        assert summary.stop_reason == "budget" and summary.calls == 0
        assert scored.stats()["chat_requests"] == 0
        assert status_json(tmp_path)["planned"] >= 5


class TestCli:
    def test_exit_3_with_one_line(
        self, scored: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        conf = write_config(tmp_path / "gra.toml", scored)
        run_dir = tmp_path / "run"
        code = main(["run", "--config", str(conf), "--run-dir", str(run_dir), "--target", "200",
                     "--concurrency", "8", "--max-cost", "0.2"])
        assert code == 3
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1, err
        assert err[0].startswith("budget reached: spent $")
        assert "of the $0.2000 budget" in err[0]
        assert err[0].endswith("rerun with a higher --max-cost to continue")
        assert journal_spend(run_dir) <= 0.2
        assert status_json(run_dir)["budget"] == 0.2

    def test_a_budget_without_prices_is_exit_2(
        self, scored: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        conf = write_config(tmp_path / "gra.toml", scored, prices=False)
        code = main(["run", "--config", str(conf), "--run-dir", str(tmp_path / "run"),
                     "--max-cost", "5"])
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [err[0]] and "run.max_cost: no endpoint has a price" in err[0]
        assert scored.stats()["chat_requests"] == 0

    @pytest.mark.parametrize("value", ["0", "-1", "lots"])
    def test_a_bad_budget_is_exit_2(
        self, scored: FakeServer, tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str],
    ) -> None:
        conf = write_config(tmp_path / "gra.toml", scored)
        code = main(["run", "--config", str(conf), "--run-dir", str(tmp_path / "run"),
                     f"--max-cost={value}"])
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "max" in err[0]

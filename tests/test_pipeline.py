"""The GRA pipeline end to end through the Python API, against the fake server with scripted
reviewer and adjudicator replies. (The CLI's own contracts: test_api.py, test_bad_input.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import gra_async
from gra_async.cli import main
from gra_async.defaults import CRITERIA
from gra_async.report import status_report

from .conftest import FakeServer

GEN, REV_B, REV_C, ADJ = "gen-a", "rev-b", "rev-c", "adj-d"


def review(score: int, feedback: str = "fine") -> str:
    return json.dumps({"scores": dict.fromkeys(CRITERIA, score), "feedback": feedback})


def verdict(decision: str) -> str:
    return json.dumps({"decision": decision, "reason": f"the adjudicator says {decision}"})


def sample(instruction: str, response: str) -> str:
    return json.dumps({"instruction": instruction, "response": response})


def fixed_team(server: FakeServer) -> dict[str, Any]:
    url = server.base_url
    return {"generator": [{"base_url": url, "model": GEN}],
            "reviewer": [{"base_url": url, "model": REV_B}, {"base_url": url, "model": REV_C}],
            "adjudicator": [{"base_url": url, "model": ADJ}]}


def synthesize(
    run_dir: Path, *, endpoints: dict[str, Any], target: int, **sections: Any,
) -> gra_async.RunSummary:
    """One run through the API; `sections` are config tables, `run=` merged with the target."""
    run = {"run_dir": str(run_dir), "target": target, **sections.pop("run", {})}
    config = gra_async.RunConfig.model_validate({"run": run, "endpoints": endpoints, **sections})
    return gra_async.run(config)


def exported(run_dir: Path, *, include_all: bool = False) -> list[dict[str, Any]]:
    return [s.model_dump() for s in gra_async.read_samples(run_dir, include_all=include_all)]


def status(run_dir: Path) -> dict[str, Any]:
    return status_report(run_dir)


class TestGate:
    def test_agreeing_high_scores_accept(self, fake_server: FakeServer, tmp_path: Path) -> None:
        fake_server.control(rules=[{"model": REV_B, "content": review(9)},
                                   {"model": REV_C, "content": review(8)}])
        summary = synthesize(tmp_path, endpoints=fixed_team(fake_server), target=4)
        assert summary.reached_target
        rows = exported(tmp_path)
        assert len(rows) == 4
        for row in rows:
            assert row["decision"] == "accept" and row["adjudication"] is None
            assert row["generator"] == GEN
            assert [r["model"] for r in row["reviews"]] == [REV_B, REV_C]
            assert row["mean"] == pytest.approx(8.5) and row["std"] == pytest.approx(0.5)
            assert row["reviews"][0]["scores"] == dict.fromkeys(CRITERIA, 9)
            assert row["tokens"] > 0 and row["instruction"] and row["response"]
        assert fake_server.stats()["models"].get(ADJ, 0) == 0
        got = status(tmp_path)
        assert got["accepted"] == 4 and got["in_progress"] == 0
        # Tasks cut off at the target keep their journaled calls for a later, larger run.
        assert 4 * 3 <= got["calls"] <= fake_server.stats()["chat_requests"]

    def test_agreeing_low_scores_reject(self, fake_server: FakeServer, tmp_path: Path) -> None:
        fake_server.control(rules=[{"model": REV_B, "content": review(2)},
                                   {"model": REV_C, "content": review(3)}])
        summary = synthesize(tmp_path, endpoints=fixed_team(fake_server), target=2,
                             run={"max_tasks": 6})
        assert summary.stop_reason == "plan_exhausted" and summary.accepted == 0
        assert summary.explain().startswith("plan exhausted: 0 of 2")
        rows = exported(tmp_path, include_all=True)
        assert len(rows) == 6 and {r["decision"] for r in rows} == {"reject"}

    @pytest.mark.parametrize("outcome", ["accept", "reject"])
    def test_disagreement_goes_to_adjudicator(
        self, fake_server: FakeServer, tmp_path: Path, outcome: str,
    ) -> None:
        fake_server.control(rules=[{"model": REV_B, "content": review(9)},
                                   {"model": REV_C, "content": review(2)},
                                   {"model": ADJ, "content": verdict(outcome)}])
        summary = synthesize(tmp_path, endpoints=fixed_team(fake_server), target=3,
                             run={"max_tasks": 3})
        assert summary.adjudicated == 3
        rows = exported(tmp_path, include_all=True)
        assert len(rows) == 3
        for row in rows:
            assert row["std"] == pytest.approx(3.5)  # far above the 1.5 threshold
            assert row["adjudication"] == {"model": ADJ, "decision": outcome,
                                           "reason": f"the adjudicator says {outcome}"}
            assert row["decision"] == outcome
        assert fake_server.stats()["models"][ADJ] == 3

    def test_invalid_review_is_retried_then_recorded_failed(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        """With a quorum of one, a sample may be decided by the reviews that were valid;
        the invalid one is recorded with its reason, never as a silent zero."""
        fake_server.control(rules=[{"model": REV_B, "content": "I liked it a lot!"},
                                   {"model": REV_C, "content": review(9)}])
        synthesize(tmp_path, endpoints=fixed_team(fake_server), target=2,
                   run={"concurrency": 1}, gate={"min_reviews": 1})
        rows = exported(tmp_path)
        assert len(rows) == 2
        for row in rows:
            assert [r["model"] for r in row["reviews"]] == [REV_C]
            (failed,) = row["failed_reviews"]
            assert failed["model"] == REV_B and "invalid reviewer reply after 3 tries" in failed["error"]
        assert fake_server.stats()["models"][REV_B] == 2 * 3  # first try + 2 re-asks each

    def test_below_the_quorum_a_sample_is_not_decided(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        """The default quorum is the whole panel: one invalid review of two fails the task
        (its reviewers' fault), and nothing is accepted on half a panel."""
        fake_server.control(rules=[{"model": REV_B, "content": "I liked it a lot!"},
                                   {"model": REV_C, "content": review(9)}])
        summary = synthesize(tmp_path, endpoints=fixed_team(fake_server), target=1,
                             run={"max_tasks": 2, "concurrency": 1})
        assert summary.accepted == 0 and summary.failed == 2
        assert summary.stop_reason == "all_failed"
        assert all("below the quorum of 2" in kind for kind in summary.failures)

    def test_no_valid_review_fails_the_task_with_reason(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        fake_server.control(rules=[{"model": REV_B, "content": "{}"},
                                   {"model": REV_C, "content": '{"scores": {}}'}])
        summary = synthesize(tmp_path, endpoints=fixed_team(fake_server), target=1,
                             run={"max_tasks": 2})
        assert summary.stop_reason == "all_failed"
        got = status(tmp_path)
        assert got["failed"] == 2 and got["accepted"] == 0
        assert any(reason.startswith("no valid review") for reason in got["failures"])


class TestRolesAndAblations:
    def test_rotate_never_reviews_own_sample(self, fake_server: FakeServer, tmp_path: Path) -> None:
        url = fake_server.base_url
        team = {"reviewer": [{"base_url": url, "model": m} for m in (GEN, REV_B, REV_C)]}
        fake_server.control(rules=[{"contains": "Score the sample", "content": review(9)}])
        synthesize(tmp_path, endpoints=team, target=12, run={"roles": "rotate"})
        rows = exported(tmp_path)
        assert len(rows) == 12
        assert {r["generator"] for r in rows} == {GEN, REV_B, REV_C}  # every model generates
        for row in rows:
            reviewers = {r["model"] for r in row["reviews"]}
            assert row["generator"] not in reviewers and len(reviewers) == 2

    @pytest.mark.parametrize("panel", [0, 1])
    def test_reviewers_ablation(self, fake_server: FakeServer, tmp_path: Path, panel: int) -> None:
        fake_server.control(rules=[{"contains": "Score the sample", "content": review(9)}])
        synthesize(tmp_path, endpoints=fixed_team(fake_server), target=4,
                   run={"reviewers": panel, "concurrency": 1})
        rows = exported(tmp_path)
        assert len(rows) == 4 and all(len(r["reviews"]) == panel for r in rows)
        models = fake_server.stats()["models"]
        assert models.get(REV_B, 0) + models.get(REV_C, 0) == 4 * panel

    def test_no_adjudicator_lets_the_mean_decide(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        fake_server.control(rules=[{"model": REV_B, "content": review(10)},
                                   {"model": REV_C, "content": review(5)}])
        synthesize(tmp_path, endpoints=fixed_team(fake_server), target=3,
                   gate={"adjudicator": False})
        rows = exported(tmp_path)
        assert len(rows) == 3 and all(r["adjudication"] is None for r in rows)
        assert all(r["mean"] == pytest.approx(7.5) for r in rows)  # >= 7.0 accepts
        assert fake_server.stats()["models"].get(ADJ, 0) == 0

    def test_rounds_grow_the_seed_pool(self, fake_server: FakeServer, tmp_path: Path) -> None:
        seeds = tmp_path / "seeds.jsonl"
        seeds.write_text(
            '{"instruction": "Add 2 and 2.", "response": "4", "domain": "math"}\n'
            '{"instruction": "Multiply 3 by 5.", "response": "15", "domain": "math"}\n'
        )
        fake_server.control(rules=[{"contains": "Score the sample", "content": review(9)}])
        synthesize(tmp_path / "run", endpoints=fixed_team(fake_server), target=8,
                   run={"rounds": 2}, planner={"seeds": str(seeds)})
        rows = exported(tmp_path / "run")
        assert len(rows) == 8
        first = [r for r in rows if r["round"] == 1]
        second = [r for r in rows if r["round"] == 2]
        assert len(first) == 4 and len(second) == 4
        assert all(not any(s.startswith("r1-") for s in r["seed_ids"]) for r in first)
        # Round 2 draws 3 few-shot examples from 2 seeds + 4 accepted: at least one is new.
        assert all(any(s.startswith("r1-") for s in r["seed_ids"]) for r in second)


class TestDedup:
    def test_exact_and_near_duplicates_and_seed_copies(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        text = ("Explain how a binary search finds an item in a sorted list of numbers, "
                "and say why it needs the list to be sorted before it starts.")
        answer = ("It compares the middle item with the target and discards the half that "
                  "cannot hold it, repeating until the item is found or nothing is left. "
                  "Each step halves the part of the list still in play, so a list of a "
                  "million numbers needs about twenty comparisons at most. If the list were "
                  "not sorted, the comparison with the middle item would say nothing about "
                  "which half holds the target, and the search could discard the very half "
                  "that contains it.")
        seeds = tmp_path / "seeds.jsonl"
        seed_text = "Name the capital of France and say one thing it is known for."
        seed_answer = "Paris, known for the Eiffel Tower and its museums."
        seeds.write_text(json.dumps({"instruction": seed_text, "response": seed_answer,
                                     "domain": "facts"}) + "\n")
        fake_server.control(rules=[
            {"contains": "Score the sample", "content": review(9)},
            {"model": GEN, "content": sample(text, answer), "times": 1},
            {"model": GEN, "content": sample(text, answer), "times": 1},  # exact copy
            {"model": GEN, "content": sample(text.replace("numbers", "integers"), answer),
             "times": 1},  # near copy
            {"model": GEN, "content": sample(seed_text, seed_answer), "times": 1},  # seed copy
            {"model": GEN, "content": sample(seed_text, "Lyon, for its food."), "times": 1},
        ])
        synthesize(tmp_path / "run", endpoints=fixed_team(fake_server), target=3,
                   run={"concurrency": 1}, planner={"seeds": str(seeds)})
        rows = exported(tmp_path / "run", include_all=True)
        by_id = {r["id"]: r for r in rows}
        first = [by_id[f"r1-{i:07d}"] for i in range(5)]
        assert [r["decision"] for r in first] == ["accept"] + ["duplicate"] * 4
        assert first[1]["duplicate_of"] == first[0]["id"]
        assert first[2]["duplicate_of"] == first[0]["id"]
        assert first[3]["duplicate_of"].startswith("seed:")  # the whole seed copied
        assert first[4]["duplicate_of"].startswith("seed:")  # its instruction copied
        assert sum(r["decision"] == "accept" for r in rows) == 3


def fixed_args(server: FakeServer, run_dir: Path, *extra: str) -> list[str]:
    url = server.base_url
    return ["run", "--run-dir", str(run_dir), "--endpoint", f"generator={GEN}@{url}",
            "--endpoint", f"reviewer={REV_B}@{url}", "--endpoint", f"reviewer={REV_C}@{url}",
            "--endpoint", f"adjudicator={ADJ}@{url}", *extra]


class TestBadInput:
    @pytest.mark.parametrize(
        ("content", "needle"),
        [
            ('{"instruction": "a", "response": "b"}\n{"instruction": "c", "resp\n', ":2:"),
            ('{"instruction": "a", "response": "b"}\n[1, 2]\n', ":2:"),
            ('{"question_text": "a", "reply": "b"}\n', ":1:"),
            ("", "empty"),
        ],
        ids=["bad-json", "not-object", "no-fields", "empty"],
    )
    def test_malformed_seeds_exit_2_with_file_line(
        self, fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        content: str, needle: str,
    ) -> None:
        seeds = tmp_path / "seeds.jsonl"
        seeds.write_text(content)
        code = main(fixed_args(fake_server, tmp_path / "run", "--seeds", str(seeds)))
        err = capsys.readouterr().err
        assert code == 2
        assert err.count("\n") == 1 and "Traceback" not in err
        assert str(seeds) in err and needle in err

    def test_unreachable_endpoint_exits_2_naming_it(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code = main(["run", "--run-dir", str(tmp_path), "--endpoint",
                     "generator=m@http://127.0.0.1:9/v1"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1
        assert "m@http://127.0.0.1:9/v1" in err

    def test_model_not_served_exits_2(
        self, fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code = main(["run", "--run-dir", str(tmp_path), "--endpoint",
                     f"generator=nope@{fake_server.base_url}"])
        err = capsys.readouterr().err
        assert code == 2 and "'nope' is not served there" in err


def test_cost_from_configured_prices(fake_server: FakeServer, tmp_path: Path) -> None:
    url = fake_server.base_url
    team = {"generator": [{"base_url": url, "model": GEN, "price_in": 1.0, "price_out": 2.0}],
            "reviewer": [{"base_url": url, "model": REV_B, "price_in": 0.5}]}
    fake_server.control(rules=[{"model": REV_B, "content": review(9)}])
    summary = synthesize(tmp_path, endpoints=team, target=2, run={"concurrency": 1})
    got = status(tmp_path)
    # Per model, whatever the role: the generator's model also writes the metadata.
    rows: dict[str, dict[str, int]] = {}
    for row in got["by_model"]:
        tally = rows.setdefault(row["model"], {"prompt_tokens": 0, "completion_tokens": 0})
        tally["prompt_tokens"] += row["prompt_tokens"]
        tally["completion_tokens"] += row["completion_tokens"]
    expected = (rows[GEN]["prompt_tokens"] * 1.0 + rows[GEN]["completion_tokens"] * 2.0
                + rows[REV_B]["prompt_tokens"] * 0.5) / 1e6
    assert got["cost"] == pytest.approx(expected) and expected > 0
    assert summary.cost == pytest.approx(expected)


def test_summary_names_failure_kinds(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The CLI's final table lists the kinds of failure."""
    fake_server.control(rules=[{"contains": "Score the sample", "content": "no idea"}])
    assert main(fixed_args(fake_server, tmp_path, "--target", "1", "--max-tasks", "2",
                           "--concurrency", "1")) == 3
    out = capsys.readouterr().out
    assert "failed x2: no valid review" in out

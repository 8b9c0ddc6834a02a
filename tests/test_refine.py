"""`refine` (GRA-Refined): an existing dataset reviewed, its rejected samples rewritten.

The fake server is scripted by the text of each seed: a reviewer's score depends on words
in the sample it reviews, the generator's rewrite on words in the sample it is shown. So
each seed's fate is known in advance: kept, rewritten, dropped, or adjudicated.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import gra_async
from gra_async.cli import main
from gra_async.report import status_report

from .conftest import FakeServer
from .test_pipeline import ADJ, GEN, REV_B, REV_C, exported, fixed_team, review, sample, verdict

# Seed words -> what the scripted team does with them.
GOOD = "solid"  # both reviewers 9: kept
FIXABLE = "sloppy"  # both 2; the rewrite is "polished": both 9 -> rewritten
HOPELESS = "garbled"  # both 2; the rewrite is "muddled": both 2 -> dropped
DISPUTED = "contested"  # 9 and 2: the adjudicator accepts -> kept, adjudicated
TOPICS = ["rivers", "volcanoes", "tides", "glaciers", "deserts", "forests", "comets",
          "bridges", "engines", "orchards", "harbours", "lighthouses"]


def rules() -> list[dict[str, Any]]:
    return [
        {"model": GEN, "contains": FIXABLE,
         "content": sample("Explain, step by step and with one worked example, how polished "
                           "lenses focus light.", "A polished convex lens bends parallel rays "
                           "so they meet at its focal point; for example a magnifier...")},
        {"model": GEN, "contains": HOPELESS,
         "content": sample("muddled muddled what", "muddled answer without any sense")},
        *({"model": m, "contains": w, "content": review(s)}
          for m in (REV_B, REV_C) for w, s in (("polished", 9), (GOOD, 9), (FIXABLE, 2),
                                                (HOPELESS, 2), ("muddled", 2))),
        {"model": REV_B, "contains": DISPUTED, "content": review(9)},
        {"model": REV_C, "contains": DISPUTED, "content": review(2, "too short, no example")},
        {"model": ADJ, "content": verdict("accept")},
    ]


def seed_rows(kinds: list[str]) -> list[dict[str, str]]:
    return [{"instruction": f"Describe {topic} in a {kind} way, seed number {i}.",
             "response": f"A {kind} account of {topic}: {topic} matter for reason {i * 7}."}
            for i, (kind, topic) in enumerate(zip(kinds, TOPICS, strict=False))]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config(server: FakeServer, run_dir: Path, seeds: Path, **sections: Any) -> dict[str, Any]:
    return {"run": {"run_dir": str(run_dir), **sections.pop("run", {})},
            "planner": {"seeds": str(seeds)}, "endpoints": fixed_team(server), **sections}


KINDS = [GOOD, FIXABLE, HOPELESS, DISPUTED, GOOD, FIXABLE]


class TestRefine:
    def test_kept_rewritten_dropped_and_adjudicated(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        fake_server.control(rules=rules())
        seeds = write_jsonl(tmp_path / "seeds.jsonl", [
            {**row, "id": f"ex-{i}"} for i, row in enumerate(seed_rows(KINDS))])
        # One task at a time: which of two near-copies comes first is then the plan's order.
        summary = gra_async.refine(config(fake_server, tmp_path / "run", seeds,
                                          run={"max_in_flight": 1}))
        assert summary.done and summary.seeds == 6
        rows = {r["source_id"]: r for r in exported(tmp_path / "run", include_all=True)}
        assert set(rows) == {f"ex-{i}" for i in range(6)}
        assert [rows[f"ex-{i}"]["origin"] for i in range(6)] == [
            "kept", "rewritten", "rewritten", "kept", "kept", "rewritten"]
        assert [rows[f"ex-{i}"]["decision"] for i in range(6)] == [
            "accept", "accept", "reject", "accept", "accept", "duplicate"]
        # A kept seed is the seed, word for word, with the panel's reviews.
        assert rows["ex-0"]["instruction"] == seed_rows(KINDS)[0]["instruction"]
        assert rows["ex-0"]["generator"] == "" and rows["ex-0"]["rewrites"] == 0
        assert [r["model"] for r in rows["ex-0"]["reviews"]] == [REV_B, REV_C]
        # A rewrite is the generator's, reviewed again.
        assert rows["ex-1"]["instruction"].startswith("Explain, step by step")
        assert rows["ex-1"]["generator"] == GEN and rows["ex-1"]["mean"] == 9
        assert rows["ex-1"]["rewrites"] == 1
        # Rejected again beyond max_rewrites (1): dropped, with the rewrite's reviews.
        assert rows["ex-2"]["mean"] == 2 and rows["ex-2"]["rewrites"] == 1
        # The disputed seed went to the adjudicator.
        assert rows["ex-3"]["adjudication"]["model"] == ADJ
        # Two seeds rewritten into the same text: the second is a duplicate of the first.
        assert rows["ex-5"]["duplicate_of"] == rows["ex-1"]["id"]
        assert (summary.kept, summary.rewritten, summary.dropped, summary.duplicates) == (3, 1, 2, 1)
        assert summary.rewrites == 3 and summary.adjudicated == 1
        models = fake_server.stats()["models"]
        # Three rewrites; metadata for the four accepted samples; one verdict. The copy is
        # caught before its reviews are paid for.
        assert models[GEN] == 3 + 4 and models[ADJ] == 1
        assert models[REV_B] == models[REV_C] == 6 + 2
        got = status_report(tmp_path / "run")
        assert got["refine"] == {"seeds": 6, "kept": 3, "rewritten": 1, "dropped": 2}
        assert got["accepted"] == 4 and got["in_progress"] == 0
        # The rewrite prompt showed the generator the seed and what the reviewers said.
        bodies = fake_server.stats(bodies=True)["bodies"]
        shown = [json.dumps(b) for b in bodies if b.get("model") == GEN and DISPUTED not in
                 json.dumps(b) and "Reviewers rejected" in json.dumps(b)]
        assert len(shown) == 3 and all("Feedback: fine" in s for s in shown)

    def test_more_rewrites_and_none(self, fake_server: FakeServer, tmp_path: Path) -> None:
        fake_server.control(rules=rules())
        seeds = write_jsonl(tmp_path / "seeds.jsonl", seed_rows([HOPELESS, FIXABLE]))
        none = gra_async.refine(config(fake_server, tmp_path / "none", seeds,
                                       refine={"max_rewrites": 0}))
        assert (none.kept, none.rewritten, none.dropped, none.rewrites) == (0, 0, 2, 0)
        # Two rewrites: the hopeless seed's second rewrite is asked of the first one.
        two = gra_async.refine(config(fake_server, tmp_path / "two", seeds), max_rewrites=2)
        assert (two.kept, two.rewritten, two.dropped, two.rewrites) == (0, 1, 1, 3)
        dropped = [r for r in exported(tmp_path / "two", include_all=True)
                   if r["decision"] == "reject"]
        assert dropped[0]["rewrites"] == 2 and dropped[0]["source_id"] == "1"

    def test_every_export_format_names_the_source(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        fake_server.control(rules=rules())
        seeds = write_jsonl(tmp_path / "seeds.jsonl", seed_rows([GOOD, FIXABLE, HOPELESS]))
        run_dir = tmp_path / "run"
        gra_async.refine(config(fake_server, run_dir, seeds))
        want = [("1", "kept"), ("2", "rewritten")]
        for fmt in ("jsonl", "alpaca", "sharegpt", "openai"):
            out = tmp_path / f"out.{fmt}.jsonl"
            assert main(["export", "--run-dir", str(run_dir), "--format", fmt,
                         "--out", str(out)]) == 0
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            assert [(r["source_id"], r["origin"]) for r in rows] == want, fmt
            assert "reviews" not in rows[0] or fmt == "jsonl"
        import pyarrow.parquet as pq

        assert main(["export", "--run-dir", str(run_dir), "--format", "parquet"]) == 0
        table = pq.read_table(run_dir / "samples.parquet")
        assert list(zip(table["source_id"].to_pylist(), table["origin"].to_pylist(),
                        strict=True)) == want
        assert main(["export", "--run-dir", str(run_dir), "--format", "hf"]) == 0
        datasets = pytest.importorskip("datasets")
        loaded = datasets.load_from_disk(str(run_dir / "samples.hf"))
        assert list(zip(loaded["source_id"], loaded["origin"], strict=True)) == want

    def test_chat_formats_are_seeds(self, fake_server: FakeServer, tmp_path: Path) -> None:
        fake_server.control(rules=rules())
        rows = seed_rows([GOOD, FIXABLE])
        share = write_jsonl(tmp_path / "share.jsonl", [
            {"id": f"c{i}", "conversations": [{"from": "system", "value": "be nice"},
                                              {"from": "human", "value": r["instruction"]},
                                              {"from": "gpt", "value": r["response"]}]}
            for i, r in enumerate(rows)])
        chat = write_jsonl(tmp_path / "chat.jsonl", [
            {"messages": [{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["response"]}]} for r in rows])
        alpaca = tmp_path / "alpaca.json"
        alpaca.write_text("[\n" + ",\n".join(json.dumps({
            "instruction": r["instruction"], "input": "", "output": r["response"]})
            for r in rows) + "\n]\n")  # Alpaca's own JSON array: ids are the items' lines
        for name, path, ids in (("share", share, ["c0", "c1"]), ("chat", chat, ["1", "2"]),
                                ("alpaca", alpaca, ["2", "3"])):
            summary = gra_async.refine(config(fake_server, tmp_path / name, path))
            assert (summary.kept, summary.rewritten) == (1, 1), name
            got = exported(tmp_path / name)
            assert [r["source_id"] for r in got] == ids, name
            assert got[0]["instruction"] == rows[0]["instruction"]

    def test_cli_and_the_run_directory_contracts(
        self, fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        fake_server.control(rules=rules())
        seeds = write_jsonl(tmp_path / "seeds.jsonl", seed_rows([GOOD, FIXABLE, HOPELESS]))
        url = fake_server.base_url
        args = ["refine", "--seeds", str(seeds), "--run-dir", str(tmp_path / "run"),
                "--endpoint", f"generator={GEN}@{url}", "--endpoint", f"reviewer={REV_B}@{url}",
                "--endpoint", f"reviewer={REV_C}@{url}", "--endpoint", f"adjudicator={ADJ}@{url}",
                "--max-rewrites", "1"]
        assert main(args) == 0
        captured = capsys.readouterr()
        assert "1 kept, 1 rewritten, 1 dropped" in captured.out
        shown = captured.out + captured.err
        assert "refined: 1 kept, 1 rewritten, 1 dropped (0 duplicates)" in shown
        assert "plan exhausted" not in shown
        sent = fake_server.stats()["chat_requests"]
        assert main(args) == 0  # finished: a rerun sends nothing
        assert fake_server.stats()["chat_requests"] == sent
        # A refine directory is not a generation run's, nor one of another max_rewrites.
        assert main([*args[:-1], "2"]) == 2
        assert "refine.max_rewrites" in capsys.readouterr().err
        run = ["run", *args[3:-2]]
        assert main(run) == 2
        assert "refine" in capsys.readouterr().err
        assert main(["status", "--run-dir", str(tmp_path / "run")]) == 0
        assert "refine: 1 kept, 1 rewritten, 1 dropped of 3 seeds" in capsys.readouterr().out
        assert main([*args, "--target", "5"]) == 2
        assert "--target does not apply" in capsys.readouterr().err

    def test_a_run_keeps_its_config_hash(self, tmp_path: Path) -> None:
        from gra_async.runner import snapshot

        data = snapshot(gra_async.RunConfig())
        assert "refine" not in data
        # The rewrite template is the refine's alone: a run's prompt digest leaves it out.
        assert data["prompts_sha256"] != snapshot(gra_async.RunConfig(),
                                                  refine=True)["prompts_sha256"]


def journal_calls(run_dir: Path) -> int:
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        return int(conn.execute("SELECT count(*) FROM calls").fetchone()[0])


def test_kill_9_then_rerun_sends_no_journaled_call_again(
    fake_server: FakeServer, tmp_path: Path,
) -> None:
    fake_server.control(latency=0.05, rules=rules())
    kinds = [GOOD, FIXABLE, HOPELESS, DISPUTED] * 3
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"instruction": f"{r['instruction']} Variant {i} about {TOPICS[i]} and {TOPICS[-i]}.",
         "response": r["response"]} for i, r in enumerate(seed_rows(kinds))])
    run_dir = tmp_path / "run"
    url = fake_server.base_url
    args = [sys.executable, "-m", "gra_async", "refine", "--seeds", str(seeds),
            "--run-dir", str(run_dir), "--concurrency", "4",
            "--endpoint", f"generator={GEN}@{url}", "--endpoint", f"reviewer={REV_B}@{url}",
            "--endpoint", f"reviewer={REV_C}@{url}", "--endpoint", f"adjudicator={ADJ}@{url}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        for _ in range(600):  # well into the run: some seeds decided, calls in flight
            if fake_server.stats()["chat_requests"] >= 14:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    sent, journaled = fake_server.stats()["chat_requests"], journal_calls(run_dir)
    assert 0 < journaled <= sent
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    # Every call of the rerun is a new one: no journaled call went to the server again.
    assert fake_server.stats()["chat_requests"] - sent == journal_calls(run_dir) - journaled
    assert journaled < journal_calls(run_dir)  # killed mid-way
    got = status_report(run_dir)
    # The three fixable seeds are rewritten into one text: two of them are duplicates.
    assert got["refine"] == {"seeds": 12, "kept": 6, "rewritten": 1, "dropped": 5}
    assert got["in_progress"] == 0 and got["planned"] == 0 and got["duplicates"] == 2


@pytest.mark.slow
def test_embedded_tiny_model_refines_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """No endpoint: the embedded SmolLM2-135M reviews two bundled seeds and, under a bar it
    cannot reach (it scores ~3.5 whatever it reads), rewrites both; each is decided."""
    from .test_local import _require_local_backend

    _require_local_backend()
    bundled = Path(gra_async.__file__).parent / "data" / "seeds.jsonl"
    seeds = write_jsonl(tmp_path / "two.jsonl", [
        json.loads(line) for line in bundled.read_text().splitlines()[:2]])
    (tmp_path / "gra.toml").write_text("[gate]\naccept_mean = 5.0\n[metadata]\nenabled = false\n")
    code = main(["refine", "--seeds", str(seeds), "--run-dir", str(tmp_path / "run"),
                 "--config", str(tmp_path / "gra.toml")])
    assert code == 0, capsys.readouterr().err
    rows = exported(tmp_path / "run", include_all=True)
    assert sorted(r["source_id"] for r in rows) == ["code-01", "code-02"]
    for row in rows:
        assert row["decision"] in ("accept", "reject") and row["reviews"]
        if row["origin"] == "rewritten":
            assert row["generator"] == "smollm2-135m" and row["rewrites"] == 1
    got = status_report(tmp_path / "run")["refine"]
    assert got["kept"] + got["rewritten"] + got["dropped"] == 2


def test_the_async_api_and_its_blocking_form(fake_server: FakeServer, tmp_path: Path) -> None:
    import asyncio

    fake_server.control(rules=rules())
    seeds = write_jsonl(tmp_path / "seeds.jsonl", seed_rows([GOOD, FIXABLE]))

    async def main_async() -> gra_async.RefineSummary:
        with pytest.raises(gra_async.UsageError, match="refine_async"):
            gra_async.refine({"planner": {"seeds": str(seeds)}})
        async with gra_async.Refiner(config(fake_server, tmp_path / "run", seeds)) as refiner:
            return await refiner.refine()

    summary = asyncio.run(main_async())
    assert (summary.kept, summary.rewritten, summary.stop_reason) == (1, 1, "done")
    # A gate of the user's decides the seeds and the rewrites alike.
    strict = gra_async.refine(config(fake_server, tmp_path / "strict", seeds),
                              gate=lambda panel, gate: "reject")
    assert (strict.kept, strict.rewritten, strict.dropped, strict.rewrites) == (0, 0, 2, 2)
    with pytest.raises(gra_async.UsageError, match=r"planner\.seeds"):
        gra_async.Refiner({"endpoints": fixed_team(fake_server)})


def test_shards_split_the_seeds_and_merge(fake_server: FakeServer, tmp_path: Path) -> None:
    fake_server.control(rules=rules())
    seeds = write_jsonl(tmp_path / "seeds.jsonl", seed_rows([GOOD, FIXABLE, HOPELESS, DISPUTED]))
    parts = [gra_async.refine(config(fake_server, tmp_path / f"s{i}", seeds,
                                     run={"shard": f"{i}/2"})) for i in range(2)]
    assert [p.seeds for p in parts] == [2, 2] and all(p.done for p in parts)
    assert main(["merge", "--run-dir", str(tmp_path / "s0"), "--run-dir", str(tmp_path / "s1"),
                 "--out", str(tmp_path / "all")]) == 0
    rows = exported(tmp_path / "all", include_all=True)
    assert sorted((r["source_id"], r["origin"], r["decision"]) for r in rows) == [
        ("1", "kept", "accept"), ("2", "rewritten", "accept"), ("3", "rewritten", "reject"),
        ("4", "kept", "accept")]

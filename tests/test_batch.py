"""`run.mode = "batch"` against the fake server's Batch API: each lifecycle branch, partial
failures, limits, the online tail, the budget, and a kill -9 while a batch is in progress."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

import gra_async

from .conftest import FakeServer, status_json
from .test_budget import journal_spend, priced_team
from .test_pipeline import ADJ, REV_B, review, verdict

FAST = {"poll_interval": 0.05, "poll_max": 0.2, "slice": 8}


@pytest.fixture
def server(fake_server: FakeServer) -> FakeServer:
    fake_server.control(batch_delay=0.2, rules=[{"model": REV_B, "content": review(9)},
                                                {"model": ADJ, "content": verdict("accept")}])
    return fake_server


def run_batch(server: FakeServer, run_dir: Path, target: int = 6, **batch: Any) -> gra_async.RunSummary:
    config = gra_async.RunConfig.model_validate({
        "run": {"run_dir": str(run_dir), "target": target, "mode": "batch",
                **batch.pop("run", {})},
        "batch": {**FAST, **batch}, "endpoints": priced_team(server)})
    return gra_async.run(config)


def submitted(server: FakeServer) -> dict[str, int]:
    """custom_id -> how many created batches carried it."""
    return dict(server.stats()["batches"]["custom_ids"])


def batch_rows(run_dir: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        return [(str(b), str(s), len(orjson.loads(c)))
                for b, s, c in conn.execute("SELECT batch_id, status, calls FROM batches")]


def journal_keys(run_dir: Path) -> set[str]:
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        return {k for (k,) in conn.execute("SELECT key FROM calls")}


class TestLifecycle:
    def test_completed_batches_reach_the_target_offline(self, server: FakeServer, tmp_path: Path) -> None:
        summary = run_batch(server, tmp_path, target=6)
        assert summary.reached_target and summary.accepted == 6
        stats = server.stats()
        assert stats["chat_requests"] == 0, "batch mode sent calls online"
        ids = submitted(server)
        assert ids and set(ids.values()) == {1}
        # custom_id is the journal key: every reply came back under its own call.
        assert set(ids) >= journal_keys(tmp_path) - set()
        rows = batch_rows(tmp_path)
        assert rows and {s for _, s, _ in rows} == {"read"}
        # A slice's generations are one wave, then its reviews per model, then verdicts.
        assert stats["batches"]["created"] >= 3
        got = status_json(tmp_path)
        assert got["batches"] == [] and got["accepted"] == 6
        # Billed at half the online price, and counted so everywhere.
        with sqlite3.connect(tmp_path / "journal.sqlite") as conn:
            endpoints = {e for (e,) in conn.execute("SELECT DISTINCT endpoint FROM calls")}
        assert all(e.endswith(" (batch)") for e in endpoints)
        assert got["cost"] == pytest.approx(journal_spend(tmp_path) / 2)
        assert summary.spent == pytest.approx(got["cost"])
        assert summary.cost == pytest.approx(got["cost"])
        samples = list(gra_async.read_samples(tmp_path))
        assert len(samples) == 6 and all(len(s.reviews) == 2 for s in samples)

    @pytest.mark.parametrize("outcome", ["expired", "cancelled", "failed"])
    def test_a_batch_that_ends_short_goes_to_the_next_wave(
        self, server: FakeServer, tmp_path: Path, outcome: str,
    ) -> None:
        server.control(batch_script=[outcome], batch_expire_done=0.5)
        summary = run_batch(server, tmp_path, target=6)
        assert summary.reached_target
        ids = submitted(server)
        # Lines that never ran were sent again, in a later batch; none more than needed.
        assert max(ids.values()) == 2
        assert server.stats()["chat_requests"] == 0

    def test_error_file_lines_and_non_200_lines_are_retried(
        self, server: FakeServer, tmp_path: Path,
    ) -> None:
        server.control(batch_line_error_rate=0.2, batch_line_fail_rate=0.2)
        summary = run_batch(server, tmp_path, target=6)
        assert summary.reached_target and summary.failed == 0
        ids = submitted(server)
        assert max(ids.values()) >= 2
        assert journal_keys(tmp_path) <= set(ids)

    def test_lines_failing_past_the_retries_fail_their_task(
        self, server: FakeServer, tmp_path: Path,
    ) -> None:
        server.control(batch_line_fail_rate=1.0)
        summary = run_batch(server, tmp_path, target=2, run={"max_tasks": 3})
        assert summary.stop_reason == "all_failed" and summary.failed == 3
        ids = submitted(server)
        # Each generation was tried once and retried max_retries (6) times, no more.
        assert set(ids.values()) == {7}
        assert "batch line failed 7 times" in next(iter(summary.failures))

    def test_polls_survive_5xx_and_resets(self, server: FakeServer, tmp_path: Path) -> None:
        server.control(batch_poll_script=[503, "reset", 500, 502, "reset"])
        summary = run_batch(server, tmp_path, target=4)
        assert summary.reached_target
        assert server.stats()["faults"].get("reset", 0) >= 2


class TestWaves:
    def test_the_line_limit_splits_a_wave(self, server: FakeServer, tmp_path: Path) -> None:
        summary = run_batch(server, tmp_path, target=6, max_lines=3)
        assert summary.reached_target
        rows = batch_rows(tmp_path)
        assert rows and max(n for _, _, n in rows) <= 3
        assert max(submitted(server).values()) == 1

    def test_the_byte_limit_splits_a_wave(self, server: FakeServer, tmp_path: Path) -> None:
        summary = run_batch(server, tmp_path, target=4, max_bytes=4096)
        assert summary.reached_target
        assert len(batch_rows(tmp_path)) > server.stats()["batches"]["created"] / 2 > 3

    def test_a_small_wave_goes_online_when_allowed(self, server: FakeServer, tmp_path: Path) -> None:
        summary = run_batch(server, tmp_path, target=3, min_size=10_000, online_tail=True)
        assert summary.reached_target
        assert server.stats()["batches"]["created"] == 0
        # Every call went online: journaled, or cut off in flight when the target was met.
        sent = server.stats()["chat_requests"]
        assert sent == len(journal_keys(tmp_path)) + status_json(tmp_path)["abandoned_calls"]
        assert sent >= summary.calls > 0

    def test_the_budget_holds_in_batch_mode(self, server: FakeServer, tmp_path: Path) -> None:
        summary = run_batch(server, tmp_path, target=500, run={"max_cost": 0.3}, slice=6)
        assert summary.stop_reason == "budget"
        assert journal_spend(tmp_path) / 2 <= 0.3
        assert summary.spent == pytest.approx(journal_spend(tmp_path) / 2)


def write_config(path: Path, server: FakeServer, run_dir: Path) -> Path:
    lines = ["[run]", f'run_dir = "{run_dir}"', "target = 12", 'mode = "batch"', "concurrency = 8",
             "[batch]", "slice = 6", "poll_interval = 0.05", "poll_max = 0.2"]
    for role, models in priced_team(server).items():
        for endpoint in models:
            lines += [f"[[endpoints.{role}]]", *(f"{k} = {orjson.dumps(v).decode()}"
                                                  for k, v in endpoint.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_kill_9_while_a_batch_is_in_progress_resubmits_nothing(
    server: FakeServer, tmp_path: Path,
) -> None:
    server.control(batch_delay=1.5)
    conf = write_config(tmp_path / "gra.toml", server, tmp_path / "run")
    argv = [sys.executable, "-m", "gra_async", "run", "--config", str(conf)]
    kills = 0
    for created in (1, 2, 4):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        # Killed while a batch is at the provider: after its creation, before it ends.
        while server.stats()["batches"]["created"] < created + kills and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            assert status_json(tmp_path / "run")["batches"], "no batch journaled in flight"
    assert kills >= 2
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ids = submitted(server)
    assert ids and max(ids.values()) == 1, "a journaled call was submitted again"
    assert server.stats()["chat_requests"] == 0
    assert status_json(tmp_path / "run")["accepted"] == 12
    assert status_json(tmp_path / "run")["batches"] == []

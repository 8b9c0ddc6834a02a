"""A real one-node Ray cluster on 127.0.0.1 for the @ray tests, and the Ray venv's tools.

Not a test module: tests/test_ray_configs.py and tests/test_ray_e2e.py import it.

Everything Ray comes from the venv that servers/ray/setup.sh builds at
``${GRA_RAY_HOME:-$HOME/.cache/gra-async/ray}/venv`` (Ray, Ray Serve LLM's parts, vLLM's CPU
build, kubernetes-validate); the project's own environment never imports Ray. Without that
venv, ``require_ray()`` skips the calling test, or fails it when GRA_REQUIRE_RAY=1.
The cluster is started and stopped with servers/ray/start-cpu.sh and stop-cpu.sh, the
scripts a user runs, on free ports so that it never meets another server on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY_DIR = ROOT / "servers" / "ray"
HOME_ENV = "GRA_RAY_HOME"
REQUIRE_ENV = "GRA_REQUIRE_RAY"
VLLM_MODEL_DIR = Path(
    os.environ.get("GRA_VLLM_HOME", str(Path.home() / ".cache" / "gra-async" / "vllm"))
) / "models" / "smollm2-135m-instruct"
# A cold start on 2 cores: Ray ~10 s, the vLLM engine in its replica 60-120 s.
START_TIMEOUT = 600


def ray_home() -> Path:
    return Path(os.environ.get(HOME_ENV, str(Path.home() / ".cache" / "gra-async" / "ray")))


def pinned(name: str) -> str:
    """A version that servers/ray/setup.sh pins (RAY_VERSION, VLLM_VERSION, ...)."""
    match = re.search(rf'^{name}="([^"]+)"', (RAY_DIR / "setup.sh").read_text(), re.M)
    assert match, f"servers/ray/setup.sh pins no {name}"
    return match.group(1)


def _missing(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_ray(*, llm: bool = False) -> Path:
    """The venv's python; skips (or fails under GRA_REQUIRE_RAY=1) when it is not set up."""
    markers = ray_home() / "markers"
    python = ray_home() / "venv" / "bin" / "python"
    steps = ("venv", "serve", "llm", "trim") if llm else ("venv", "serve")
    absent = [s for s in steps if not (markers / s).is_file()]
    if not python.is_file() or absent:
        _missing(f"the Ray venv is not set up ({', '.join(absent) or 'no python'}): "
                 "run bash servers/ray/setup.sh")
    if llm and not (VLLM_MODEL_DIR / "config.json").is_file():
        _missing(f"no model at {VLLM_MODEL_DIR}: run bash servers/cpu-vllm/setup.sh")
    return python


def validate(files: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """servers/ray/validate.py's verdict on these files: {path: [document reports]}."""
    python = require_ray(llm=True)
    done = subprocess.run(
        [str(python), str(RAY_DIR / "validate.py"), *map(str, files)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]
    files_report: dict[str, list[dict[str, Any]]] = json.loads(done.stdout)["files"]
    return files_report


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclasses.dataclass
class RayCluster:
    pid: int
    base_url: str  # the OpenAI-compatible URL, http://127.0.0.1:<port>/v1
    dashboard: str
    temp_dir: Path
    ready_s: float
    env: dict[str, str]

    def serve_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        serve = ray_home() / "venv" / "bin" / "serve"
        return subprocess.run([str(serve), *args, "--address", self.dashboard], env=self.env,
                              capture_output=True, text=True, timeout=120, check=False)

    def stop(self) -> None:
        subprocess.run(["bash", str(RAY_DIR / "stop-cpu.sh"), str(self.pid)], env=self.env,
                       capture_output=True, timeout=120, check=False)
        # Ray's session logs take a few MB per start; a failed start's tail is quoted above.
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cpu_cluster() -> RayCluster:
    """servers/ray/start-cpu.sh on free loopback ports; it returns once serve-cpu.yaml's
    application is RUNNING (its vLLM engine loaded and healthy)."""
    require_ray(llm=True)
    gcs, dash, serve, client, agent, metrics = _free_ports(6)
    # Short: Ray's unix socket paths under it must stay below ~100 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="gra-ray-", dir="/tmp"))
    env = {
        **os.environ,
        "GRA_RAY_TEMP_DIR": str(temp_dir),
        "GRA_RAY_GCS_PORT": str(gcs),
        "GRA_RAY_DASHBOARD_PORT": str(dash),
        "GRA_RAY_SERVE_PORT": str(serve),
        "GRA_RAY_CLIENT_PORT": str(client),
        "GRA_RAY_AGENT_PORT": str(agent),
        "GRA_RAY_METRICS_PORT": str(metrics),
        "GRA_RAY_READY_TIMEOUT": str(START_TIMEOUT),
        "GRA_RAY_WATCH_PID": str(os.getpid()),  # a killed pytest leaves no cluster behind
        "GRA_VLLM_MODEL_DIR": str(VLLM_MODEL_DIR),
    }
    done = subprocess.run(["bash", str(RAY_DIR / "start-cpu.sh")], env=env, capture_output=True,
                          text=True, timeout=START_TIMEOUT + 120, check=False)
    if done.returncode != 0:
        shutil.rmtree(temp_dir, ignore_errors=True)
        pytest.fail(f"servers/ray/start-cpu.sh failed ({done.returncode}):\n{done.stderr[-4000:]}",
                    pytrace=False)
    fields = dict(item.split("=", 1) for item in done.stdout.split())
    return RayCluster(int(fields["pid"]), fields["url"], fields["dashboard"], temp_dir,
                      float(fields["ready_s"]), env)

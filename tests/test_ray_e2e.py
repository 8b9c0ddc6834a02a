"""gra-async through Ray Serve LLM for real: a one-node Ray cluster on 127.0.0.1 serving
servers/ray/serve-cpu.yaml (SmolLM2-135M on vLLM's CPU build inside a Serve replica),
started by servers/ray/start-cpu.sh as a user would, then `doctor` and a short run
through it with servers/ray/ray-cpu.toml.

As in tests/test_vllm_pipeline.py, SmolLM2-135M's reviews are nearly always low, so the run
usually ends "plan exhausted" (exit 3) with 0 accepted; the assertions are that every
planned task was decided, that real generate -> review calls went through Ray's ingress,
and that nothing failed at the HTTP level.

Skipped when servers/ray/setup.sh or servers/cpu-vllm/setup.sh has not been run, unless
GRA_REQUIRE_RAY=1. Runtime on 2 cores: the cluster ~2 min to RUNNING, the run 1-3 min.
"""

from __future__ import annotations

import contextlib
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gra_async.cli import main
from tests import ray_cluster

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
MAX_TASKS = 3

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ray_cluster.RayCluster]:
    started = ray_cluster.start_cpu_cluster()
    print(f"\n[ray e2e] serve-cpu.yaml RUNNING after {started.ready_s:.0f}s at {started.base_url}")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def config(cluster: ray_cluster.RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """servers/ray/ray-cpu.toml at the test cluster's port, with the bounded budgets of the
    vLLM pipeline test so that the run stays short on 2 cores."""
    text = (ROOT / "servers" / "ray" / "ray-cpu.toml").read_text()
    assert text.count("http://127.0.0.1:8000/v1") == 3
    text = text.replace("http://127.0.0.1:8000/v1", cluster.base_url)
    text = text.replace("[run]\n", f"[run]\nmax_tasks = {MAX_TASKS}\n", 1)
    text += "\n[generation]\nmax_tokens = 256\nreview_max_tokens = 200\nverdict_max_tokens = 128\n"
    path = tmp_path_factory.mktemp("ray-e2e") / "ray-cpu.toml"
    path.write_text(text)
    return path


def test_the_application_runs_ray_serve_llm_on_vllm(cluster: ray_cluster.RayCluster) -> None:
    """What answers is Ray Serve LLM's LLMServer deployment, not some other server."""
    done = cluster.serve_cli("status")
    assert done.returncode == 0, done.stderr
    assert f"LLMServer:{MODEL}" in done.stdout
    assert "OpenAiIngress" in done.stdout
    status, models = _get(f"{cluster.base_url}/models")
    assert status == 200
    (listed,) = models["data"]
    assert listed["id"] == MODEL
    # Ray Serve LLM's model card; vLLM's own /v1/models has no such field.
    assert listed["metadata"]["model_id"] == MODEL


def test_the_ingress_routes_on_the_model_field(cluster: ray_cluster.RayCluster) -> None:
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
            "temperature": 0}
    status, reply = _post(f"{cluster.base_url}/chat/completions", {**body, "model": MODEL})
    assert status == 200, reply
    assert reply["model"] == MODEL
    assert reply["usage"]["completion_tokens"] >= 1
    assert reply["system_fingerprint"].startswith("vllm-" + ray_cluster.pinned("VLLM_VERSION"))
    status, reply = _post(f"{cluster.base_url}/chat/completions", {**body, "model": "not-served"})
    assert status == 404, reply
    assert "not-served" in json.dumps(reply)


def test_doctor_passes_through_ray(config: Path) -> None:
    code, out, err = cli("doctor", "--config", str(config))
    assert code == 0, out + err
    assert "json_schema output ok" in out


def test_a_short_run_through_ray(config: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out, err = cli("run", "--config", str(config), "--run-dir", str(run_dir),
                         "--target", "2", "--concurrency", "3")
    assert code in (0, 3), err[-3000:]
    code, out, err = cli("status", "--run-dir", str(run_dir), "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["in_progress"] == 0
    assert status["accepted"] + status["rejected"] + status["failed"] == MAX_TASKS or (
        status["accepted"] == 2
    ), status
    by_role = {row["role"]: row for row in status["by_model"]}
    assert by_role["generator"]["calls"] >= 1
    assert by_role["reviewer"]["calls"] >= 1, "no review came back through Ray"
    (endpoint,) = status["endpoints"]
    assert endpoint["failed"] == 0 and endpoint["succeeded"] == status["calls"], endpoint

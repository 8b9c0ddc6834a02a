"""servers/ray and servers/k8s held against each other, the compose setup and real schemas.

The first part is plain Python (YAML and TOML read here): serve.yaml serves the compose
file's models under its names with servers/*.env's engine settings, the gra-async configs
are sized to what Ray may start, the RayService carries serve.yaml byte for byte, the Job
resumes on a block volume. The second part (@ray, the venv of servers/ray/setup.sh) runs
servers/ray/validate.py: Ray's ServeDeploySchema and Ray Serve LLM's LLMServingArgs, vLLM's
engine arguments, kubernetes-validate and KubeRay's CRD schema; it also checks that each of
those catches a broken copy, so a validator that accepts anything fails here.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gra_async.config import RunConfig, load_config
from tests import ray_cluster

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ROOT / "servers"
SERVE_YAML = SERVERS / "ray" / "serve.yaml"
SERVE_CPU_YAML = SERVERS / "ray" / "serve-cpu.yaml"
RAYSERVICE = SERVERS / "k8s" / "rayservice.yaml"
JOB = SERVERS / "k8s" / "orchestrator-job.yaml"
ROLES = ("generator", "reviewer", "adjudicator")
# (gra-async config, the serve config it points at)
CONFIGS = {
    "servers/ray/ray.toml": SERVE_YAML,
    "servers/k8s/gra.toml": SERVE_YAML,
    "servers/ray/ray-cpu.toml": SERVE_CPU_YAML,
}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _llm_configs(serve: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (app,) = serve["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    return {c["model_loading_config"]["model_id"]: c for c in app["args"]["llm_configs"]}


def _env_file(name: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (SERVERS / name).read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def _compose_defaults() -> dict[str, str]:
    """${VAR:-default} in docker-compose.yml: the model and served name of each role."""
    text = (ROOT / "docker-compose.yml").read_text()
    return dict(re.findall(r"\$\{([A-Z_]+):-([^}]+)\}", text))


def _config(name: str) -> RunConfig:
    return load_config(ROOT / name, environ={})


# --- serve.yaml and serve-cpu.yaml against the compose setup ------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_serve_yaml_serves_each_compose_model_with_its_env_settings(role: str) -> None:
    compose = _compose_defaults()
    models = _llm_configs(_yaml(SERVE_YAML))
    served = compose[f"{role.upper()}_SERVED_NAME"]
    assert served in models, f"serve.yaml serves no {served!r} ({role} in docker-compose.yml)"
    llm = models[served]
    assert llm["model_loading_config"]["model_source"] == compose[f"{role.upper()}_MODEL"]
    env = _env_file(f"{role}.env")
    engine = llm["engine_kwargs"]
    assert engine["max_model_len"] == int(env["MAX_MODEL_LEN"])
    assert engine["gpu_memory_utilization"] == float(env["GPU_MEMORY_UTILIZATION"])
    assert engine["max_num_seqs"] == int(env["MAX_NUM_SEQS"])
    assert engine["dtype"] == env["DTYPE"]
    assert llm["accelerator_config"] == {"kind": "gpu"}


def test_serve_yaml_serves_nothing_else() -> None:
    compose = _compose_defaults()
    names = {compose[f"{role.upper()}_SERVED_NAME"] for role in ROLES}
    assert set(_llm_configs(_yaml(SERVE_YAML))) == names


def test_serve_cpu_yaml_has_the_cpu_profile_settings() -> None:
    env = _env_file("cpu.env")
    (llm,) = _llm_configs(_yaml(SERVE_CPU_YAML)).values()
    engine = llm["engine_kwargs"]
    assert llm["accelerator_config"] == {"kind": "cpu"}
    assert engine["max_model_len"] == int(env["MAX_MODEL_LEN"])
    assert engine["max_num_seqs"] == int(env["MAX_NUM_SEQS"])
    assert engine["dtype"] == env["DTYPE"]
    assert ("--enforce-eager" in env["VLLM_EXTRA_ARGS"]) == engine.get("enforce_eager", False)
    assert llm["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == env["VLLM_CPU_KVCACHE_SPACE"]
    # The compose cpu image's model path; start-cpu.sh swaps in the local directory.
    assert llm["model_loading_config"]["model_source"] == "/models/smollm2-135m-instruct"


@pytest.mark.parametrize("serve_file", [SERVE_YAML, SERVE_CPU_YAML], ids=lambda p: p.name)
def test_every_model_autoscales_on_limits_that_are_set(serve_file: Path) -> None:
    """Ray Serve LLM's defaults (1e9 for both) leave autoscaling inert: both must be set,
    a replica must take no more than one vLLM batch, and the target must sit below that
    so that a client holding its load at the current capacity still triggers a scale-up."""
    for name, llm in _llm_configs(_yaml(serve_file)).items():
        deployment = llm["deployment_config"]
        scaling = deployment["autoscaling_config"]
        max_ongoing = deployment["max_ongoing_requests"]
        assert max_ongoing == llm["engine_kwargs"]["max_num_seqs"], name
        assert 0 < scaling["target_ongoing_requests"] < max_ongoing, name
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"], name


@pytest.mark.parametrize("serve_file", [SERVE_YAML, SERVE_CPU_YAML], ids=lambda p: p.name)
def test_vllm_usage_stats_are_off_for_every_model(serve_file: Path) -> None:
    for name, llm in _llm_configs(_yaml(serve_file)).items():
        assert llm["runtime_env"]["env_vars"]["VLLM_NO_USAGE_STATS"] == "1", name


def test_cpu_serve_config_listens_on_loopback_only() -> None:
    """Nothing checks a key on the ingress: on a single machine it stays on 127.0.0.1."""
    assert _yaml(SERVE_CPU_YAML)["http_options"]["host"] == "127.0.0.1"


# --- the gra-async configs against the serve configs ---------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_points_each_role_at_a_served_model(name: str) -> None:
    config = _config(name)
    serve = _yaml(CONFIGS[name])
    models = _llm_configs(serve)
    port = serve["http_options"]["port"]
    for role in ROLES:
        (endpoint,) = config.endpoints[role]
        assert endpoint.model in models, (role, endpoint.model)
        assert endpoint.base_url.endswith(f":{port}/v1"), endpoint.base_url
        # The ingress checks no key; a key variable would suggest it does.
        assert endpoint.api_key_env is None
        # Long enough to wait out a replica loading its weights, and within Serve's own
        # request timeout, which would otherwise cut the call first.
        assert 600 <= endpoint.read_timeout <= serve["http_options"]["request_timeout_s"]


@pytest.mark.parametrize("name", ["servers/ray/ray.toml", "servers/k8s/gra.toml"])
def test_gpu_config_fills_every_replica_the_autoscaler_may_start(name: str) -> None:
    config = _config(name)
    models = _llm_configs(_yaml(SERVE_YAML))
    for role in ROLES:
        (endpoint,) = config.endpoints[role]
        deployment = models[endpoint.model or ""]["deployment_config"]
        wanted = deployment["autoscaling_config"]["max_replicas"] * deployment["max_ongoing_requests"]
        assert endpoint.max_concurrency == wanted, (role, endpoint.max_concurrency, wanted)
    assert config.run.concurrency == sum(config.endpoints[r][0].max_concurrency or 0 for r in ROLES)


def test_cpu_config_shares_the_one_replica_between_the_roles() -> None:
    config = _config("servers/ray/ray-cpu.toml")
    (llm,) = _llm_configs(_yaml(SERVE_CPU_YAML)).values()
    deployment = llm["deployment_config"]
    capacity = deployment["autoscaling_config"]["max_replicas"] * deployment["max_ongoing_requests"]
    assert sum(config.endpoints[r][0].max_concurrency or 0 for r in ROLES) == capacity
    assert config.run.concurrency == capacity


def test_k8s_config_is_the_vm_config_at_the_cluster_service() -> None:
    vm, k8s = _config("servers/ray/ray.toml"), _config("servers/k8s/gra.toml")
    rayservice = _yaml(RAYSERVICE)
    service_url = f"http://{rayservice['metadata']['name']}-serve-svc:8000/v1"
    for role in ROLES:
        (a,), (b,) = vm.endpoints[role], k8s.endpoints[role]
        assert b.base_url == service_url
        assert a.model_copy(update={"base_url": b.base_url}) == b
    assert vm.run.model_copy(update={"run_dir": k8s.run.run_dir}) == k8s.run


# --- the Kubernetes manifests ----------------------------------------------------------------


def test_rayservice_carries_serve_yaml_byte_for_byte() -> None:
    rayservice = _yaml(RAYSERVICE)
    assert rayservice["spec"]["serveConfigV2"] == SERVE_YAML.read_text()
    done = subprocess.run([sys.executable, str(SERVERS / "k8s" / "sync_serve_config.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_sync_script_notices_a_changed_serve_yaml(tmp_path: Path) -> None:
    sys.path.insert(0, str(SERVERS / "k8s"))
    try:
        import sync_serve_config as sync
    finally:
        sys.path.pop(0)
    manifest = RAYSERVICE.read_text()
    changed = SERVE_YAML.read_text().replace("max_replicas: 4", "max_replicas: 5", 1)
    rendered = sync.render(manifest, changed)
    assert rendered != manifest
    assert yaml.safe_load(rendered)["spec"]["serveConfigV2"] == changed
    # Everything around the block is kept as it was.
    assert yaml.safe_load(rendered)["spec"]["rayClusterConfig"] == _yaml(RAYSERVICE)["spec"]["rayClusterConfig"]


def test_gpu_worker_group_spans_the_models_replica_range() -> None:
    cluster = _yaml(RAYSERVICE)["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    scaling = [llm["deployment_config"]["autoscaling_config"]
               for llm in _llm_configs(_yaml(SERVE_YAML)).values()]
    (container,) = group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == 1  # one replica (tensor_parallel_size 1) per worker pod
    assert group["minReplicas"] == sum(s["min_replicas"] for s in scaling)
    assert group["maxReplicas"] == sum(s["max_replicas"] for s in scaling)
    assert cluster["enableInTreeAutoscaling"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"


def test_rayservice_runs_the_ray_release_the_configs_were_checked_with() -> None:
    cluster = _yaml(RAYSERVICE)["spec"]["rayClusterConfig"]
    version = ray_cluster.pinned("RAY_VERSION")
    assert cluster["rayVersion"] == version
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            assert container["image"].startswith(f"rayproject/ray-llm:{version}-"), container["image"]


def test_orchestrator_job_resumes_on_a_block_volume() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(JOB.read_text())}
    pvc, job = docs["PersistentVolumeClaim"], docs["Job"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    assert job["spec"]["parallelism"] == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    (main,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    command = main["command"]
    run_dir = command[command.index("--run-dir") + 1]
    assert run_dir.startswith(mounts["runs"] + "/")
    config_path = Path(command[command.index("--config") + 1])
    assert str(config_path.parent) == mounts["config"]
    assert _config("servers/k8s/gra.toml").run.run_dir == Path(run_dir)


# --- the real schemas (@ray) ---------------------------------------------------------------


def _broken_copies(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """One copy per mistake a validator must catch: {case: (file, text the error names)}."""
    serve = _yaml(SERVE_YAML)
    cases: dict[str, tuple[Any, str, str]] = {}

    typo_engine = copy.deepcopy(serve)
    first = typo_engine["applications"][0]["args"]["llm_configs"][0]
    first["engine_kwargs"]["max_num_seq"] = first["engine_kwargs"].pop("max_num_seqs")
    cases["engine kwarg vLLM does not have"] = (typo_engine, "serve.yaml", "max_num_seq")

    bad_scaling = copy.deepcopy(serve)
    scaling = bad_scaling["applications"][0]["args"]["llm_configs"][1]["deployment_config"]
    scaling["autoscaling_config"]["min_replicas"] = 9  # above max_replicas
    cases["min_replicas above max_replicas"] = (bad_scaling, "serve.yaml", "replicas")

    typo_deploy = copy.deepcopy(serve)
    opts = typo_deploy["applications"][0]["args"]["llm_configs"][2]["deployment_config"]
    opts["max_ongoing_request"] = opts.pop("max_ongoing_requests")
    cases["misspelt deployment option"] = (typo_deploy, "serve.yaml", "max_ongoing_request")

    duplicate = copy.deepcopy(serve)
    configs = duplicate["applications"][0]["args"]["llm_configs"]
    configs[1]["model_loading_config"]["model_id"] = configs[0]["model_loading_config"]["model_id"]
    cases["two models under one name"] = (duplicate, "serve.yaml", "Duplicate")

    rayservice = _yaml(RAYSERVICE)
    typo_crd = copy.deepcopy(rayservice)
    group = typo_crd["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")
    cases["misspelt RayService field"] = (typo_crd, "rayservice.yaml", "maxReplica")

    wrong_type = copy.deepcopy(rayservice)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = "three"
    cases["RayService field of the wrong type"] = (wrong_type, "rayservice.yaml", "minReplicas")

    inner = copy.deepcopy(rayservice)
    inner["spec"]["serveConfigV2"] = inner["spec"]["serveConfigV2"].replace(
        "max_model_len:", "max_model_length:", 1)
    cases["serveConfigV2 with a bad engine kwarg"] = (inner, "rayservice.yaml", "max_model_length")

    pvc, job = yaml.safe_load_all(JOB.read_text())
    bad_job = copy.deepcopy(job)
    bad_job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [2]
    cases["Job field of the wrong type"] = ([pvc, bad_job], "job.yaml", "cpu")

    typo_job = copy.deepcopy(job)
    typo_job["spec"]["backofLimit"] = typo_job["spec"].pop("backoffLimit")
    cases["misspelt Job field"] = ([pvc, typo_job], "job.yaml", "backofLimit")

    out: dict[str, tuple[Path, str]] = {}
    for index, (case, (doc, name, needle)) in enumerate(sorted(cases.items())):
        path = tmp_path / f"{index}-{name}"
        docs = doc if isinstance(doc, list) else [doc]
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        out[case] = (path, needle)
    return out


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, tuple[Path, str]]]:
    """One run of validate.py over the real files and every broken copy (importing Ray and
    vLLM costs ~15-40 s, so once)."""
    ray_cluster.require_ray(llm=True)
    broken = _broken_copies(tmp_path_factory.mktemp("broken"))
    originals = [SERVE_YAML, SERVE_CPU_YAML, RAYSERVICE, JOB]
    report = ray_cluster.validate([*originals, *(p for p, _ in broken.values())])
    return report, broken


@pytest.mark.ray
@pytest.mark.parametrize("path", [SERVE_YAML, SERVE_CPU_YAML, RAYSERVICE, JOB], ids=lambda p: p.name)
def test_file_passes_its_projects_own_schema(verdicts: Any, path: Path) -> None:
    report, _ = verdicts
    docs = report[str(path)]
    assert docs, f"validate.py checked no document in {path}"
    for doc in docs:
        assert doc["errors"] == [], (doc["kind"], doc["name"], doc["errors"])
    kinds = {d["kind"]: d["checked_by"] for d in docs}
    if path == JOB:
        assert set(kinds) == {"PersistentVolumeClaim", "Job"}
        assert all("kubernetes-validate" in by for by in kinds.values())
    elif path == RAYSERVICE:
        assert kinds == {"RayService": "rayservice-v1.7.0.schema.json"}


@pytest.mark.ray
@pytest.mark.parametrize("case", [
    "engine kwarg vLLM does not have",
    "min_replicas above max_replicas",
    "misspelt deployment option",
    "two models under one name",
    "misspelt RayService field",
    "RayService field of the wrong type",
    "serveConfigV2 with a bad engine kwarg",
    "Job field of the wrong type",
    "misspelt Job field",
])
def test_validator_rejects_a_broken_copy(verdicts: Any, case: str) -> None:
    report, broken = verdicts
    path, needle = broken[case]
    errors = [e for doc in report[str(path)] for e in doc["errors"]]
    assert errors, f"{case}: validate.py found nothing wrong"
    assert any(needle in e for e in errors), (case, errors)

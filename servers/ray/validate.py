"""Check the Ray Serve and Kubernetes files with the schemas their own projects publish.

Run it with the Python of servers/ray/setup.sh's venv, where Ray, vLLM and
kubernetes-validate are installed:

    ~/.cache/gra-async/ray/venv/bin/python servers/ray/validate.py            # all files
    ~/.cache/gra-async/ray/venv/bin/python servers/ray/validate.py FILE...    # some

What each kind of file is held against:
  Ray Serve config (a YAML with `applications`): Ray's `ServeDeploySchema`, then, for an
      application built by `ray.serve.llm:build_openai_app`, its arguments against Ray
      Serve LLM's own `LLMServingArgs` (every `LLMConfig`), each engine's `engine_kwargs`
      against vLLM's `AsyncEngineArgs` fields, and each `deployment_config` against Ray
      Serve's `DeploymentSchema`.
  Kubernetes manifests: core kinds (Job, PersistentVolumeClaim, ...) with
      kubernetes-validate in strict mode (unknown fields are errors, as with
      `kubectl apply --validate=strict`); a RayService against the CRD schema of KubeRay
      in servers/k8s/schema/, made strict the same way, and its serveConfigV2 as a Ray
      Serve config (above).

Prints one JSON object {"files": {path: [{"kind", "name", "checked_by", "errors"}...]}} and
exits 1 if any document has errors, 0 otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FILES = (
    "servers/ray/serve.yaml",
    "servers/ray/serve-cpu.yaml",
    "servers/k8s/rayservice.yaml",
    "servers/k8s/orchestrator-job.yaml",
)
RAYSERVICE_SCHEMA = ROOT / "servers" / "k8s" / "schema" / "rayservice-v1.7.0.schema.json"
KUBERNETES_VERSION = "1.37.0"
LLM_APP = "ray.serve.llm:build_openai_app"


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected where the CRD lists the fields.

    The API server prunes unknown fields of a CRD silently; a misspelt key would vanish
    instead of failing. `x-kubernetes-preserve-unknown-fields` marks where anything goes.
    """
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def check_serve_config(config: dict[str, Any]) -> list[str]:
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    errors: list[str] = []
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [f"ServeDeploySchema: {exc}"]
    for app in config.get("applications", []):
        if app.get("import_path") != LLM_APP:
            continue
        errors += [f"{app.get('name')}: {e}" for e in _check_llm_app(app.get("args") or {})]
    # ServeDeploySchema lets unknown keys through (forward compatibility); a misspelt
    # deployment option would be dropped without a word, so compare names too.
    allowed = set(DeploymentSchema.model_fields)
    for app in config.get("applications", []):
        for llm in (app.get("args") or {}).get("llm_configs", []):
            if not isinstance(llm, dict):
                continue
            unknown = set(llm.get("deployment_config", {})) - allowed
            if unknown:
                errors.append(f"deployment_config: unknown options {sorted(unknown)}")
    return errors


def _check_llm_app(args: dict[str, Any]) -> list[str]:
    from pydantic import ValidationError
    from ray.llm._internal.serve.core.ingress.builder import LLMServingArgs
    from ray.serve.schema import DeploymentSchema
    from vllm.engine.arg_utils import AsyncEngineArgs

    errors: list[str] = []
    try:
        serving = LLMServingArgs.model_validate(args)
    except ValidationError as exc:
        return [f"LLMServingArgs: {exc}"]
    engine_fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for llm in serving.llm_configs:
        name = llm.model_id
        unknown = set(llm.engine_kwargs) - engine_fields
        if unknown:
            errors.append(f"{name}: engine_kwargs not in vLLM's AsyncEngineArgs: {sorted(unknown)}")
        deployment = dict(llm.deployment_config)
        deployment.setdefault("name", name)
        try:
            DeploymentSchema.model_validate(deployment)
        except ValidationError as exc:
            errors.append(f"{name}: deployment_config: {exc}")
    return errors


def check_rayservice(doc: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = _strict(json.loads(RAYSERVICE_SCHEMA.read_text()))
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]
    serve_config = (doc.get("spec") or {}).get("serveConfigV2")
    if not isinstance(serve_config, str):
        return [*errors, "spec.serveConfigV2 must be a YAML string"]
    return errors + [f"serveConfigV2: {e}" for e in check_serve_config(yaml.safe_load(serve_config))]


def check_core(doc: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(copy.deepcopy(doc), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path) or "<root>"
        return [f"{path}: {exc.message}"]
    return []


def check_file(path: Path) -> list[dict[str, Any]]:
    results = []
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        if "applications" in doc and "kind" not in doc:
            kind, name, by = "ServeConfig", path.name, "ray.serve.schema.ServeDeploySchema + LLMServingArgs"
            errors = check_serve_config(doc)
        elif doc.get("kind") == "RayService":
            kind, name, by = "RayService", doc["metadata"]["name"], RAYSERVICE_SCHEMA.name
            errors = check_rayservice(doc)
        else:
            kind, name = doc.get("kind", "?"), (doc.get("metadata") or {}).get("name", "?")
            by = f"kubernetes-validate {KUBERNETES_VERSION} strict"
            errors = check_core(doc)
        results.append({"kind": kind, "name": name, "checked_by": by, "errors": errors})
    return results


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or [ROOT / f for f in DEFAULT_FILES]
    report = {"files": {str(f): check_file(f) for f in files}}
    print(json.dumps(report, indent=1))
    failed = any(doc["errors"] for docs in report["files"].values() for doc in docs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

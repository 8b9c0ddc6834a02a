"""The real vLLM OpenAI-compatible server on CPU (servers/cpu-vllm), met with raw httpx.

These pin the server behaviour the client layer and the pipeline rely on: /health without a key,
401 for a wrong key, json_schema structured output, and vLLM's own error replies.

Skipped when the venv/model of servers/cpu-vllm/setup.sh is absent, unless GRA_REQUIRE_VLLM=1.

Reusable: the session fixture ``vllm_server`` below starts ONE server (aliases gen/rev/adj,
api key API_KEY) through servers/cpu-vllm/vllm_server.py::shared_server, which caches it per
process; any other module/fixture that calls ``cpu_vllm.pytest_server(names=ROLE_ALIASES,
api_key=API_KEY)`` gets the same server instead of starting a second one.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "servers" / "cpu-vllm" / "vllm_server.py"


def _load_helper() -> ModuleType:
    if "gra_cpu_vllm_server" in sys.modules:  # loaded already (by another test module)
        return sys.modules["gra_cpu_vllm_server"]
    spec = importlib.util.spec_from_file_location("gra_cpu_vllm_server", HELPER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


cpu_vllm = _load_helper()

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ROLE_ALIASES = ("gen", "rev", "adj")
API_KEY = "gra-test-key"
MAX_MODEL_LEN = cpu_vllm.MAX_MODEL_LEN


@pytest.fixture(scope="session")
def vllm_server() -> Any:
    """The shared CPU vLLM server: aliases gen/rev/adj on one model, started with API_KEY."""
    return cpu_vllm.pytest_server(names=ROLE_ALIASES, api_key=API_KEY)


@pytest.fixture(scope="session")
def vllm_client(vllm_server: Any) -> Any:
    with httpx.Client(
        base_url=vllm_server.base_url, headers=vllm_server.headers(), timeout=300
    ) as c:
        yield c


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    instruction: str = Field(min_length=1, max_length=120)
    answer: str = Field(min_length=1, max_length=200)
    difficulty: int = Field(ge=1, le=5)


# Bounded strings: the grammar must close them, so a reply fits in max_tokens (an unbounded
# string lets the 135M model ramble into finish_reason "length" and cut-off JSON: measured
# 24-26/32 valid at max_tokens=512 unbounded vs 32/32 bounded).
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "instruction": {"type": "string", "minLength": 1, "maxLength": 120},
        "answer": {"type": "string", "minLength": 1, "maxLength": 200},
        "difficulty": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["instruction", "answer", "difficulty"],
    "additionalProperties": False,
}


def chat(model: str, content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **extra,
    }


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert isinstance(body.get("error"), dict), body
    return body["error"]  # type: ignore[no-any-return]


# --- availability -------------------------------------------------------------------------


def test_start_script_fails_clearly_without_a_model(tmp_path: Path) -> None:
    """No server needed: start.sh refuses at once, naming setup.sh, when the model is missing."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GRA_VLLM_HOME": str(tmp_path)}
    r = subprocess.run(
        ["bash", str(cpu_vllm.START_SH), "18999", "gen"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 3, r
    assert "setup.sh" in r.stderr


def test_server_is_ready_and_serves_every_alias(
    vllm_server: Any, vllm_client: httpx.Client
) -> None:
    assert vllm_server.alive()
    models = vllm_client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == list(ROLE_ALIASES)
    assert {m["max_model_len"] for m in models} == {MAX_MODEL_LEN}
    for alias in ROLE_ALIASES:
        r = vllm_client.post("/v1/chat/completions", json=chat(alias, "Say hello.", 8))
        assert r.status_code == 200, r.text
        body = r.json()
        # vLLM names the FIRST --served-model-name in every reply, whichever alias was asked:
        # a client must not insist that the reply's "model" equals the alias it sent.
        assert body["model"] == ROLE_ALIASES[0]
        assert body["usage"]["completion_tokens"] >= 1


# --- authentication -------------------------------------------------------------------------


def test_health_needs_no_key(vllm_server: Any) -> None:
    r = httpx.get(f"{vllm_server.base_url}/health", timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-key"}], ids=["no-key", "wrong-key"]
)
def test_v1_needs_the_key(vllm_server: Any, headers: dict[str, str]) -> None:
    base = vllm_server.base_url
    for r in (
        httpx.get(f"{base}/v1/models", headers=headers, timeout=30),
        httpx.post(
            f"{base}/v1/chat/completions", json=chat("gen", "Hi", 4), headers=headers, timeout=30
        ),
    ):
        assert r.status_code == 401
        assert r.json() == {"error": "Unauthorized"}  # a bare string, not vLLM's usual error object


# --- structured output ----------------------------------------------------------------------


def test_json_schema_output_is_schema_valid(vllm_client: httpx.Client) -> None:
    """With bounded strings, compact JSON (start.sh's default structured-outputs config) and
    max_tokens above the worst case (~320 chars of single-digit tokens + keys), every reply ends
    with "stop" and validates; measured 32/32 (vs 31/32 with vLLM's default whitespace)."""
    rf = {
        "type": "json_schema",
        "json_schema": {"name": "sample", "schema": SCHEMA, "strict": True},
    }

    def ask(i: int) -> httpx.Response:
        body = chat(
            ROLE_ALIASES[i % 3],
            f"Invent one quiz question about topic {i} and answer it, as JSON.",
            512,
            response_format=rf,
            temperature=0.7,
            seed=i,
        )
        return vllm_client.post("/v1/chat/completions", json=body)

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, range(4)))
    for r in replies:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        content = choice["message"]["content"]
        assert "\n" not in content, "expected compact JSON (disable_any_whitespace)"
        Sample.model_validate_json(content)
        try:
            import jsonschema  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            continue
        jsonschema.validate(json.loads(content), SCHEMA)


def test_json_schema_cut_by_max_tokens_is_finish_length(vllm_client: httpx.Client) -> None:
    """Structured output is valid only when finish_reason is "stop": max_tokens cuts it off."""
    rf = {"type": "json_schema", "json_schema": {"name": "sample", "schema": SCHEMA}}
    r = vllm_client.post(
        "/v1/chat/completions", json=chat("gen", "A quiz question as JSON.", 5, response_format=rf)
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(choice["message"]["content"])


def test_invalid_json_schema_is_400(vllm_client: httpx.Client) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    r = vllm_client.post("/v1/chat/completions", json=chat("gen", "Hi", 8, response_format=rf))
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "BadRequestError"
    # backend "auto": "Grammar error: Invalid type: nonsense"; backend "xgrammar" (start.sh):
    # "Failed to transform json schema into a grammar: ... Unsupported type \"nonsense\""
    assert "nonsense" in err["message"]


# --- error replies --------------------------------------------------------------------------


def test_max_tokens_over_max_model_len_is_400(vllm_client: httpx.Client) -> None:
    r = vllm_client.post("/v1/chat/completions", json=chat("gen", "Hi", 2 * MAX_MODEL_LEN))
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "BadRequestError"
    assert err["param"] == "max_tokens"
    assert err["code"] == 400
    assert (
        f"max_tokens={2 * MAX_MODEL_LEN} cannot be greater than max_model_len={MAX_MODEL_LEN}"
        in err["message"]
    )


def test_prompt_too_long_is_400(vllm_client: httpx.Client) -> None:
    r = vllm_client.post(
        "/v1/chat/completions", json=chat("gen", "hello " * (MAX_MODEL_LEN + 500), 16)
    )
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "BadRequestError"
    assert err["param"] == "input_tokens"
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in err["message"]


def test_prompt_plus_max_tokens_over_the_limit_is_cut_not_rejected(
    vllm_client: httpx.Client,
) -> None:
    """vLLM 0.32 does not reject prompt + max_tokens > max_model_len: it answers 200 and stops at
    the context limit with finish_reason "length" (the pipeline must treat that as a cut reply)."""
    body = chat("rev", "hello " * (MAX_MODEL_LEN - 60), 500, ignore_eos=True)
    r = vllm_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["choices"][0]["finish_reason"] == "length"
    assert j["usage"]["total_tokens"] == MAX_MODEL_LEN
    assert j["usage"]["completion_tokens"] < 500


def test_unknown_model_is_404(vllm_client: httpx.Client) -> None:
    r = vllm_client.post("/v1/chat/completions", json=chat("no-such-model", "Hi", 8))
    assert r.status_code == 404
    err = error_of(r)
    assert err["type"] == "NotFoundError"
    assert err["param"] == "model"
    assert "no-such-model" in err["message"]
    for alias in ROLE_ALIASES:
        assert alias in err["message"]  # "Valid aliases: gen, rev, adj."


def test_malformed_request_is_400(vllm_client: httpx.Client) -> None:
    r = vllm_client.post("/v1/chat/completions", json={"model": "gen", "messages": "not-a-list"})
    assert r.status_code == 400
    assert error_of(r)["param"] == "body.messages"


# --- batching -------------------------------------------------------------------------------


def test_concurrent_requests_are_batched(vllm_client: httpx.Client) -> None:
    """Continuous batching: 8 concurrent requests take far less than 8x one request."""
    tokens = 32

    def gen(i: int) -> int:
        r = vllm_client.post(
            "/v1/chat/completions",
            json=chat("gen", f"Tell a story about robot {i}.", tokens, ignore_eos=True),
        )
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["completion_tokens"])

    gen(0)  # warm
    t0 = time.monotonic()
    assert gen(1) == tokens
    single = time.monotonic() - t0
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(gen, range(8)))
    batch = time.monotonic() - t0
    assert counts == [tokens] * 8
    assert batch < 4 * single, f"8 concurrent took {batch:.1f}s vs {single:.1f}s for one"

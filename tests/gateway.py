"""A real LiteLLM proxy in front of an upstream (the fake server), for the @gateway tests.

Not a test module: tests/test_gateway.py and servers/litellm/observe.py import it.

The proxy comes from the venv that servers/litellm/setup.sh builds at
``${GRA_LITELLM_HOME:-$HOME/.cache/gra-async/litellm}/venv``. Without that venv,
``require_litellm()`` skips the calling test, or fails it when GRA_REQUIRE_GATEWAY=1
(as the vLLM tests do with GRA_REQUIRE_VLLM).

The config written here keeps the proxy out of the client's way, so a test sees what the
upstream did and not what LiteLLM made of it: no retries (``num_retries: 0`` in both
``litellm_settings`` and ``router_settings``), an upstream timeout of ``request_timeout``
seconds instead of LiteLLM's 6000, no database (so no virtual keys: the master key is the
only key), and nothing fetched from the network at start. A per-model ``rpm`` makes the
proxy itself refuse calls over it; LiteLLM only enforces that with the
``usage-based-routing-v2`` strategy, so that strategy is switched on when any rpm is given.

The observe_* functions send one situation each through a running proxy and return what
came back (status, the headers that matter, body, seconds); the tests assert on them and
observe.py prints them. servers/litellm/README.md quotes what they found.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

LITELLM_VERSION = "1.108.7"  # what servers/litellm/setup.sh installs
HOME_ENV = "GRA_LITELLM_HOME"
REQUIRE_ENV = "GRA_REQUIRE_GATEWAY"
UPSTREAM_KEY_ENV = "GRA_GATEWAY_UPSTREAM_KEY"  # how the upstream key reaches the proxy
MASTER_KEY_ENV = "GRA_GATEWAY_MASTER_KEY"  # and its own master key: neither is in the file

DEFAULT_MASTER_KEY = "sk-gra-gateway-1"  # LiteLLM wants master keys to start with "sk-"
START_TIMEOUT = 120.0  # seconds; the proxy takes ~15-30 s to import and start on 2 cores

# LiteLLM fetches a model cost map and a few other JSON files from the network at import and
# start-up (it retries for several seconds, then falls back to its bundled copies); these use
# the bundled copies at once. Telemetry is off by default in 1.108 but the variable is set all
# the same.
QUIET_ENV: Mapping[str, str] = {
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOG": "WARNING",
    "PYTHONUNBUFFERED": "1",
    "NO_PROXY": "127.0.0.1,localhost",
}
# A database turns on virtual keys, spend logs and a Prisma client; these tests run without.
DROPPED_ENV = ("DATABASE_URL", "DIRECT_URL", "LITELLM_MASTER_KEY", "REDIS_URL", "REDIS_HOST",
               "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")


def litellm_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "gra-async" / "litellm")


def litellm_bin() -> Path:
    return litellm_home() / "venv" / "bin" / "litellm"


def require_litellm() -> Path:
    """The proxy's executable; skip (or fail with GRA_REQUIRE_GATEWAY=1) when it is missing."""
    exe = litellm_bin()
    if exe.is_file() and (litellm_home() / "ready").is_file():
        return exe
    why = f"LiteLLM proxy not set up at {exe}: run `bash servers/litellm/setup.sh`"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{why} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclasses.dataclass(frozen=True)
class Route:
    """One served model name and where the proxy sends it."""

    name: str  # what clients ask for
    upstream: str  # the upstream's model name (sent as "openai/<upstream>")
    rpm: int | None = None  # the proxy's own limit for this model
    timeout: float | None = None  # the proxy's upstream timeout for this model, seconds


class LiteLLMProxy:
    """`litellm --config` as a child process on 127.0.0.1, in front of one upstream.

    ``models`` is a list of names (served under the same name upstream) or ``Route``s;
    ``rpm`` adds a proxy-side limit to the named models. The config and the log
    (``log_path``) live in ``workdir`` (a fresh temp dir unless given).
    """

    def __init__(
        self,
        upstream_base_url: str,
        *,
        upstream_api_key: str | None = None,
        models: Sequence[str | Route] = ("gen-a", "rev-b", "rev-c", "adj-d"),
        rpm: Mapping[str, int] | None = None,
        master_key: str = DEFAULT_MASTER_KEY,
        request_timeout: float = 60.0,
        num_retries: int | None = 0,
        workdir: Path | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.exe = require_litellm()
        self.upstream_base_url = upstream_base_url.rstrip("/")
        self.upstream_api_key = upstream_api_key
        limits = dict(rpm or {})
        self.routes: list[Route] = []
        for item in models:
            route = item if isinstance(item, Route) else Route(item, item)
            if route.name in limits:
                route = dataclasses.replace(route, rpm=limits.pop(route.name))
            self.routes.append(route)
        if limits:
            raise ValueError(f"rpm given for models that are not served: {sorted(limits)}")
        self.master_key = master_key
        self.request_timeout = request_timeout
        self.num_retries = num_retries  # None: LiteLLM's own default (it retries)
        self.start_timeout = start_timeout
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gra-litellm-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "proxy.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0  # how many times the proxy was started (restart() adds one)
        self.start_seconds = 0.0  # how long the last start took until it answered

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    def launch(cls, upstream_base_url: str, **kwargs: Any) -> LiteLLMProxy:
        """Create and start; closes what it made if the start fails."""
        proxy = cls(upstream_base_url, **kwargs)
        try:
            proxy.start()
        except BaseException:
            proxy.close()
            raise
        return proxy

    def config(self) -> dict[str, Any]:
        """The proxy config as data (keys are `os.environ/` references, not values)."""
        model_list: list[dict[str, Any]] = []
        for route in self.routes:
            params: dict[str, Any] = {
                "model": f"openai/{route.upstream}",
                "api_base": self.upstream_base_url,
                # LiteLLM's OpenAI client wants some key even when the upstream needs none.
                "api_key": f"os.environ/{UPSTREAM_KEY_ENV}",
            }
            if route.rpm is not None:
                params["rpm"] = route.rpm
            if route.timeout is not None:
                params["timeout"] = route.timeout
            model_list.append({"model_name": route.name, "litellm_params": params})
        settings: dict[str, Any] = {"request_timeout": self.request_timeout}
        router: dict[str, Any] = {}
        if self.num_retries is not None:
            settings["num_retries"] = router["num_retries"] = self.num_retries
        if any(route.rpm is not None for route in self.routes):
            router["routing_strategy"] = "usage-based-routing-v2"
        return {
            "model_list": model_list,
            "litellm_settings": settings,
            "router_settings": router,
            "general_settings": {"master_key": f"os.environ/{MASTER_KEY_ENV}"},
        }

    def write_config(self) -> Path:
        # JSON is YAML: no YAML library needed on the test side.
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")
        return self.config_path

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        env.update(QUIET_ENV)
        env[UPSTREAM_KEY_ENV] = self.upstream_api_key or "sk-unused"
        env[MASTER_KEY_ENV] = self.master_key
        return env

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the proxy is running already")
        self.write_config()
        if not self.port:
            self.port = free_port()
        argv = [str(self.exe), "--config", str(self.config_path),
                "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts + 1}: port {self.port}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                argv, cwd=self.workdir, env=self.environment(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.starts += 1
        try:
            self.start_seconds = self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> float:
        """Poll until /health/liveliness and /v1/models (with the key) answer 200; seconds."""
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"litellm exited with {self.process.returncode} at start:\n"
                                       + self.log_tail())
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health/liveliness").status_code == 200:
                        models = client.get(f"{self.base_url}/models", headers=self.headers())
                        if models.status_code == 200:
                            return time.monotonic() - t0
                if time.monotonic() > deadline:
                    raise TimeoutError(f"litellm not ready after {self.start_timeout:.0f} s:\n"
                                       + self.log_tail())
                time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM to the proxy's process group, SIGKILL after 10 s. Safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def restart(self, master_key: str | None = None, *, new_port: bool = False) -> None:
        """Stop and start again on the same port (unless `new_port`), with another master key
        if given: a key rotation as a running client sees it. While it restarts (~15-30 s)
        connections to the port are refused."""
        self.stop()
        if master_key is not None:
            self.master_key = master_key
        if new_port:
            self.port = 0
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LiteLLMProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- addresses and helpers ------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes: ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.master_key}"}

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------------
# Observations: one situation each, through a running proxy


@dataclasses.dataclass
class Reply:
    """What a client got back: status (0: no HTTP answer), headers, JSON or text body."""

    status: int
    headers: dict[str, str]
    body: Any
    seconds: float
    error: str | None = None  # the transport error when there was no answer

    def facts(self) -> dict[str, Any]:
        """The parts worth quoting: status, body, timing and the rate/retry headers."""
        return {"status": self.status, "seconds": round(self.seconds, 3),
                "headers": notable_headers(self.headers), "body": self.body,
                **({"error": self.error} if self.error else {})}


NOTABLE_PREFIXES = ("x-ratelimit-", "llm_provider-", "retry-after", "x-litellm-attempted-",
                    "x-litellm-max-retries", "x-litellm-timeout", "x-litellm-model-group",
                    "content-type")


def notable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(headers.items())
            if k.lower().startswith(NOTABLE_PREFIXES)}


def chat(proxy: LiteLLMProxy, model: str = "gen-a", *, key: str | None = None,
         content: str = "hello", timeout: float = 60.0, auth: bool = True) -> Reply:
    """One non-streaming chat call through the proxy, as a plain HTTP client sends it."""
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 64}
    headers = proxy.headers(key) if auth else {}
    t0 = time.monotonic()
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            response = client.post(f"{proxy.base_url}/chat/completions", json=body,
                                   headers=headers)
    except httpx.HTTPError as exc:
        return Reply(0, {}, None, time.monotonic() - t0, f"{type(exc).__name__}: {exc}")
    seconds = time.monotonic() - t0
    try:
        parsed: Any = response.json()
    except ValueError:
        parsed = response.text
    return Reply(response.status_code, dict(response.headers), parsed, seconds)


def _unique(tag: str) -> str:
    return f"{tag} {time.time_ns()}"  # distinct prompts: no cache anywhere can answer


def observe_wrong_key(proxy: LiteLLMProxy, rotated_key: str = "sk-gra-gateway-rotated"
                      ) -> dict[str, Any]:
    """Restart the proxy with a rotated master key; call with the old key, with the new one,
    with a key of another shape and with no Authorization header at all."""
    old = proxy.master_key
    proxy.restart(master_key=rotated_key)
    return {
        "old_key_after_rotation": chat(proxy, key=old, content=_unique("old key")).facts(),
        "new_key": chat(proxy, content=_unique("new key")).facts(),
        "key_without_sk_prefix": chat(proxy, key="not-a-litellm-key").facts(),
        "no_authorization_header": chat(proxy, auth=False).facts(),
    }


def observe_unknown_model(proxy: LiteLLMProxy) -> dict[str, Any]:
    return {"unknown_model": chat(proxy, model="no-such-model").facts()}


def observe_upstream_rate_limit(proxy: LiteLLMProxy, upstream: Any, model: str = "gen-a"
                                ) -> dict[str, Any]:
    """The fake upstream limits to 1 rpm (and a large tpm, to see the token headers too):
    the first call is a 200 carrying its x-ratelimit-* headers, the second a 429."""
    upstream.restore(rpm=1, tpm=100_000)
    try:
        ok = chat(proxy, model, content=_unique("rate ok"))
        limited = chat(proxy, model, content=_unique("rate limited"))
        stats = upstream.stats()
    finally:
        upstream.restore()
    return {"upstream_200": ok.facts(), "upstream_429": limited.facts(),
            "upstream_saw": stats["status"]}


def observe_gateway_rate_limit(proxy: LiteLLMProxy, upstream: Any, model: str,
                               calls: int = 4) -> dict[str, Any]:
    """Calls to a model with a proxy-side rpm until the proxy itself refuses one."""
    upstream.restore()
    replies = [chat(proxy, model, content=_unique(f"gateway rpm {i}")) for i in range(calls)]
    limit = next((r.rpm for r in proxy.routes if r.name == model), None)
    return {"model": model, "rpm": limit, "statuses": [r.status for r in replies],
            "upstream_saw": upstream.stats()["status"],
            "first_200": next((r.facts() for r in replies if r.status == 200), None),
            "first_429": next((r.facts() for r in replies if r.status == 429), None)}


def observe_upstream_errors(proxy: LiteLLMProxy, upstream: Any) -> dict[str, Any]:
    """Scripted upstream errors, more of them in a row than LiteLLM's allowed_fails (3): are
    they passed on as they are, sent upstream once only, and does the next call still go
    upstream (no cooldown of the model)?"""
    script = [500, 502, 503, 429, 500, 503]
    upstream.restore(status_script=script)
    replies = [chat(proxy, content=_unique(f"scripted {s}")) for s in script]
    after = chat(proxy, content=_unique("after the script"))
    stats = upstream.stats()
    upstream.restore()
    return {"scripted": script, "statuses": [r.status for r in replies],
            "next_call": after.status,
            "upstream_chat_requests": stats["chat_requests"],
            "replies": {str(s): r.facts() for s, r in zip(script[:4], replies, strict=False)}}


def observe_default_retries(upstream: Any, upstream_api_key: str | None,
                            model: str = "gen-a") -> dict[str, Any]:
    """A second proxy with LiteLLM's own retry defaults (no num_retries in its config):
    how many upstream calls does one client call make on 500s, and on a 429?"""
    out: dict[str, Any] = {}
    with proxy_in_front(upstream, upstream_api_key=upstream_api_key, models=[model],
                        num_retries=None) as proxy:
        # One 500 (then the upstream is fine), three 500s, one 429 with Retry-After: 1.
        for name, script in (("500", [500]), ("500x3", [500, 500, 500]), ("429", [429])):
            upstream.restore(status_script=script, retry_after=1)
            reply = chat(proxy, model, content=_unique(f"default retries {name}"))
            stats = upstream.stats()
            out[name] = {"scripted": script, "client_status": reply.status,
                                "seconds": round(reply.seconds, 3),
                                "headers": notable_headers(reply.headers),
                                "upstream_status_counts": stats["status"],
                                "upstream_chat_requests": stats["chat_requests"]}
        upstream.restore()
    return out


def observe_upstream_down(proxy: LiteLLMProxy, upstream: Any, mode: str,
                          down_for: float = 3.0) -> dict[str, Any]:
    """The upstream down in this `down_mode` ("503", "reset", "refuse") for `down_for` s."""
    upstream.restore(down=True, down_mode=mode, down_for=down_for)
    replies = [chat(proxy, content=_unique(f"down {mode} {i}")) for i in range(2)]
    if mode == "refuse":  # its control endpoint is gone too until down_for has passed
        _wait_up(upstream, down_for + 10)
    upstream.restore()
    after = chat(proxy, content=_unique(f"back after {mode}"))
    return {"mode": mode, "first": replies[0].facts(), "second": replies[1].facts(),
            "after_upstream_back": after.status}


def observe_upstream_hang(proxy: LiteLLMProxy, upstream: Any, model: str) -> dict[str, Any]:
    """The upstream never answers; `model` has a short per-model timeout in the proxy."""
    upstream.restore(status_script=["hang"])
    reply = chat(proxy, model, content=_unique("hang"))
    stats = upstream.stats()
    upstream.restore()
    limit = next((r.timeout for r in proxy.routes if r.name == model), None)
    return {"model": model, "proxy_timeout": limit, "reply": reply.facts(),
            "upstream_chat_requests": stats["chat_requests"]}


def observe_client_disconnect(proxy: LiteLLMProxy, upstream: Any, latency: float = 3.0,
                              client_timeout: float = 0.5) -> dict[str, Any]:
    """The client gives up while the upstream is still working: does the proxy cancel the
    upstream call? (A direct client that hangs up drops the fake server's in_flight to 0.)"""
    upstream.restore(latency=latency)
    t0 = time.monotonic()
    reply = chat(proxy, content=_unique("disconnect"), timeout=client_timeout)
    time.sleep(0.5)
    in_flight_after_hangup = upstream.stats()["in_flight"]
    deadline = t0 + latency + 5
    while upstream.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    finished = time.monotonic() - t0
    stats = upstream.stats()
    upstream.restore()
    return {"client": reply.facts(), "upstream_latency": latency,
            "upstream_in_flight_0.5s_after_hangup": in_flight_after_hangup,
            "upstream_call_ended_after_s": round(finished, 2),
            "upstream_status_counts": stats["status"],
            "upstream_chat_requests": stats["chat_requests"]}


def _wait_up(upstream: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, httpx.HTTPError):
            if httpx.get(f"{upstream.url}/health", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError("the fake upstream did not come back up")


@contextlib.contextmanager
def proxy_in_front(upstream: Any, **kwargs: Any) -> Iterator[LiteLLMProxy]:
    """A started proxy in front of a FakeServerProcess (pass its key as upstream_api_key)."""
    proxy = LiteLLMProxy.launch(upstream.base_url, **kwargs)
    try:
        yield proxy
    finally:
        proxy.close()

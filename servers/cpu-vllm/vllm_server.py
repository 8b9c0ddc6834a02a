"""Start and stop the real CPU vLLM server (set up by setup.sh) from Python: tests and tools.

Standard library only (pytest is imported lazily by :func:`pytest_server`). The directory name
has a hyphen, so load this file by path::

    import importlib.util, pathlib, sys
    _p = pathlib.Path(__file__).parents[1] / "servers" / "cpu-vllm" / "vllm_server.py"
    cpu_vllm = sys.modules.get("gra_cpu_vllm_server")
    if cpu_vllm is None:  # one module object per process: shared_server's cache lives in it
        _spec = importlib.util.spec_from_file_location("gra_cpu_vllm_server", _p)
        cpu_vllm = importlib.util.module_from_spec(_spec)
        sys.modules["gra_cpu_vllm_server"] = cpu_vllm
        _spec.loader.exec_module(cpu_vllm)

    server = cpu_vllm.pytest_server(names=("gen", "rev", "adj"), api_key="k")  # in a fixture
    server.openai_base_url   # "http://127.0.0.1:<port>/v1"

:func:`shared_server` keeps one server per (names, api_key) for the whole Python process, so
several test modules (or fixtures) that ask for the same aliases share one server (~30-70 s to
start, ~4.5 GB RAM); it is stopped when the process exits, and a watchdog started by start.sh
also stops it if this process dies without cleaning up.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
START_SH = HERE / "start.sh"
SETUP_SH = HERE / "setup.sh"
DEFAULT_MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 2048


class VLLMStartError(RuntimeError):
    """start.sh could not bring the server to /health 200 (its log tail is in the message)."""


def vllm_home() -> Path:
    return Path(os.environ.get("GRA_VLLM_HOME") or Path.home() / ".cache" / "gra-async" / "vllm")


def venv_python() -> Path:
    return Path(os.environ.get("GRA_VLLM_PYTHON_BIN") or vllm_home() / "venv" / "bin" / "python")


def model_dir() -> Path:
    return Path(os.environ.get("GRA_VLLM_MODEL_DIR") or vllm_home() / "models" / DEFAULT_MODEL)


def missing_reason() -> str | None:
    """Why the server cannot be started here (None when the venv and the model are in place)."""
    py, model = venv_python(), model_dir()
    if not py.exists():
        return f"no vLLM venv at {py} (run: bash servers/cpu-vllm/setup.sh)"
    if not (model / "config.json").is_file():
        return f"no converted model at {model} (run: bash servers/cpu-vllm/setup.sh)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VLLMServer:
    pid: int
    host: str
    port: int
    names: tuple[str, ...]
    api_key: str | None
    log: Path
    ready_s: float
    max_model_len: int = MAX_MODEL_LEN
    _stopped: bool = field(default=False, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def memory_mib(self) -> dict[str, int]:
        """RSS and PSS in MiB summed over the server's process group (api server, engine, worker)."""
        rss = pss = 0
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[2]) != self.pid:
                    continue
                for ln in (p / "smaps_rollup").read_text().splitlines():
                    if ln.startswith("Rss:"):
                        rss += int(ln.split()[1])
                    elif ln.startswith("Pss:"):
                        pss += int(ln.split()[1])
            except (OSError, IndexError, ValueError):
                continue
        return {"rss_mib": rss // 1024, "pss_mib": pss // 1024}

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after `timeout` seconds."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def cleanup(self) -> None:
        """Stop it and remove its private run directory (pidfile + log)."""
        self.stop()
        if self.log.parent.name.startswith("gra-vllm-"):
            shutil.rmtree(self.log.parent, ignore_errors=True)


_LINE = re.compile(r"pid=(\d+) url=http://([^:]+):(\d+)/v1 log=(\S+) pidfile=\S+ ready_s=([\d.]+)")


def start_server(
    names: Sequence[str] = (DEFAULT_MODEL,),
    api_key: str | None = None,
    port: int | None = None,
    timeout: float = 300.0,
    extra_args: Sequence[str] = (),
    watch_parent: bool = True,
) -> VLLMServer:
    """Start a server through start.sh and return once /health answers 200."""
    reason = missing_reason()
    if reason:
        raise VLLMStartError(reason)
    port = port or free_port()
    run_dir = Path(tempfile.mkdtemp(prefix=f"gra-vllm-{port}-"))
    env = dict(os.environ)
    env.pop("GRA_VLLM_API_KEY", None)
    if api_key:
        env["GRA_VLLM_API_KEY"] = api_key
    env["GRA_VLLM_PIDFILE"] = str(run_dir / "server.pid")
    env["GRA_VLLM_LOG"] = str(run_dir / "server.log")
    env["GRA_VLLM_READY_TIMEOUT"] = str(int(timeout))
    if watch_parent:
        env["GRA_VLLM_WATCH_PID"] = str(os.getpid())
    cmd = ["bash", str(START_SH), str(port), *names]
    if extra_args:
        cmd += ["--", *extra_args]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 60)
    except subprocess.TimeoutExpired as e:
        raise VLLMStartError(f"start.sh did not return in {timeout + 60:.0f}s") from e
    m = _LINE.search(proc.stdout)
    if proc.returncode != 0 or not m:
        raise VLLMStartError(
            f"start.sh exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return VLLMServer(
        pid=int(m.group(1)),
        host=m.group(2),
        port=int(m.group(3)),
        names=tuple(names),
        api_key=api_key,
        log=Path(m.group(4)),
        ready_s=float(m.group(5)),
    )


@contextlib.contextmanager
def running(**kwargs: object) -> Iterator[VLLMServer]:
    """``with running(names=("gen",)) as server: ...`` — a private server, stopped on exit."""
    server = start_server(**kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.cleanup()


_shared: dict[tuple[tuple[str, ...], str | None], VLLMServer] = {}
_shared_errors: dict[tuple[tuple[str, ...], str | None], str] = {}
_lock = threading.Lock()


def shared_server(
    names: Sequence[str] = ("gen", "rev", "adj"), api_key: str | None = None
) -> VLLMServer:
    """One server per (names, api_key) for this process; stopped at exit. A failed start is
    remembered, so later callers fail at once instead of waiting again."""
    key = (tuple(names), api_key)
    with _lock:
        if key in _shared_errors:
            raise VLLMStartError(_shared_errors[key])
        server = _shared.get(key)
        if server is not None and server.alive():
            return server
        try:
            server = start_server(names=names, api_key=api_key)
        except VLLMStartError as e:
            _shared_errors[key] = str(e)
            raise
        _shared[key] = server
        atexit.register(server.cleanup)
        return server


def required() -> bool:
    """GRA_REQUIRE_VLLM=1 turns a missing setup from a skip into a failure (CI sets it)."""
    return os.environ.get("GRA_REQUIRE_VLLM", "") not in ("", "0", "false", "no")


def pytest_server(
    names: Sequence[str] = ("gen", "rev", "adj"), api_key: str | None = None
) -> VLLMServer:
    """For a pytest fixture: the shared server, or skip (fail with GRA_REQUIRE_VLLM=1) when the
    venv/model is absent. A setup that is present but fails to start always fails."""
    import pytest

    reason = missing_reason()
    if reason:
        if required():
            pytest.fail(f"GRA_REQUIRE_VLLM=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        return shared_server(names=names, api_key=api_key)
    except VLLMStartError as e:
        pytest.fail(f"the CPU vLLM server did not start: {e}", pytrace=False)
        raise  # unreachable; for type checkers

"""Pipeline throughput against the real vLLM CPU server: `--concurrency 1` vs `16`.

    python bench/vllm_pipeline_bench.py                    # starts its own server (~30-70 s)
    python bench/vllm_pipeline_bench.py --url http://127.0.0.1:8000/v1 --key-env MY_KEY
    python bench/vllm_pipeline_bench.py --tasks 32 --concurrency 1,4,16

Each concurrency gets a fresh run directory and the same plan (same run seed), driven through
`gra_async.cli.main` in-process exactly as `python -m gra_async run` would be. Reported per run:
wall time, model calls/s (journaled replies), tasks decided/s, accepted/s and completion
tokens/s. SmolLM2-135M reviewers score almost everything low, so accepted/s is usually 0:
decided/s and tokens/s are the comparable numbers. Generation is sampled (temperature 0.8),
so two runs write different amounts of text; compare tokens/s, not wall time alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sqlite3
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from gra_async.cli import main

REPO = Path(__file__).resolve().parents[1]
ALIASES = ("gen", "rev", "adj")
DEFAULT_KEY_ENV = "GRA_BENCH_VLLM_KEY"


def _helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gra_cpu_vllm_server", REPO / "servers" / "cpu-vllm" / "vllm_server.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _server(url: str | None, key_env: str) -> Iterator[str]:
    """The given server, or a private one started through servers/cpu-vllm (stopped after)."""
    if url:
        yield url
        return
    key = os.environ.setdefault(key_env, "gra-bench-key")
    with _helper().running(names=ALIASES, api_key=key) as server:
        print(f"vLLM ready in {server.ready_s:.0f}s at {server.openai_base_url}", file=sys.stderr)
        yield str(server.openai_base_url)


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def _warm(url: str, key_env: str) -> None:
    """One small request so the first run does not pay the server's first-request costs."""
    body = json.dumps({"model": "gen", "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 8}).encode()
    request = urllib.request.Request(
        f"{url}/chat/completions", data=body, method="POST",
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {os.environ.get(key_env, '')}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()


def bench_one(url: str, key_env: str, tasks: int, concurrency: int, work: Path,
              max_tokens: int, review_max_tokens: int) -> dict[str, Any]:
    """One run of `tasks` tasks at `concurrency` calls in flight; its throughput numbers."""
    run_dir = work / f"c{concurrency}"
    config = work / f"c{concurrency}.toml"
    config.write_text(f"[run]\nmax_tasks = {tasks}\n\n[generation]\nmax_tokens = {max_tokens}\n"
                      f"review_max_tokens = {review_max_tokens}\nverdict_max_tokens = 128\n")
    started = time.monotonic()
    code, _, err = _cli(
        "run", "--config", str(config), "--run-dir", str(run_dir), "--target", str(tasks),
        "--concurrency", str(concurrency),
        "--endpoint", f"generator=gen@{url}", "--endpoint", f"reviewer=rev@{url}",
        "--endpoint", f"adjudicator=adj@{url}", "--api-key-env", key_env)
    wall = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"run at concurrency {concurrency} exited {code}: {err.strip()[-500:]}")
    code, out, err = _cli("status", "--run-dir", str(run_dir), "--json")
    status = json.loads(out)
    with contextlib.closing(sqlite3.connect(run_dir / "journal.sqlite")) as conn:
        tokens_out, attempts = conn.execute(
            "SELECT sum(completion_tokens), sum(attempts) FROM calls").fetchone()
    decided = status["accepted"] + status["rejected"] + status["failed"]
    return {
        "concurrency": concurrency,
        "wall_s": round(wall, 1),
        "calls": status["calls"],
        "attempts": attempts or 0,
        "decided": decided,
        "accepted": status["accepted"],
        "rejected": status["rejected"],
        "failed": status["failed"],
        "duplicates": status["duplicates"],
        "failures": status["failures"],
        "completion_tokens": tokens_out or 0,
        "calls_per_s": round(status["calls"] / wall, 3),
        "decided_per_s": round(decided / wall, 3),
        "accepted_per_s": round(status["accepted"] / wall, 3),
        "tokens_per_s": round((tokens_out or 0) / wall, 1),
    }


def main_bench(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", help="an already running server's /v1 URL (aliases gen/rev/adj)")
    parser.add_argument("--key-env", default=DEFAULT_KEY_ENV, help="variable holding its key")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated list")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--review-max-tokens", type=int, default=200)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with _server(args.url, args.key_env) as url, tempfile.TemporaryDirectory() as tmp:
        _warm(url, args.key_env)
        for concurrency in levels:
            row = bench_one(url, args.key_env, args.tasks, concurrency, Path(tmp),
                            args.max_tokens, args.review_max_tokens)
            print(json.dumps(row), flush=True)
            rows.append(row)
    head = ("c", "wall s", "calls", "calls/s", "decided/s", "accepted", "accepted/s", "tok/s")
    print("\n" + " | ".join(head))
    for r in rows:
        print(" | ".join(str(r[k]) for k in ("concurrency", "wall_s", "calls", "calls_per_s",
                                              "decided_per_s", "accepted", "accepted_per_s",
                                              "tokens_per_s")))


if __name__ == "__main__":
    main_bench()

"""Outages, key rotations and end-of-run waste, measured on one or more gra-async checkouts.

    bash servers/litellm/setup.sh                            # once: the LiteLLM proxy venv
    python bench/outage_bench.py                             # this checkout (~3 min)
    git -C . worktree add /tmp/gra-before 38369d4            # an older commit, to compare
    python bench/outage_bench.py --repo before=/tmp/gra-before --repo after=.
    python bench/outage_bench.py --scenarios waste --repo /tmp/gra-before --json out.json
    git -C . worktree remove /tmp/gra-before

Each `--repo [LABEL=]PATH` is run as `PYTHONPATH=PATH python -m gra_async ...` from a scratch
directory (so the package imported is PATH's, whatever is installed); the fake server and the
LiteLLM proxy always come from this checkout (`gra_async.testing.fake_server`,
`tests/gateway.py`). Reviewers score every sample 9, so every generated sample is accepted
and a sample costs 3 calls. Upstream latency `--latency` +- `--jitter` (0.5 +- 0.1 s).

outage    `run --target 60` through the proxy; once the upstream has seen `--trigger` chat
          requests the proxy is stopped, kept down `--outage` s (45), then started again on
          the same port (its start adds ~10 s of downtime).
rotation  `run --target 60` through the proxy with its master key; once the upstream has
          seen `--trigger` chat requests the proxy is restarted with a new master key (the
          old key then gets 400 "No connected db."); when that run ends it is rerun at once
          with the new key (with --retry-failed where the checkout has it).
waste     `run --target 30` against the fake server directly, default concurrency. Wasted
          calls = chat requests the upstream got minus the journaled calls of finished
          (accepted/rejected/failed) samples = calls abandoned in flight (the upstream's count
          minus the journaled calls, i.e. `status --json` `abandoned_calls` where the checkout
          has it) + journaled calls of tasks left unfinished.

Figures per scenario: tasks failed for good (`status` `failed` at the end), calls spent (the
upstream's `chat_requests`; `status` `calls`, i.e. journaled replies), seconds idle after
recovery (from the gateway answering `/health/liveliness` again to the next chat request the
upstream gets, polled every 0.1 s; "never": none came; for a rotation that includes the
old-key run noticing and ending, 0 when it ended before the gateway was back, and the rerun's
start), accepted / target, exit codes, wall time. Keys an older checkout's `status --json`
lacks are shown as "-".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))  # tests/gateway.py: the LiteLLM proxy helper

from gra_async.defaults import CRITERIA  # noqa: E402
from gra_async.testing.fake_server import FakeServerProcess  # noqa: E402
from tests.gateway import LiteLLMProxy, litellm_bin, litellm_home  # noqa: E402

MODELS = ("gen-a", "rev-b", "rev-c", "adj-d")
REVIEW = json.dumps({"scores": dict.fromkeys(CRITERIA, 9), "feedback": "ok"})
# Matches the reviewer prompt of every version since the prompts were written.
SCORE_RULES = [{"contains": "Score the sample", "content": REVIEW}]
KEY_ENV = "OUTAGE_BENCH_KEY"  # not GRA_*: gra-async reads GRA_<SECTION>__<KEY> as config
FIRST_KEY = "sk-outage-bench-1"  # LiteLLM master keys start with "sk-"
POLL = 0.1  # seconds between polls of the upstream's /_stats and the proxy's liveliness
SCENARIOS = ("outage", "rotation", "waste")


# --- one checkout --------------------------------------------------------------------------


@dataclasses.dataclass
class Checkout:
    label: str
    path: Path
    commit: str = "?"
    package: str = "?"  # where `import gra_async` resolved, as the runs see it
    retry_failed: bool = False  # `run --retry-failed` exists

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRA_")}
        env["PYTHONPATH"] = str(self.path)
        env["NO_PROXY"] = "127.0.0.1,localhost"
        env.update(extra or {})
        return env

    def gra(self, args: Sequence[str], cwd: Path, extra: dict[str, str] | None = None,
            timeout: float = 900.0) -> tuple[int, str, str, float]:
        """`python -m gra_async ARGS` from this checkout: exit code, stdout, stderr, seconds."""
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "gra_async", *args], cwd=cwd,
                              env=self.env(extra), capture_output=True, text=True,
                              timeout=timeout, check=False)
        return done.returncode, done.stdout, done.stderr, time.monotonic() - started

    def status(self, run_dir: Path, cwd: Path) -> dict[str, Any]:
        code, out, err, _ = self.gra(["status", "--run-dir", str(run_dir), "--json"], cwd)
        if code != 0:
            return {"status_error": (err.strip().splitlines() or ["?"])[-1]}
        got: dict[str, Any] = json.loads(out)
        return got

    def inspect(self, cwd: Path) -> None:
        done = subprocess.run(["git", "-C", str(self.path), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=False)
        self.commit = done.stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(self.path), "status", "--porcelain",
                                "--untracked-files=no", "--", "gra_async"],
                               capture_output=True, text=True, check=False).stdout.strip()
        if dirty:
            self.commit += "+dirty"
        probe = subprocess.run([sys.executable, "-c", "import gra_async; print(gra_async.__file__)"],
                               cwd=cwd, env=self.env(), capture_output=True, text=True, check=False)
        self.package = probe.stdout.strip() or probe.stderr.strip()
        _, out, _, _ = self.gra(["run", "--help"], cwd)
        self.retry_failed = "--retry-failed" in out


def parse_repo(text: str) -> Checkout:
    label, sep, path = text.partition("=")
    if not sep:
        label, path = "", text
    resolved = Path(path).expanduser().resolve()
    return Checkout(label or resolved.name, resolved)


# --- measuring -----------------------------------------------------------------------------


def chat_requests(upstream: FakeServerProcess) -> int:
    count: int = upstream.stats()["chat_requests"]
    return count


def wait_calls(upstream: FakeServerProcess, calls: int, stop: threading.Event,
               timeout: float = 300.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if chat_requests(upstream) >= calls:
            return True
        time.sleep(0.02)
    return False


def wait_liveliness(proxy: LiteLLMProxy, timeout: float = 300.0) -> float | None:
    """Monotonic time of the first 200 from the proxy's /health/liveliness (polled)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{proxy.url}/health/liveliness").status_code == 200:
                    return time.monotonic()
            time.sleep(POLL)
    return None


def first_chat_after(upstream: FakeServerProcess, seen: int, since: float,
                     finished: threading.Event, timeout: float = 600.0) -> float | None:
    """Seconds from `since` to the first poll showing more than `seen` chat requests;
    None if the runs ended (or `timeout` passed) with none."""
    deadline = since + timeout
    while time.monotonic() < deadline:
        if chat_requests(upstream) > seen:
            return max(time.monotonic() - since, 0.0)
        if finished.is_set():
            return None if chat_requests(upstream) <= seen else max(time.monotonic() - since, 0.0)
        time.sleep(POLL)
    return None


@dataclasses.dataclass
class Fault:
    """What a fault thread saw: when the gateway was stopped and answered again."""

    fired: bool = False
    down_at: float | None = None
    back_at: float | None = None
    idle_after_recovery: float | None = None
    error: str | None = None


def restart_proxy(proxy: LiteLLMProxy, upstream: FakeServerProcess, fault: Fault,
                  down_for: float, master_key: str | None, finished: threading.Event) -> None:
    """Stop the proxy, keep it down `down_for` s, start it on the same port (with another
    key if given), then time the upstream's wait for its next chat request."""
    fault.down_at = time.monotonic()
    proxy.stop()
    seen = chat_requests(upstream)  # the proxy is gone: nothing more reaches the upstream
    time.sleep(down_for)
    if master_key is not None:
        proxy.master_key = master_key
    errors: list[BaseException] = []

    def start() -> None:
        try:
            proxy.start()
        except BaseException as exc:  # reported, not raised in a thread
            errors.append(exc)

    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    fault.back_at = wait_liveliness(proxy)
    starter.join()
    if errors or fault.back_at is None:
        fault.error = f"the proxy did not start again: {errors[0] if errors else 'timeout'}"
        return
    fault.idle_after_recovery = first_chat_after(upstream, seen, fault.back_at, finished)


def fault_thread(upstream: FakeServerProcess, trigger: int, finished: threading.Event,
                 action: Callable[[Fault], None]) -> tuple[threading.Thread, Fault]:
    fault = Fault()

    def body() -> None:
        try:
            if wait_calls(upstream, trigger, finished):
                fault.fired = True
                action(fault)
        except Exception as exc:  # shown in the results; the bench goes on
            fault.error = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, fault


def journal_calls(run_dir: Path) -> tuple[int, int]:
    """(journaled calls of finished samples, journaled calls of tasks not finished)."""
    uri = f"file:{run_dir / 'journal.sqlite'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        finished, total = conn.execute(
            "SELECT coalesce(sum(s.state IN ('accepted', 'rejected', 'failed')), 0), count(*) "
            "FROM calls c LEFT JOIN samples s ON s.task_id = c.task_id").fetchone()
    return int(finished), int(total) - int(finished)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# --- scenarios -----------------------------------------------------------------------------


@dataclasses.dataclass
class Bench:
    upstream: FakeServerProcess
    proxy: LiteLLMProxy | None
    scratch: Path
    args: argparse.Namespace

    def fresh_upstream(self) -> None:
        """Counters zeroed once the last scenario's calls are over: a run that ends leaves
        calls in flight, and the proxy goes on sending them upstream after the client hung
        up (seconds later when it is busy), which would be counted in the next scenario."""
        deadline = time.monotonic() + 120
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            stats = self.upstream.stats()
            if stats["chat_requests"] != last or stats["in_flight"]:
                last, quiet_since = stats["chat_requests"], time.monotonic()
            elif time.monotonic() - quiet_since >= 3.0:
                break
            time.sleep(POLL)
        self.upstream.restore(latency=self.args.latency, jitter=self.args.jitter,
                              rules=SCORE_RULES)

    def running_proxy(self) -> LiteLLMProxy:
        """The proxy, started if it is not running (a scenario leaves it up, maybe with
        another master key: `proxy.master_key` is the one in force)."""
        assert self.proxy is not None
        if self.proxy.process is None or self.proxy.process.poll() is not None:
            self.proxy.stop()
            self.proxy.start()
        return self.proxy

    def run_args(self, run_dir: Path, base_url: str, target: int, key: bool) -> list[str]:
        args = ["run", "--run-dir", str(run_dir), "--target", str(target)]
        args += ["--endpoint", f"generator=gen-a@{base_url}",
                 "--endpoint", f"reviewer=rev-b@{base_url}",
                 "--endpoint", f"reviewer=rev-c@{base_url}",
                 "--endpoint", f"adjudicator=adj-d@{base_url}"]
        if key:
            args += ["--api-key-env", KEY_ENV]
        return args

    def outcome(self, repo: Checkout, run_dir: Path, target: int) -> dict[str, Any]:
        status = repo.status(run_dir, self.scratch)
        return {
            "failed": status.get("failed"),
            "accepted": status.get("accepted"),
            "target": target,
            "status_calls": status.get("calls"),
            "upstream_chat_requests": chat_requests(self.upstream),
            "abandoned_calls": status.get("abandoned_calls"),
            "reached_target": status.get("reached_target"),
            **({"status_error": status["status_error"]} if "status_error" in status else {}),
        }

    def outage(self, repo: Checkout) -> dict[str, Any]:
        proxy = self.running_proxy()
        key = proxy.master_key
        self.fresh_upstream()
        run_dir = self.scratch / f"{repo.label}-outage"
        finished = threading.Event()
        thread, fault = fault_thread(self.upstream, self.args.trigger, finished, lambda f: (
            restart_proxy(proxy, self.upstream, f, self.args.outage, None, finished)))
        code, _, err, seconds = repo.gra(self.run_args(run_dir, proxy.base_url,
                                                       self.args.target, key=True),
                                         self.scratch, {KEY_ENV: key})
        finished.set()
        thread.join(timeout=600)
        return {**self.outcome(repo, run_dir, self.args.target), "exit": code,
                "stderr": last_line(err), "seconds": round(seconds, 1), **fault_row(fault)}

    def rotation(self, repo: Checkout) -> dict[str, Any]:
        proxy = self.running_proxy()
        old_key, new_key = proxy.master_key, f"sk-outage-bench-{time.time_ns()}"
        self.fresh_upstream()
        run_dir = self.scratch / f"{repo.label}-rotation"
        finished = threading.Event()
        thread, fault = fault_thread(self.upstream, self.args.trigger, finished, lambda f: (
            restart_proxy(proxy, self.upstream, f, 0.0, new_key, finished)))
        args = self.run_args(run_dir, proxy.base_url, self.args.target, key=True)
        code, _, err, seconds = repo.gra(args, self.scratch, {KEY_ENV: old_key})
        first_ended = time.monotonic()
        failed_first = repo.status(run_dir, self.scratch).get("failed")
        if fault.fired:  # wait for the new key to be in force before the rerun
            while thread.is_alive() and fault.back_at is None and fault.error is None:
                time.sleep(POLL)
        rerun = [*args, "--retry-failed"] if repo.retry_failed else args
        code2, _, err2, seconds2 = repo.gra(rerun, self.scratch, {KEY_ENV: new_key})
        finished.set()
        thread.join(timeout=600)
        ended_after = (None if fault.back_at is None
                       else round(max(first_ended - fault.back_at, 0.0), 1))
        return {**self.outcome(repo, run_dir, self.args.target), "failed_first_run": failed_first,
                "old_key_run_ended_after_recovery_s": ended_after,
                "exit": code, "stderr": last_line(err), "exit_rerun": code2, "stderr_rerun": last_line(err2),
                "rerun_flags": "--retry-failed" if repo.retry_failed else "",
                "seconds": round(seconds, 1), "seconds_rerun": round(seconds2, 1),
                **fault_row(fault)}

    def waste(self, repo: Checkout) -> dict[str, Any]:
        self.fresh_upstream()
        run_dir = self.scratch / f"{repo.label}-waste"
        code, _, err, seconds = repo.gra(self.run_args(run_dir, self.upstream.base_url,
                                                       self.args.waste_target, key=False),
                                         self.scratch)
        row = self.outcome(repo, run_dir, self.args.waste_target)
        sent = row["upstream_chat_requests"]
        finished_calls, unfinished_calls = journal_calls(run_dir)
        journaled = finished_calls + unfinished_calls
        wasted = sent - finished_calls
        row.update({
            "exit": code, "stderr": last_line(err), "seconds": round(seconds, 1),
            "finished_calls": finished_calls, "unfinished_calls": unfinished_calls,
            "abandoned_in_flight": sent - journaled,  # computed: any version
            "wasted_calls": wasted,
            "wasted_share": round(wasted / sent, 3) if sent else None,
        })
        return row


def fault_row(fault: Fault) -> dict[str, Any]:
    down = (fault.back_at - fault.down_at
            if fault.back_at is not None and fault.down_at is not None else None)
    return {"fault_fired": fault.fired, "gateway_down_s": None if down is None else round(down, 1),
            "idle_after_recovery_s": (None if fault.idle_after_recovery is None
                                      else round(fault.idle_after_recovery, 1)),
            **({"fault_error": fault.error} if fault.error else {})}


# --- the table -----------------------------------------------------------------------------


def show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


ROWS: dict[str, list[tuple[str, Callable[[dict[str, Any]], Any]]]] = {
    "outage": [
        ("tasks failed for good", lambda r: r["failed"]),
        ("upstream chat requests", lambda r: r["upstream_chat_requests"]),
        ("status calls", lambda r: r["status_calls"]),
        ("gateway down, s", lambda r: r["gateway_down_s"]),
        ("idle after recovery, s", lambda r: r["idle_after_recovery_s"]
         if r["idle_after_recovery_s"] is not None else ("never" if r["fault_fired"] else "-")),
        ("accepted / target", lambda r: f"{show(r['accepted'])}/{r['target']}"),
        ("exit code", lambda r: r["exit"]),
        ("run wall time, s", lambda r: r["seconds"]),
    ],
    "rotation": [
        ("tasks failed, first run", lambda r: r["failed_first_run"]),
        ("tasks failed for good", lambda r: r["failed"]),
        ("upstream chat requests", lambda r: r["upstream_chat_requests"]),
        ("status calls", lambda r: r["status_calls"]),
        ("idle after recovery, s", lambda r: r["idle_after_recovery_s"]
         if r["idle_after_recovery_s"] is not None else ("never" if r["fault_fired"] else "-")),
        ("accepted / target", lambda r: f"{show(r['accepted'])}/{r['target']}"),
        ("old-key run ended after recovery, s", lambda r: r["old_key_run_ended_after_recovery_s"]),
        ("exit code (old key)", lambda r: r["exit"]),
        ("exit code (rerun, new key)", lambda r: r["exit_rerun"]),
        ("wall time, s (run + rerun)", lambda r: f"{r['seconds']:g} + {r['seconds_rerun']:g}"),
    ],
    "waste": [
        ("upstream chat requests", lambda r: r["upstream_chat_requests"]),
        ("calls of finished samples", lambda r: r["finished_calls"]),
        ("abandoned in flight (computed)", lambda r: r["abandoned_in_flight"]),
        ("status abandoned_calls", lambda r: r["abandoned_calls"]),
        ("calls of unfinished tasks", lambda r: r["unfinished_calls"]),
        ("wasted calls", lambda r: r["wasted_calls"]),
        ("wasted share", lambda r: f"{100 * r['wasted_share']:.1f} %"
         if r["wasted_share"] is not None else "-"),
        ("tasks failed for good", lambda r: r["failed"]),
        ("accepted / target", lambda r: f"{show(r['accepted'])}/{r['target']}"),
        ("exit code", lambda r: r["exit"]),
        ("run wall time, s", lambda r: r["seconds"]),
    ],
}


def table(repos: list[Checkout], results: dict[str, dict[str, dict[str, Any]]]) -> str:
    heads = [f"{r.label} ({r.commit})" for r in repos]
    width = max(len(name) for rows in ROWS.values() for name, _ in rows) + 2
    cols = [max(len(h), 12) + 2 for h in heads]
    lines = [f"{'':<{width}}" + "".join(f"{h:>{c}}" for h, c in zip(heads, cols, strict=True))]
    for scenario, rows in ROWS.items():
        if scenario not in results:
            continue
        lines.append(f"[{scenario}]")
        for name, get in rows:
            cells = []
            for repo, col in zip(repos, cols, strict=True):
                row = results[scenario].get(repo.label)
                try:
                    cell = show(get(row)) if row and "error" not in row else "error"
                except (KeyError, TypeError):
                    cell = "-"
                cells.append(f"{cell:>{col}}")
            lines.append(f"  {name:<{width - 2}}" + "".join(cells))
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", action="append", metavar="[LABEL=]PATH",
                        help="a gra-async checkout to measure (repeat to compare; default: "
                             "this checkout)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--target", type=int, default=60, help="outage and rotation runs")
    parser.add_argument("--waste-target", type=int, default=30)
    parser.add_argument("--trigger", type=int, default=60,
                        help="upstream chat requests before the fault")
    parser.add_argument("--outage", type=float, default=45.0, help="seconds the proxy is down")
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the raw figures")
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    repos = [parse_repo(text) for text in (args.repo or [f"after={HERE}"])]
    if len({r.label for r in repos}) != len(repos):
        parser.error("two --repo with the same label: name them LABEL=PATH")
    needs_proxy = bool({"outage", "rotation"} & set(scenarios))
    if needs_proxy and not (litellm_bin().is_file() and (litellm_home() / "ready").is_file()):
        print(f"no LiteLLM proxy at {litellm_bin()}: run `bash servers/litellm/setup.sh`",
              file=sys.stderr)
        return 2

    results: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in scenarios}
    with tempfile.TemporaryDirectory(prefix="gra-outage-bench-") as tmp:
        scratch = Path(tmp)
        for repo in repos:
            repo.inspect(scratch)
            print(f"{repo.label}: {repo.path} at {repo.commit}, package {repo.package}"
                  f"{', has --retry-failed' if repo.retry_failed else ''}", file=sys.stderr)
        upstream = FakeServerProcess.start(models=list(MODELS), timeout=30.0)
        proxy = None
        try:
            if needs_proxy:
                proxy = LiteLLMProxy(upstream.base_url, models=MODELS, master_key=FIRST_KEY,
                                     workdir=scratch)
            bench = Bench(upstream, proxy, scratch, args)
            for scenario in scenarios:
                for repo in repos:
                    print(f"{scenario} / {repo.label} ...", file=sys.stderr, flush=True)
                    try:
                        row = getattr(bench, scenario)(repo)
                    except Exception as exc:  # one failed cell, not the whole table
                        row = {"error": f"{type(exc).__name__}: {exc}"}
                    results[scenario][repo.label] = row
                    print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
        finally:
            if proxy is not None:
                proxy.close()
            upstream.close()
    print(table(repos, results))
    if args.json:
        args.json.write_text(json.dumps({
            "repos": [dataclasses.asdict(r) | {"path": str(r.path)} for r in repos],
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

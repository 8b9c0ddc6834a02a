"""The whole pipeline against the real vLLM CPU server (servers/cpu-vllm), driven through
`gra_async.cli.main` in-process, as a user would run it.

The fake server pins what the pipeline does with scripted replies; these pin that the same
code holds up against real vLLM replies: structured output from a real (tiny) model, vLLM's
own 400/401/404 bodies, and `doctor`'s verdicts on a server that requires a key.

SmolLM2-135M reviews at temperature 0 give nearly every sample low scores, so a run here
usually ends "plan exhausted" with 0 accepted; the tests accept that and check instead that
every planned task ended accepted/rejected/failed with a reason and that real
generate -> review cycles happened.

Skipped when servers/cpu-vllm/setup.sh has not been run, unless GRA_REQUIRE_VLLM=1.
Runtime (2 cores, load 4-8): server start 32-53 s (shared with tests/test_vllm_server.py in
one pytest process), the 3-task run 21-25 s, everything else ~5 s: 61-85 s for the module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import sqlite3
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gra_async.cli import main
from gra_async.defaults import ACCEPT_MEAN, CRITERIA, SCORE_MAX, SCORE_MIN
from gra_async.scoring import (
    InvalidReply,
    generation_schema,
    parse_generation,
    parse_review,
    parse_verdict,
    response_format,
    review_schema,
    verdict_schema,
)

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "servers" / "cpu-vllm" / "vllm_server.py"


def _load_helper() -> ModuleType:
    """One module object per process under the name test_vllm_server.py uses, so the shared
    server cache is shared too (one vLLM start for both modules)."""
    if "gra_cpu_vllm_server" in sys.modules:
        return sys.modules["gra_cpu_vllm_server"]
    spec = importlib.util.spec_from_file_location("gra_cpu_vllm_server", HELPER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


cpu_vllm = _load_helper()

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ALIASES = ("gen", "rev", "adj")
API_KEY = "gra-test-key"  # the key tests/test_vllm_server.py starts the shared server with
KEY_ENV = "GRA_TEST_VLLM_KEY"  # names without "__": not read as GRA_* config overrides
BAD_KEY_ENV = "GRA_TEST_VLLM_BAD_KEY"
BAD_KEY = "wrong-key-5d1e7c"
MAX_TASKS = 3  # the pipeline run: 3 tasks ~ 30 s on 2 cores
TARGET = 2
MAX_TASKS_400 = 2

GEN_TOKENS, REVIEW_TOKENS, VERDICT_TOKENS = 256, 200, 128
# Bounded so one run stays ~20-30 s on 2 cores.
RUN_TOML = f"""\
[run]
max_tasks = {MAX_TASKS}

[generation]
max_tokens = {GEN_TOKENS}
review_max_tokens = {REVIEW_TOKENS}
verdict_max_tokens = {VERDICT_TOKENS}
"""

# The schemas the pipeline sends for RUN_TOML's budgets (string caps follow max_tokens).
SCHEMAS: dict[str, dict[str, Any]] = {
    "generator": generation_schema(GEN_TOKENS),
    "reviewer": review_schema(CRITERIA, REVIEW_TOKENS),
    "adjudicator": verdict_schema(VERDICT_TOKENS),
}


@dataclass(frozen=True, slots=True)
class CliResult:
    code: int
    out: str
    err: str
    seconds: float


def cli(*args: str) -> CliResult:
    """`main(args)` with its stdout/stderr captured; works in module-scoped fixtures too,
    where capsys is not available."""
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return CliResult(code, out.getvalue(), err.getvalue(), time.monotonic() - started)


def status(run_dir: Path) -> dict[str, Any]:
    result = cli("status", "--run-dir", str(run_dir), "--json")
    assert result.code == 0, result.err
    return dict(json.loads(result.out))


def export_all(run_dir: Path) -> list[dict[str, Any]]:
    """Every finished sample (accepted, rejected, failed) as exported."""
    out = run_dir / "all.jsonl"
    result = cli("export", "--run-dir", str(run_dir), "--all", "--out", str(out))
    assert result.code == 0, result.err
    return [json.loads(line) for line in out.read_text().splitlines()]


def journal_calls(run_dir: Path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(f"file:{run_dir / 'journal.sqlite'}?mode=ro",
                                            uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(
            "SELECT task_id, role, model, content, finish_reason, completion_tokens FROM calls")]


def endpoints(url: str, generator: str = "gen") -> list[str]:
    return ["--endpoint", f"generator={generator}@{url}", "--endpoint", f"reviewer=rev@{url}",
            "--endpoint", f"adjudicator=adj@{url}"]


def one_line(err: str) -> str:
    """The CLI contract for exit 2: exactly one line on stderr, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def chat_4xx_count(server: Any) -> int:
    """vLLM's own counter of 4xx answers on /v1/chat/completions (its Prometheus /metrics)."""
    request = urllib.request.Request(f"{server.base_url}/metrics", headers=server.headers())
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    match = re.search(r'^http_requests_total\{handler="/v1/chat/completions",method="POST",'
                      r'status="4xx"\} ([0-9.]+)$', text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def schema_errors(role: str, content: str) -> list[str]:
    """Why `content` is not a valid reply for `role`: jsonschema when installed, else the
    pipeline's pydantic parsers."""
    try:
        import jsonschema  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        parse = {"generator": parse_generation, "reviewer": lambda t: parse_review(t, CRITERIA),
                 "adjudicator": parse_verdict}[role]
        try:
            parse(content)
        except InvalidReply as exc:
            return [exc.reason]
        return []
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        return [f"not JSON: {exc}"]
    validator = jsonschema.Draft202012Validator(SCHEMAS[role])
    return [error.message for error in validator.iter_errors(data)]


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Any:
    """The shared CPU vLLM server (aliases gen/rev/adj, key API_KEY)."""
    return cpu_vllm.pytest_server(names=ALIASES, api_key=API_KEY)


@pytest.fixture(scope="module", autouse=True)
def key_env() -> Iterator[None]:
    """The right key and a wrong one, in variables named by --api-key-env / api_key_env."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, API_KEY)
        mp.setenv(BAD_KEY_ENV, BAD_KEY)
        yield


@dataclass(frozen=True, slots=True)
class PipelineRun:
    result: CliResult
    run_dir: Path


@pytest.fixture(scope="module")
def pipeline_run(server: Any, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """One bounded run (MAX_TASKS tasks, --concurrency 3) shared by the assertions below."""
    base = tmp_path_factory.mktemp("vllm-pipeline")
    config = base / "gra.toml"
    config.write_text(RUN_TOML)
    run_dir = base / "run"
    result = cli("run", "--config", str(config), "--run-dir", str(run_dir),
                 "--target", str(TARGET), "--concurrency", "3",
                 *endpoints(server.openai_base_url), "--api-key-env", KEY_ENV)
    print(f"\n[vllm pipeline] server ready in {server.ready_s:.0f}s; {MAX_TASKS} tasks took "
          f"{result.seconds:.1f}s; stderr tail: {result.err.strip().splitlines()[-1:]}")
    return PipelineRun(result, run_dir)


# --- 1. a pipeline run -------------------------------------------------------------------


def test_run_ends_with_every_task_decided(pipeline_run: PipelineRun) -> None:
    """Exit 0 at the target, or 3 when the whole plan ran short of it; no task left mid-way."""
    result = pipeline_run.result
    assert result.code in (0, 3), result.err
    got = status(pipeline_run.run_dir)
    assert got["in_progress"] == 0
    finished = got["accepted"] + got["rejected"] + got["failed"]
    if "plan exhausted" in result.err:
        assert got["accepted"] < TARGET
        assert finished == MAX_TASKS, got
        assert f"plan exhausted: {got['accepted']} of {TARGET}" in result.err
        assert result.code == 3
    else:
        assert got["accepted"] == TARGET, (got, result.err)
        assert f"({got['accepted']} accepted)" in result.out


def test_every_exported_sample_is_complete_and_gated(pipeline_run: PipelineRun) -> None:
    """Accepted and rejected samples carry instruction, response and full reviews whose
    decision follows the gate; failed ones carry their reason; a real cycle happened."""
    rows = export_all(pipeline_run.run_dir)
    got = status(pipeline_run.run_dir)
    assert len(rows) == got["accepted"] + got["rejected"] + got["failed"]
    reviewed = 0
    for row in rows:
        decision = row["decision"]
        assert decision in ("accept", "reject", "duplicate", "failed"), row
        if decision == "failed":
            assert isinstance(row.get("reason"), str) and row["reason"].strip(), row
            continue
        assert isinstance(row["instruction"], str) and row["instruction"].strip()
        assert isinstance(row["response"], str) and row["response"].strip()
        assert row["generator"] == "gen" and row["tokens"] > 0
        if decision == "duplicate":
            assert row["duplicate_of"], row
            continue
        assert row["reviews"] or row["failed_reviews"], row
        for review in row["reviews"]:
            assert review["model"] == "rev"
            scores = review["scores"]
            assert sorted(scores) == sorted(CRITERIA), scores
            assert all(type(s) is int and SCORE_MIN <= s <= SCORE_MAX for s in scores.values())
            assert review["mean"] == pytest.approx(sum(scores.values()) / len(CRITERIA))
            assert isinstance(review["feedback"], str)
        reviewed += bool(row["reviews"])
        if row["adjudication"] is None:  # one reviewer: std 0, the mean decides
            assert (row["mean"] >= ACCEPT_MEAN) == (decision == "accept"), row
        else:
            assert row["adjudication"]["decision"] == decision
            assert row["adjudication"]["reason"] is not None
    assert reviewed >= 1, "no sample went through generate -> review"


def test_accepted_export_has_instruction_and_response(pipeline_run: PipelineRun) -> None:
    """The default export (accepted only) holds exactly the accepted samples, each complete."""
    out = pipeline_run.run_dir / "samples.jsonl"
    result = cli("export", "--run-dir", str(pipeline_run.run_dir), "--out", str(out))
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == status(pipeline_run.run_dir)["accepted"]
    for row in rows:
        assert row["decision"] == "accept"
        assert row["instruction"].strip() and row["response"].strip() and row["reviews"]


def test_journal_replies_match_the_json_schemas(pipeline_run: PipelineRun) -> None:
    """Every reply vLLM finished ("stop") under json_schema validates against the schema the
    pipeline sent; only replies cut at max_tokens ("length") may not."""
    calls = journal_calls(pipeline_run.run_dir)
    roles = {c["role"] for c in calls}
    assert {"generator", "reviewer"} <= roles <= set(SCHEMAS), roles
    for call in calls:
        assert call["finish_reason"] in ("stop", "length"), call
        if call["finish_reason"] == "stop":
            assert schema_errors(call["role"], call["content"]) == [], call
        else:
            # cut exactly at the role's budget, or at twice it, three times (a cut-off
            # reply is re-asked with twice the room)
            budgets = {b * 2**k for b in (GEN_TOKENS, REVIEW_TOKENS, VERDICT_TOKENS)
                       for k in range(3)}
            assert call["completion_tokens"] in budgets, call
    by_task: dict[str, set[str]] = {}
    for call in calls:
        if call["finish_reason"] == "stop":
            by_task.setdefault(call["task_id"], set()).add(call["role"])
    assert any({"generator", "reviewer"} <= r for r in by_task.values()), by_task


# --- 2. doctor ---------------------------------------------------------------------------


def test_doctor_with_the_right_key_is_ok(server: Any) -> None:
    result = cli("doctor", "--endpoint", f"generator=gen@{server.openai_base_url}",
                 "--api-key-env", KEY_ENV)
    assert result.code == 0, result.out + result.err
    line = one_line(result.out)
    assert line.startswith("ok") and "json_schema output ok" in line


def test_doctor_with_a_wrong_key_names_the_endpoint_not_the_key(server: Any) -> None:
    result = cli("doctor", "--endpoint", f"generator=gen@{server.openai_base_url}",
                 "--api-key-env", BAD_KEY_ENV)
    assert result.code == 2, result.out + result.err
    line = one_line(result.out)
    assert line.startswith("FAIL") and f"gen@{server.openai_base_url}" in line
    assert "401" in line
    assert BAD_KEY not in result.out + result.err and API_KEY not in result.out + result.err


def test_doctor_without_a_key_fails(server: Any) -> None:
    result = cli("doctor", "--endpoint", f"generator=gen@{server.openai_base_url}")
    assert result.code == 2, result.out + result.err
    line = one_line(result.out)
    assert line.startswith("FAIL") and "401" in line and f"gen@{server.openai_base_url}" in line


# --- 3. vLLM's error replies at `run` ----------------------------------------------------


def test_unknown_model_stops_run_before_any_work(server: Any, tmp_path: Path) -> None:
    """vLLM lists its aliases on /v1/models: the probe says "not served", exit 2, one line."""
    url = server.openai_base_url
    result = cli("run", "--run-dir", str(tmp_path / "run"), "--target", "1",
                 *endpoints(url, generator="no-such-model"), "--api-key-env", KEY_ENV)
    assert result.code == 2, result.err
    line = one_line(result.err)
    assert "not served" in line and f"no-such-model@{url}" in line


def test_wrong_key_on_one_endpoint_stops_run_naming_it(server: Any, tmp_path: Path) -> None:
    """A config whose middle endpoint (the reviewer) has a wrong key: exit 2, one line naming
    that endpoint, never a key."""
    url = server.openai_base_url
    config = tmp_path / "gra.toml"
    config.write_text(RUN_TOML + "".join(
        f'\n[[endpoints.{role}]]\nbase_url = "{url}"\nmodel = "{model}"\napi_key_env = "{env}"\n'
        for role, model, env in (("generator", "gen", KEY_ENV), ("reviewer", "rev", BAD_KEY_ENV),
                                 ("adjudicator", "adj", KEY_ENV))))
    result = cli("run", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                 "--target", "1")
    assert result.code == 2, result.err
    line = one_line(result.err)
    assert f"rev@{url}" in line and "401" in line
    assert f"gen@{url}" not in line and f"adj@{url}" not in line
    assert BAD_KEY not in result.out + result.err and API_KEY not in result.out + result.err


@dataclass(frozen=True, slots=True)
class MaxTokensRun:
    result: CliResult
    run_dir: Path
    url: str
    rejected_requests: int  # 4xx answers vLLM counted on /v1/chat/completions during the run


@pytest.fixture(scope="module")
def max_tokens_run(server: Any, tmp_path_factory: pytest.TempPathFactory) -> MaxTokensRun:
    """A run whose generator asks max_tokens=4096 > max_model_len=2048 (vLLM answers 400)."""
    base = tmp_path_factory.mktemp("vllm-400")
    config = base / "gra.toml"
    config.write_text(f"[run]\nmax_tasks = {MAX_TASKS_400}\n\n"
                      "[generation]\nmax_tokens = 4096\nreview_max_tokens = 200\n")
    url = server.openai_base_url
    before = chat_4xx_count(server)
    result = cli("run", "--config", str(config), "--run-dir", str(base / "run"), "--target", "1",
                 "--concurrency", "2", *endpoints(url), "--api-key-env", KEY_ENV)
    return MaxTokensRun(result, base / "run", url, chat_4xx_count(server) - before)


def test_max_tokens_over_context_stops_the_run_quoting_vllm(max_tokens_run: MaxTokensRun) -> None:
    """The same 400 on every call is not one task's fault: the breaker opens after 5 and the
    run stops at once (exit 2) quoting vLLM, with no task failed for good, so fixing
    max_tokens and running again continues the plan."""
    run = max_tokens_run
    assert run.result.code == 2, run.result.err
    line = one_line(run.result.err)
    assert f"every endpoint serving gen refuses every call: gen@{run.url}: HTTP 400" in line
    assert "max_tokens=4096 cannot be greater than max_model_len=2048" in line
    assert run.result.seconds < 60, run.result.seconds
    assert run.rejected_requests <= 5 + 2  # the breaker's five, plus what was in flight
    got = status(run.run_dir)
    assert (got["failed"], got["accepted"]) == (0, 0), got
    assert got["in_progress"] == 0 and got["calls"] == 0


def test_status_names_the_refusing_endpoint(max_tokens_run: MaxTokensRun) -> None:
    """`status --json` says which endpoint refused and with what."""
    endpoints = {e["endpoint"]: e for e in status(max_tokens_run.run_dir)["endpoints"]}
    gen = endpoints[f"gen@{max_tokens_run.url}"]
    assert gen["health"] == "refusing" and "HTTP 400" in gen["last_error"], gen


def test_review_cut_at_max_tokens_is_not_a_valid_review(server: Any) -> None:
    """A real vLLM review cut inside its feedback ("length") must be an invalid reply, not a
    review with its feedback silently lost (README: Configuration)."""
    import httpx

    schema = review_schema(CRITERIA)
    body: dict[str, Any] = {
        "model": "rev",
        "messages": [{"role": "user", "content": (
            "Score this sample from 1 to 10 on " + ", ".join(CRITERIA) + " and give feedback "
            "as JSON.\nInstruction: Name a prime number.\nResponse: 7 is prime.")}],
        "temperature": 0.0,
        "max_tokens": 200,
        "response_format": response_format("gra_reviewer", schema, "json_schema"),
    }
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=120) as client:
        full = client.post("/v1/chat/completions", json=body).json()
        used = int(full["usage"]["completion_tokens"])
        # Same greedy prefix, cut two tokens before its end: inside the feedback string.
        cut = client.post("/v1/chat/completions", json={**body, "max_tokens": used - 2}).json()
    choice = cut["choices"][0]
    assert choice["finish_reason"] == "length", choice
    content = choice["message"]["content"]
    assert '"scores":{' in content and schema_errors("reviewer", content), content
    try:
        review = parse_review(content, CRITERIA)
    except InvalidReply:
        return
    pytest.fail(f"a reply cut at max_tokens parsed as a review: {review!r} from {content!r}")

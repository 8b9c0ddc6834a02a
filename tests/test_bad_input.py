"""The bad-input table: every mistake a user can make at the door gets exit 2 and one line.

Each row runs the real entry point, `python -m gra_async`, as a subprocess, with a live API key
in the environment, and checks: exit code 2, exactly one line on stderr, starting "error: ",
no traceback, the line says what is wrong (and where), and the key appears nowhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gra_async.testing.fake_server import FakeServerProcess

from .conftest import FAKE_MODELS, start_fake_server

SECRET = "sk-test-SECRET-4f9a0b7c1d2e3f40"
KEY_ENV = "GRA_TEST_API_KEY"
GEN, REV = "gen-a", "rev-b"


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def gra(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Outcome:
    """`python -m gra_async ARGS` with the key in the environment (unless `env` says otherwise)."""
    environ = {**os.environ, KEY_ENV: SECRET, "PYTHONUNBUFFERED": "1"}
    environ.update(env or {})
    done = subprocess.run([sys.executable, "-m", "gra_async", *args], capture_output=True,
                          text=True, env=environ, timeout=timeout, check=False)
    return Outcome(done.returncode, done.stdout, done.stderr)


def assert_user_error(outcome: Outcome, *needles: str) -> str:
    """Exit 2, one line on stderr naming the problem, no traceback, no secret; the line."""
    err = outcome.err
    assert outcome.code == 2, (outcome.code, err, outcome.out[-2000:])
    assert "Traceback" not in err and "Traceback" not in outcome.out
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert SECRET not in err and SECRET not in outcome.out
    return err.strip()


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServerProcess]:
    """One fake server for the module; it requires the key."""
    started = start_fake_server(models=list(FAKE_MODELS), api_key=SECRET)
    try:
        yield started
    finally:
        started.close()


def endpoints(server: FakeServerProcess) -> list[str]:
    url = server.base_url
    return ["--endpoint", f"generator={GEN}@{url}", "--endpoint", f"reviewer={REV}@{url}",
            "--api-key-env", KEY_ENV]


def good_run(server: FakeServerProcess, run_dir: Path, *extra: str) -> list[str]:
    return ["run", "--run-dir", str(run_dir), *endpoints(server), *extra]


# --- seeds ---------------------------------------------------------------------------------


def test_seeds_file_missing(server: FakeServerProcess, tmp_path: Path) -> None:
    seeds = tmp_path / "nope.jsonl"
    out = gra(*good_run(server, tmp_path / "run", "--seeds", str(seeds)))
    assert_user_error(out, str(seeds), "not found", "--seeds")


def test_seeds_file_empty(server: FakeServerProcess, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("")
    out = gra(*good_run(server, tmp_path / "run", "--seeds", str(seeds)))
    assert_user_error(out, str(seeds), "empty")


def test_seeds_jsonl_malformed_names_the_line(server: FakeServerProcess, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "a", "response": "b"}\n'
                     '{"instruction": "c", "response": "d"}\n'
                     '{"instruction": "e", "respo\n')
    out = gra(*good_run(server, tmp_path / "run", "--seeds", str(seeds)))
    assert_user_error(out, f"{seeds}:3:", "invalid JSON")


def test_seeds_record_without_fields_names_the_line(
    server: FakeServerProcess, tmp_path: Path
) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "a", "response": "b"}\n{"question_text": "c"}\n')
    out = gra(*good_run(server, tmp_path / "run", "--seeds", str(seeds)))
    assert_user_error(out, f"{seeds}:2:")


def test_seeds_csv_malformed_names_the_line(server: FakeServerProcess, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.csv"
    seeds.write_text('instruction,response\na,b\n"c,d\n')
    out = gra(*good_run(server, tmp_path / "run", "--seeds", str(seeds)))
    assert_user_error(out, f"{seeds}:3:")


def test_seeds_not_utf8_names_the_line(server: FakeServerProcess, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9"}\n')
    out = gra(*good_run(server, tmp_path / "run", "--seeds", str(seeds)))
    assert_user_error(out, f"{seeds}:2:", "not UTF-8", "re-save the file as UTF-8")


def test_seeds_of_unknown_format(server: FakeServerProcess, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("Write a poem.\n")
    out = gra(*good_run(server, tmp_path / "run", "--seeds", str(seeds)))
    assert_user_error(out, str(seeds), "unknown seeds format '.txt'", ".jsonl")


# --- refine: the dataset to refine --------------------------------------------------------


def good_refine(server: FakeServerProcess, run_dir: Path, seeds: Path, *extra: str) -> list[str]:
    return ["refine", "--seeds", str(seeds), "--run-dir", str(run_dir), *endpoints(server),
            *extra]


@pytest.mark.parametrize(
    ("record", "needles"),
    [({"text": "a poem", "label": 3}, (":1:", "sharegpt conversations", "openai messages")),
     ({"conversations": "hello"}, (":1:", "'conversations' is not a list of turns")),
     ({"messages": [{"role": "user", "content": "hi"}]},
      (":1:", "no user turn followed by an assistant turn")),
     ({"conversations": [{"from": "gpt", "value": "hi"}]},
      (":1:", "no human turn followed by an assistant turn"))],
    ids=["no-known-fields", "conversations-not-turns", "no-answer", "no-question"],
)
def test_refine_seeds_of_no_known_format(
    server: FakeServerProcess, tmp_path: Path, record: dict[str, object],
    needles: tuple[str, ...],
) -> None:
    seeds = tmp_path / "data.jsonl"
    seeds.write_text(json.dumps(record) + "\n")
    out = gra(*good_refine(server, tmp_path / "run", seeds))
    assert_user_error(out, str(seeds), *needles)
    assert not (tmp_path / "run" / "journal.sqlite").exists()


def test_refine_without_seeds(server: FakeServerProcess, tmp_path: Path) -> None:
    out = gra("refine", "--run-dir", str(tmp_path / "run"), *endpoints(server))
    assert_user_error(out, "--seeds FILE is required")


@pytest.mark.parametrize(("flag", "value"), [("--target", "5"), ("--rounds", "2"),
                                             ("--max-rewrites", "-1"), ("--max-rewrites", "11")])
def test_refine_flags_that_do_not_apply_or_are_out_of_range(
    server: FakeServerProcess, tmp_path: Path, flag: str, value: str,
) -> None:
    seeds = tmp_path / "data.jsonl"
    seeds.write_text('{"instruction": "a", "response": "b"}\n')
    out = gra(*good_refine(server, tmp_path / "run", seeds, flag, value))
    assert_user_error(out, "does not apply" if flag in ("--target", "--rounds")
                      else "refine.max_rewrites")


# --- endpoints -----------------------------------------------------------------------------


def test_unknown_role(server: FakeServerProcess, tmp_path: Path) -> None:
    out = gra("run", "--run-dir", str(tmp_path), "--endpoint", f"judge={GEN}@{server.base_url}")
    assert_user_error(out, "unknown role 'judge'", "generator, reviewer, adjudicator or embedder")


def test_endpoint_without_role(server: FakeServerProcess, tmp_path: Path) -> None:
    out = gra("run", "--run-dir", str(tmp_path), "--endpoint", server.base_url)
    assert_user_error(out, "expected ROLE=[MODEL@]URL")


@pytest.mark.parametrize(
    ("url", "needle"),
    [("htp:/127.0.0.1:8000/v1", "is not an http(s) URL"),
     ("http://127.0.0.1:80x/v1", "has an invalid port"),
     ("127.0.0.1:8000", "is not an http(s) URL")],
    ids=["scheme", "port", "no-scheme"],
)
def test_malformed_url(tmp_path: Path, url: str, needle: str) -> None:
    out = gra("run", "--run-dir", str(tmp_path), "--endpoint", f"generator=m@{url}")
    assert_user_error(out, "base_url", needle)
    assert not (tmp_path / "journal.sqlite").exists()


def test_unreachable_endpoint(tmp_path: Path) -> None:
    out = gra("run", "--run-dir", str(tmp_path / "run"), "--endpoint",
              "generator=m@http://127.0.0.1:9/v1", "--api-key-env", KEY_ENV)
    assert_user_error(out, "m@http://127.0.0.1:9/v1", "cannot connect", "is the server running")


def test_url_without_v1(server: FakeServerProcess, tmp_path: Path) -> None:
    out = gra("run", "--run-dir", str(tmp_path / "run"), "--endpoint",
              f"generator={GEN}@{server.url}", "--api-key-env", KEY_ENV)
    assert_user_error(out, f"{GEN}@{server.url}", "HTTP 404", "ends in /v1")


def test_wrong_api_key(server: FakeServerProcess, tmp_path: Path) -> None:
    out = gra(*good_run(server, tmp_path / "run"), env={KEY_ENV: "sk-wrong-0000"})
    assert_user_error(out, f"{GEN}@{server.base_url}", "HTTP 401", "API key was refused")
    assert "sk-wrong-0000" not in out.err


def test_no_api_key_sent(server: FakeServerProcess, tmp_path: Path) -> None:
    out = gra("run", "--run-dir", str(tmp_path / "run"), "--endpoint",
              f"generator={GEN}@{server.base_url}")
    assert_user_error(out, "HTTP 401", "API key was refused")


def test_api_key_variable_not_set(server: FakeServerProcess, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRA_UNSET_KEY"}
    out = gra("run", "--run-dir", str(tmp_path / "run"), "--endpoint",
              f"generator={GEN}@{server.base_url}", "--api-key-env", "GRA_UNSET_KEY", env=env)
    assert_user_error(out, "environment variable GRA_UNSET_KEY is not set")


def test_api_key_with_a_line_break(server: FakeServerProcess, tmp_path: Path) -> None:
    """A pasted key with a newline would split the request's headers: refused at start,
    without the key in the message."""
    out = gra("run", "--run-dir", str(tmp_path / "run"), "--endpoint",
              f"generator={GEN}@{server.base_url}", "--api-key-env", KEY_ENV,
              env={KEY_ENV: SECRET + "\nX-Injected: 1"})
    assert_user_error(out, "'Authorization' contains a line break")


def test_key_given_where_its_variable_name_belongs(
    server: FakeServerProcess, tmp_path: Path
) -> None:
    out = gra("run", "--run-dir", str(tmp_path / "run"), "--endpoint",
              f"generator={GEN}@{server.base_url}", "--api-key-env", SECRET)
    assert_user_error(out, "api_key_env", "NAME of an environment variable")


def test_model_not_served(server: FakeServerProcess, tmp_path: Path) -> None:
    out = gra("run", "--run-dir", str(tmp_path / "run"), "--endpoint",
              f"generator=gpt-99@{server.base_url}", "--api-key-env", KEY_ENV)
    assert_user_error(out, f"gpt-99@{server.base_url}", "'gpt-99' is not served there",
                      "it serves: gen-a")


def test_failed_start_does_not_poison_the_run_dir(
    server: FakeServerProcess, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    typo = gra("run", "--run-dir", str(run_dir), "--endpoint",
               f"generator=gen-x@{server.base_url}", "--api-key-env", KEY_ENV, "--target", "1")
    assert_user_error(typo, "'gen-x' is not served there")
    fixed = gra("run", "--run-dir", str(run_dir), "--endpoint",
                f"generator={GEN}@{server.base_url}", "--api-key-env", KEY_ENV, "--target", "1")
    assert fixed.code == 0, fixed.err


def test_credentials_in_url_are_refused_without_echo(
    server: FakeServerProcess, tmp_path: Path
) -> None:
    url = server.base_url.replace("http://", f"http://user:{SECRET}@")
    out = gra("run", "--run-dir", str(tmp_path / "run"), "--endpoint", f"generator={GEN}@{url}")
    assert_user_error(out)  # refused, or at least redacted: the key must not be echoed


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ('[run]\ntarget = "many"\n', ("run.target", "valid integer")),
        ("[run]\nconcurrency = 1.5\n", ("run.concurrency", "valid integer")),
        ('[gate]\naccept_mean = "high"\n', ("gate.accept_mean", "valid number")),
        ("[run]\ntargte = 5\n", ("run.targte", "unknown key")),
        ("[runs]\ntarget = 5\n", ("runs", "unknown key")),
        ("[run\ntarget = 5\n", ("not valid TOML", "line 1")),
        (f'[[endpoints.generator]]\nbase_url = "http://127.0.0.1:9/v1"\napi_key = "{SECRET}"\n',
         ("endpoints.generator.0.api_key", "unknown key")),
        ('[[endpoints.generator]]\nbase_url = "http://127.0.0.1:9/v1"\nrpm = -5\n',
         ("endpoints.generator.0.rpm", "greater than or equal to 0")),
    ],
    ids=["str-for-int", "float-for-int", "str-for-float", "unknown-key", "unknown-section",
         "not-toml", "key-in-config", "negative-rpm"],
)
def test_config_errors(tmp_path: Path, toml: str, needles: tuple[str, ...]) -> None:
    config = tmp_path / "gra.toml"
    config.write_text(toml)
    out = gra("run", "--config", str(config), "--run-dir", str(tmp_path / "run"))
    assert_user_error(out, str(config), *needles)


def test_config_file_missing(tmp_path: Path) -> None:
    config = tmp_path / "nope.toml"
    out = gra("run", "--config", str(config), "--run-dir", str(tmp_path / "run"))
    assert_user_error(out, str(config), "not found")


def test_environment_override_type_error(tmp_path: Path) -> None:
    out = gra("run", "--run-dir", str(tmp_path / "run"), "--endpoint",
              "generator=m@http://127.0.0.1:9/v1", env={"GRA_RUN__CONCURRENCY": "lots"})
    assert_user_error(out, "GRA_* environment", "run.concurrency")


@pytest.mark.parametrize(
    ("flags", "needles"),
    [(("--target", "abc"), ("--target", "invalid int value")),
     (("--target", "0"), ("run.target", "greater than or equal to 1")),
     (("--roles", "random"), ("--roles", "invalid choice"))],
    ids=["target-abc", "target-0", "roles"],
)
def test_bad_flag_values(
    server: FakeServerProcess, tmp_path: Path, flags: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    out = gra(*good_run(server, tmp_path / "run", *flags))
    assert_user_error(out, *needles)


# --- run directory -------------------------------------------------------------------------


def test_read_only_run_dir(server: FakeServerProcess, small_mount: Callable[..., Path]) -> None:
    point = small_mount("1m", read_only=True)
    out = gra(*good_run(server, point / "run"))
    assert_user_error(out, str(point / "run"), "not writable", "--run-dir")


def test_full_disk(server: FakeServerProcess, small_mount: Callable[..., Path]) -> None:
    server.control(rules=[{"contains": "Score the sample",
                           "content": json.dumps({"scores": {}, "feedback": ""})}])
    try:
        point = small_mount("256k")
        out = gra(*good_run(server, point / "run", "--target", "2000", "--reviewers", "0"))
    finally:
        server.control(rules=[])
    assert_user_error(out, str(point / "run"), "disk is full", "run the same command again")


def test_resume_with_a_different_config(server: FakeServerProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = gra(*good_run(server, run_dir, "--target", "1", "--reviewers", "0"))
    assert first.code == 0, first.err
    out = gra(*good_run(server, run_dir, "--target", "1", "--reviewers", "0", "--seed", "7"))
    assert_user_error(out, str(run_dir), "different config", "run.seed",
                      "pass --force or use a new --run-dir")


def test_run_dir_is_a_file(server: FakeServerProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "results.jsonl"
    run_dir.write_text("{}\n")
    out = gra(*good_run(server, run_dir))
    assert_user_error(out, str(run_dir), "cannot write the journal")


def test_run_dir_is_a_file_says_so(server: FakeServerProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "results.jsonl"
    run_dir.write_text("{}\n")
    line = assert_user_error(gra(*good_run(server, run_dir)), str(run_dir))
    assert "run the same command again" not in line and "not a directory" in line


def test_run_dir_in_use_by_another_run(tmp_path: Path) -> None:
    slow = start_fake_server(models=list(FAKE_MODELS), latency=0.2)
    try:
        run_dir = tmp_path / "run"
        args = ["run", "--run-dir", str(run_dir), "--endpoint", f"generator={GEN}@{slow.base_url}",
                "--reviewers", "0", "--target", "30", "--concurrency", "2"]
        first = subprocess.Popen([sys.executable, "-m", "gra_async", *args],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            while slow.stats()["chat_requests"] == 0 and first.poll() is None:
                time.sleep(0.05)
            second = gra(*args)
        finally:
            _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        assert_user_error(second, str(run_dir), "in use")
    finally:
        slow.close()


def test_status_of_a_directory_that_is_no_run(tmp_path: Path) -> None:
    out = gra("status", "--run-dir", str(tmp_path))
    assert_user_error(out, str(tmp_path), "no journal.sqlite here")


def test_journal_that_is_not_a_database(server: FakeServerProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "journal.sqlite").write_bytes(b"this is not a database" * 100)
    out = gra(*good_run(server, run_dir))
    assert_user_error(out, "journal.sqlite", "use a new --run-dir")

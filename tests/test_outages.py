"""A failure that is not the sample's never burns the plan: repeated 400s, outages, lost
reviews, timeouts, gateway rate-limit headers and calls abandoned in flight, against the
fake server on 127.0.0.1 (the same findings through a real LiteLLM proxy: test_gateway.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import gra_async
from gra_async.cli import main
from gra_async.client import Endpoint
from gra_async.client.retry import retry_after
from gra_async.config import EndpointConfig
from gra_async.defaults import CRITERIA

from .conftest import FakeServer, status_json

GEN, REV_B, REV_C, ADJ = "gen-a", "rev-b", "rev-c", "adj-d"


def review(score: int) -> str:
    return json.dumps({"scores": dict.fromkeys(CRITERIA, score), "feedback": "fine"})


def good_reviews(server: FakeServer) -> None:
    server.control(rules=[{"contains": "Score the sample", "content": review(9)}])


def config(run_dir: Path, gen_url: str, rev_b_url: str, rev_c_url: str | None = None,
           endpoint: dict[str, Any] | None = None, **run: Any) -> gra_async.RunConfig:
    extra = endpoint or {}
    return gra_async.RunConfig.model_validate({
        "run": {"run_dir": str(run_dir), **run},
        "endpoints": {
            "generator": [{"base_url": gen_url, "model": GEN, **extra}],
            "reviewer": [{"base_url": rev_b_url, "model": REV_B, **extra},
                         {"base_url": rev_c_url or rev_b_url, "model": REV_C, **extra}],
        }})



class TestRepeated400:
    def test_a_400_every_call_gets_stops_the_run_and_fails_no_task(
        self, fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A gateway that lost its key store answers every call 400: the run stops with
        exit 2 quoting the server, no task is failed, and the rerun with the gateway fixed
        reaches the target."""
        good_reviews(fake_server)
        url = fake_server.base_url
        args = ["run", "--run-dir", str(tmp_path), "--target", "12", "--max-tasks", "60",
                "--endpoint", f"generator={GEN}@{url}", "--endpoint", f"reviewer={REV_B}@{url}"]
        fake_server.control(status_script=[400] * 1000)
        assert main(args) == 2
        err = capsys.readouterr().err
        line = next(line for line in err.splitlines() if line.startswith("error:"))
        assert "refuses every call" in line and "scripted 400" in line and url in line
        spent = fake_server.stats()["chat_requests"]
        got = status_json(tmp_path)
        assert got["failed"] == 0 and got["in_progress"] == 0
        # At most the calls in flight when the first 400 came back, plus the breaker's 5.
        assert spent <= 5 + 64

        fake_server.control(status_script=[])
        assert main(args) == 0
        assert status_json(tmp_path)["accepted"] == 12

    def test_a_400_only_one_task_gets_fails_that_task_alone(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        good_reviews(fake_server)
        # The generator's reply for one prompt is refused: a 400 of its own, twice.
        fake_server.control(status_script=[400])
        summary = gra_async.run(config(tmp_path, fake_server.base_url, fake_server.base_url,
                                       target=3, concurrency=1, max_in_flight=1))
        assert summary.reached_target and summary.failed == 0  # once is not the task's fault
        fake_server.control(status_script=[400, 400])
        summary = gra_async.run(config(tmp_path / "b", fake_server.base_url,
                                       fake_server.base_url, target=3, concurrency=1,
                                       max_in_flight=1))
        assert summary.reached_target


class TestOutage:
    def test_an_outage_parks_tasks_and_every_sample_has_its_whole_panel(
        self, fake_server_factory: Any, tmp_path: Path,
    ) -> None:
        gen = fake_server_factory(models=[GEN], latency=0.05)
        rev = fake_server_factory(models=[REV_B, REV_C], latency=0.05)
        good_reviews(rev)

        def outage() -> None:
            deadline = time.monotonic() + 30
            while rev.stats()["chat_requests"] < 6 and time.monotonic() < deadline:
                time.sleep(0.02)
            rev.control(down=True, down_mode="refuse", down_for=4.0)

        cutter = threading.Thread(target=outage)
        cutter.start()
        summary = gra_async.run(config(tmp_path, gen.base_url, rev.base_url, target=8,
                                       endpoint={"read_timeout": 5}))
        cutter.join()
        assert summary.reached_target and summary.failed == 0
        samples = list(gra_async.read_samples(tmp_path))
        assert len(samples) == 8
        assert all([r.model for r in s.reviews] == [REV_B, REV_C] for s in samples)
        assert all(not s.failed_reviews for s in samples)

    def test_every_endpoint_down_stalls_with_exit_75_and_resumes(
        self, fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        good_reviews(fake_server)
        url = fake_server.base_url
        (tmp_path / "gra.toml").write_text("[run]\nstall_timeout = 3\n")
        args = ["run", "--run-dir", str(tmp_path / "run"), "--target", "3",
                "--config", str(tmp_path / "gra.toml"),
                "--endpoint", f"generator={GEN}@{url}", "--endpoint", f"reviewer={REV_B}@{url}"]
        fake_server.control(status_script=[503] * 10_000)  # up for the probe, every call 503
        assert main(args) == 75
        err = capsys.readouterr().err
        line = next(line for line in err.splitlines() if line.startswith("error: stalled"))
        assert "no call completed" in line and "scripted 503" in line
        assert status_json(tmp_path / "run")["failed"] == 0
        fake_server.control(status_script=[])
        assert main(args) == 0


class TestTimeouts:
    def test_read_timeout_is_the_limit_a_call_gets(
        self, fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """read_timeout = 1 against 3 s replies: the run says so and stalls out (exit 75)
        instead of showing nothing for minutes."""
        fake_server.control(latency=3.0)
        url = fake_server.base_url
        (tmp_path / "gra.toml").write_text(
            "[run]\nstall_timeout = 4\n"
            f'[[endpoints.generator]]\nbase_url = "{url}"\nmodel = "{GEN}"\nread_timeout = 1\n'
            f'[[endpoints.reviewer]]\nbase_url = "{url}"\nmodel = "{REV_B}"\nread_timeout = 1\n')
        started = time.monotonic()
        code = main(["run", "--run-dir", str(tmp_path / "run"), "--target", "2",
                     "--config", str(tmp_path / "gra.toml")])
        err = capsys.readouterr().err
        assert code == 75
        assert f"calls to {GEN}@{url} time out after 1 s: raise its read_timeout" in err
        assert "timeouts" in next(line for line in err.splitlines() if "stalled" in line)
        assert time.monotonic() - started < 60  # not the 300 s default nor connect + read
        endpoints = {e["endpoint"]: e for e in status_json(tmp_path / "run")["endpoints"]}
        assert endpoints[f"{GEN}@{url}"]["timeouts"] >= 3


class TestGatewayHeaders:
    def endpoint(self, now: list[float]) -> Endpoint:
        return Endpoint(EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m"),
                        transport=None,  # type: ignore[arg-type]
                        clock=lambda: now[0])

    @pytest.mark.parametrize(("headers", "hold"), [
        # OpenAI style: reset is the time until the bucket is full; one request is back sooner.
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-requests": "1200",
          "x-ratelimit-reset-requests": "59.9s"}, 59.9 / 1200),
        # LiteLLM forwards the upstream's headers with a prefix.
        ({"llm_provider-x-ratelimit-remaining-requests": "0",
          "llm_provider-x-ratelimit-limit-requests": "600",
          "llm_provider-x-ratelimit-reset-requests": "30s"}, 30 / 600),
        # LiteLLM's own limiter: remaining 0, a limit, no reset.
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-requests": "120"}, 0.5),
        # Nothing known but "spent": a brief hold.
        ({"x-ratelimit-remaining-requests": "0"}, 1.0),
        ({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "9s"}, 0.0),
    ], ids=["openai-reset", "llm_provider-prefix", "no-reset-known-limit", "blind", "not-spent"])
    def test_holds_for_one_request_worth(self, headers: dict[str, str], hold: float) -> None:
        now = [100.0]
        ep = self.endpoint(now)
        ep._observe_headers(headers)
        assert max(ep.hold_until - 100.0, 0.0) == pytest.approx(hold)

    @pytest.mark.parametrize(("headers", "wait"), [
        ({"retry-after": "3"}, 3.0),
        ({"llm_provider-retry-after": "4"}, 4.0),
        ({"llm_provider-retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "100", "llm_provider-retry-after": "9"}, 0.1),
    ])
    def test_retry_after_from_a_gateway(self, headers: dict[str, str], wait: float) -> None:
        assert retry_after(headers, lambda: 0.0) == pytest.approx(wait)


class TestAbandoned:
    def test_calls_cut_off_at_the_target_are_counted(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        good_reviews(fake_server)
        fake_server.control(latency=0.3, jitter=0.25)
        summary = gra_async.run(config(tmp_path, fake_server.base_url, fake_server.base_url,
                                       target=5, concurrency=32))
        assert summary.reached_target
        got = status_json(tmp_path)
        sent = fake_server.stats()["chat_requests"]
        assert got["abandoned_calls"] == sent - got["calls"] >= 1
        assert got["abandoned_tokens"] > 0


def test_retry_failed_replans_what_the_endpoint_failed(
    fake_server: FakeServer, tmp_path: Path,
) -> None:
    """A journal of an earlier version, where an outage failed tasks for good."""
    good_reviews(fake_server)
    cfg = config(tmp_path, fake_server.base_url, fake_server.base_url, target=2)
    gra_async.run(cfg)
    import sqlite3

    with sqlite3.connect(tmp_path / "journal.sqlite") as conn:
        conn.execute("UPDATE samples SET state = 'failed', body = json_object('decision', "
                     "'failed', 'reason', 'gen-a@x: cannot connect (gave up after 7 attempts)')")
        conn.execute("INSERT INTO samples VALUES ('r1-000099', 1, 99, 'failed', 'd', '[]', "
                     "json_object('decision', 'failed', 'reason', 'invalid generator reply "
                     "after 3 tries from gen-a: not JSON'), 0)")
    assert status_json(tmp_path)["accepted"] == 0
    summary = gra_async.run(cfg, retry_failed=True)
    assert summary.accepted == 2 and summary.failed == 1  # the invalid reply stays failed

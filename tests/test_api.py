"""The Python API end to end against the fake server: Synthesizer, run, filters, gate,
read_samples, load_config, and the exit codes the CLI derives from a RunSummary."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import gra_async
from gra_async.cli import main
from gra_async.defaults import CRITERIA

from .conftest import FakeServer, status_json

GEN, REV_B, REV_C, ADJ = "gen-a", "rev-b", "rev-c", "adj-d"


def review(score: int) -> str:
    return json.dumps({"scores": dict.fromkeys(CRITERIA, score), "feedback": "fine"})


def verdict(decision: str) -> str:
    return json.dumps({"decision": decision, "reason": f"the adjudicator says {decision}"})


def team(url: str, reviewer_url: str | None = None) -> dict[str, Any]:
    rev = reviewer_url or url
    return {"generator": [{"base_url": url, "model": GEN}],
            "reviewer": [{"base_url": rev, "model": REV_B}, {"base_url": rev, "model": REV_C}],
            "adjudicator": [{"base_url": url, "model": ADJ}]}


def config(server: FakeServer, run_dir: Path, **run: Any) -> gra_async.RunConfig:
    return gra_async.RunConfig.model_validate(
        {"run": {"run_dir": str(run_dir), **run}, "endpoints": team(server.base_url)})


def scores(server: FakeServer, b: int, c: int) -> None:
    server.control(rules=[{"model": REV_B, "content": review(b)},
                          {"model": REV_C, "content": review(c)},
                          {"model": ADJ, "content": verdict("reject")}])


class TestRun:
    def test_reaches_the_target_and_says_so(self, fake_server: FakeServer, tmp_path: Path) -> None:
        scores(fake_server, 9, 8)
        summary = gra_async.run(config(fake_server, tmp_path, target=3))
        assert isinstance(summary, gra_async.RunSummary)
        assert summary.reached_target and summary.stop_reason == "target"
        assert summary.accepted == 3 and summary.target == 3 and summary.failed == 0
        assert summary.calls >= 9 and summary.tokens == summary.prompt_tokens + summary.completion_tokens > 0
        assert {(u.role, u.model) for u in summary.usage} >= {("generator", GEN), ("reviewer", REV_B)}
        assert summary.explain() == "target reached: 3 of 3 accepted"

        samples = list(gra_async.read_samples(tmp_path))
        assert len(samples) == 3
        for sample in samples:
            assert isinstance(sample, gra_async.Sample) and sample.decision == "accept"
            assert sample.generator == GEN and sample.instruction and sample.response
            assert [type(r) for r in sample.reviews] == [gra_async.Review] * 2
            assert [r.model for r in sample.reviews] == [REV_B, REV_C]
            assert sample.reviews[0].scores == dict.fromkeys(CRITERIA, 9)
            assert sample.reviews[0].mean == 9 and sample.mean == pytest.approx(8.5)
            assert sample.adjudication is None and sample.tokens > 0

    def test_a_resumed_run_past_its_target_sends_nothing(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        scores(fake_server, 9, 9)
        gra_async.run(config(fake_server, tmp_path, target=2))
        sent = fake_server.stats()["chat_requests"]
        again = gra_async.run(config(fake_server, tmp_path, target=2))
        assert again.reached_target and again.calls == 0 and again.accepted == 2
        assert fake_server.stats()["chat_requests"] == sent

    def test_synthesizer_is_an_async_context_manager(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        scores(fake_server, 9, 9)

        async def go() -> gra_async.RunSummary:
            async with gra_async.Synthesizer(config(fake_server, tmp_path, target=2)) as synth:
                assert synth.progress.accepted == 0
                summary = await synth.run()
                with pytest.raises(gra_async.UsageError, match="runs once"):
                    await synth.run()
                return summary

        assert asyncio.run(go()).accepted == 2

    def test_run_inside_a_running_loop_says_to_await(self, tmp_path: Path) -> None:
        async def inside() -> None:
            gra_async.run({"run": {"run_dir": str(tmp_path)}})

        with pytest.raises(gra_async.UsageError) as info:
            asyncio.run(inside())
        assert "await gra_async.Synthesizer(config).run()" in str(info.value)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "journal.sqlite").exists()

    def test_plan_exhausted_is_not_the_target(self, fake_server: FakeServer, tmp_path: Path) -> None:
        scores(fake_server, 2, 3)
        summary = gra_async.run(config(fake_server, tmp_path, target=2, max_tasks=4))
        assert not summary.reached_target and summary.stop_reason == "plan_exhausted"
        assert summary.rejected == 4 and summary.rejections == {"reject": 4}
        assert summary.explain().startswith("plan exhausted: 0 of 2 accepted; rejected: reject x4")


class TestFilters:
    @pytest.mark.parametrize("kind", ["sync", "async"])
    def test_a_filter_rejects_before_any_review_is_paid_for(
        self, fake_server: FakeServer, tmp_path: Path, kind: str,
    ) -> None:
        scores(fake_server, 9, 9)
        seen: list[gra_async.Draft] = []

        def sync_filter(draft: gra_async.Draft) -> str | None:
            seen.append(draft)
            return "too short for us"

        async def async_filter(draft: gra_async.Draft) -> str | None:
            await asyncio.sleep(0)
            return sync_filter(draft)

        check = sync_filter if kind == "sync" else async_filter
        summary = gra_async.run(config(fake_server, tmp_path, target=1, max_tasks=3),
                                filters=[check])
        assert summary.filtered == 3 and summary.rejections == {"filtered": 3}
        assert not summary.reached_target
        assert fake_server.stats()["models"].get(REV_B, 0) == 0  # no review was paid for
        assert {d.generator for d in seen} == {GEN} and all(d.instruction and d.domain for d in seen)
        rows = list(gra_async.read_samples(tmp_path, include_all=True))
        assert [(r.decision, r.reason) for r in rows] == [("filtered", "too short for us")] * 3
        status = status_json(tmp_path)
        assert status["rejected"] == 3 and status["reached_target"] is False

    def test_filters_run_in_order_and_none_keeps_the_draft(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        scores(fake_server, 9, 9)
        calls: list[str] = []

        def keep(draft: gra_async.Draft) -> None:
            calls.append("keep")

        def reject(draft: gra_async.Draft) -> str:
            calls.append("reject")
            return "no"

        gra_async.run(config(fake_server, tmp_path, target=1, max_tasks=1), filters=[keep, reject])
        assert calls == ["keep", "reject"]


class TestGate:
    @pytest.mark.parametrize("kind", ["sync", "async"])
    def test_a_custom_gate_replaces_the_rule(
        self, fake_server: FakeServer, tmp_path: Path, kind: str,
    ) -> None:
        scores(fake_server, 2, 3)  # the default rule rejects these
        panels: list[gra_async.Panel] = []

        def lenient(panel: gra_async.Panel, gate: gra_async.GateConfig) -> str:
            panels.append(panel)
            assert gate.accept_mean == 7.0
            return "accept"

        async def async_lenient(panel: gra_async.Panel, gate: gra_async.GateConfig) -> str:
            return lenient(panel, gate)

        summary = gra_async.run(config(fake_server, tmp_path, target=2),
                                gate=lenient if kind == "sync" else async_lenient)
        assert summary.reached_target and summary.accepted == 2
        assert [r.model for r in panels[0].reviews] == [REV_B, REV_C]
        assert panels[0].mean == pytest.approx(2.5) and panels[0].std == pytest.approx(0.5)

    def test_a_gate_may_send_a_sample_to_the_adjudicator(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        scores(fake_server, 9, 9)
        summary = gra_async.run(config(fake_server, tmp_path, target=1, max_tasks=2),
                                gate=lambda panel, gate: "adjudicate")
        assert summary.adjudicated == 2 and summary.accepted == 0  # the adjudicator rejects
        rows = list(gra_async.read_samples(tmp_path, include_all=True))
        assert all(r.adjudication is not None and r.adjudication.model == ADJ for r in rows)

    def test_adjudicate_without_an_adjudicator_falls_back_to_the_mean(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        scores(fake_server, 7, 7)  # exactly at the bar: the mean accepts
        endpoints = team(fake_server.base_url)
        del endpoints["adjudicator"]
        cfg = gra_async.RunConfig.model_validate(
            {"run": {"run_dir": str(tmp_path), "target": 1}, "endpoints": endpoints})
        summary = gra_async.run(cfg, gate=lambda panel, gate: "adjudicate")
        assert summary.accepted == 1 and summary.adjudicated == 0

    def test_a_gate_that_answers_nonsense_stops_the_run(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        scores(fake_server, 9, 9)
        with pytest.raises(gra_async.UsageError, match="returned 'maybe'"):
            gra_async.run(config(fake_server, tmp_path, target=1), gate=lambda p, g: "maybe")
        assert status_json(tmp_path)["in_progress"] == 0


class TestStructuredConcurrency:
    def test_a_fatal_review_error_cancels_its_sibling(
        self, fake_server_factory: Any, tmp_path: Path,
    ) -> None:
        main_server = fake_server_factory(models=[GEN, ADJ], latency=0.0)
        refusing = fake_server_factory(models=[REV_B], status_script=[401] * 20)
        hanging = fake_server_factory(models=[REV_C], hang_rate=1.0)
        cfg = gra_async.RunConfig.model_validate({
            "run": {"run_dir": str(tmp_path), "target": 1, "concurrency": 1,
                    "max_in_flight": 1},
            "endpoints": {"generator": [{"base_url": main_server.base_url, "model": GEN}],
                          "reviewer": [{"base_url": refusing.base_url, "model": REV_B},
                                       {"base_url": hanging.base_url, "model": REV_C}],
                          "adjudicator": [{"base_url": main_server.base_url, "model": ADJ}]}})
        with pytest.raises(gra_async.AuthenticationError) as info:
            gra_async.run(cfg)
        assert info.value.status == 401 and REV_B in info.value.endpoint
        assert hanging.stats()["in_flight"] == 0 or _settles(lambda: hanging.stats()["in_flight"] == 0)
        assert status_json(tmp_path)["in_progress"] == 0

    def test_cancelling_the_run_from_outside_propagates_and_loses_nothing(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        scores(fake_server, 9, 9)
        fake_server.control(latency=0.2)

        async def go() -> None:
            synth = gra_async.Synthesizer(config(fake_server, tmp_path, target=50))
            runner = asyncio.create_task(synth.run())
            for _ in range(200):
                await asyncio.sleep(0.05)
                if fake_server.stats()["chat_requests"] >= 5:
                    break
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner

        asyncio.run(go())
        got = status_json(tmp_path)
        assert got["in_progress"] == 0
        fake_server.control(latency=0.0)
        assert gra_async.run(config(fake_server, tmp_path, target=3)).accepted == 3


def _settles(condition: Any, seconds: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


class CountingTransport:
    """The real aiohttp transport, counting what goes through it (an injected dependency)."""

    def __init__(self) -> None:
        from gra_async.client import AiohttpTransport

        self.inner = AiohttpTransport()
        self.requests = 0
        self.closed = False

    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        self.requests += 1
        return await self.inner.request(method, url, **kwargs)

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


def test_the_http_transport_is_injected(fake_server: FakeServer, tmp_path: Path) -> None:
    scores(fake_server, 9, 9)
    transport = CountingTransport()

    async def go() -> gra_async.RunSummary:
        try:
            return await gra_async.Synthesizer(config(fake_server, tmp_path, target=2),
                                               transport=transport).run()
        finally:
            assert not transport.closed  # the caller's to close
            await transport.aclose()

    summary = asyncio.run(go())
    # Every call and the start-up probe of each of the 4 endpoints went through it (and the
    # calls cut off at the target).
    assert transport.requests >= summary.calls + 4 and summary.calls > 0


class TestNoSilentCaps:
    def test_concurrency_flag_is_what_flag_given_endpoints_get(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        url = fake_server.base_url
        cfg = gra_async.load_config(None, environ={}, run={"run_dir": str(tmp_path),
                                                           "concurrency": 500},
                                    endpoints={"generator": [{"base_url": url, "model": GEN}]})

        async def windows() -> list[float]:
            async with gra_async.Synthesizer(cfg) as synth:
                return [s.window for s in synth.endpoint_stats()]

        assert asyncio.run(windows()) == [500.0]

    def test_a_cap_below_the_concurrency_is_announced_once(
        self, fake_server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    ) -> None:
        url = fake_server.base_url
        cfg = gra_async.RunConfig.model_validate({
            "run": {"run_dir": str(tmp_path), "concurrency": 100, "target": 1},
            "endpoints": {"generator": [{"base_url": url, "model": GEN, "max_concurrency": 8}],
                          "reviewer": [{"base_url": url, "model": REV_B}]}})
        scores(fake_server, 9, 9)
        with caplog.at_level("WARNING", logger="gra_async"):
            gra_async.run(cfg)
        notes = [r.getMessage() for r in caplog.records if "max_concurrency" in r.getMessage()]
        assert notes == ["generator endpoints take at most 8 calls at once (their "
                         "max_concurrency), below the run's concurrency of 100: raise "
                         "max_concurrency in [[endpoints.generator]] to use it"]


class TestLoadConfig:
    def test_file_then_environment_then_overrides(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        path = tmp_path / "gra.toml"
        path.write_text('[run]\ntarget = 5\nconcurrency = 8\nrounds = 2\n[gate]\naccept_mean = 6.5\n')
        monkeypatch.setenv("GRA_RUN__CONCURRENCY", "16")
        monkeypatch.setenv("GRA_RUN__ROUNDS", "3")
        cfg = gra_async.load_config(path, run={"rounds": 4}, gate={"disagreement_std": 2.0})
        assert (cfg.run.target, cfg.run.concurrency, cfg.run.rounds) == (5, 16, 4)
        assert (cfg.gate.accept_mean, cfg.gate.disagreement_std) == (6.5, 2.0)
        assert gra_async.load_config(str(path), environ={}).run.concurrency == 8

    def test_model_validate_takes_the_file_keys(self) -> None:
        cfg = gra_async.RunConfig.model_validate({"run": {"target": 7}, "gate": {"accept_mean": 8}})
        assert cfg.run.target == 7 and cfg.gate.accept_mean == 8.0

    def test_a_wrong_key_is_one_line(self) -> None:
        with pytest.raises(gra_async.ConfigError, match=r"^overrides: run\.targett: unknown key"):
            gra_async.load_config(None, environ={}, run={"targett": 3})



class TestExitCodes:
    def test_plan_exhausted_exits_3_with_the_rejection_counts(
        self, fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        scores(fake_server, 2, 3)
        url = fake_server.base_url
        code = main(["run", "--run-dir", str(tmp_path), "--target", "2", "--max-tasks", "3",
                     "--endpoint", f"generator={GEN}@{url}", "--endpoint", f"reviewer={REV_B}@{url}",
                     "--endpoint", f"reviewer={REV_C}@{url}"])
        err = capsys.readouterr().err
        assert code == 3
        assert "plan exhausted: 0 of 2 accepted; rejected: reject x3" in err
        assert "Traceback" not in err
        assert status_json(tmp_path)["reached_target"] is False

    def test_every_task_failed_exits_3_naming_the_failure(
        self, fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        fake_server.control(rules=[{"model": REV_B, "content": "{}"},
                                   {"model": REV_C, "content": "{}"}])
        url = fake_server.base_url
        code = main(["run", "--run-dir", str(tmp_path), "--target", "1", "--max-tasks", "2",
                     "--endpoint", f"generator={GEN}@{url}", "--endpoint", f"reviewer={REV_B}@{url}",
                     "--endpoint", f"reviewer={REV_C}@{url}"])
        err = capsys.readouterr().err
        assert code == 3
        line = next(line for line in err.splitlines() if line.startswith("every task failed"))
        assert "no valid review" in line

    def test_target_reached_exits_0_and_status_says_so(
        self, fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        scores(fake_server, 9, 9)
        url = fake_server.base_url
        monkeypatch.chdir(tmp_path)  # status and export default to runs/demo, as run does
        assert main(["run", "--target", "2", "--endpoint", f"generator={GEN}@{url}",
                     "--endpoint", f"reviewer={REV_B}@{url}"]) == 0
        capsys.readouterr()
        assert main(["status", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["reached_target"] is True and got["accepted"] == 2
        assert main(["export"]) == 0
        assert len((tmp_path / "runs/demo/samples.jsonl").read_text().splitlines()) == 2


def test_help_names_the_command_as_typed() -> None:
    done = subprocess.run([sys.executable, "-m", "gra_async", "--help"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.startswith("usage: python -m gra_async ")


def test_the_bundled_seeds_are_fingerprinted() -> None:
    from gra_async.runner import snapshot

    digest = snapshot(gra_async.RunConfig())["seeds_sha256"]
    assert digest != "e3b0c44298fc1c14"  # sha256 of nothing

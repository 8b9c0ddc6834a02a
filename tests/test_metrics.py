"""`/metrics`: scraped over HTTP during a real run against the fake server, parsed with
prometheus_client's own parser, and checked against `status --json` at the end."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import gra_async
from gra_async.cli import main
from gra_async.metrics import LATENCY_BUCKETS, METRIC_NAMES

from .conftest import FakeServer, status_json
from .test_pipeline import fixed_team, review

DASHBOARD = Path(__file__).resolve().parent.parent / "servers" / "grafana" / "gra-async.json"


def scrape(url: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Samples by family name: (sample name, labels, value)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    families: dict[str, list[tuple[str, dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families[family.name].append((sample.name, dict(sample.labels), sample.value))
    return families


def total(samples: list[tuple[str, dict[str, str], float]], **match: str) -> float:
    return sum(v for _, labels, v in samples if all(labels.get(k) == w for k, w in match.items()))


def config(server: FakeServer, run_dir: Path, **run: Any) -> gra_async.RunConfig:
    return gra_async.RunConfig.model_validate({
        "run": {"run_dir": str(run_dir), "target": 30, "metrics_port": 0, **run},
        "endpoints": fixed_team(server),
    })


def test_scraped_during_a_run_and_agreeing_with_status_at_the_end(
    fake_server: FakeServer, tmp_path: Path,
) -> None:
    # A 429, a 500 and a second 429 come first: retries with their reasons. The latency
    # keeps the run going long enough to be scraped mid-way.
    fake_server.control(latency=0.02, status_script=[429, 500, 429],
                        rules=[{"model": "rev-b", "content": review(9)}])
    run_dir = tmp_path / "run"

    async def go() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with gra_async.Synthesizer(config(fake_server, run_dir, concurrency=4)) as synth:
            url = synth.metrics_url
            assert url is not None and url.startswith("http://127.0.0.1:")
            running = asyncio.create_task(synth.run())
            during = []
            while not running.done():
                during.append(await asyncio.to_thread(scrape, url))
                await asyncio.sleep(0.05)
            summary = await running
            end = await asyncio.to_thread(scrape, url)
        assert summary.reached_target
        with pytest.raises(OSError):  # closed with the run
            scrape(url)
        return during, end

    during, end = asyncio.run(go())
    assert len(during) >= 2
    oks = [total(s["gra_calls"], outcome="ok") for s in during]
    assert oks == sorted(oks) and oks[-1] > 0  # counters only go up
    status = status_json(run_dir)

    calls = end["gra_calls"]
    assert total(calls, outcome="ok") == status["calls"]
    for row in status["by_model"]:
        assert total(calls, role=row["role"], model=row["model"], outcome="ok") == row["calls"]
        assert total(end["gra_tokens"], role=row["role"], model=row["model"],
                     direction="prompt") == row["prompt_tokens"]
        assert total(end["gra_tokens"], role=row["role"], model=row["model"],
                     direction="completion") == row["completion_tokens"]
    samples = end["gra_samples"]
    assert total(samples, decision="accept") == status["accepted"] == 30
    assert total(samples, decision="failed") == status["failed"]
    assert total(samples) == status["accepted"] + status["rejected"] + status["failed"]
    assert total(calls, outcome="rate_limited") == 2 and total(calls, outcome="error") == 1
    assert total(end["gra_retries"], reason="rate_limited") == 2
    assert total(end["gra_retries"], reason="server_error") == 1

    # One histogram per endpoint, its count the endpoint's journaled calls.
    histogram = end["gra_call_latency_seconds"]
    for endpoint in {labels["endpoint"] for _, labels, _ in calls}:
        count = total([s for s in histogram if s[0].endswith("_count")], endpoint=endpoint)
        assert count == total(calls, endpoint=endpoint, outcome="ok") > 0
        buckets = [v for name, labels, v in histogram
                   if name.endswith("_bucket") and labels["endpoint"] == endpoint]
        assert len(buckets) == len(LATENCY_BUCKETS) + 1 and buckets == sorted(buckets)
    assert {labels["endpoint"] for _, labels, _ in end["gra_in_flight"]} == {
        e["endpoint"] for e in status["endpoints"]}
    assert all(v == 0 for _, _, v in end["gra_in_flight"])  # nothing in flight after the run
    assert all(v >= 1 for _, _, v in end["gra_concurrency_window"])
    assert "gra_cost_usd" not in end  # no price configured


def test_cost_when_prices_are_set(fake_server: FakeServer, tmp_path: Path) -> None:
    team = fixed_team(fake_server)
    for endpoints in team.values():
        for endpoint in endpoints:
            endpoint.update(price_in=1.0, price_out=2.0)
    cfg = gra_async.RunConfig.model_validate({
        "run": {"run_dir": str(tmp_path), "target": 3, "metrics_port": 0}, "endpoints": team})

    async def go() -> dict[str, Any]:
        async with gra_async.Synthesizer(cfg) as synth:
            await synth.run()
            assert synth.metrics_url is not None
            return await asyncio.to_thread(scrape, synth.metrics_url)

    end = asyncio.run(go())
    ((_, _, cost),) = end["gra_cost_usd"]
    assert cost == pytest.approx(status_json(tmp_path)["cost"])


def test_a_port_in_use_is_one_line(fake_server: FakeServer, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["run", "--run-dir", str(tmp_path), "--target", "1", "--metrics-port",
                     str(port), "--endpoint", f"generator=gen-a@{fake_server.base_url}",
                     "--endpoint", f"reviewer=rev-b@{fake_server.base_url}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == (f"error: --metrics-port {port}: cannot listen on 127.0.0.1:{port} (Address "
                   "already in use); pick another port, or 0 for any free one\n")


def test_the_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    assert len(exprs) >= 8
    used = {name for expr in exprs for name in re.findall(r"\bgra_[a-z_]+", expr)}
    known = {*METRIC_NAMES, *(f"{n}_{s}" for n in METRIC_NAMES for s in ("bucket", "sum", "count"))}
    assert used <= known, used - known
    assert {"gra_calls_total", "gra_samples_total", "gra_tokens_total", "gra_retries_total",
            "gra_in_flight", "gra_concurrency_window", "gra_cost_usd",
            "gra_call_latency_seconds_bucket"} <= used

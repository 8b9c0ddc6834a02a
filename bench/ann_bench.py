"""Exact (numpy) against approximate nearest-neighbour search for the semantic dedup index.

    OPENBLAS_NUM_THREADS=1 python bench/ann_bench.py [--sizes 10000,100000] [--queries 200]

Vectors of dim 384 (multilingual-e5-small's), normalised, drawn around cluster centres so
that neighbours are near as in text embeddings; each query is a stored vector moved to a
cosine of ~0.92 (a near duplicate the dedup must find). Per library and size: build
time, mean query time, bytes held per vector, and recall of the planted duplicate at cosine >= 0.9
(what the dedup needs: the exact search finds all of them). One thread everywhere: the
dedup lookup runs on the event loop, one query at a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float32]
DIM = 384


def data(n: int, queries: int, seed: int = 0) -> tuple[Matrix, Matrix, npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 100, 1), DIM)).astype(np.float32)
    points = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal(
        (n, DIM)).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    targets = rng.choice(n, queries, replace=False)
    noise = rng.standard_normal((queries, DIM)).astype(np.float32)
    noise -= (noise * points[targets]).sum(1, keepdims=True) * points[targets]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    # cos(angle) = 0.92: a planted near duplicate, above the 0.9 threshold
    probes = 0.92 * points[targets] + np.sqrt(1 - 0.92**2) * noise
    return points, probes.astype(np.float32), targets


def exact(points: Matrix) -> Callable[[Matrix], int]:
    def query(vector: Matrix) -> int:
        return int(np.argmax(points @ vector))
    return query


def usearch_index(points: Matrix) -> Callable[[Matrix], int]:
    from usearch.index import Index

    index = Index(ndim=DIM, metric="ip", dtype="f32")
    index.add(np.arange(len(points)), points, threads=1)

    def query(vector: Matrix) -> int:
        return int(index.search(vector, 1, threads=1).keys[0])
    return query


def faiss_index(points: Matrix) -> Callable[[Matrix], int]:
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    index.add(points)

    def query(vector: Matrix) -> int:
        return int(index.search(vector[None, :], 1)[1][0, 0])
    return query


def hnswlib_index(points: Matrix) -> Callable[[Matrix], int]:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=DIM)
    index.init_index(max_elements=len(points), M=16, ef_construction=200)
    index.set_num_threads(1)
    index.add_items(points, np.arange(len(points)))
    index.set_ef(64)

    def query(vector: Matrix) -> int:
        return int(index.knn_query(vector, k=1)[0][0, 0])
    return query


LIBRARIES = {"exact": (None, exact), "usearch": ("usearch", usearch_index),
             "faiss-cpu": ("faiss", faiss_index), "hnswlib": ("hnswlib", hnswlib_index)}


def measure(name: str, n: int, queries: int) -> str:
    module, build = LIBRARIES[name]
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{name:10} {n:>8} not installed"
    points, probes, targets = data(n, queries)
    before = _rss_mb()
    started = time.perf_counter()
    query = build(points)
    built = time.perf_counter() - started
    grown = _rss_mb() - before  # what the index holds beyond the input matrix
    started = time.perf_counter()
    found = [query(p) for p in probes]
    per_query = (time.perf_counter() - started) / len(probes) * 1000
    recall = float(np.mean(np.asarray(found) == targets))
    # exact search is the matrix itself: 4 bytes a dimension, nothing beyond
    held = DIM * 4 if name == "exact" else grown * 2**20 / n
    return f"{name:10} {n:>8} {built:8.2f} {per_query:9.3f} {held:9.0f} {recall:7.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--only", default=",".join(LIBRARIES))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure(args.only, int(args.sizes), args.queries), flush=True)
        return
    print(f"{'library':10} {'n':>8} {'build s':>8} {'query ms':>9} {'B/vector':>9} {'recall':>7}")
    for n in args.sizes.split(","):
        for name in args.only.split(","):
            # One process each: the resident set then shows what that index alone holds.
            subprocess.run([sys.executable, __file__, "--one", "--only", name, "--sizes", n,
                            "--queries", str(args.queries)], check=True)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


if __name__ == "__main__":
    main()

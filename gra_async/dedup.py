"""Near-duplicate filtering of accepted samples, against each other and against the seeds.

Two stages, cheapest first: an exact match of the normalised text (a hash), then
MinHash LSH over word 3-shingles to find candidates, each verified by its Jaccard
similarity. Texts shorter than three words have no shingle and are matched exactly
only. A semantic stage (embedding cosine, as the GRA paper does) plugs in through the
`Similarity` protocol, after both: `semantic.EmbeddingIndex` is the one the pipeline uses.

About datasketch's `MinHashLSH(threshold=t)`: t is not a cut-off. It picks the band
layout (b bands of r rows) that balances false positives against false negatives
*around* t, and with 128 permutations at t=0.9 that layout (5 x 25) finds a pair
whose true Jaccard is exactly 0.9 only about a third of the time. So the index is
built with our own layout, chosen for recall (a pair at the threshold is a candidate
with probability >= 99.5%), and the threshold is applied afterwards.

Verification uses the exact Jaccard of the stored shingle hashes, not the MinHash
estimate: with 128 permutations the estimate's standard error near 0.9 is ~0.03,
which let about one in seven 0.94-similar copies through in our trials.

The index keeps what lookups need in sorted numpy runs, ~300 bytes a text (datasketch's
`MinHashLSH` spent ~4 KB of Python sets and bytes per text, the shingle hashes another
~1 KB). With a `FingerprintStore` (the run's journal) the shingle hashes stay on disk,
read back only for the few candidates a lookup verifies, and a resume reloads the
index from the store instead of re-hashing every accepted sample.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from datasketch import MinHash

from gra_async import defaults

__all__ = [
    "Deduplicator",
    "Duplicate",
    "Fingerprint",
    "FingerprintStore",
    "LshIndex",
    "Similarity",
    "copied_from",
    "layout",
    "normalize",
    "shingles",
]

_WHITESPACE = re.compile(r"\s+")
_SHINGLE = 3
_CANDIDATE_RECALL = 0.995
_RECENT = 4096  # at least this many fingerprints kept between `check` and `check_and_add`


def _identity(value: int) -> int:
    return value


@functools.cache
def _punctuation() -> dict[int, str]:
    # Built once (~0.2 s): every Unicode punctuation mark (category P*), not just ASCII's.
    return {cp: " " for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == "P"}


def normalize(text: str) -> str:
    """Casefold, NFKC, punctuation to spaces, whitespace collapsed: what counts as "the same text".

    Symbols (+, <, =, $) are kept: `x < 5` and `x > 5` are different code.
    """
    text = unicodedata.normalize("NFKC", text).casefold().translate(_punctuation())
    return _WHITESPACE.sub(" ", text).strip()


def shingles(normalized: str, size: int = _SHINGLE) -> set[bytes]:
    """Word n-grams of a normalised text; empty when it has fewer than `size` words."""
    words = normalized.split(" ") if normalized else []
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


def _band_layout(threshold: float, num_perm: int) -> tuple[int, int]:
    """The most selective (bands, rows) whose chance of catching a pair at `threshold` is high."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= _CANDIDATE_RECALL:
            return bands, rows
    return num_perm, 1


def layout(
    threshold: float = defaults.NEAR_DUP_THRESHOLD, num_perm: int = defaults.MINHASH_PERMUTATIONS,
    seed: int = 1,
) -> str:
    """What a stored bucket means: fingerprints made under another layout never match."""
    bands, rows = _band_layout(threshold, num_perm)
    dtype = MinHash(num_perm=1).hashvalues.dtype.str
    return f"minhash-{num_perm}-{dtype}-{seed}-{bands}x{rows}"


class Duplicate(NamedTuple):
    """What a text duplicates: the stored key, and the embedding cosine when the semantic
    stage found it (None: an exact or MinHash copy)."""

    key: str
    similarity: float | None = None


class Fingerprint(NamedTuple):
    """What the index keeps of a text."""

    digest: int  # 64-bit hash of the normalised text, the exact stage (odds of a false match
    # among a million texts: ~3e-8)
    buckets: npt.NDArray[np.int64]  # one per LSH band; empty under three words
    shingles: npt.NDArray[np.uint64] | None  # sorted unique shingle hashes, for exact Jaccard


def _jaccard(a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64]) -> float:
    shared = np.intersect1d(a, b, assume_unique=True).size
    return shared / (a.size + b.size - shared)


def copied_from(
    text: str, references: Mapping[str, str], threshold: float = defaults.NEAR_DUP_THRESHOLD
) -> str | None:
    """The reference `text` copies (same normalised text, or shingle Jaccard >= threshold).

    For the few examples a generator was shown: a pairwise check needs no index, so the
    seed set costs no memory here however large it is.
    """
    mine = normalize(text)
    grams = shingles(mine)
    for key, other in references.items():
        theirs, others = _reference_grams(other)
        if theirs == mine:
            return key
        if grams and others and len(grams & others) / len(grams | others) >= threshold:
            return key
    return None


@functools.lru_cache(maxsize=4096)
def _reference_grams(text: str) -> tuple[str, frozenset[bytes]]:
    # The same few-shot seeds come back task after task: normalising them each time was
    # 3% of a run's CPU (py-spy, bench/pipeline_bench.py at 0 ms latency).
    normalized = normalize(text)
    return normalized, frozenset(shingles(normalized))


@runtime_checkable
class Similarity(Protocol):
    """A semantic near-duplicate index, e.g. embeddings compared by cosine
    (`semantic.EmbeddingIndex`).

    Synchronous on purpose: an implementation computes embeddings ahead (async,
    in the pipeline) and looks them up here by key or text.
    """

    def nearest(self, key: str, text: str) -> tuple[str, float] | None:
        """The most similar stored key and its similarity in [0, 1], or None."""
        ...

    def add(self, key: str, text: str) -> None: ...


class FingerprintStore(Protocol):
    """Where fingerprints persist (the run's journal), as bytes."""

    def save(self, key: str, digest: int, buckets: bytes, shingles: bytes | None) -> None: ...

    def saved(self) -> Iterator[tuple[str, int, bytes]]:
        """(key, digest, buckets) of everything saved so far, in the order saved."""
        ...

    def shingles(self, key: str) -> bytes | None: ...


class _Postings:
    """int64 key -> int32 values as sorted numpy runs plus a small dict: ~12 bytes an entry.

    A dict of Python ints would cost ~100 bytes an entry. Runs are merged size-tiered,
    so there are O(log n) of them and each is binary-searched.
    """

    _FRESH = 4096

    def __init__(self) -> None:
        self._runs: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]] = []
        self._fresh: dict[int, list[int]] = {}
        self._fresh_size = 0

    def add(self, keys: Iterable[int], value: int) -> None:
        for key in keys:
            self._fresh.setdefault(key, []).append(value)
            self._fresh_size += 1
        if self._fresh_size >= self._FRESH:
            self._seal()

    def extend(self, keys: npt.NDArray[np.int64], values: npt.NDArray[np.int32]) -> None:
        self._seal()
        self._push(keys, values)

    def find(self, keys: Sequence[int]) -> list[int]:
        """The values stored under any of `keys`."""
        found = [value for key in keys for value in self._fresh.get(key, ())]
        if self._runs:
            query = np.asarray(keys, dtype=np.int64)
            for run_keys, run_values in self._runs:
                starts = np.searchsorted(run_keys, query, "left")
                ends = np.searchsorted(run_keys, query, "right")
                for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                    found += run_values[start:end].tolist()
        return found

    def _seal(self) -> None:
        if not self._fresh:
            return
        keys = np.fromiter((k for k, vs in self._fresh.items() for _ in vs), dtype=np.int64,
                           count=self._fresh_size)
        values = np.fromiter((v for vs in self._fresh.values() for v in vs), dtype=np.int32,
                             count=self._fresh_size)
        self._fresh.clear()
        self._fresh_size = 0
        self._push(keys, values)

    def _push(self, keys: npt.NDArray[np.int64], values: npt.NDArray[np.int32]) -> None:
        self._runs.append((keys, values))
        while len(self._runs) > 1 and (
            len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]) or not len(self._runs[-1][0])
        ):
            newer, older = self._runs.pop(), self._runs.pop()
            self._runs.append((np.concatenate((older[0], newer[0])),
                               np.concatenate((older[1], newer[1]))))
        keys, values = self._runs[-1]
        order = np.argsort(keys, kind="stable")
        self._runs[-1] = (keys[order], values[order])


class LshIndex:
    """Fingerprints by digest and by LSH bucket; the shingle hashes in memory or in a store."""

    def __init__(self, store: FingerprintStore | None = None) -> None:
        self._store = store
        self._keys: list[str] = []
        self._ordinals: dict[str, int] = {}
        self._digests = _Postings()
        self._buckets = _Postings()
        self._shingles: dict[str, npt.NDArray[np.uint64]] = {}  # without a store only

    def __contains__(self, key: object) -> bool:
        return key in self._ordinals

    def __len__(self) -> int:
        return len(self._keys)

    def exact(self, digest: int) -> str | None:
        """The first key stored with this digest."""
        found = self._digests.find([digest])
        return self._keys[min(found)] if found else None

    def candidates(self, buckets: npt.NDArray[np.int64]) -> set[str]:
        """Keys sharing at least one bucket."""
        return {self._keys[i] for i in self._buckets.find(buckets.tolist())} if len(buckets) else set()

    def shingles(self, key: str) -> npt.NDArray[np.uint64]:
        if self._store is None:
            return self._shingles[key]
        stored = self._store.shingles(key)
        if stored is None:
            raise KeyError(key)
        return np.frombuffer(stored, dtype=np.uint64)

    def add(self, key: str, fingerprint: Fingerprint) -> None:
        ordinal = self._remember(key)
        self._digests.add((fingerprint.digest,), ordinal)
        self._buckets.add(fingerprint.buckets.tolist(), ordinal)
        shingles = fingerprint.shingles
        if self._store is not None:
            self._store.save(key, fingerprint.digest, fingerprint.buckets.tobytes(),
                             None if shingles is None else shingles.tobytes())
        elif shingles is not None:
            self._shingles[key] = shingles

    def load(self) -> int:
        """Take in what the store saved (a resume); the number of texts loaded."""
        if self._store is None:
            return 0
        digests: list[int] = []
        bucket_chunks: list[bytes] = []
        ordinals: list[int] = []
        for key, digest, buckets in self._store.saved():
            if key in self._ordinals:
                continue
            ordinal = self._remember(key)
            digests.append(digest)
            bucket_chunks.append(buckets)
            ordinals += [ordinal] * (len(buckets) // 8)
        first = len(self._keys) - len(digests)
        self._digests.extend(np.array(digests, dtype=np.int64),
                             np.arange(first, len(self._keys), dtype=np.int32))
        self._buckets.extend(np.frombuffer(b"".join(bucket_chunks), dtype=np.int64).copy(),
                             np.array(ordinals, dtype=np.int32))
        return len(digests)

    def _remember(self, key: str) -> int:
        ordinal = len(self._keys)
        self._keys.append(key)
        self._ordinals[key] = ordinal
        return ordinal


class Deduplicator:
    """Remembers texts by key and says which stored key a new text duplicates.

    Deterministic: the same texts added in the same order give the same answers.
    """

    def __init__(
        self,
        threshold: float = defaults.NEAR_DUP_THRESHOLD,
        num_perm: int = defaults.MINHASH_PERMUTATIONS,
        seed: int = 1,
        *,
        store: FingerprintStore | None = None,
        semantic: Similarity | None = None,
        semantic_threshold: float = defaults.SEMANTIC_THRESHOLD,
        in_flight: int = 0,
    ) -> None:
        """`in_flight`: how many samples may be between their `check` and their
        `check_and_add` at once (the run's concurrency); each one's fingerprint is kept
        for the second call."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = threshold
        self.index = LshIndex(store)
        self.semantic = semantic
        self.semantic_threshold = semantic_threshold
        self.bands, self.rows = _band_layout(threshold, num_perm)
        # Copied per text, so the permutations are drawn once; its inputs are hashes already.
        self._empty = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity)
        self._recent: OrderedDict[str, tuple[str, Fingerprint]] = OrderedDict()
        # Sized below the samples in flight, it hashed every text twice: 4% of a run's
        # CPU at 10,000 calls in flight (py-spy, bench/pipeline_bench.py --scale).
        self._recent_size = max(_RECENT, 2 * in_flight)

    @property
    def layout(self) -> str:
        return layout(self.threshold, self._empty.hashvalues.size, self._empty.seed)

    def _prepare(self, text: str) -> Fingerprint:
        normalized = normalize(text)
        digest = int.from_bytes(hashlib.blake2b(normalized.encode(), digest_size=8).digest(),
                                "little", signed=True)
        grams = shingles(normalized)
        if not grams:
            return Fingerprint(digest, np.empty(0, dtype=np.int64), None)
        # One hash per shingle serves both stages: its 64 bits for the exact Jaccard, its
        # low 32 bits as the MinHash input (datasketch would hash every shingle again).
        hashes = np.unique(np.fromiter(
            (int.from_bytes(hashlib.blake2b(g, digest_size=8).digest(), "little") for g in grams),
            dtype=np.uint64, count=len(grams)))
        minhash = self._empty.copy()
        minhash.update_batch(hashes & np.uint64(0xFFFFFFFF))
        signature = minhash.hashvalues
        buckets = np.fromiter(
            (int.from_bytes(hashlib.blake2b(
                signature[band * self.rows : (band + 1) * self.rows].tobytes(),
                digest_size=8, person=band.to_bytes(2, "little")).digest(), "little", signed=True)
             for band in range(self.bands)), dtype=np.int64, count=self.bands)
        return Fingerprint(digest, buckets, hashes)

    def _fingerprint(self, key: str, text: str) -> Fingerprint:
        """`check` then `check_and_add` of one sample hash its text once."""
        recent = self._recent.pop(key, None)
        if recent is not None and recent[0] == text:
            return recent[1]
        return self._prepare(text)

    def _find(self, key: str, text: str, fingerprint: Fingerprint) -> Duplicate | None:
        exact = self.index.exact(fingerprint.digest)
        if exact is not None and exact != key:
            return Duplicate(exact)
        if fingerprint.shingles is not None:
            best: tuple[float, str] | None = None
            for candidate in sorted(self.index.candidates(fingerprint.buckets)):
                if candidate == key:
                    continue
                similarity = _jaccard(self.index.shingles(candidate), fingerprint.shingles)
                if similarity >= self.threshold and (best is None or similarity > best[0]):
                    best = (similarity, candidate)
            if best is not None:
                return Duplicate(best[1])
        if self.semantic is not None:
            hit = self.semantic.nearest(key, text)
            if hit is not None and hit[0] != key and hit[1] >= self.semantic_threshold:
                return Duplicate(hit[0], round(float(hit[1]), 4))
        return None

    def _add(self, key: str, text: str, fingerprint: Fingerprint) -> None:
        self.index.add(key, fingerprint)
        if self.semantic is not None:
            self.semantic.add(key, text)

    def load(self) -> int:
        """Take in the fingerprints the store saved (a resume); how many there were."""
        return self.index.load()

    def check(self, key: str, text: str) -> str | None:
        """The key this text duplicates (exact first, then near), or None. Stores nothing.

        A text is never reported as a duplicate of its own key, so re-checking a
        stored sample on resume is harmless.
        """
        found = self.find(key, text)
        return None if found is None else found.key

    def find(self, key: str, text: str) -> Duplicate | None:
        """`check`, with the similarity of a semantic match."""
        fingerprint = self._prepare(text)
        self._recent[key] = (text, fingerprint)
        if len(self._recent) > self._recent_size:
            self._recent.popitem(last=False)
        return self._find(key, text, fingerprint)

    def add(self, key: str, text: str) -> None:
        """Store a text under `key`; adding a key again is a no-op (resume re-adds samples)."""
        if key not in self.index:
            self._add(key, text, self._prepare(text))

    def check_and_add(self, key: str, text: str) -> str | None:
        """`check`, then `add` when the text is new, hashing the text once."""
        found = self.find_and_add(key, text)
        return None if found is None else found.key

    def find_and_add(self, key: str, text: str) -> Duplicate | None:
        """`check_and_add`, with the similarity of a semantic match."""
        fingerprint = self._fingerprint(key, text)
        duplicate = self._find(key, text, fingerprint)
        if duplicate is None and key not in self.index:
            self._add(key, text, fingerprint)
        return duplicate

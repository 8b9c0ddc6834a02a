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

Per sample the pipeline calls `find` when it is generated and `find_and_add` when it is
accepted: ~80 us of CPU over 20k texts of 15-35 words, down from ~270 (~93 against ~344
over 100k; a micro-benchmark of that call pattern). What went: a blake2b per shingle
and per band, datasketch's `copy` and `update_batch` (only its permutations are used
now, in its own formula on numpy arrays), a second pass over the index for the digest,
a Python loop over every key a lookup made, and `find_and_add` searching the whole
index again (it searches only what came in since `find`). A word is hashed once
(cached), a shingle's hash is a weighted sum of its words' hashes and a band's key a
weighted sum of its rows. Those hash values are new, so `layout()` is too ("v2-"): a
journal indexed the old way is indexed again, not mixed with the new.
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
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

_SHINGLE = 3
_CANDIDATE_RECALL = 0.995
_RECENT = 4096  # at least this many fingerprints kept between `check` and `check_and_add`


def _identity(value: int) -> int:
    return value


class _Punctuation(dict[int, "int | str"]):
    """`str.translate`'s table: every Unicode punctuation mark (category P*), not just
    ASCII's, to a space; filled as characters are met.

    Built whole up front, it took ~0.2 s (every code point's category): 10 us a sample
    of a 20,000-sample run. Filled lazily, it costs that only for characters seen, and a
    hit is the same C dict lookup.
    """

    _LIMIT = 1 << 16  # characters remembered (~6 MB); when full, forgotten all at once

    def __missing__(self, codepoint: int) -> int | str:
        if len(self) >= self._LIMIT:
            self.clear()
        mapped: int | str = " " if unicodedata.category(chr(codepoint))[0] == "P" else codepoint
        self[codepoint] = mapped
        return mapped


@functools.cache
def _punctuation() -> _Punctuation:
    return _Punctuation()


def normalize(text: str) -> str:
    """Casefold, NFKC, punctuation to spaces, whitespace collapsed: what counts as "the same text".

    Symbols (+, <, =, $) are kept: `x < 5` and `x > 5` are different code.
    """
    return " ".join(_words(text))


def _words(text: str) -> list[str]:
    """The words of `normalize(text)`, split once for both the digest and the shingles."""
    # str.split() and the old `re.sub(r"\s+", " ", ...).strip()` agree on every code point
    # (both use Python's Unicode whitespace); the regex was 8.5 us of a 9 us normalize.
    return unicodedata.normalize("NFKC", text).casefold().translate(_punctuation()).split()


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
    # v2: shingle hashes from cached word hashes, band keys by multiply-add (not blake2b).
    return f"{_HASHES_VERSION}-minhash-{num_perm}-{dtype}-{seed}-{bands}x{rows}"


# What `layout` says about how shingle hashes and band keys are made; bump it when either
# changes, so a resumed journal re-indexes instead of mixing two kinds of fingerprints.
_HASHES_VERSION = "v2"

_U32 = np.uint32
_U64 = np.uint64
# datasketch's MinHash constants (minhash.py): its signatures are what we reproduce.
_MERSENNE_PRIME = _U64((1 << 61) - 1)
_MAX_HASH = _U64((1 << 32) - 1)
_FMIX32 = (_U32(16), _U32(0x85EBCA6B), _U32(13), _U32(0xC2B2AE35), _U32(16))  # MurmurHash3's


def _derived(label: str, count: int) -> npt.NDArray[np.uint64]:
    """`count` fixed odd 64-bit constants named by `label`: the same in every process."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{label}/{i}".encode(), digest_size=8,
                                                    person=b"gra-dedup").digest(), "little") | 1
                     for i in range(count)], dtype=np.uint64)


# A shingle's word hashes weighted by position, so "a b c" and "c b a" differ. Two
# different shingles collide when, grouping their words, sum(c_w * hash(w)) = 0 mod 2^64,
# each c_w a sum of +-weights, not all zero: with random word hashes the odds are
# 2^-(64 - k), k the factors of two of the c_w. Every nonzero +-1/0 combination of these
# weights has at most 4 (tests/test_dedup.py checks), so the odds are <= 2^-60.
_SHINGLE_WEIGHTS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 1], dtype=np.uint64)
assert len(_SHINGLE_WEIGHTS) == _SHINGLE


class _WordHashes(dict[str, int]):
    """word -> 64-bit blake2b of it, forgotten all at once when full.

    blake2b per shingle was ~30 us of a 92 us `_prepare`; a word recurs across texts, so
    hashing each word once and combining three with numpy costs ~4 us. 100k entries are
    ~13 MB; a text's words are looked up in C (`dict.__getitem__`), only a miss calls here.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __missing__(self, word: str) -> int:
        if len(self) >= self.limit:
            self.clear()
        value = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        self[word] = value
        return value


_word_hashes = _WordHashes(100_000)  # a pure function's cache: shared by every Deduplicator


def _shingle_hashes(words: Sequence[str]) -> npt.NDArray[np.uint64]:
    """A 64-bit hash of each word 3-shingle of `words` (at least three), in text order."""
    hashes = np.fromiter(map(_word_hashes.__getitem__, words), dtype=np.uint64, count=len(words))
    size = hashes.itemsize
    # Every shingle as a row of a strided view: one matmul weighs and sums them (1.7 us,
    # against 2.4 us for three slices multiplied and added).
    windows: npt.NDArray[np.uint64] = np.ndarray((len(words) - _SHINGLE + 1, _SHINGLE),
                                                 dtype=np.uint64, buffer=hashes, strides=(size, size))
    # Left linear, not mixed: a bijection would keep every collision, and MinHash mixes
    # its input (the low 32 bits) itself (`_signature`: datasketch's MurmurHash3 premix,
    # or a*x+b mod a prime in the legacy scheme). 3,000 pairs at Jaccard 0.86 agreed on
    # 0.861 of their 128 values and were candidates 98.0% of the time; with splitmix64's
    # finaliser here (8 numpy calls, ~4 us a text) 0.860 and 98.2%; theory 0.86 and 98.4%.
    return windows @ _SHINGLE_WEIGHTS


class _Permutations(NamedTuple):
    """An empty datasketch `MinHash` and its permutations, unpacked once (~1 us a text)."""

    minhash: MinHash
    a: npt.NDArray[np.unsignedinteger]
    b: npt.NDArray[np.unsignedinteger]
    scheme: str

    @classmethod
    def of(cls, minhash: MinHash) -> _Permutations:
        a, b = minhash.permutations
        # datasketch < 2 had no `scheme`: the legacy formula was its only one.
        return cls(minhash, a, b, getattr(minhash, "scheme", "legacy"))


def _signature(hashes: npt.NDArray[np.uint64], permutations: _Permutations) -> npt.NDArray[np.unsignedinteger]:
    """What `minhash.copy().update_batch(hashes & 0xFFFFFFFF).hashvalues` would be, for
    the empty `permutations.minhash`.

    datasketch's `copy` and `update_batch` were ~45 us a text (parsing the permutations
    again, a Python call of the identity hash function per shingle); the same arithmetic
    on numpy arrays is ~11 us. The MinHash is empty: every value found is <= its initial
    `_MAX_HASH`, so the min with it is left out.
    """
    a, b, scheme = permutations.a, permutations.b, permutations.scheme
    if scheme == "affine32":  # datasketch >= 2's default
        values = hashes.astype(np.uint32)  # the low 32 bits
        shift1, multiply1, shift2, multiply2, shift3 = _FMIX32
        values ^= values >> shift1
        values *= multiply1
        values ^= values >> shift2
        values *= multiply2
        values ^= values >> shift3
        permuted = np.multiply.outer(values, a)  # wraps mod 2^32, as datasketch's does
        permuted += b
        return np.minimum.reduce(permuted, axis=0)  # type: ignore[no-any-return]
    if scheme == "legacy":
        permuted = np.multiply.outer(hashes & _MAX_HASH, a)  # wraps mod 2^64, as datasketch's does
        permuted += b
        permuted %= _MERSENNE_PRIME
        permuted &= _MAX_HASH
        return np.minimum.reduce(permuted, axis=0)  # type: ignore[no-any-return]
    copy = permutations.minhash.copy()  # a scheme of a later datasketch: its own code, slower
    copy.update_batch(hashes & _MAX_HASH)
    return copy.hashvalues  # type: ignore[no-any-return]


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
        size, their_size = len(grams), len(others)
        if not size or not their_size:
            continue
        # Jaccard is at most the smaller set's size over the larger's: most references
        # are ruled out by their sizes, and the rest need no union built.
        if min(size, their_size) / max(size, their_size) < threshold:
            continue
        shared = len(grams & others)
        if shared / (size + their_size - shared) >= threshold:
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
    so there are O(log n) of them and each is binary-searched. Only adjacent runs merge,
    so each run holds a contiguous stretch of the entries in the order added: a lookup
    can skip the runs holding only entries older than some point (`find_at`'s `since`).
    """

    _FRESH = 4096

    def __init__(self) -> None:
        # (keys, values, how many entries were added before the run's first)
        self._runs: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], int]] = []
        self._sealed = 0  # entries in the runs
        # key -> its first fresh value; the rare later ones (a bucket two fresh texts share)
        # apart: a list for every entry was ~5% of a benchmark run (py-spy).
        self._fresh: dict[int, int] = {}
        self._fresh_more: dict[int, list[int]] = {}
        # The fresh entries again, in the order added: sealed by one list conversion each
        # (the two generators over the dict it replaced were 2.5% of a benchmark run).
        self._fresh_keys: list[int] = []
        self._fresh_values: list[int] = []

    def __len__(self) -> int:
        """Entries added so far."""
        return self._sealed + len(self._fresh_keys)

    def add(self, keys: Sequence[int], value: int) -> None:
        self.add_each(list(keys), [value] * len(keys))

    def add_each(self, keys: list[int], values: list[int]) -> None:
        """Store each of `values` under the key at the same position of `keys`."""
        fresh = self._fresh
        for key, value in zip(keys, values, strict=True):
            if key in fresh:
                self._fresh_more.setdefault(key, []).append(value)
            else:
                fresh[key] = value
        self._fresh_keys += keys
        self._fresh_values += values
        if len(self._fresh_keys) >= self._FRESH:
            self._seal()

    def extend(self, keys: npt.NDArray[np.int64], values: npt.NDArray[np.int32]) -> None:
        self._seal()
        self._push(keys, values)

    def find(self, keys: Sequence[int]) -> list[int]:
        """The values stored under any of `keys`."""
        return [value for _, value in self.find_at(list(keys))]

    def find_at(self, keys: list[int], since: int = 0) -> list[tuple[int, int]]:
        """(position in `keys`, value) of each value stored under one of `keys`: every
        one added after the first `since` entries, and maybe some older."""
        found: list[tuple[int, int]] = []
        fresh = self._fresh
        if fresh and not fresh.keys().isdisjoint(keys):
            more = self._fresh_more
            for i, key in enumerate(keys):
                if key in fresh:
                    found.append((i, fresh[key]))
                    found += [(i, value) for value in more.get(key, ())]
        query: npt.NDArray[np.int64] | None = None
        # Nearly every key misses every run, so a run costs one searchsorted call (the
        # method: np.searchsorted's wrapper added 1.8 us a call), a look at the keys found
        # there and one count (`.any()` took 2.7 us, np.count_nonzero 0.4); the right ends
        # are searched for the hits only. A second searchsorted of every key cost ~1 us
        # more a run (15 new keys take ~2 us even in a 4k-entry run), and the Python loop
        # over every key, a slice each, that all this replaced ~3x more.
        for run_keys, run_values, start in self._runs:
            if start + len(run_keys) <= since:
                continue
            if query is None:
                query = np.array(keys, dtype=np.int64)
            starts = run_keys.searchsorted(query)
            hit = run_keys.take(starts, mode="clip") == query
            if not np.count_nonzero(hit):
                continue
            positions = hit.nonzero()[0]
            ends = run_keys.searchsorted(query[positions], "right").tolist()
            for i, first, end in zip(positions.tolist(), starts[positions].tolist(), ends, strict=True):
                found += [(i, value) for value in run_values[first:end].tolist()]
        return found

    def _seal(self) -> None:
        if not self._fresh_keys:
            return
        keys = np.array(self._fresh_keys, dtype=np.int64)
        values = np.array(self._fresh_values, dtype=np.int32)
        self._fresh.clear()
        self._fresh_more.clear()
        self._fresh_keys = []
        self._fresh_values = []
        self._push(keys, values)

    def _push(self, keys: npt.NDArray[np.int64], values: npt.NDArray[np.int32]) -> None:
        self._runs.append((keys, values, self._sealed))
        self._sealed += len(keys)
        while len(self._runs) > 1 and (
            len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]) or not len(self._runs[-1][0])
        ):
            newer, older = self._runs.pop(), self._runs.pop()
            self._runs.append((np.concatenate((older[0], newer[0])),
                               np.concatenate((older[1], newer[1])), older[2]))
        keys, values, start = self._runs[-1]
        order = np.argsort(keys, kind="stable")
        self._runs[-1] = (keys[order], values[order], start)


class _Hits(NamedTuple):
    """What a lookup found, by ordinal."""

    first: int | None  # the first text stored with the digest
    near: frozenset[int]  # texts sharing a bucket
    seen: int  # how many postings entries there were: a repeat lookup searches only newer


_NO_HITS = _Hits(None, frozenset(), 0)


class LshIndex:
    """Fingerprints by digest and by LSH bucket; the shingle hashes in memory or in a store.

    Digests and buckets share one `_Postings`, a digest's value being ~ordinal (negative)
    and a bucket's the ordinal: a lookup of both costs one pass over the runs, not two
    (two passes were ~8 us of each lookup at 20k texts). A hit counts only for its kind
    (a digest query against digest entries), so a digest equal to some bucket key by
    chance matches nothing.
    """

    def __init__(self, store: FingerprintStore | None = None) -> None:
        self._store = store
        self._keys: list[str] = []
        self._ordinals: dict[str, int] = {}
        self._postings = _Postings()
        self._shingles: dict[str, npt.NDArray[np.uint64]] = {}  # without a store only

    def __contains__(self, key: object) -> bool:
        return key in self._ordinals

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, ordinal: int) -> str:
        """The key stored `ordinal`-th (from 0)."""
        return self._keys[ordinal]

    def exact(self, digest: int) -> str | None:
        """The first key stored with this digest."""
        first = self.lookup(digest, np.empty(0, dtype=np.int64)).first
        return None if first is None else self._keys[first]

    def candidates(self, buckets: npt.NDArray[np.int64]) -> set[str]:
        """Keys sharing at least one bucket."""
        if not len(buckets):
            return set()
        found = self._postings.find_at(np.asarray(buckets, dtype=np.int64).tolist())
        return {self._keys[value] for _, value in found if value >= 0}

    def lookup(self, digest: int, buckets: npt.NDArray[np.int64], earlier: _Hits = _NO_HITS) -> _Hits:
        """`exact(digest)` and `candidates(buckets)` in one pass, by ordinal.

        `earlier`: what a lookup of the same digest and buckets found before. Stored
        texts never change, so only the entries added since are searched: the second
        lookup of a sample (`find` then `find_and_add`) costs the fresh entries and the
        runs that took in entries since, not every run (~3 us at 20k texts, against ~25).
        """
        query = buckets.tolist()
        query.insert(0, digest)
        seen = len(self._postings)
        first = earlier.first
        near: set[int] = set()
        for position, value in self._postings.find_at(query, earlier.seen):
            if position == 0:
                if value < 0 and (first is None or ~value < first):
                    first = ~value
            elif value >= 0:
                near.add(value)
        return _Hits(first, (earlier.near | near) if near else earlier.near, seen)

    def shingles(self, key: str) -> npt.NDArray[np.uint64]:
        if self._store is None:
            return self._shingles[key]
        stored = self._store.shingles(key)
        if stored is None:
            raise KeyError(key)
        return np.frombuffer(stored, dtype=np.uint64)

    def add(self, key: str, fingerprint: Fingerprint) -> None:
        ordinal = self._remember(key)
        keys = fingerprint.buckets.tolist()
        values = [ordinal] * len(keys)
        keys.insert(0, fingerprint.digest)
        values.insert(0, ~ordinal)
        self._postings.add_each(keys, values)
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
        digest_values = ~np.arange(first, len(self._keys), dtype=np.int32)
        self._postings.extend(
            np.concatenate((np.array(digests, dtype=np.int64),
                            np.frombuffer(b"".join(bucket_chunks), dtype=np.int64))),
            np.concatenate((digest_values, np.array(ordinals, dtype=np.int32))))
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
        # Only its permutations are used (see `_signature`), drawn once; its inputs are
        # hashes already.
        self._empty = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity)
        self._permutations = _Permutations.of(self._empty)
        # A band's key is a weighted sum of its rows plus an offset of its own (so equal rows
        # in two bands differ): one matmul, 2.4 us, for what a blake2b per band did in 19 us.
        # Keys are only compared for equality, so mixing them further would change nothing
        # (a bijection keeps every collision); a false one costs a Jaccard check, no more.
        self._band_weights = _derived("band-weights", self.rows)
        self._band_offsets = _derived("band-offsets", self.bands)
        # A sample's text, fingerprint and first lookup, from `find` to `find_and_add`.
        self._recent: OrderedDict[str, tuple[str, Fingerprint, _Hits]] = OrderedDict()
        # Sized below the samples in flight, it hashed every text twice: 4% of a run's
        # CPU at 10,000 calls in flight (py-spy, bench/pipeline_bench.py --scale).
        self._recent_size = max(_RECENT, 2 * in_flight)

    @property
    def layout(self) -> str:
        return layout(self.threshold, self._empty.hashvalues.size, self._empty.seed)

    def _prepare(self, text: str) -> Fingerprint:
        words = _words(text)
        digest = int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest(),
                                "little", signed=True)
        if len(words) < _SHINGLE:
            return Fingerprint(digest, np.empty(0, dtype=np.int64), None)
        # One hash per shingle serves both stages: its 64 bits for the exact Jaccard, its
        # low 32 bits as the MinHash input.
        hashes = _shingle_hashes(words)
        signature = _signature(hashes, self._permutations)
        buckets = signature[: self.bands * self.rows].reshape(self.bands, self.rows) @ self._band_weights
        buckets += self._band_offsets
        hashes.sort()
        if np.count_nonzero(hashes[1:] == hashes[:-1]):  # a shingle repeated in the text
            hashes = np.unique(hashes)
        return Fingerprint(digest, buckets.view(np.int64), hashes)

    def _judge(self, key: str, text: str, fingerprint: Fingerprint, hits: _Hits) -> Duplicate | None:
        if hits.first is not None:
            exact = self.index.key(hits.first)
            if exact != key:
                return Duplicate(exact)
        if fingerprint.shingles is not None and hits.near:
            best: tuple[float, str] | None = None
            for candidate in sorted(map(self.index.key, hits.near)):
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
        hits = self.index.lookup(fingerprint.digest, fingerprint.buckets)
        self._recent[key] = (text, fingerprint, hits)
        if len(self._recent) > self._recent_size:
            self._recent.popitem(last=False)
        return self._judge(key, text, fingerprint, hits)

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
        # After `find`, the text is hashed and looked up once: only what the index took
        # in since is searched.
        recent = self._recent.pop(key, None)
        if recent is not None and recent[0] == text:
            _, fingerprint, earlier = recent
        else:
            fingerprint, earlier = self._prepare(text), _NO_HITS
        hits = self.index.lookup(fingerprint.digest, fingerprint.buckets, earlier)
        duplicate = self._judge(key, text, fingerprint, hits)
        if duplicate is None and key not in self.index:
            self._add(key, text, fingerprint)
        return duplicate

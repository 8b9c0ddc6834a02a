"""Near-duplicate filtering of accepted samples, against each other and against the seeds.

Two stages, cheapest first: an exact match of the normalised text (a hash), then
MinHash LSH over word 3-shingles to find candidates, each verified by its Jaccard
similarity. Texts shorter than three words have no shingle and are matched exactly
only. A semantic stage (embedding cosine, DESIGN.md §1) plugs in through the
`Similarity` protocol; none is built here.

About datasketch's `MinHashLSH(threshold=t)`: t is not a cut-off. It picks the band
layout (b bands of r rows) that balances false positives against false negatives
*around* t, and with 128 permutations at t=0.9 that layout (5 x 25) finds a pair
whose true Jaccard is exactly 0.9 only about a third of the time. So the index is
built with our own layout, chosen for recall (a pair at the threshold is a candidate
with probability >= 99.5%), and the threshold is applied afterwards.

Verification uses the exact Jaccard of the stored shingle hashes, not the MinHash
estimate: with 128 permutations the estimate's standard error near 0.9 is ~0.03,
which let about one in seven 0.94-similar copies through in our trials. The hashes
cost 8 bytes a shingle, about what the LSH tables already spend per text.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from datasketch import MinHash, MinHashLSH

from gra_async import defaults

__all__ = ["Deduplicator", "Similarity", "copied_from", "normalize", "shingles"]

_WHITESPACE = re.compile(r"\s+")
_SHINGLE = 3
_CANDIDATE_RECALL = 0.995
_RECENT = 4096  # fingerprints kept between a sample's early check and its final check_and_add


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


class _Fingerprint(NamedTuple):
    digest: bytes  # of the normalised text: the exact stage
    minhash: MinHash | None  # None: fewer than three words
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
        theirs = normalize(other)
        if theirs == mine:
            return key
        others = shingles(theirs)
        if grams and others and len(grams & others) / len(grams | others) >= threshold:
            return key
    return None


@runtime_checkable
class Similarity(Protocol):
    """A semantic near-duplicate index, e.g. embeddings compared by cosine.

    Synchronous on purpose: an implementation computes embeddings ahead (async,
    in the pipeline) and looks them up here by key or text.
    """

    def nearest(self, key: str, text: str) -> tuple[str, float] | None:
        """The most similar stored key and its similarity in [0, 1], or None."""
        ...

    def add(self, key: str, text: str) -> None: ...


class Deduplicator:
    """Remembers texts by key and says which stored key a new text duplicates.

    Deterministic: the same texts added in the same order give the same answers.
    References (seed texts) and samples share one index; `is_reference` tells them apart.
    """

    def __init__(
        self,
        threshold: float = defaults.NEAR_DUP_THRESHOLD,
        num_perm: int = defaults.MINHASH_PERMUTATIONS,
        seed: int = 1,
        *,
        semantic: Similarity | None = None,
        semantic_threshold: float = defaults.NEAR_DUP_THRESHOLD,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = threshold
        self.num_perm = num_perm
        self.semantic = semantic
        self.semantic_threshold = semantic_threshold
        # Copied per text, so the permutations are drawn once; its inputs are hashes already.
        self._empty = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity)
        self._recent: OrderedDict[str, tuple[str, _Fingerprint]] = OrderedDict()
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm,
                               params=_band_layout(threshold, num_perm))
        self._exact: dict[bytes, str] = {}
        self._shingles: dict[str, npt.NDArray[np.uint64]] = {}
        self._keys: set[str] = set()
        self._references: set[str] = set()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def is_reference(self, key: str) -> bool:
        return key in self._references

    def _prepare(self, text: str) -> _Fingerprint:
        normalized = normalize(text)
        digest = hashlib.blake2b(normalized.encode(), digest_size=16).digest()
        grams = shingles(normalized)
        if not grams:
            return _Fingerprint(digest, None, None)
        # One hash per shingle serves both stages: its 64 bits for the exact Jaccard, its
        # low 32 bits as the MinHash input (datasketch would hash every shingle again).
        hashes = np.unique(np.fromiter(
            (int.from_bytes(hashlib.blake2b(g, digest_size=8).digest(), "little") for g in grams),
            dtype=np.uint64, count=len(grams)))
        minhash = self._empty.copy()
        minhash.update_batch(hashes & np.uint64(0xFFFFFFFF))
        return _Fingerprint(digest, minhash, hashes)

    def _fingerprint(self, key: str, text: str) -> _Fingerprint:
        """`check` then `check_and_add` of one sample hash its text once."""
        recent = self._recent.pop(key, None)
        if recent is not None and recent[0] == text:
            return recent[1]
        return self._prepare(text)

    def _find(self, key: str, text: str, fingerprint: _Fingerprint) -> str | None:
        exact = self._exact.get(fingerprint.digest)
        if exact is not None and exact != key:
            return exact
        if fingerprint.minhash is not None and fingerprint.shingles is not None:
            best: tuple[float, str] | None = None
            for candidate in sorted(self._lsh.query(fingerprint.minhash)):
                if candidate == key:
                    continue
                similarity = _jaccard(self._shingles[candidate], fingerprint.shingles)
                if similarity >= self.threshold and (best is None or similarity > best[0]):
                    best = (similarity, candidate)
            if best is not None:
                return best[1]
        if self.semantic is not None:
            hit = self.semantic.nearest(key, text)
            if hit is not None and hit[0] != key and hit[1] >= self.semantic_threshold:
                return hit[0]
        return None

    def _add(self, key: str, text: str, fingerprint: _Fingerprint) -> None:
        self._keys.add(key)
        self._exact.setdefault(fingerprint.digest, key)
        if fingerprint.minhash is not None and fingerprint.shingles is not None:
            self._shingles[key] = fingerprint.shingles
            self._lsh.insert(key, fingerprint.minhash, check_duplication=False)
        if self.semantic is not None:
            self.semantic.add(key, text)

    def check(self, key: str, text: str) -> str | None:
        """The key this text duplicates (exact first, then near), or None. Stores nothing.

        A text is never reported as a duplicate of its own key, so re-checking a
        stored sample on resume is harmless.
        """
        fingerprint = self._prepare(text)
        self._recent[key] = (text, fingerprint)
        if len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
        return self._find(key, text, fingerprint)

    def add(self, key: str, text: str) -> None:
        """Store a text under `key`; adding a key again is a no-op (resume re-adds samples)."""
        if key not in self._keys:
            self._add(key, text, self._prepare(text))

    def add_reference(self, key: str, text: str) -> None:
        """Store a seed text: a sample that copies a few-shot example is not a new sample."""
        self.add(key, text)
        self._references.add(key)

    def check_and_add(self, key: str, text: str) -> str | None:
        """`check`, then `add` when the text is new, hashing the text once."""
        fingerprint = self._fingerprint(key, text)
        duplicate = self._find(key, text, fingerprint)
        if duplicate is None and key not in self._keys:
            self._add(key, text, fingerprint)
        return duplicate

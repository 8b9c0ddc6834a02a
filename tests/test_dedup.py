"""Exact and near-duplicate detection, against samples and against seeds."""

from __future__ import annotations

import itertools
import random
import re
import sys
import unicodedata

import numpy as np
import pytest
from datasketch import MinHash

from gra_async.config import PlannerConfig
from gra_async.dedup import (
    _SHINGLE_WEIGHTS,
    Deduplicator,
    Similarity,
    _band_layout,
    _identity,
    _Permutations,
    _Postings,
    _shingle_hashes,
    _signature,
    _word_hashes,
    _words,
    layout,
    normalize,
    shingles,
)
from gra_async.seeds import SeedStore

VOCAB = [f"w{i}" for i in range(400)]
WIDE_VOCAB = [f"v{i}" for i in range(50_000)]  # few repeated words, so a pair's Jaccard is as planned


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


def edited(base: list[str], changes: int, seed: int) -> str:
    rng = random.Random(seed)
    out = list(base)
    for position in rng.sample(range(len(out)), changes):
        out[position] = f"new{position}"
    return " ".join(out)


class TestNormalize:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("  Hello,   WORLD!\n", "hello world"),
            ("“Quoted” — dash… end.", "quoted dash end"),
            ("Straße", "strasse"),
            ("\uff46\uff55\uff4c\uff4c width", "full width"),
            ("x < 5 + y", "x < 5 + y"),
            ("don't stop", "don t stop"),
        ],
        ids=["case-space-punct", "unicode-punct", "casefold", "nfkc", "symbols-kept", "apostrophe"],
    )
    def test_normalize(self, text: str, expected: str) -> None:
        assert normalize(text) == expected

    def test_shingles(self) -> None:
        assert shingles("a b c d") == {b"a b c", b"b c d"}
        assert shingles("a b") == set() and shingles("") == set()

    def test_every_code_point_as_the_regex_and_the_full_table_did(self) -> None:
        # normalize() now splits on str.split()'s whitespace and fills its punctuation
        # table lazily: the same text as the regex and the table built up front.
        table = {cp: " " for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == "P"}
        whitespace = re.compile(r"\s+")

        def before(text: str) -> str:
            text = unicodedata.normalize("NFKC", text).casefold().translate(table)
            return whitespace.sub(" ", text).strip()

        for start in range(0, sys.maxunicode + 1, 512):
            text = "".join(f"{chr(cp)}a" for cp in range(start, min(start + 512, sys.maxunicode + 1)))
            assert " ".join(_words(text)) == before(text), hex(start)  # what normalize() returns


class TestExact:
    def test_same_text_after_normalisation(self) -> None:
        dedup = Deduplicator()
        index = dedup.index
        assert dedup.check_and_add("s1", "What is the capital of France?") is None
        assert dedup.check_and_add("s2", "what is the CAPITAL of france") == "s1"
        assert len(index) == 1 and "s2" not in index

    def test_short_texts_match_exactly_only(self) -> None:
        dedup = Deduplicator()
        dedup.add("a", "Hello world")
        assert dedup.check("b", "hello, world!") == "a"
        assert dedup.check("c", "hello there") is None
        assert dedup.check("d", "Hello") is None


class TestNearDuplicates:
    def test_one_word_changed_in_a_long_text(self) -> None:
        base = words(100, seed=1)
        dedup = Deduplicator()
        dedup.add("base", " ".join(base))
        # Jaccard of 3-shingles after one substitution is ~0.94: every variant is caught.
        assert all(dedup.check(f"v{i}", edited(base, 1, seed=i)) == "base" for i in range(30))

    def test_below_threshold_is_not_a_duplicate(self) -> None:
        base = words(100, seed=2)
        dedup = Deduplicator()
        dedup.add("base", " ".join(base))
        assert all(dedup.check(f"v{i}", edited(base, 6, seed=i)) is None for i in range(10))
        # ...but a lower threshold catches them.
        loose = Deduplicator(threshold=0.5)
        loose.add("base", " ".join(base))
        assert loose.check("v", edited(base, 6, seed=0)) == "base"

    def test_unrelated_texts(self) -> None:
        dedup = Deduplicator()
        index = dedup.index
        for i in range(200):
            assert dedup.check_and_add(f"t{i}", " ".join(words(40, seed=100 + i))) is None
        assert len(index) == 200

    def test_near_copy_of_a_seed(self) -> None:
        seeds = list(SeedStore.build(None, PlannerConfig(), seed=0))
        dedup = Deduplicator()
        for seed in seeds:
            dedup.add(f"seed:{seed.id}", f"{seed.instruction}\n{seed.response}")
        target = next(s for s in seeds if s.id == "sci-01")
        # A small model's typical "new" sample: the example, lightly reworded.
        copy = (f"{target.instruction.replace('Why', 'why')}\n"
                f"{target.response.replace('Sunlight contains', 'Sunlight has')}")
        assert dedup.check("sample-1", copy) == "seed:sci-01"
        fresh = "Why do leaves change colour in autumn?\nChlorophyll breaks down in the cold."
        assert dedup.check("sample-2", fresh) is None

    def test_best_match_wins(self) -> None:
        base = words(100, seed=3)
        dedup = Deduplicator(threshold=0.8)
        dedup.add("far", edited(base, 3, seed=1))
        dedup.add("near", " ".join(base))
        assert dedup.check("q", edited(base, 1, seed=2)) == "near"


class TestRecall:
    """Near-duplicates around the threshold (0.9), over many random pairs."""

    def pair(self, rng: random.Random, length: int, changes: int, trial: int) -> tuple[str, str, float]:
        base = [rng.choice(WIDE_VOCAB) for _ in range(length)]
        other = list(base)
        for n, position in enumerate(rng.sample(range(3, length - 3, 4), changes)):  # 3-shingles apart
            other[position] = f"new{trial}x{n}"
        a, b = shingles(normalize(" ".join(base))), shingles(normalize(" ".join(other)))
        return " ".join(base), " ".join(other), len(a & b) / len(a | b)

    @pytest.mark.parametrize(
        ("length", "changes", "low", "high", "found"),
        [(120, 1, 0.95, 0.96, 1.0), (60, 1, 0.9, 0.91, 0.995), (60, 2, 0.8, 0.82, 0.0)],
        ids=["jaccard-0.95", "jaccard-0.90", "jaccard-0.81"],
    )
    def test_pairs_are_found_as_their_jaccard_says(
        self, length: int, changes: int, low: float, high: float, found: float
    ) -> None:
        rng = random.Random(length * 10 + changes)
        dedup = Deduplicator()
        for i in range(1500):  # other texts, so the pairs are looked up across several runs
            dedup.add(f"filler{i}", " ".join(rng.choice(WIDE_VOCAB) for _ in range(30)))
        pairs = [self.pair(rng, length, changes, trial) for trial in range(400)]
        for trial, (base, _, jaccard) in enumerate(pairs):
            assert low <= jaccard < high
            dedup.add(f"b{trial}", base)
        hits = [dedup.check(f"v{trial}", variant) for trial, (_, variant, _) in enumerate(pairs)]
        assert all(hit in (None, f"b{trial}") for trial, hit in enumerate(hits))
        rate = sum(hit is not None for hit in hits) / len(hits)
        # Candidates at J=0.9016 with 14 bands of 9 rows: 1 - (1 - 0.9016^9)^14 = 99.9%;
        # the exact Jaccard check then rejects every pair under 0.9.
        assert rate >= found if found else rate == 0.0

    def test_minhash_agreement_estimates_the_jaccard(self) -> None:
        # Per permutation, two signatures agree with probability J: a hash that is not
        # random enough (correlated shingle hashes, a weak MinHash input) shows here.
        rng = random.Random(11)
        permutations = Deduplicator()._permutations
        agreement, jaccards = [], []
        for trial in range(400):
            base, other, jaccard = self.pair(rng, 40, 1, trial)
            a, b = (np.unique(_shingle_hashes(_words(text))) for text in (base, other))
            agreement.append(np.mean(_signature(a, permutations) == _signature(b, permutations)))
            jaccards.append(jaccard)
        # 400 pairs x 128 permutations: the mean's standard error is ~0.0015.
        assert abs(np.mean(agreement) - np.mean(jaccards)) < 0.006
        assert 0.02 < np.std(np.array(agreement) - np.array(jaccards)) < 0.04  # ~sqrt(J(1-J)/128)


class TestHashes:
    @pytest.mark.parametrize("scheme", ["affine32", "legacy", "affine64"])
    @pytest.mark.parametrize(("num_perm", "seed"), [(128, 1), (64, 7)])
    def test_signature_is_datasketchs(self, scheme: str, num_perm: int, seed: int) -> None:
        try:
            empty = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity, scheme=scheme)
        except TypeError:  # datasketch < 2: one scheme, the legacy one, and no `scheme`
            if scheme != "legacy":
                pytest.skip("datasketch < 2")
            empty = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity)
        rng = np.random.default_rng(seed)
        for size in (1, 2, 30, 500):
            hashes = rng.integers(0, 2**64, size, dtype=np.uint64)
            theirs = empty.copy()
            theirs.update_batch(hashes & np.uint64(0xFFFFFFFF))
            ours = _signature(hashes, _Permutations.of(empty))
            assert ours.dtype == theirs.hashvalues.dtype
            assert np.array_equal(ours, theirs.hashvalues)

    def test_the_deduplicators_signature_is_datasketchs(self) -> None:
        dedup = Deduplicator()
        hashes = _shingle_hashes(words(40, seed=9))
        theirs = dedup._empty.copy()
        theirs.update_batch(hashes & np.uint64(0xFFFFFFFF))
        assert np.array_equal(_signature(hashes, dedup._permutations), theirs.hashvalues)

    def test_word_order_matters(self) -> None:
        forward, backward = _shingle_hashes(["a", "b", "c"]), _shingle_hashes(["c", "b", "a"])
        assert forward.tolist() != backward.tolist()
        assert _shingle_hashes(["a", "b", "a"]).tolist() != _shingle_hashes(["b", "a", "a"]).tolist()
        text = words(40, seed=10)
        dedup = Deduplicator()
        dedup.add("forward", " ".join(text))
        assert dedup.check("backward", " ".join(reversed(text))) is None
        assert dedup.check("again", " ".join(text)) == "forward"

    def test_shingle_hashes_do_not_collide(self) -> None:
        # Two shingles collide only if a +-1/0 combination of the weights, not all zero,
        # times the word hashes sums to 0 mod 2^64: odds 2^-(64 - its factors of two).
        weights = [int(w) for w in _SHINGLE_WEIGHTS]

        def twos(value: int) -> int:  # factors of two of value mod 2^64
            value %= 2**64
            return 64 if not value else (value & -value).bit_length() - 1

        combinations = [c for c in itertools.product((-1, 0, 1), repeat=len(weights)) if any(c)]
        assert max(twos(sum(c * w for c, w in zip(combination, weights, strict=True)))
                   for combination in combinations) <= 4
        vocabulary = [f"w{i}" for i in range(30)]
        triples = list(itertools.product(vocabulary, repeat=3))  # all 27,000, repeated words too
        hashes = np.concatenate([_shingle_hashes(list(triple)) for triple in triples])
        assert len(np.unique(hashes)) == len(triples)

    def test_the_word_cache_forgets_without_changing_a_hash(self) -> None:
        text = words(50, seed=12)
        before = _shingle_hashes(text)
        limit = _word_hashes.limit
        try:
            _word_hashes.limit = 5
            _word_hashes.clear()
            assert np.array_equal(_shingle_hashes(text), before)
            assert len(_word_hashes) <= 5
        finally:
            _word_hashes.limit = limit

    def test_layout_says_the_hashes_changed(self) -> None:
        dtype = MinHash(num_perm=1).hashvalues.dtype.str
        # "minhash-128-<u4-1-14x9" was made with blake2b per shingle and per band: a journal
        # indexed that way is indexed again, not mixed with these.
        assert layout() == f"v2-minhash-128-{dtype}-1-14x9"
        assert Deduplicator().layout == layout()
        assert layout(0.8) != layout() and layout(seed=2) != layout()


class TestBookkeeping:
    def test_check_stores_nothing(self) -> None:
        dedup = Deduplicator()
        index = dedup.index
        assert dedup.check("a", "one two three four") is None
        assert dedup.check("b", "one two three four") is None
        assert len(index) == 0

    def test_readding_a_key_is_a_no_op_and_never_its_own_duplicate(self) -> None:
        dedup = Deduplicator()
        index = dedup.index
        text = " ".join(words(50, seed=4))
        dedup.add("a", text)
        dedup.add("a", text)
        assert len(index) == 1
        assert dedup.check("a", text) is None  # resume re-checks a stored sample
        assert dedup.check_and_add("a", text) is None and len(index) == 1
        assert dedup.check("b", text) == "a"

    def test_deterministic(self) -> None:
        texts = [edited(words(60, seed=5), k % 4, seed=k) for k in range(40)]
        runs = []
        for _ in range(2):
            dedup = Deduplicator(threshold=0.85)
            runs.append([dedup.check_and_add(str(i), t) for i, t in enumerate(texts)])
        assert runs[0] == runs[1] and any(r is not None for r in runs[0])

    @pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.95, 1.0])
    def test_band_layout_favours_recall(self, threshold: float) -> None:
        bands, rows = _band_layout(threshold, 128)
        assert bands * rows <= 128
        assert 1 - (1 - threshold**rows) ** bands >= 0.995

    @pytest.mark.parametrize("when", ["right after", "before the last"])
    def test_find_and_add_sees_what_was_added_since_find(self, when: str) -> None:
        # find_and_add searches again only what came in after find: a copy added between
        # the two calls must be found, whether it is still fresh or merged into old runs.
        rng = random.Random(13)
        base = words(60, seed=14)
        dedup = Deduplicator()
        filler = [" ".join(rng.choice(VOCAB) + str(i) for _ in range(30)) for i in range(3000)]
        for i, text in enumerate(filler[:1000]):
            dedup.add(f"old{i}", text)
        assert dedup.find("x", " ".join(base)) is None
        near, exact = edited(base, 1, seed=15), " ".join(base).upper()
        if when == "right after":
            dedup.add("near", near)
        for i, text in enumerate(filler[1000:]):  # 30,000 postings: sealed, merged
            dedup.add(f"new{i}", text)
        if when != "right after":
            dedup.add("near", near)
        assert dedup.find_and_add("x", " ".join(base)) == ("near", None)
        assert "x" not in dedup.index
        dedup.find("y", " ".join(base))
        dedup.add("exact", exact)
        assert dedup.find_and_add("y", " ".join(base)) == ("exact", None)

    def test_find_then_find_and_add_of_a_new_text_adds_it(self) -> None:
        dedup = Deduplicator()
        text = " ".join(words(30, seed=16))
        assert dedup.find("a", text) is None and dedup.find_and_add("a", text) is None
        assert "a" in dedup.index and dedup.check("b", text) == "a"

    def test_invalid_threshold(self) -> None:
        with pytest.raises(ValueError, match="threshold"):
            Deduplicator(threshold=0.0)


class TestPostings:
    def test_many_entries_across_merged_runs_match_a_dict(self) -> None:
        rng = random.Random(7)
        postings, reference = _Postings(), {}
        keys = [rng.getrandbits(63) - (1 << 62) for _ in range(3000)]
        for value in range(20_000):  # several sealed runs, merged size-tiered, and a fresh dict
            key = rng.choice(keys)
            postings.add([key], value)
            reference.setdefault(key, []).append(value)
        for key in [*rng.sample(keys, 300), 12345]:
            assert sorted(postings.find([key])) == reference.get(key, [])
        pair = keys[:2]
        assert sorted(postings.find(pair)) == sorted(reference.get(pair[0], []) + reference.get(pair[1], []))
        assert len(postings._runs) > 1 and postings._fresh

    def test_since_skips_only_what_is_older(self) -> None:
        rng = random.Random(8)
        postings = _Postings()
        keys = [rng.getrandbits(63) - (1 << 62) for _ in range(500)]
        added = [rng.choice(keys) for _ in range(30_000)]
        for value, key in enumerate(added):  # the value is the entry's place in the order added
            postings.add([key], value)
        assert len(postings) == len(added)
        for since in (0, 1, 4095, 4096, 12_345, 29_000, 30_000):
            query = rng.sample(keys, 5)
            found = postings.find_at(query, since)
            newer = {(i, value) for i, key in enumerate(query) for value in range(since, len(added))
                     if added[value] == key}
            every = {(i, value) for i, key in enumerate(query) for value in range(len(added))
                     if added[value] == key}
            assert newer <= set(found) <= every and len(found) == len(set(found))


class FakeSemantic:
    """A stand-in for an embedding index: says 'paraphrase' texts match key 'p'."""

    def __init__(self) -> None:
        self.added: list[str] = []

    def nearest(self, key: str, text: str) -> tuple[str, float] | None:
        return ("p", 0.95) if "paraphrase" in text else ("p", 0.2)

    def add(self, key: str, text: str) -> None:
        self.added.append(key)


class TestSemanticSeam:
    def test_protocol_is_consulted_after_minhash(self) -> None:
        semantic = FakeSemantic()
        assert isinstance(semantic, Similarity)
        dedup = Deduplicator(semantic=semantic, semantic_threshold=0.9)
        assert dedup.check_and_add("a", "an original sentence here") is None
        assert dedup.check("b", "a paraphrase of it") == "p"
        assert dedup.check("c", "something else entirely") is None
        assert semantic.added == ["a"]


def test_copied_from_finds_exact_and_near_copies_of_its_examples() -> None:
    from gra_async.dedup import copied_from

    seed = ("Write a function that returns the largest of three numbers, and explain how it "
            "compares them one pair at a time before it returns the winner to the caller.")
    refs = {"seed:a": "Name a prime number.", "seed:b": seed}
    assert copied_from(seed.upper() + "!", refs) == "seed:b"  # same text once normalised
    assert copied_from(seed.replace("caller", "user"), refs) == "seed:b"  # Jaccard ~0.92
    assert copied_from("Name a prime number", refs) == "seed:a"
    assert copied_from("Explain why the sky is blue at noon but red at sunset.", refs) is None
    assert copied_from(seed.replace("caller", "user"), refs, threshold=0.99) is None


def test_copied_from_agrees_with_jaccard_on_every_pair() -> None:
    from gra_async.dedup import copied_from, normalize, shingles

    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(12)]
    for _ in range(400):
        text = " ".join(rng.choices(vocab, k=rng.randint(3, 14)))
        other = " ".join(rng.choices(vocab, k=rng.randint(3, 14)))
        threshold = rng.choice([0.3, 0.5, 0.9])
        mine, theirs = shingles(normalize(text)), shingles(normalize(other))
        jaccard = len(mine & theirs) / len(mine | theirs)
        expected = "r" if normalize(text) == normalize(other) or jaccard >= threshold else None
        assert copied_from(text, {"r": other}, threshold) == expected, (text, other, threshold)

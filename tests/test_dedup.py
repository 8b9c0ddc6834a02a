"""Exact and near-duplicate detection, against samples and against seeds."""

from __future__ import annotations

import random

import pytest

from gra_async.config import PlannerConfig
from gra_async.dedup import Deduplicator, Similarity, _band_layout, normalize, shingles
from gra_async.seeds import SeedStore

VOCAB = [f"w{i}" for i in range(400)]


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

    def test_invalid_threshold(self) -> None:
        with pytest.raises(ValueError, match="threshold"):
            Deduplicator(threshold=0.0)


class TestPostings:
    def test_many_entries_across_merged_runs_match_a_dict(self) -> None:
        from gra_async.dedup import _Postings

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

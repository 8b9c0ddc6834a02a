"""What a seed is about: words, keywords, and domains found by clustering.

Clustering is TF-IDF (sparse rows) + spherical k-means, fitted on a fixed-size
sample and then applied to every seed a chunk at a time, so its memory does not
grow with the seed set. Everything here is deterministic: same input, same output.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

# Words that say what kind of request it is, not what it is about: they would name every cluster.
_STOPWORD_TEXT = """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers him his how i if in into is it its itself just
    me more most my no nor not now of off on once only or other our out over own same she should
    so some such than that the their them then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you your
    yours one two use used using uses way may might must get gets make makes need needs like
    write explain describe give list provide create show tell find answer question response
    following example examples short brief simple simply sentence sentences word words please
    given return returns let help know want thing things something include includes e g eg
    new many much every keep keeps less first second last next another each even ever still
    back well good better best better really often usually always never sometimes around since
    however therefore instead rather though although either neither whether yet already
    usually quite almost enough whole part parts time times day days year years kind kinds
    lot lots set sets put puts take takes taken go goes going come comes see seen look looks
    say says said done made able try tries three four five six ten hundred
    common different difference same similar shared together called means mean meaning
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_TOKEN = re.compile(r"[a-z][a-z0-9+#]*")
FIT_SAMPLE = 5000  # seeds the clusters are fitted on; every seed is then assigned in chunks
_MAX_FEATURES = 2000
_KMEANS_ITERATIONS = 50
_KMEANS_RESTARTS = 8  # k-means++ starts; the tightest clustering wins

Matrix: TypeAlias = sp.csr_matrix


def _tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.casefold()) if len(t) > 1 and t not in _STOPWORDS]


def seed_tokens(instruction: str, response: str) -> list[str]:
    """A seed's words. The instruction says what the task is about; counting it twice keeps
    long responses from drowning it out."""
    words = _tokens(instruction)
    return words + words + _tokens(response)


def top_keywords(
    document_frequency: Mapping[str, int], size: int,
    corpus_frequency: Mapping[str, int], total: int, n: int,
) -> list[str]:
    """The words that mark a domain: the share of its seeds using a word, weighted by the
    word's IDF over the whole pool, so words every domain uses sink."""
    size = max(1, size)
    scores = {
        term: round(df / size * (math.log((1 + total) / (1 + corpus_frequency.get(term, 0))) + 1.0), 9)
        for term, df in document_frequency.items()
    }
    return [term for term, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


class _Tfidf:
    """TF-IDF over a vocabulary fixed at fit time (sublinear tf, smooth idf, L2 rows)."""

    def __init__(self, documents: Sequence[list[str]]) -> None:
        df: Counter[str] = Counter()
        for words in documents:
            df.update(set(words))
        keep = sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[:_MAX_FEATURES]
        self.terms = sorted(term for term, _ in keep)
        self.index = {term: i for i, term in enumerate(self.terms)}
        n = len(documents)
        self.idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in self.terms])

    def transform(self, documents: Sequence[list[str]]) -> Matrix:
        rows: list[int] = []
        columns: list[int] = []
        values: list[float] = []
        for row, words in enumerate(documents):
            for term, count in Counter(words).items():
                column = self.index.get(term)
                if column is not None:
                    rows.append(row)
                    columns.append(column)
                    values.append((1.0 + math.log(count)) * self.idf[column])
        matrix = sp.csr_matrix((values, (rows, columns)), shape=(len(documents), len(self.terms)))
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return sp.csr_matrix(sp.diags(1.0 / norms) @ matrix)


def _similarity(points: Matrix, centroids: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    # Rounding keeps argmax ties from flipping on the last bit of a BLAS sum.
    similarity: npt.NDArray[np.float64] = np.asarray(points @ centroids.T, dtype=np.float64)
    return similarity.round(9)


def _kmeans(points: Matrix, k: int, seed: int) -> npt.NDArray[np.float64]:
    """Spherical k-means (cosine), k-means++ start from a fixed seed: same points, same centroids."""
    rng = np.random.default_rng(seed)
    n = points.shape[0]
    centroids = np.zeros((k, points.shape[1]))
    centroids[0] = points[rng.integers(n)].toarray()
    closest = 1.0 - _similarity(points, centroids[:1])[:, 0]
    for c in range(1, k):
        weights = np.clip(closest, 0.0, None)
        total = weights.sum()
        pick = int(rng.choice(n, p=weights / total)) if total > 1e-12 else int(rng.integers(n))
        centroids[c] = points[pick].toarray()
        closest = np.minimum(closest, 1.0 - _similarity(points, centroids[c : c + 1])[:, 0])
    labels = np.full(n, -1)
    for _ in range(_KMEANS_ITERATIONS):
        similarity = _similarity(points, centroids)
        new = np.argmax(similarity, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = points[labels == c]
            if members.shape[0]:
                centre = np.asarray(members.sum(axis=0)).ravel()
            else:  # empty cluster: restart it on the point worst served by its centroid
                fit = similarity[np.arange(n), labels]
                centre = points[int(np.argmin(fit))].toarray().ravel()
            norm = np.linalg.norm(centre)
            centroids[c] = centre / norm if norm > 0 else centre
    return centroids


@dataclass(slots=True)
class DomainModel:
    """Clusters fitted on a sample of seeds; assigns any seed to one of them."""

    tfidf: _Tfidf
    centroids: npt.NDArray[np.float64]

    @classmethod
    def fit(cls, documents: Sequence[list[str]], k: int, seed: int) -> DomainModel:
        tfidf = _Tfidf(documents)
        points = tfidf.transform(documents)
        best: tuple[float, npt.NDArray[np.float64]] | None = None
        for restart in range(_KMEANS_RESTARTS):
            candidate = _kmeans(points, k, seed * _KMEANS_RESTARTS + restart)
            cohesion = round(float(np.max(np.asarray(points @ candidate.T), axis=1).sum()), 6)
            if best is None or cohesion > best[0]:
                best = (cohesion, candidate)
        assert best is not None  # _KMEANS_RESTARTS >= 1
        return cls(tfidf, best[1])

    def assign(self, documents: Sequence[list[str]]) -> tuple[npt.NDArray[np.int64], Matrix]:
        """Each document's cluster, and its TF-IDF rows (their sums name the clusters)."""
        points = self.tfidf.transform(documents)
        labels: npt.NDArray[np.int64] = np.argmax(_similarity(points, self.centroids), axis=1)
        return labels, points

    def name(self, weights: npt.NDArray[np.float64], taken: set[str]) -> str:
        """A cluster's name: its three heaviest words, made unique against `taken`."""
        terms = self.tfidf.terms
        ranked = [terms[i] for i in np.lexsort((np.arange(len(terms)), -np.round(weights, 9)))
                  if weights[i] > 0][:3]
        base = "-".join(ranked) or "general"
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        return name

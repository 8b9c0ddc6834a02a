"""Seeds in, a deterministic stream of generation tasks out (DESIGN.md §1, §2).

The planner is a pure function of (seeds, run seed, round, task index): task i of
round r is the same in every process that loads the same seeds, which is what
makes resume exact without storing the plan. Memory is O(seeds), never O(tasks).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gra_async.config import PlannerConfig
from gra_async.errors import SeedError

__all__ = [
    "Planner",
    "Seed",
    "Task",
    "assign_domains",
    "domain_keywords",
    "load_seeds",
]

INSTRUCTION_FIELDS = ("instruction", "prompt", "question")
INPUT_FIELDS = ("input",)
RESPONSE_FIELDS = ("response", "output", "answer")
DOMAIN_FIELDS = ("domain", "category")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
# Metadata that `datasets.save_to_disk` writes next to the data: not seeds.
_METADATA_FILES = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})


@dataclass(frozen=True, slots=True)
class Seed:
    """One example the generator is shown. `domain` is "" until one is assigned."""

    id: str
    instruction: str
    response: str
    domain: str


@dataclass(frozen=True, slots=True)
class Task:
    """One generation request: which domain, which seed examples."""

    id: str
    round: int
    index: int
    domain: str
    seed_ids: tuple[str, ...]


# --------------------------------------------------------------------------- loading


def _fail(where: str, what: str, todo: str) -> SeedError:
    return SeedError(f"{where}: {what} ({todo})")


def _text(value: Any, name: str, where: str) -> str:
    """Numbers are accepted as text (math sets store answers as numbers); nothing else is."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _fail(where, f"field {name!r} is a {type(value).__name__}, expected text",
                "map a text column with the planner's *_field settings")


def _pick(record: Mapping[str, Any], configured: str | None, candidates: Sequence[str]) -> str | None:
    if configured is not None:
        return configured if configured in record else None
    return next((name for name in candidates if name in record), None)


def _record_to_seed(record: Any, where: str, default_id: str, cfg: PlannerConfig) -> Seed:
    if not isinstance(record, dict):
        raise _fail(where, f"expected a JSON object, found {type(record).__name__}",
                    'write one object per line, like {"instruction": ..., "response": ...}')
    found = ", ".join(sorted(map(str, record))) or "none"
    instruction_key = _pick(record, cfg.instruction_field, INSTRUCTION_FIELDS)
    response_key = _pick(record, cfg.response_field, RESPONSE_FIELDS)
    missing = []
    if instruction_key is None:
        missing.append(cfg.instruction_field or "instruction/prompt/question")
    if response_key is None:
        missing.append(cfg.response_field or "response/output/answer")
    if instruction_key is None or response_key is None:
        raise _fail(where, f"no {' or '.join(missing)} field (found: {found})",
                    "rename the fields or set planner.instruction_field / planner.response_field")
    instruction = _text(record[instruction_key], instruction_key, where).strip()
    response = _text(record[response_key], response_key, where).strip()
    for configured, setting in ((cfg.input_field, "input_field"), (cfg.domain_field, "domain_field")):
        if configured is not None and configured not in record:
            raise _fail(where, f"no {configured!r} field (found: {found})",
                        f"fix planner.{setting} or remove it to detect the field")
    input_key = _pick(record, cfg.input_field, INPUT_FIELDS)
    if input_key is not None:
        extra = _text(record[input_key], input_key, where).strip()
        if extra:
            instruction = f"{instruction}\n\n{extra}" if instruction else extra
    if not instruction:
        raise _fail(where, f"field {instruction_key!r} is empty", "give every seed an instruction")
    if not response:
        raise _fail(where, f"field {response_key!r} is empty", "give every seed a response")
    domain_key = _pick(record, cfg.domain_field, DOMAIN_FIELDS)
    domain = _text(record[domain_key], domain_key, where).strip() if domain_key else ""
    raw_id = record.get("id")
    seed_id = default_id if raw_id is None or raw_id == "" else _text(raw_id, "id", where).strip()
    return Seed(id=seed_id, instruction=instruction, response=response, domain=domain)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _fail(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                    "re-save the file as UTF-8") from None


def _json_lines(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{label}:{number}"
            line = _decode(raw, where).strip()
            if not line:
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise _fail(where, f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})",
                            "fix this line; each line must be one JSON object") from None


def _json_array(text: str, label: str) -> Iterator[tuple[int, Any]]:
    """A whole-file JSON array (Alpaca's own format), items reported by their line."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")

    def skip(index: int) -> int:
        match = whitespace.match(text, index)
        return match.end() if match else index

    def line_of(index: int) -> int:
        return text.count("\n", 0, index) + 1

    index = skip(text.index("[") + 1)
    if index < len(text) and text[index] == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            raise _fail(f"{label}:{exc.lineno}", f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})",
                        "fix the array item") from None
        yield line_of(index), item
        index = skip(end)
        if index < len(text) and text[index] == ",":
            index = skip(index + 1)
            continue
        if index < len(text) and text[index] == "]":
            index = skip(index + 1)
            if index != len(text):
                raise _fail(f"{label}:{line_of(index)}", "text after the closing ]",
                            "remove it")
            return
        raise _fail(f"{label}:{line_of(index)}", "expected , or ] between array items",
                    "fix the JSON array")


def _json_records(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    if path.suffix == ".json":
        with path.open("rb") as handle:
            head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            yield from _json_array(_decode(path.read_bytes(), f"{label}:1"), label)
            return
    yield from _json_lines(path, label)


def _csv_records(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(max(previous_limit, 1 << 26))  # long responses exceed the 128 KiB default
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return
            header = [name.strip() for name in header]
            last_line = reader.line_num
            for row in reader:
                # A quoted cell may span lines: a record starts right after the previous one ends.
                start, last_line = last_line + 1, reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                where = f"{label}:{start}"
                if len(row) > len(header):
                    raise _fail(where, f"{len(row)} cells but {len(header)} header columns",
                                "quote cells that contain commas")
                if len(row) < len(header):
                    raise _fail(where, f"{len(row)} cells but {len(header)} header columns",
                                "give every row one cell per column")
                yield start, dict(zip(header, row, strict=True))
    except UnicodeDecodeError as exc:
        raise _fail(label, f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                    "re-save the file as UTF-8") from None
    except csv.Error as exc:
        raise _fail(label, f"malformed CSV ({exc})", "check the quoting") from None
    finally:
        csv.field_size_limit(previous_limit)


def _arrow_batches(path: Path, label: str) -> Iterator[list[dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                yield batch.to_pylist()
            return
        # `datasets.save_to_disk` writes Arrow IPC streams; plain .arrow files use the file format.
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
        yield from (batch.to_pylist() for batch in table.to_batches(max_chunksize=4096))
    except (pa.ArrowException, OSError) as exc:
        kind = "Parquet" if path.suffix == ".parquet" else "Arrow"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(label, f"cannot read as {kind} ({first})",
                    f"check that the file is a complete {kind} file") from None


def _arrow_records(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    row = 0
    for batch in _arrow_batches(path, label):
        for record in batch:
            row += 1
            yield row, record


def _file_records(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    if path.suffix in (".jsonl", ".json"):
        return _json_records(path, label)
    if path.suffix == ".csv":
        return _csv_records(path, label)
    return _arrow_records(path, label)


def _files(path: Path) -> list[Path]:
    """A directory (e.g. a Hugging Face dataset snapshot) contributes every seed file in it."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                  and p.name not in _METADATA_FILES
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def _load(path: Path, cfg: PlannerConfig) -> list[Seed]:
    if not path.exists():
        raise _fail(str(path), "seeds file not found", "check the --seeds path")
    files = _files(path)
    if not files:
        raise _fail(str(path), "no seed files in this directory",
                    f"add files ending in {', '.join(SUFFIXES)}")
    seeds: list[Seed] = []
    first_seen: dict[str, str] = {}
    for file in files:
        if file.suffix not in SUFFIXES:
            raise _fail(str(file), f"unknown seeds format {file.suffix or '(no suffix)'!r}",
                        f"use a file ending in {', '.join(SUFFIXES)}")
        label = str(file)
        prefix = f"{file.relative_to(path).as_posix()}:" if path.is_dir() else ""
        before = len(seeds)
        try:
            for number, record in _file_records(file, label):
                where = f"{label}:{number}"
                seed = _record_to_seed(record, where, f"{prefix}{number}", cfg)
                if seed.id in first_seen:
                    raise _fail(where, f"duplicate id {seed.id!r} (first at {first_seen[seed.id]})",
                                "make ids unique or drop the id field")
                first_seen[seed.id] = where
                seeds.append(seed)
        except OSError as exc:
            raise _fail(label, f"cannot read ({exc.strerror or exc})", "check permissions") from None
        if len(seeds) == before:
            raise _fail(label, "the file is empty (no seeds in it)",
                        "add seeds, one object per line, or point --seeds at another file")
    return seeds


def load_seeds(path: Path | None, cfg: PlannerConfig) -> list[Seed]:
    """Read seeds from .jsonl/.json/.csv/.parquet/.arrow (or a folder of them); None: bundled set.

    Whole-file problems name the file alone; record problems name `file:line`
    (the physical line for JSON/CSV, the 1-based row for Parquet/Arrow).
    Seeds without a domain keep domain "" until `assign_domains` runs.
    """
    if path is not None:
        return _load(path, cfg)
    bundled = resources.files("gra_async") / "data" / "seeds.jsonl"
    with resources.as_file(bundled) as real_path:
        return _load(real_path, cfg)


# --------------------------------------------------------------------------- domains

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
_FIT_SAMPLE = 5000  # seeds used to fit the clusters; every seed is then assigned in chunks
_MAX_FEATURES = 2000
_KMEANS_ITERATIONS = 50
_KMEANS_RESTARTS = 8  # k-means++ starts; the tightest clustering wins


def _tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.casefold()) if len(t) > 1 and t not in _STOPWORDS]


def _seed_tokens(seed: Seed) -> list[str]:
    # The instruction says what the task is about; counting it twice keeps long responses from
    # drowning it out.
    words = _tokens(seed.instruction)
    return words + words + _tokens(seed.response)


def _ranked(weights: Mapping[str, float], n: int) -> list[str]:
    return [term for term, _ in sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def domain_keywords(
    seeds_of_domain: list[Seed], n: int = 5, *, corpus: Sequence[Seed] | None = None
) -> list[str]:
    """The words that mark a domain: topics to steer the generator. Same input, same output.

    A word scores by the share of the domain's seeds that use it; given the whole
    `corpus`, that share is weighted by the word's IDF there, so words every domain
    uses sink and the domain's own vocabulary rises.
    """
    document_frequency: Counter[str] = Counter()
    for seed in seeds_of_domain:
        document_frequency.update(set(_seed_tokens(seed)))
    corpus_frequency: Counter[str] | None = None
    if corpus is not None:
        corpus_frequency = Counter()
        for seed in corpus:
            corpus_frequency.update(set(_seed_tokens(seed)) & document_frequency.keys())
    return _keywords(document_frequency, len(seeds_of_domain), corpus_frequency,
                     len(corpus) if corpus is not None else 0, n)


def _keywords(
    document_frequency: Mapping[str, int], size: int,
    corpus_frequency: Mapping[str, int] | None, total: int, n: int,
) -> list[str]:
    idf: dict[str, float] = {}
    if corpus_frequency is not None:
        idf = {t: math.log((1 + total) / (1 + corpus_frequency.get(t, 0))) + 1.0
               for t in document_frequency}
    size = max(1, size)
    scores = {t: round(df / size * idf.get(t, 1.0), 9) for t, df in document_frequency.items()}
    return _ranked(scores, n)


class _Tfidf:
    """Tiny TF-IDF over a fixed vocabulary (sublinear tf, smooth idf, L2 rows)."""

    def __init__(self, documents: list[list[str]]) -> None:
        df: Counter[str] = Counter()
        for words in documents:
            df.update(set(words))
        keep = sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[:_MAX_FEATURES]
        self.terms = sorted(term for term, _ in keep)
        self.index = {term: i for i, term in enumerate(self.terms)}
        n = len(documents)
        self.idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in self.terms])

    def transform(self, documents: Sequence[list[str]]) -> npt.NDArray[np.float64]:
        matrix = np.zeros((len(documents), len(self.terms)))
        for row, words in enumerate(documents):
            for term, count in Counter(words).items():
                column = self.index.get(term)
                if column is not None:
                    matrix[row, column] = 1.0 + math.log(count)
        matrix *= self.idf
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        result: npt.NDArray[np.float64] = matrix / norms
        return result


def _kmeans(points: npt.NDArray[np.float64], k: int, seed: int) -> npt.NDArray[np.float64]:
    """Spherical k-means (cosine), k-means++ start from a fixed seed: same points, same centroids."""
    rng = np.random.default_rng(seed)
    n = points.shape[0]
    centroids = np.empty((k, points.shape[1]))
    centroids[0] = points[rng.integers(n)]
    closest = 1.0 - points @ centroids[0]
    for c in range(1, k):
        weights = np.clip(closest, 0.0, None)
        total = weights.sum()
        pick = int(rng.choice(n, p=weights / total)) if total > 1e-12 else int(rng.integers(n))
        centroids[c] = points[pick]
        closest = np.minimum(closest, 1.0 - points @ centroids[c])
    labels = np.full(n, -1)
    for _ in range(_KMEANS_ITERATIONS):
        # Rounding keeps argmax ties from flipping on the last bit of a BLAS sum.
        new = np.argmax(np.round(points @ centroids.T, 9), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = points[labels == c]
            if len(members):
                centre = members.sum(axis=0)
            else:  # empty cluster: restart it on the point worst served by its centroid
                fit = np.round(np.einsum("ij,ij->i", points, centroids[labels]), 9)
                centre = points[int(np.argmin(fit))].copy()
            norm = np.linalg.norm(centre)
            centroids[c] = centre / norm if norm > 0 else centre
    return centroids


def _domain_name(weights: npt.NDArray[np.float64], terms: list[str], taken: set[str]) -> str:
    ranked = [terms[i] for i in np.lexsort((np.arange(len(terms)), -np.round(weights, 9)))
              if weights[i] > 0][:3]
    base = "-".join(ranked) or "general"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def assign_domains(seeds: list[Seed], k: int, seed: int) -> list[Seed]:
    """Give every seed without a domain one, by clustering (TF-IDF + k-means), named by keywords.

    Seeds that have a domain keep it. Same seeds, k and seed -> same domains: the
    plan, and so resume, depends on it.
    """
    unlabelled = [i for i, s in enumerate(seeds) if not s.domain]
    if not unlabelled:
        return list(seeds)
    documents = [_seed_tokens(seeds[i]) for i in unlabelled]
    distinct = len({tuple(sorted(d)) for d in documents})
    k = max(1, min(k, distinct))
    if len(documents) > _FIT_SAMPLE:
        fit_rows = sorted(random.Random(f"gra-domains/{seed}").sample(range(len(documents)), _FIT_SAMPLE))
    else:
        fit_rows = list(range(len(documents)))
    tfidf = _Tfidf([documents[i] for i in fit_rows])
    points = tfidf.transform([documents[i] for i in fit_rows])
    best: tuple[float, npt.NDArray[np.float64]] | None = None
    for restart in range(_KMEANS_RESTARTS):
        candidate = _kmeans(points, k, seed * _KMEANS_RESTARTS + restart)
        cohesion = round(float(np.max(points @ candidate.T, axis=1).sum()), 6)
        if best is None or cohesion > best[0]:
            best = (cohesion, candidate)
    assert best is not None  # _KMEANS_RESTARTS >= 1
    centroids = best[1]
    labels = np.empty(len(documents), dtype=np.int64)
    weights = np.zeros_like(centroids)
    for start in range(0, len(documents), 2048):
        chunk = tfidf.transform(documents[start : start + 2048])
        chunk_labels = np.argmax(np.round(chunk @ centroids.T, 9), axis=1)
        labels[start : start + 2048] = chunk_labels
        np.add.at(weights, chunk_labels, chunk)
    taken = {s.domain for s in seeds if s.domain}
    names = {c: _domain_name(weights[c], tfidf.terms, taken) for c in sorted(set(labels.tolist()))}
    out = list(seeds)
    for position, label in zip(unlabelled, labels.tolist(), strict=True):
        s = out[position]
        out[position] = Seed(id=s.id, instruction=s.instruction, response=s.response,
                             domain=names[label])
    return out


# --------------------------------------------------------------------------- planning


def _rng(*parts: object) -> random.Random:
    """A RNG per (run seed, round, index): Python's hash() is salted per process, sha256 is not."""
    digest = hashlib.sha256("/".join(map(str, ("gra-planner", *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


class Planner:
    """The task stream of a run: domains round-robin (shuffled per cycle), few-shot seeds at random.

    Every domain gets a task once per cycle of `len(domains)` tasks, whatever its size,
    so a small domain is not drowned by a large one.
    """

    def __init__(self, seeds: Iterable[Seed], run_seed: int, few_shot: int) -> None:
        if few_shot < 0:
            raise ValueError("few_shot must be >= 0")
        self.run_seed = run_seed
        self.few_shot = few_shot
        self._by_id: dict[str, Seed] = {}
        self._pools: dict[str, list[str]] = {}
        self._keywords: dict[tuple[str, int], list[str]] = {}
        # Word document frequencies, kept as seeds arrive: keywords then cost a domain's
        # vocabulary, not a pass over every seed (2 s per domain at 100,000 seeds).
        self._corpus_df: Counter[str] = Counter()
        self._domain_df: dict[str, Counter[str]] = {}
        self.add_seeds(list(seeds))
        if not self._by_id:
            raise ValueError("Planner needs at least one seed")

    @property
    def domains(self) -> tuple[str, ...]:
        """Every domain, sorted: the order is part of the plan, so it must not depend on input order."""
        return tuple(sorted(self._pools))

    def __len__(self) -> int:
        return len(self._by_id)

    def add_seeds(self, new: list[Seed]) -> None:
        """Grow the pool (accepted samples join the next round); re-adding the same seed is a no-op."""
        for seed in new:
            if not seed.domain:
                raise ValueError(f"seed {seed.id!r} has no domain (run assign_domains first)")
            known = self._by_id.get(seed.id)
            if known is not None:
                if known != seed:
                    raise ValueError(f"seed id {seed.id!r} is already used by a different seed")
                continue
            self._by_id[seed.id] = seed
            self._pools.setdefault(seed.domain, []).append(seed.id)
            words = set(_seed_tokens(seed))
            self._corpus_df.update(words)
            self._domain_df.setdefault(seed.domain, Counter()).update(words)
            self._keywords.clear()  # keywords weigh words against the whole pool

    def seed(self, id: str) -> Seed:
        """The seed with this id; KeyError when there is none."""
        return self._by_id[id]

    def seeds_of(self, domain: str) -> list[Seed]:
        return [self._by_id[i] for i in self._pools.get(domain, ())]

    def keywords(self, domain: str, n: int = 5) -> list[str]:
        """`domain_keywords` of a domain against the whole pool, cached until the pool grows."""
        key = (domain, n)
        if key not in self._keywords:
            self._keywords[key] = _keywords(
                self._domain_df[domain], len(self._pools[domain]), self._corpus_df,
                len(self._by_id), n)
        return list(self._keywords[key])

    def tasks(self, round: int, start: int = 0) -> Iterator[Task]:
        """Tasks `start`, `start + 1`, ... of a round, without end.

        The pool is fixed when this is called (seeds added later join the next call),
        so the stream does not depend on when `add_seeds` runs.
        """
        if start < 0:
            raise ValueError("start must be >= 0")
        domains = self.domains
        sizes = {d: len(self._pools[d]) for d in domains}
        pools = self._pools
        order: list[str] = []
        cycle = -1
        index = start
        while True:
            if index // len(domains) != cycle:
                cycle = index // len(domains)
                order = list(domains)
                _rng(self.run_seed, round, "cycle", cycle).shuffle(order)
            domain = order[index % len(domains)]
            rng = _rng(self.run_seed, round, index)
            pool = pools[domain]
            picks = rng.sample(range(sizes[domain]), min(self.few_shot, sizes[domain]))
            yield Task(
                id=f"r{round}-{index:07d}",
                round=round,
                index=index,
                domain=domain,
                seed_ids=tuple(pool[p] for p in picks),
            )
            index += 1

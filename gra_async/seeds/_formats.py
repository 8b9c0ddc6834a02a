"""Seed files in, `Seed` records out: one pass, one record at a time.

Formats: JSON lines, a JSON array (Alpaca's own file), CSV, Parquet, Arrow (as
`datasets.save_to_disk` writes it), or a folder of them. A whole-file problem names
the file; a record problem names `file:line` and says what to do about it.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from gra_async.config import PlannerConfig
from gra_async.errors import SeedError

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

def fail(where: str, what: str, todo: str) -> SeedError:
    return SeedError(f"{where}: {what} ({todo})")


def _text(value: Any, name: str, where: str) -> str:
    """Numbers are accepted as text (math sets store answers as numbers); nothing else is."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise fail(where, f"field {name!r} is a {type(value).__name__}, expected text",
               "map a text column with the planner's *_field settings")


def _pick(record: Mapping[str, Any], configured: str | None, candidates: Sequence[str]) -> str | None:
    if configured is not None:
        return configured if configured in record else None
    return next((name for name in candidates if name in record), None)


# Chat records: (list field, speaker key, text key, user speakers, assistant speakers).
_CHATS = (("conversations", "from", "value", ("human", "user"), ("gpt", "assistant")),
          ("messages", "role", "content", ("user",), ("assistant",)))


def _chat_to_fields(record: dict[str, Any], where: str) -> dict[str, Any] | None:
    """A ShareGPT (`conversations`) or OpenAI (`messages`) record as instruction/response:
    the first user turn and the assistant turn after it; None for a record of neither kind."""
    for name, speaker, text, users, assistants in _CHATS:
        turns = record.get(name)
        if name not in record or any(k in record for k in INSTRUCTION_FIELDS):
            continue
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise fail(where, f"field {name!r} is not a list of turns",
                       f'write {name} as [{{"{speaker}": ..., "{text}": ...}}, ...]')
        asked = next((i for i, t in enumerate(turns) if t.get(speaker) in users), None)
        answer = None if asked is None else next(
            (t for t in turns[asked + 1:] if t.get(speaker) in assistants), None)
        if asked is None or answer is None:
            raise fail(where, f"{name} has no {users[0]} turn followed by an {assistants[-1]} "
                       "turn", "give every conversation a question and its answer")
        return {**record, "instruction": _text(turns[asked].get(text), text, where),
                "response": _text(answer.get(text), text, where)}
    return None


def _record_to_seed(record: Any, where: str, default_id: str, cfg: PlannerConfig) -> Seed:
    if not isinstance(record, dict):
        raise fail(where, f"expected a JSON object, found {type(record).__name__}",
                   'write one object per line, like {"instruction": ..., "response": ...}')
    found = ", ".join(sorted(map(str, record))) or "none"
    if cfg.instruction_field is None and cfg.response_field is None:
        record = _chat_to_fields(record, where) or record
    instruction_key = _pick(record, cfg.instruction_field, INSTRUCTION_FIELDS)
    response_key = _pick(record, cfg.response_field, RESPONSE_FIELDS)
    missing = []
    if instruction_key is None:
        missing.append(cfg.instruction_field or "instruction/prompt/question")
    if response_key is None:
        missing.append(cfg.response_field or "response/output/answer")
    if instruction_key is None or response_key is None:
        raise fail(where, f"no {' or '.join(missing)} field (found: {found})",
                   "use instruction/response, alpaca instruction/input/output, sharegpt "
                   "conversations or openai messages, or set planner.instruction_field / "
                   "planner.response_field")
    instruction = _text(record[instruction_key], instruction_key, where).strip()
    response = _text(record[response_key], response_key, where).strip()
    for configured, setting in ((cfg.input_field, "input_field"), (cfg.domain_field, "domain_field")):
        if configured is not None and configured not in record:
            raise fail(where, f"no {configured!r} field (found: {found})",
                       f"fix planner.{setting} or remove it to detect the field")
    input_key = _pick(record, cfg.input_field, INPUT_FIELDS)
    if input_key is not None:
        extra = _text(record[input_key], input_key, where).strip()
        if extra:
            instruction = f"{instruction}\n\n{extra}" if instruction else extra
    if not instruction:
        raise fail(where, f"field {instruction_key!r} is empty", "give every seed an instruction")
    if not response:
        raise fail(where, f"field {response_key!r} is empty", "give every seed a response")
    domain_key = _pick(record, cfg.domain_field, DOMAIN_FIELDS)
    domain = _text(record[domain_key], domain_key, where).strip() if domain_key else ""
    raw_id = record.get("id")
    seed_id = default_id if raw_id is None or raw_id == "" else _text(raw_id, "id", where).strip()
    return Seed(id=seed_id, instruction=instruction, response=response, domain=domain)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})",
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
                raise fail(where, f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})",
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
            raise fail(f"{label}:{exc.lineno}", f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})",
                       "fix the array item") from None
        yield line_of(index), item
        index = skip(end)
        if index < len(text) and text[index] == ",":
            index = skip(index + 1)
            continue
        if index < len(text) and text[index] == "]":
            index = skip(index + 1)
            if index != len(text):
                raise fail(f"{label}:{line_of(index)}", "text after the closing ]",
                           "remove it")
            return
        raise fail(f"{label}:{line_of(index)}", "expected , or ] between array items",
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
                    raise fail(where, f"{len(row)} cells but {len(header)} header columns",
                               "quote cells that contain commas")
                if len(row) < len(header):
                    raise fail(where, f"{len(row)} cells but {len(header)} header columns",
                               "give every row one cell per column")
                yield start, dict(zip(header, row, strict=True))
    except UnicodeDecodeError as exc:
        raise fail(label, f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                   "re-save the file as UTF-8") from None
    except csv.Error as exc:
        raise fail(label, f"malformed CSV ({exc})", "check the quoting") from None
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
                stream = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i).to_pylist()
                return
            for batch in stream:
                yield batch.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        kind = "Parquet" if path.suffix == ".parquet" else "Arrow"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fail(label, f"cannot read as {kind} ({first})",
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


def _read(path: Path, cfg: PlannerConfig) -> Iterator[tuple[str, Seed]]:
    if not path.exists():
        raise fail(str(path), "seeds file not found", "check the --seeds path")
    files = _files(path)
    if not files:
        raise fail(str(path), "no seed files in this directory",
                   f"add files ending in {', '.join(SUFFIXES)}")
    for file in files:
        if file.suffix not in SUFFIXES:
            raise fail(str(file), f"unknown seeds format {file.suffix or '(no suffix)'!r}",
                       f"use a file ending in {', '.join(SUFFIXES)}")
        label = str(file)
        prefix = f"{file.relative_to(path).as_posix()}:" if path.is_dir() else ""
        empty = True
        try:
            for number, record in _file_records(file, label):
                where = f"{label}:{number}"
                yield where, _record_to_seed(record, where, f"{prefix}{number}", cfg)
                empty = False
        except OSError as exc:
            raise fail(label, f"cannot read ({exc.strerror or exc})", "check permissions") from None
        if empty:
            raise fail(label, "the file is empty (no seeds in it)",
                       "add seeds, one object per line, or point --seeds at another file")


def read_seeds(path: Path | None, cfg: PlannerConfig) -> Iterator[tuple[str, Seed]]:
    """(where, seed) for each record of .jsonl/.json/.csv/.parquet/.arrow files; None: bundled set.

    `where` is `file:line` (the physical line for JSON/CSV, the 1-based row for
    Parquet/Arrow). Ids are not checked for uniqueness here: the seed store does it
    without holding every id in memory. A JSON array is the one format read whole.
    """
    if path is not None:
        yield from _read(path, cfg)
        return
    bundled = resources.files("gra_async") / "data" / "seeds.jsonl"
    with resources.as_file(bundled) as real_path:
        yield from _read(real_path, cfg)

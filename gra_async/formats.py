"""The shapes an export takes: our own provenance rows, and the files trainers read.

    jsonl / parquet   every export field (README: Runs), one fixed Parquet schema
    alpaca            {instruction, input, output}            LLaMA-Factory, axolotl, Stanford Alpaca
    sharegpt          {conversations: [{from, value}, ...]}   LLaMA-Factory, axolotl, FastChat
    openai            {messages: [{role, content}, ...]}      TRL's SFTTrainer, OpenAI fine-tuning
    hf                a `datasets.load_from_disk` directory with a dataset card

The training formats carry the text alone unless provenance is asked for: a trainer that
meets an unknown column either drops it or fails on it. Plain functions over export rows
(`report.sample_row`); writing files is `report.export`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "FORMATS",
    "REFINE_FIELDS",
    "TRAINING_FORMATS",
    "ExportFormat",
    "dataset_card",
    "default_name",
    "hf_schema",
    "llamafactory_entry",
    "sample_schema",
    "training_record",
]

ExportFormat: TypeAlias = Literal["jsonl", "parquet", "alpaca", "sharegpt", "openai", "hf"]
FORMATS: tuple[ExportFormat, ...] = ("jsonl", "parquet", "alpaca", "sharegpt", "openai", "hf")
TRAINING_FORMATS: tuple[ExportFormat, ...] = ("alpaca", "sharegpt", "openai", "hf")
# The text of a sample; everything else in an export row is provenance.
_TEXT = ("instruction", "response")
# A refined sample's link to the dataset it came from: in every format, as it names the
# row a trainer would otherwise not know the source of (`refine`).
REFINE_FIELDS = ("source_id", "origin")
_NAMES: dict[ExportFormat, str] = {
    "jsonl": "samples.jsonl", "parquet": "samples.parquet", "alpaca": "samples.alpaca.json",
    "sharegpt": "samples.sharegpt.jsonl", "openai": "samples.openai.jsonl", "hf": "samples.hf",
}


def default_name(fmt: ExportFormat) -> str:
    """The export's file (or, for `hf`, folder) name in the run directory."""
    return _NAMES[fmt]


def _chat(instruction: str, response: str, fmt: ExportFormat) -> list[dict[str, str]]:
    if fmt == "sharegpt":
        return [{"from": "human", "value": instruction}, {"from": "gpt", "value": response}]
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]


def training_record(
    row: Mapping[str, Any], fmt: ExportFormat, *, with_provenance: bool = False,
) -> dict[str, Any]:
    """One export row in a training format; the provenance fields follow the text when asked."""
    instruction, response = str(row["instruction"] or ""), str(row["response"] or "")
    record: dict[str, Any]
    if fmt == "alpaca":
        # Our instructions hold their context already; Alpaca's readers expect `input` anyway.
        record = {"instruction": instruction, "input": "", "output": response}
    elif fmt == "sharegpt":
        record = {"conversations": _chat(instruction, response, fmt)}
    elif fmt == "openai":
        record = {"messages": _chat(instruction, response, fmt)}
    elif fmt == "hf":
        record = {"instruction": instruction, "response": response,
                  "messages": _chat(instruction, response, fmt)}
    else:
        raise ValueError(f"{fmt} is not a training format")
    record.update((k, row[k]) for k in REFINE_FIELDS if row.get(k) is not None)
    if with_provenance:
        record.update((k, v) for k, v in row.items() if k not in _TEXT and k not in record)
    return record


def llamafactory_entry(fmt: ExportFormat, file_name: str) -> dict[str, Any]:
    """The `dataset_info.json` entry LLaMA-Factory needs to read an export file."""
    if fmt == "alpaca":
        return {"file_name": file_name,
                "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    if fmt == "sharegpt":
        return {"file_name": file_name, "formatting": "sharegpt",
                "columns": {"messages": "conversations"}}
    if fmt == "openai":
        return {"file_name": file_name, "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}
    if fmt in ("jsonl", "parquet"):
        return {"file_name": file_name,
                "columns": {"prompt": "instruction", "response": "response"}}
    raise ValueError(f"LLaMA-Factory has no entry for a {fmt} export")


def sample_schema(criteria: Sequence[str]) -> pa.Schema:
    """The Parquet schema of an export, fixed by the run's criteria and never by its rows.

    Inferred schemas differ with the data (`adjudication: null` in a run that never
    adjudicated), and two such files do not concatenate. Scores are a struct of the
    criteria: `datasets` has no map type, and a struct reads as `scores.correctness`.
    """
    import pyarrow as pa

    string, integer, number = pa.string(), pa.int64(), pa.float64()
    review = pa.struct([("model", string),
                        ("scores", pa.struct([(c, integer) for c in criteria])),
                        ("mean", number), ("feedback", string)])
    return pa.schema([
        ("id", string), ("instruction", string), ("response", string), ("domain", string),
        ("seed_ids", pa.list_(string)), ("generator", string), ("reviews", pa.list_(review)),
        ("mean", number), ("std", number), ("decision", string),
        ("adjudication", pa.struct([("model", string), ("decision", string),
                                    ("reason", string)])),
        ("tokens", integer), ("round", integer),
        ("failed_reviews", pa.list_(pa.struct([("model", string), ("error", string)]))),
        ("duplicate_of", string), ("similarity", number), ("reason", string),
        ("keywords", pa.list_(string)), ("summary", string),
        ("source_id", string), ("origin", string), ("rewrites", integer),
    ])


def hf_schema(criteria: Sequence[str], *, with_provenance: bool,
              refined: bool = False) -> pa.Schema:
    """The `hf` export's columns: the text and its chat form, a refine's source, then
    provenance if asked."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [pa.field("instruction", pa.string()), pa.field("response", pa.string()),
              pa.field("messages", pa.list_(message))]
    if refined:
        fields += [pa.field(name, pa.string()) for name in REFINE_FIELDS]
    if with_provenance:
        fields += [f for f in sample_schema(criteria)
                   if f.name not in _TEXT and f.name not in (REFINE_FIELDS if refined else ())]
    return pa.schema(fields)


def dataset_card(name: str, config: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """The `README.md` of an `hf` export: how the data was made, for whoever trains on it.

    `config` is the run's recorded config (`config.json`), `summary` the export's
    `.summary.json`: counts, rates and the models that spent tokens, per role.
    """
    import orjson

    gate = config.get("gate", {})
    lines = [
        "---", f"pretty_name: {name}", "task_categories:", "- text-generation",
        "tags:", "- synthetic", "- gra", "---", "", f"# {name}", "",
        "Instruction-tuning samples made by gra-async (the GRA method: a generator, a review "
        "panel, an adjudicator for disagreements, deduplication).", "",
        "## Models per role", "", "| role | model | calls | prompt tokens | completion tokens |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {t['role']} | {t['model']} | {t['calls']} | {t['prompt_tokens']} | "
              f"{t['completion_tokens']} |" for t in summary.get("tokens", [])]
    rate = summary.get("acceptance_rate")
    adjudicated = summary.get("adjudication_rate")
    lines += [
        "", "## Gate", "",
        f"- accept when the panel mean is at least {gate.get('accept_mean')} (of 10)",
        f"- adjudicate when the panel's std exceeds {gate.get('disagreement_std')} "
        f"(adjudicator {'on' if gate.get('adjudicator', True) else 'off'})",
        f"- criteria: {', '.join(gate.get('criteria', ()))}",
        "", "## Counts", "",
        f"- samples decided: {summary.get('samples')}",
        f"- decisions: {', '.join(f'{k} {v}' for k, v in summary.get('decisions', {}).items())}",
        f"- acceptance rate: {'n/a' if rate is None else f'{rate:.3f}'}",
        f"- adjudication rate: {'n/a' if adjudicated is None else f'{adjudicated:.3f}'}",
        f"- prompt templates (sha256, first 16): {config.get('prompts_sha256', 'n/a')}",
        f"- seeds (sha256, first 16): {config.get('seeds_sha256', 'n/a')}",
        "", "## The config that made it", "", "```json",
        orjson.dumps(config, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode(),
        "```", "",
    ]
    return "\n".join(lines)

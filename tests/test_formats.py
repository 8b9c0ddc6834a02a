"""`export --format alpaca|sharegpt|openai|hf`: each file read the way its trainer reads it.

LLaMA-Factory loads a local file with `datasets.load_dataset("json" | "parquet", ...)` and
maps columns by its `dataset_info.json` entry; TRL's SFTTrainer takes a `messages` column
of {role, content}; the `hf` folder must open with `datasets.load_from_disk`. The run is a
real one against the fake server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gra_async.cli import main
from gra_async.defaults import CRITERIA

from .conftest import FakeServer
from .test_pipeline import exported, fixed_team, review, synthesize

datasets = pytest.importorskip("datasets")

PROVENANCE = {"id", "domain", "seed_ids", "generator", "reviews", "mean", "std", "decision",
              "adjudication", "tokens"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .conftest import start_fake_server

    server = start_fake_server(latency=0.0)
    try:
        server.control(rules=[{"model": "rev-b", "content": review(9, "clear and right")},
                              {"model": "rev-c", "content": review(8, "good")}])
        run_dir = tmp_path_factory.mktemp("formats") / "run"
        assert synthesize(run_dir, endpoints=fixed_team(server), target=5).reached_target
    finally:
        server.close()
    return run_dir


def export_to(run_dir: Path, fmt: str, out: Path, *flags: str) -> Path:
    assert main(["export", "--run-dir", str(run_dir), "--format", fmt, "--out", str(out),
                 *flags]) == 0
    return out


def load_like_llamafactory(info_dir: Path, name: str) -> list[dict[str, str]]:
    """What LLaMA-Factory's `align_dataset` makes of an entry: (prompt, response) pairs."""
    entry = json.loads((info_dir / "dataset_info.json").read_text())[name]
    path = info_dir / entry["file_name"]
    builder = "parquet" if path.suffix == ".parquet" else "json"
    rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    columns = entry["columns"]
    pairs = []
    for row in rows:
        if entry.get("formatting") == "sharegpt":
            tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                    "assistant_tag": "gpt", **entry.get("tags", {})}
            turns = row[columns["messages"]]
            assert [t[tags["role_tag"]] for t in turns] == [tags["user_tag"], tags["assistant_tag"]]
            pairs.append({"prompt": turns[0][tags["content_tag"]],
                          "response": turns[1][tags["content_tag"]]})
        else:
            prompt = row[columns["prompt"]]
            if columns.get("query") and row[columns["query"]]:
                prompt += "\n" + row[columns["query"]]
            pairs.append({"prompt": prompt, "response": row[columns["response"]]})
    return pairs


class TestTrainingFormats:
    @pytest.mark.parametrize(("fmt", "name"), [("alpaca", "a.json"), ("alpaca", "a.jsonl"),
                                               ("sharegpt", "s.jsonl"), ("sharegpt", "s.json"),
                                               ("openai", "o.jsonl"), ("jsonl", "p.jsonl"),
                                               ("parquet", "p.parquet")])
    def test_llamafactory_reads_every_sample(
        self, run_dir: Path, tmp_path: Path, fmt: str, name: str,
    ) -> None:
        export_to(run_dir, fmt, tmp_path / name, "--llamafactory")
        pairs = load_like_llamafactory(tmp_path, "run")
        want = [{"prompt": s["instruction"], "response": s["response"]} for s in exported(run_dir)]
        assert pairs == want and len(want) == 5

    def test_alpaca_is_exactly_alpaca(self, run_dir: Path, tmp_path: Path) -> None:
        records = json.loads(export_to(run_dir, "alpaca", tmp_path / "a.json").read_text())
        assert isinstance(records, list) and len(records) == 5
        for record in records:
            assert set(record) == {"instruction", "input", "output"}
            assert record["instruction"] and record["output"] and record["input"] == ""

    def test_openai_messages_are_chat_messages(self, run_dir: Path, tmp_path: Path) -> None:
        from openai.types.chat import ChatCompletionMessageParam
        from pydantic import TypeAdapter

        messages = TypeAdapter(list[ChatCompletionMessageParam])
        lines = export_to(run_dir, "openai", tmp_path / "o.jsonl").read_text().splitlines()
        for line in lines:
            record = json.loads(line)
            assert set(record) == {"messages"}  # no provenance a trainer would trip on
            checked = messages.validate_python(record["messages"])
            assert [m["role"] for m in checked] == ["user", "assistant"]

    def test_provenance_only_when_asked(self, run_dir: Path, tmp_path: Path) -> None:
        plain = json.loads(export_to(run_dir, "sharegpt", tmp_path / "s.jsonl")
                           .read_text().splitlines()[0])
        full = json.loads(export_to(run_dir, "sharegpt", tmp_path / "f.jsonl", "--with-provenance")
                          .read_text().splitlines()[0])
        assert set(plain) == {"conversations"}
        assert set(full) >= PROVENANCE and full["conversations"] == plain["conversations"]
        assert full["reviews"][0]["feedback"] == "clear and right"

    def test_entry_joins_an_existing_dataset_info(self, run_dir: Path, tmp_path: Path) -> None:
        (tmp_path / "dataset_info.json").write_text(json.dumps({"alpaca_en": {"file_name": "x"}}))
        export_to(run_dir, "alpaca", tmp_path / "a.json", "--llamafactory")
        info = json.loads((tmp_path / "dataset_info.json").read_text())
        assert set(info) == {"alpaca_en", "run"}


class TestHuggingFace:
    def test_load_from_disk_with_a_card(self, run_dir: Path, tmp_path: Path) -> None:
        folder = export_to(run_dir, "hf", tmp_path / "ds")
        dataset = datasets.load_from_disk(str(folder))
        samples = exported(run_dir)
        assert dataset.num_rows == len(samples) == 5
        assert dataset.column_names == ["instruction", "response", "messages"]
        assert dataset[0]["messages"] == [
            {"role": "user", "content": samples[0]["instruction"]},
            {"role": "assistant", "content": samples[0]["response"]}]
        card = (folder / "README.md").read_text()
        for fact in ("gen-a", "rev-b", "rev-c", "accept when the panel mean is at least 7.0",
                     "acceptance rate: 1.000", "adjudication rate: 0.000", '"prompts_sha256"'):
            assert fact in card

    def test_provenance_columns_and_export_again(self, run_dir: Path, tmp_path: Path) -> None:
        export_to(run_dir, "hf", tmp_path / "ds")
        folder = export_to(run_dir, "hf", tmp_path / "ds", "--with-provenance")  # replaces it
        dataset = datasets.load_from_disk(str(folder))
        assert set(dataset.column_names) >= PROVENANCE
        assert dataset[0]["reviews"][0]["scores"] == dict.fromkeys(CRITERIA, 9)
        assert not list(tmp_path.glob("ds.*"))  # no temporary folder left behind
        assert json.loads((folder / "summary.json").read_text())["samples"] == 5

    def test_llamafactory_refuses_a_folder(self, run_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
        code = main(["export", "--run-dir", str(run_dir), "--format", "hf", "--out",
                     str(tmp_path / "ds"), "--llamafactory"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "--format alpaca" in err


class TestOneParquetSchema:
    def test_two_runs_concatenate_whatever_their_data(
        self, run_dir: Path, tmp_path: Path, fake_server: FakeServer,
    ) -> None:
        # A second run whose reviewers disagree: adjudications, unlike the first run.
        fake_server.control(rules=[{"model": "rev-b", "content": review(10)},
                                   {"model": "rev-c", "content": review(2)},
                                   {"model": "adj-d", "content": json.dumps(
                                       {"decision": "accept", "reason": "the low score is wrong"})}])
        other = tmp_path / "other"
        assert synthesize(other, endpoints=fixed_team(fake_server), target=2).reached_target
        first = pq.read_table(export_to(run_dir, "parquet", tmp_path / "1.parquet"))
        second = pq.read_table(export_to(other, "parquet", tmp_path / "2.parquet"))
        assert first.schema == second.schema
        both = pa.concat_tables([first, second]).to_pylist()
        assert [r["adjudication"] is None for r in both] == [True] * 5 + [False] * 2
        assert both[5]["adjudication"]["reason"] == "the low score is wrong"

    def test_an_empty_export_has_the_schema(self, run_dir: Path, tmp_path: Path,
                                            fake_server: FakeServer) -> None:
        fake_server.control(rules=[{"model": "rev-b", "content": review(1)},
                                   {"model": "rev-c", "content": review(1)}])
        other = tmp_path / "none"
        synthesize(other, endpoints=fixed_team(fake_server), target=1, run={"max_tasks": 2})
        empty = pq.read_table(export_to(other, "parquet", tmp_path / "e.parquet"))
        full = pq.read_table(export_to(run_dir, "parquet", tmp_path / "f.parquet"))
        assert empty.num_rows == 0 and empty.schema == full.schema

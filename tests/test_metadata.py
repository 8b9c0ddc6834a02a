"""Per-sample metadata (keywords, a one-line summary) and replies that only echo their prompt.

The metadata call goes to the sample's generator through the fake server, which answers
it from the sample in the prompt (its words, a sentence about its instruction) unless a
rule scripts it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gra_async.cli import main
from gra_async.errors import InvalidReply
from gra_async.scoring import parse_metadata, parse_review, parse_verdict

from .conftest import FakeServer
from .test_pipeline import exported, fixed_args, fixed_team, review, synthesize

ECHO = "Describe this sample"  # a line of the bundled metadata prompt


def metadata_calls(run_dir: Path) -> list[str]:
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        return [r[0] for r in conn.execute("SELECT task_id FROM calls WHERE role = 'metadata'")]


class TestMetadata:
    def test_every_accepted_sample_is_described(self, fake_server: FakeServer, tmp_path: Path) -> None:
        fake_server.control(rules=[{"contains": "Score the sample", "content": review(9)}])
        synthesize(tmp_path, endpoints=fixed_team(fake_server), target=4)
        samples = exported(tmp_path)
        assert len(samples) == 4
        for sample in samples:
            assert 1 <= len(sample["keywords"]) <= 5
            # The fake model's keywords are words of the instruction: they describe it.
            assert all(k in sample["instruction"].casefold() for k in sample["keywords"])
            assert sample["summary"] and "\n" not in sample["summary"]
            assert sample["summary"] != sample["instruction"]
        assert main(["export", "--run-dir", str(tmp_path), "--format", "parquet"]) == 0
        table = pq.read_table(tmp_path / "samples.parquet").to_pylist()
        assert [r["keywords"] for r in table] == [s["keywords"] for s in samples]

    def test_resume_never_describes_a_sample_twice(self, fake_server: FakeServer, tmp_path: Path) -> None:
        fake_server.control(rules=[{"contains": "Score the sample", "content": review(9)}])
        args = fixed_args(fake_server, tmp_path, "--concurrency", "4")
        assert main([*args, "--target", "3"]) == 0
        first = metadata_calls(tmp_path)
        assert main([*args, "--target", "6"]) == 0
        calls = metadata_calls(tmp_path)
        assert len(calls) == len(set(calls)), "a sample's metadata was asked for twice"
        assert set(first) <= set(calls)
        accepted = {s["id"] for s in exported(tmp_path)}
        assert len(accepted) == 6 and accepted <= set(calls)

    def test_off_switch(self, fake_server: FakeServer, tmp_path: Path) -> None:
        fake_server.control(rules=[{"contains": "Score the sample", "content": review(9)}])
        assert main([*fixed_args(fake_server, tmp_path), "--target", "2", "--no-metadata"]) == 0
        assert metadata_calls(tmp_path) == []
        assert all(s["keywords"] == [] and s["summary"] is None for s in exported(tmp_path))

    def test_a_placeholder_reply_is_asked_again_and_never_kept(
        self, fake_server: FakeServer, tmp_path: Path,
    ) -> None:
        placeholder = json.dumps({"keywords": ["<keyword>"], "summary": "<one line>"})
        fake_server.control(rules=[{"contains": "Score the sample", "content": review(9)},
                                   {"contains": ECHO, "content": placeholder}])
        synthesize(tmp_path, endpoints=fixed_team(fake_server), target=2)
        samples = exported(tmp_path)
        assert len(samples) == 2  # accepted all the same: a sample is never lost to metadata
        assert all(s["keywords"] == [] and s["summary"] is None for s in samples)
        per_task = metadata_calls(tmp_path)
        assert len(per_task) >= 3 * 2  # the first try and two re-asks, per sample


class TestEchoesAreNoReplies:
    INSTRUCTION, RESPONSE = "Explain why the sky is blue.", "Rayleigh scattering of sunlight."

    @pytest.mark.parametrize("reply", [
        {"keywords": ["sky", "light"], "summary": "Explain why the sky is blue."},
        {"keywords": ["sky"], "summary": "<one line>"},
        {"keywords": ["<keyword>"], "summary": "Why the sky looks blue, by scattering."},
        {"keywords": ["keyword"], "summary": "Why the sky looks blue, by scattering."},
        {"keywords": [], "summary": "Why the sky looks blue, by scattering."},
        {"keywords": ["a phrase far too long to be one keyword"], "summary": "Sky colour."},
        {"keywords": ["sky"], "summary": "..."},
    ], ids=["summary-is-instruction", "summary-placeholder", "keyword-placeholder",
            "keyword-word", "no-keywords", "long-keyword", "dots"])
    def test_invalid_metadata(self, reply: dict[str, object]) -> None:
        with pytest.raises(InvalidReply):
            parse_metadata(json.dumps(reply), self.INSTRUCTION, self.RESPONSE)

    def test_valid_metadata_is_cleaned(self) -> None:
        got = parse_metadata(json.dumps({"Keywords": "Sky, light , sky, scattering",
                                         "summary": "Why the sky\nlooks blue."}),
                             self.INSTRUCTION, self.RESPONSE, keywords=2)
        assert got.keywords == ("Sky", "light") and got.summary == "Why the sky looks blue."

    def test_review_feedback_placeholder(self) -> None:
        scores = dict.fromkeys(("correctness", "clarity"), 8)
        with pytest.raises(InvalidReply, match="placeholder"):
            parse_review(json.dumps({"scores": scores, "feedback": "<one or two sentences>"}),
                         ("correctness", "clarity"))
        assert parse_review(json.dumps({"scores": scores, "feedback": "Clear and right."}),
                            ("correctness", "clarity")).feedback == "Clear and right."

    def test_verdict_reason_copied_from_the_prompt(self) -> None:
        with pytest.raises(InvalidReply, match="placeholder"):
            parse_verdict(json.dumps({"decision": "accept", "reason": "one sentence saying why"}))

"""Reply parsing (chatty JSON, score coercion), schemas, panel statistics and every gate branch."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from gra_async import defaults
from gra_async.config import GateConfig
from gra_async.errors import GraError
from gra_async.scoring import (
    Decision,
    InvalidReply,
    PanelScore,
    ReviewReply,
    aggregate,
    decide,
    extract_json,
    generation_schema,
    parse_generation,
    parse_review,
    parse_verdict,
    response_format,
    review_schema,
    verdict_schema,
)

CRITERIA = defaults.CRITERIA


def review_text(scores: dict[str, Any], feedback: str = "ok") -> str:
    return json.dumps({"scores": scores, "feedback": feedback})


def uniform(score: Any) -> dict[str, Any]:
    return {name: score for name in CRITERIA}


def review(*scores: int) -> ReviewReply:
    names = CRITERIA[: len(scores)]
    return ReviewReply.model_validate({"scores": dict(zip(names, scores, strict=True))},
                                 context={"criteria": names})


def reviewer_at(mean_scores: list[int]) -> ReviewReply:
    return parse_review(review_text(dict(zip(CRITERIA, mean_scores, strict=True))), CRITERIA)


# --------------------------------------------------------------------------- extract_json


class TestExtractJson:
    @pytest.mark.parametrize(
        "text",
        [
            '{"a": {"b": "}"}}',
            '  \ufeff{"a": {"b": "}"}}\n',
            'Sure! Here is the JSON:\n```json\n{"a": {"b": "}"}}\n```\nHope it helps {:',
            'Reasoning: use {braces} carefully. {"a": {"b": "}"}} and {"a": 2}',
            '```\n{"a": {"b": "}"}}\n```',
        ],
        ids=["strict", "whitespace-bom", "fenced-chatty", "prose-braces-first", "bare-fence"],
    )
    def test_finds_the_first_object(self, text: str) -> None:
        assert extract_json(text) == {"a": {"b": "}"}}

    def test_strict_json_of_any_type(self) -> None:
        assert extract_json("[1, 2]") == [1, 2]

    def test_escaped_quotes_inside_strings(self) -> None:
        assert extract_json('Answer: {"q": "say \\"{\\" now", "n": 1} end') == {"q": 'say "{" now', "n": 1}

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ("", "empty reply"),
            ("I think it is good.", "not JSON"),
            ("{not: json}", "not JSON"),
            ('{"scores": {"correctness": 8, "feedback": "the answer is cut', "cut off"),
            ('Here: {"scores": {"correctness": 8,', "cut off"),
        ],
        ids=["empty", "prose", "not-json-braces", "truncated-string", "truncated-object"],
    )
    def test_invalid(self, text: str, reason: str) -> None:
        with pytest.raises(InvalidReply) as info:
            extract_json(text)
        assert reason in info.value.reason
        assert isinstance(info.value, GraError)
        assert info.value.excerpt == text[:200]


# --------------------------------------------------------------------------- generation


class TestGeneration:
    def test_valid_with_chat_and_extra_keys(self) -> None:
        sample = parse_generation(
            'Here you go:\n{"Instruction": "  Name a prime. ", "response": "7", "domain": "math"}')
        assert (sample.instruction, sample.response) == ("Name a prime.", "7")

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            ({"instruction": "Q"}, "missing response"),
            ({"instruction": "  ", "response": "A"}, "instruction is empty"),
            ({"instruction": "...", "response": "..."}, "instruction is empty"),
            ({"instruction": "Q", "response": ["A"]}, "response is not a string"),
            (["Q", "A"], "not a JSON object"),
        ],
        ids=["missing", "blank", "copied-shape", "list-value", "array"],
    )
    def test_invalid(self, data: Any, reason: str) -> None:
        with pytest.raises(InvalidReply, match=reason):
            parse_generation(json.dumps(data))


# --------------------------------------------------------------------------- reviews


class TestReview:
    @pytest.mark.parametrize(
        ("raw", "score"),
        [(7, 7), (7.0, 7), ("8", 8), (" 9 ", 9), ("8/10", 8), ("6.0 / 10", 6), (7.5, 8),
         (7.49, 7), (1, 1), (10, 10), (0.5, 1), (10.4, 10)],
    )
    def test_score_coercion(self, raw: Any, score: int) -> None:
        parsed = parse_review(review_text(uniform(raw)), CRITERIA)
        assert parsed.scores == uniform(score)

    @pytest.mark.parametrize(
        ("raw", "reason"),
        [(0, "outside 1-10"), (11, "outside 1-10"), (10.6, "outside 1-10"), (-3, "outside 1-10"),
         (True, "not a number"), ("high", "not a number"), (None, "not a number"),
         ([7], "not a number"), ("NaN", "not a number")],
    )
    def test_invalid_scores(self, raw: Any, reason: str) -> None:
        with pytest.raises(InvalidReply, match=f"^score for correctness .*{reason}"):
            parse_review(review_text(uniform(raw)), CRITERIA)

    def test_nan_literal(self) -> None:
        text = review_text(uniform(5)).replace('"correctness": 5', '"correctness": NaN')
        with pytest.raises(InvalidReply, match="not a number"):
            parse_review(text, CRITERIA)

    def test_missing_criterion_is_named(self) -> None:
        scores = uniform(8)
        del scores["clarity"]
        with pytest.raises(InvalidReply) as info:
            parse_review(review_text(scores), CRITERIA)
        assert info.value.reason == "missing score for clarity"

    def test_keys_case_insensitive_extras_dropped_feedback_optional(self) -> None:
        data = {"Scores": {name.upper(): 6 for name in CRITERIA} | {"humour": 2}}
        parsed = parse_review(json.dumps(data), CRITERIA)
        assert parsed.scores == uniform(6) and parsed.feedback == ""
        assert list(parsed.scores) == list(CRITERIA)

    def test_flat_reply_without_scores_wrapper(self) -> None:
        parsed = parse_review(json.dumps(uniform(9) | {"feedback": "Fine."}), CRITERIA)
        assert parsed.scores == uniform(9) and parsed.feedback == "Fine."

    def test_configured_criteria_only(self) -> None:
        parsed = parse_review('{"scores": {"accuracy": 4}, "feedback": "x"}', ("accuracy",))
        assert parsed.scores == {"accuracy": 4} and parsed.mean == 4.0

    @pytest.mark.parametrize(
        ("text", "reason"),
        [('{"feedback": "good"}', "missing scores"), ('{"scores": [8, 8]}', "scores is not an object"),
         ('{"scores": {}, "feedback": 3}', "missing score for correctness")],
    )
    def test_invalid_shapes(self, text: str, reason: str) -> None:
        with pytest.raises(InvalidReply, match=reason):
            parse_review(text, CRITERIA)


class TestVerdict:
    @pytest.mark.parametrize(("word", "decision"),
                             [("accept", "accept"), ("Accepted", "accept"), (" REJECT. ", "reject"),
                              ("rejected", "reject")])
    def test_normalised(self, word: str, decision: str) -> None:
        verdict = parse_verdict(f'Decision made: {{"decision": "{word}", "reason": "wrong sum"}}')
        assert (verdict.decision, verdict.reason) == (decision, "wrong sum")

    @pytest.mark.parametrize("word", ["maybe", "accept or reject", ""])
    def test_invalid(self, word: str) -> None:
        with pytest.raises(InvalidReply, match="decision"):
            parse_verdict(json.dumps({"decision": word, "reason": "r"}))

    def test_reason_optional(self) -> None:
        assert parse_verdict('{"decision": "reject"}').reason == ""


# --------------------------------------------------------------------------- schemas


class TestSchemas:
    def test_review_schema(self) -> None:
        schema = review_schema(CRITERIA)
        scores = schema["properties"]["scores"]
        assert scores["required"] == list(CRITERIA) and scores["additionalProperties"] is False
        assert all(p == {"type": "integer", "minimum": 1, "maximum": 10, "enum": list(range(1, 11))}
                   for p in scores["properties"].values())
        assert schema["required"] == ["scores", "feedback"] and schema["additionalProperties"] is False

    def test_generation_and_verdict_schemas(self) -> None:
        assert generation_schema()["required"] == ["instruction", "response"]
        assert generation_schema()["additionalProperties"] is False
        verdict = verdict_schema()
        assert verdict["properties"]["decision"]["enum"] == ["accept", "reject"]
        assert verdict["required"] == ["decision", "reason"]

    def test_schemas_are_json(self) -> None:
        for schema in (generation_schema(), review_schema(CRITERIA), verdict_schema()):
            assert json.loads(json.dumps(schema)) == schema

    def test_response_format_modes(self) -> None:
        schema = verdict_schema()
        assert response_format("verdict", schema, "json_schema") == {
            "type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
        assert response_format("verdict", schema, "json_object") == {"type": "json_object", "schema": schema}
        assert response_format("verdict", schema, "none") is None
        with pytest.raises(ValueError, match="schema name"):
            response_format("a verdict!", schema, "json_schema")


# --------------------------------------------------------------------------- panel and gate

GATE = GateConfig()  # accept_mean 7.0, disagreement_std 1.5, adjudicator on


class TestAggregate:
    def test_population_std(self) -> None:
        panel = aggregate([review(8, 6), review(4, 4)])
        assert panel.per_review_means == (7.0, 4.0)
        assert panel.mean == 5.5 and panel.std == 1.5  # sample std would be 2.12

    def test_single_reviewer_has_no_spread(self) -> None:
        assert aggregate([review(9, 8)]) == PanelScore(mean=8.5, std=0.0, per_review_means=(8.5,))

    def test_no_reviews(self) -> None:
        with pytest.raises(ValueError, match="at least one review"):
            aggregate([])


class TestDecide:
    def test_paper_case_study_goes_to_the_adjudicator(self) -> None:
        # Two reviewers rate a flawed sample highly, one sees the flaw: the mean passes,
        # the spread (std ~2.5) sends it to the adjudicator.
        panel = aggregate([reviewer_at([9] * 6), reviewer_at([9] * 6), reviewer_at([4, 4, 4, 4, 3, 3])])
        assert panel.mean >= GATE.accept_mean
        assert math.isclose(panel.std, 2.51, abs_tol=0.01)
        assert decide(panel, GATE) is Decision.ADJUDICATE
        # The ablation without an adjudicator lets the mean decide: the bad sample passes.
        assert decide(panel, GATE.model_copy(update={"adjudicator": False})) is Decision.ACCEPT

    @pytest.mark.parametrize(
        ("mean", "std", "adjudicator", "decision"),
        [
            (8.0, 0.5, True, Decision.ACCEPT),       # high mean, agreement
            (4.0, 0.5, True, Decision.REJECT),       # low mean, agreement
            (7.0, 0.0, True, Decision.ACCEPT),       # exactly at the bar
            (6.99, 0.0, True, Decision.REJECT),
            (8.0, 1.5, True, Decision.ACCEPT),       # std at the threshold is agreement
            (8.0, 1.51, True, Decision.ADJUDICATE),  # disagreement, high mean
            (3.0, 2.0, True, Decision.ADJUDICATE),   # disagreement, low mean
            (8.0, 3.0, False, Decision.ACCEPT),      # no adjudicator: mean decides
            (3.0, 3.0, False, Decision.REJECT),
        ],
    )
    def test_branches(self, mean: float, std: float, adjudicator: bool, decision: Decision) -> None:
        gate = GATE.model_copy(update={"adjudicator": adjudicator})
        assert decide(PanelScore(mean, std, (mean,)), gate) is decision

    def test_float_noise_does_not_reject_at_the_bar(self) -> None:
        assert decide(PanelScore(7.0 - 1e-12, 0.0, (7.0,)), GATE) is Decision.ACCEPT

    def test_no_reviewers_accepts(self) -> None:
        assert decide(None, GATE) is Decision.ACCEPT

    def test_decision_values(self) -> None:
        assert [str(d) for d in Decision] == ["accept", "reject", "adjudicate"]


def test_string_caps_follow_the_token_budget() -> None:
    assert generation_schema(100)["properties"]["instruction"]["maxLength"] == 100
    assert generation_schema(100)["properties"]["response"]["maxLength"] == 250
    assert review_schema(CRITERIA, 200)["properties"]["feedback"]["maxLength"] == 400
    assert verdict_schema(50)["properties"]["reason"]["maxLength"] == 100
    assert "maxLength" not in generation_schema()["properties"]["response"]
